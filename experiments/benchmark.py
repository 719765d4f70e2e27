"""Step-time benchmark: SGD, SAM, m-SAM in every formulation, and the rest.

::

  python -m experiments.benchmark            # quick: 3 interleaved repeats
  python -m experiments.benchmark --full     # 10 repeats of 3 steps each
  python -m experiments.benchmark --only 'm_sam/vmap' --micro-batch-sizes 16

Times one jitted train step (clean pass, the transform, SGD with momentum) per
variant, in one process, on random data of CIFAR shape (``[B, 32, 32, 3]``,
nothing is downloaded): the small CNN of ``experiments.models.SmallCNN`` on a
CPU, ResNet-18 (CIFAR variant, BatchNorm) on a GPU (``--model`` overrides).
Repeats are interleaved (every variant once per round, the order rotating
between rounds), so a change in the machine's load hits all variants alike;
each ratio is the median over rounds of the per-round ratio. Prints, per
variant, the median step time, its compiled FLOPs and bytes accessed,
compile time and memory, then the ratios the issue asks for with their
targets.

The variants: ``sgd``; ``sam``; ``m_sam/vmap/m=M`` and ``m_sam/unrolled/m=M``
(the two one-program forms of :func:`sam_optax.m_sam`, ``"auto"`` picks the
latter on a CPU); ``m_sam/vmap/m=16/chunk=C`` (memory-bounded: chunks of ``C``
micro-batches in a ``lax`` loop); the sequential forms ``m_sam/loop/m=M`` (one
micro-batch per iteration of a ``lax`` loop inside the step) and
``m_sam/sequential/m=M`` (the papers' way: a Python loop calling a jitted SAM
step per micro-batch); and ``asam``, ``f_sam``, ``rw_sam``, ``rw_asam``,
``gsam``, ``wsam``, ``vasso``, ``momentum_sam`` and LookSAM's two kinds of
step, ``look_sam/sam_step`` (its SAM step, every ``k``-th) and
``look_sam/between`` (the steps in between, without the perturbed pass):
with ``k = 5`` a LookSAM step costs on average ``(sam_step + 4 between) / 5``.

Cost: XLA's cost analysis of each compiled step (``compiled.cost_analysis()``):
``flops`` and ``bytes accessed``, a device-independent view of the work that
holds on a GPU too (the sequential form: its micro-step times the number of
micro-batches, plus the clean pass and the update). A step with a
``jax.lax.cond`` (LookSAM) reports its costlier branch; LookSAM's rows are
therefore measured on the step compiled with the optimizer state as a
constant, where XLA keeps only the branch that state selects (their times are
those of the real step, the counter an argument).

Memory: XLA's buffer assignment for the compiled step
(``compiled.memory_analysis()``): ``temp`` is the working memory beyond the
inputs and outputs (where m-SAM's per-micro-batch perturbed weights live) and
``total`` adds the step's inputs and outputs (parameters, optimizer state,
batch): an upper bound on what the step holds at once. On a GPU the
process's peak device memory is printed as well.

The variants are a registry (:func:`variants`): a new transform is one entry.
"""

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import functools
import json
import re
import shlex
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import models
from experiments import nnx_glue
from experiments import reporting
from experiments import steps as steps_lib
import sam_optax

RHO = 0.05
LEARNING_RATE = 0.1
LOOK_SAM_EVERY_K = 5


@dataclasses.dataclass(frozen=True)
class Setup:
  """The model, data and settings every variant runs on."""

  graphdef: Any
  params: Any
  state: Any
  batch: dict[str, jax.Array]
  micro_batch_sizes: tuple[int, ...]
  chunked_micro_batch_size: int
  sequential_micro_batch_sizes: tuple[int, ...]
  per_example_loss: Callable[..., Any] = steps_lib.per_example_loss
  """``(model, batch) -> (losses [B], aux)``, the loss of every pass."""


@dataclasses.dataclass
class Runner:
  """A compiled variant: ``run()`` takes one train step and blocks."""

  run: Callable[[], None]
  compile_seconds: float
  temp_bytes: int
  total_bytes: int
  flops: float = -1.0
  bytes_accessed: float = -1.0


def compiled_memory(compiled: Any) -> tuple[int, int]:
  """``(temporary bytes, total bytes)`` by XLA's memory analysis (-1, -1 if
  not reported)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return -1, -1
  # Arguments + outputs + temporaries (less the outputs aliasing inputs):
  # everything the step holds at once by XLA's buffer assignment.
  total = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )
  return stats.temp_size_in_bytes, total


def compiled_cost(compiled: Any) -> tuple[float, float]:
  """``(flops, bytes accessed)`` by XLA's cost analysis (-1 if not reported)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  cost = cost or {}
  return float(cost.get("flops", -1)), float(cost.get("bytes accessed", -1))


def _compile(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, int, int]:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  return (compiled, seconds, *compiled_memory(compiled))


def _clean_pass(
  setup: Setup, params: Any, state: Any, batch: Any
) -> tuple[Any, Any]:
  """``(∇L_B(w), the model's new state)``: the train step's clean pass."""
  _, grads, new_state, _ = nnx_glue.loss_grad_and_state(
    setup.graphdef, state, setup.per_example_loss, params, batch, has_aux=True
  )
  return grads, new_state


def transform_runner(
  make: Callable[[], optax.GradientTransformationExtraArgs] | None,
  prepare: Callable[[Any], Any] | None = None,
  *,
  whole: bool = False,
) -> Callable[[Setup], Runner]:
  """A train step with ``make()`` chained before SGD (plain SGD if None).

  ``prepare`` maps the initial optimizer state to the one the step runs from
  (e.g. a step counter); the cost is then that of the step compiled with that
  state as a constant, where XLA keeps only the branch it selects. ``whole``:
  ``make()`` is the whole optimizer (bSAM), with no SGD after it.
  """

  def build(setup: Setup) -> Runner:
    base = optax.sgd(LEARNING_RATE, momentum=0.9)
    if whole:
      assert make is not None
      tx = make()
    else:
      tx = base if make is None else optax.chain(make(), base)
    loss_fn = steps_lib.passes_loss_fn(
      setup.graphdef, setup.params, setup.state, setup.per_example_loss
    )

    def train_step(params, state, opt_state, batch, key):
      grads, new_state = _clean_pass(setup, params, state, batch)
      updates, opt_state = tx.update(
        grads, opt_state, params, loss_fn=loss_fn, batch=batch, key=key
      )
      return optax.apply_updates(params, updates), new_state, opt_state

    opt_state = tx.init(setup.params)
    if prepare is not None:
      opt_state = prepare(opt_state)
    args = (
      setup.params,
      setup.state,
      opt_state,
      setup.batch,
      jax.random.key(0),
    )
    compiled, seconds, temp, total = _compile(train_step, *args)
    costed = compiled
    if prepare is not None:
      costed = (
        jax.jit(
          lambda params, state, batch, key: train_step(
            params, state, opt_state, batch, key
          )
        )
        .lower(*args[:2], *args[3:])
        .compile()
      )
    return Runner(
      lambda: jax.block_until_ready(compiled(*args)),
      seconds,
      temp,
      total,
      *compiled_cost(costed),
    )

  return build


def sequential_runner(micro_batch_size: int) -> Callable[[Setup], Runner]:
  """m-SAM as the papers' code runs it: a Python loop of jitted SAM steps.

  One compiled program takes micro-batch ``j`` (a traced index, so it
  compiles once) and adds its SAM gradient to a running sum; a second one
  takes the clean pass (BatchNorm statistics) and the SGD update.
  """

  def build(setup: Setup) -> Runner:
    base = optax.sgd(LEARNING_RATE, momentum=0.9)
    sam = sam_optax.sam(RHO)
    loss_fn = steps_lib.passes_loss_fn(
      setup.graphdef, setup.params, setup.state, setup.per_example_loss
    )
    count = setup.batch["labels"].shape[0] // micro_batch_size

    def micro_step(params, total, batch, j):
      micro = jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(
          x, j * micro_batch_size, micro_batch_size
        ),
        batch,
      )
      gradient, _ = sam.update(
        None, optax.EmptyState(), params, loss_fn=loss_fn, batch=micro
      )
      return optax.tree.add(total, gradient)

    def finish(params, state, opt_state, batch, total):
      _, new_state = _clean_pass(setup, params, state, batch)
      updates, opt_state = base.update(
        optax.tree.scale(1 / count, total), opt_state, params
      )
      return optax.apply_updates(params, updates), new_state, opt_state

    zeros = optax.tree.zeros_like(setup.params)
    opt_state = base.init(setup.params)
    index = jnp.asarray(0, jnp.int32)
    step_c, step_s, step_temp, step_total = _compile(
      micro_step, setup.params, zeros, setup.batch, index
    )
    finish_c, finish_s, finish_temp, finish_total = _compile(
      finish, setup.params, setup.state, opt_state, setup.batch, zeros
    )
    indices = [jnp.asarray(j, jnp.int32) for j in range(count)]

    def run():
      total = zeros
      for j in indices:
        total = step_c(setup.params, total, setup.batch, j)
      jax.block_until_ready(
        finish_c(setup.params, setup.state, opt_state, setup.batch, total)
      )

    step_flops, step_bytes = compiled_cost(step_c)
    finish_flops, finish_bytes = compiled_cost(finish_c)
    return Runner(
      run,
      step_s + finish_s,
      max(step_temp, finish_temp),
      max(step_total, finish_total),
      count * step_flops + finish_flops,
      count * step_bytes + finish_bytes,
    )

  return build


@dataclasses.dataclass(frozen=True)
class Variant:
  """A benchmark entry: a name and how to build its runner from the setup."""

  name: str
  build: Callable[[Setup], Runner]


def _m_sam(
  micro_batch_size: int,
  implementation: str,
  per_chunk: int | None = None,
  name: str | None = None,
) -> Variant:
  suffix = f"/chunk={per_chunk}" if per_chunk else ""
  return Variant(
    name or f"m_sam/{implementation}/m={micro_batch_size}{suffix}",
    transform_runner(
      lambda: sam_optax.m_sam(
        RHO,
        micro_batch_size,
        implementation=implementation,
        micro_batches_per_chunk=per_chunk,
      )
    ),
  )


def variants(setup: Setup) -> list[Variant]:
  """The registry. Add a transform with one ``Variant`` line."""
  entries = [
    Variant("sgd", transform_runner(None)),
    Variant("sam", transform_runner(lambda: sam_optax.sam(RHO))),
  ]
  for m in setup.micro_batch_sizes:
    entries.append(_m_sam(m, "vmap"))
  for m in setup.micro_batch_sizes:
    entries.append(_m_sam(m, "unrolled"))
  # Memory-bounded: chunks of c micro-batches, vmapped, in a lax loop.
  count = setup.batch["labels"].shape[0] // setup.chunked_micro_batch_size
  for per_chunk in (2, 4):
    if per_chunk < count and count % per_chunk == 0:
      entries.append(_m_sam(setup.chunked_micro_batch_size, "vmap", per_chunk))
  # The sequential forms: one micro-batch at a time, in a lax loop inside the
  # step (chunks of 1), and as the papers' code runs it (a Python loop).
  for m in setup.sequential_micro_batch_sizes:
    entries.append(_m_sam(m, "vmap", 1, name=f"m_sam/loop/m={m}"))
    entries.append(Variant(f"m_sam/sequential/m={m}", sequential_runner(m)))
  # The other members of the family.
  entries += [
    Variant("asam", transform_runner(lambda: sam_optax.asam(0.5))),
    Variant("f_sam", transform_runner(lambda: sam_optax.f_sam(RHO))),
    Variant("rw_sam", transform_runner(lambda: sam_optax.rw_sam(RHO, 0.5))),
    Variant("rw_asam", transform_runner(lambda: sam_optax.rw_asam(0.5, 0.5))),
    Variant("gsam", transform_runner(lambda: sam_optax.gsam(RHO))),
    Variant("wsam", transform_runner(lambda: sam_optax.wsam(RHO))),
    Variant("vasso", transform_runner(lambda: sam_optax.vasso(RHO))),
    Variant(
      "momentum_sam", transform_runner(lambda: sam_optax.momentum_sam(RHO))
    ),
  ]
  # LookSAM's two kinds of step, from a state whose counter selects each.
  for name, count in (("look_sam/sam_step", 0), ("look_sam/between", 1)):
    entries.append(
      Variant(
        name,
        transform_runner(
          lambda: sam_optax.look_sam(RHO, LOOK_SAM_EVERY_K),
          functools.partial(_at_step, count=count),
        ),
      )
    )
  return entries


def _at_step(opt_state: Any, count: int) -> Any:
  """``chain(look_sam, sgd)``'s state with LookSAM's counter at ``count``."""
  return (
    opt_state[0]._replace(count=jnp.asarray(count, jnp.int32)),
    *opt_state[1:],
  )


def make_setup(
  model_name: str,
  batch_size: int,
  num_classes: int,
  micro_batch_sizes: Sequence[int],
  chunked: int,
  sequential: Sequence[int],
) -> Setup:
  model = models.create_model(model_name, num_classes=num_classes, seed=0)
  split = nnx_glue.split(model)
  rng = np.random.default_rng(0)
  batch = {
    "inputs": jnp.asarray(
      rng.normal(size=(batch_size, 32, 32, 3)), jnp.float32
    ),
    "labels": jnp.asarray(rng.integers(0, num_classes, size=batch_size)),
  }
  return Setup(
    split.graphdef,
    split.params,
    split.state,
    batch,
    tuple(micro_batch_sizes),
    chunked,
    tuple(sequential),
  )


def without_round(run: Callable[[], Any]) -> Callable[[int], Any]:
  """``run`` as a step of :func:`interleaved_times` (the round unused)."""
  return lambda round_index: run()


def interleaved_times(
  steps: dict[str, Callable[[int], Any]],
  rounds: int,
  steps_per_round: int = 1,
  on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
  """Seconds per step of each ``steps[name]``, one entry a round.

  Round ``r`` calls every ``steps[name](r)`` ``steps_per_round`` times in a
  row, name after name, starting at name ``r mod n`` (so a drift of the
  machine's load falls on every variant alike), and waits for the last
  result (``jax.block_until_ready``) before the clock stops. Ratios are
  best taken round by round (:func:`median_ratio`). ``on_round(r)`` runs
  after each round (a progress line).
  """
  names = list(steps)
  times: dict[str, list[float]] = {name: [] for name in names}
  for round_index in range(rounds):
    shift = round_index % len(names) if names else 0
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      for _ in range(steps_per_round):
        out = steps[name](round_index)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / steps_per_round)
    if on_round is not None:
      on_round(round_index)
  return times


def median_ratio(
  times: dict[str, list[float]], numerator: str, denominator: str
) -> float | None:
  """The median over rounds of ``times[numerator] / times[denominator]``.

  None if either is missing (a variant that was not run).
  """
  if numerator not in times or denominator not in times:
    return None
  return statistics.median(
    a / b for a, b in zip(times[numerator], times[denominator], strict=True)
  )


def report_ratios(
  times: dict[str, list[float]], setup: Setup, on_gpu: bool
) -> list[tuple[str, float, str]]:
  """The ratios asked for, as ``(label, value, target or "")``."""
  rows = [("sam / sgd", median_ratio(times, "sam", "sgd"), "")]
  for implementation in ("vmap", "unrolled"):
    for m in setup.micro_batch_sizes:
      name = f"m_sam/{implementation}/m={m}"
      target = ""
      if implementation == "vmap" and m == 16:
        target = "<= 1.3 (GPU, ResNet-18)" if on_gpu else "<= 2.0 (CPU)"
      rows.append((f"{name} / sam", median_ratio(times, name, "sam"), target))
  for name in times:
    if "/chunk=" in name:
      rows.append((f"{name} / sam", median_ratio(times, name, "sam"), ""))
      whole = name.split("/chunk=")[0]
      rows.append((f"{name} / {whole}", median_ratio(times, name, whole), ""))
  for m in setup.sequential_micro_batch_sizes:
    for form in ("sequential", "loop"):
      sequential = f"m_sam/{form}/m={m}"
      rows.append(
        (f"{sequential} / sam", median_ratio(times, sequential, "sam"), "")
      )
      for implementation in ("vmap", "unrolled"):
        name = f"m_sam/{implementation}/m={m}"
        target = ">= 5" if implementation == "vmap" and m == 8 else ""
        rows.append(
          (
            f"{sequential} / {name} (speed-up)",
            median_ratio(times, sequential, name),
            target,
          )
        )
  for name in (
    "asam",
    "f_sam",
    "rw_sam",
    "rw_asam",
    "gsam",
    "wsam",
    "vasso",
    "momentum_sam",
    "look_sam/sam_step",
    "look_sam/between",
  ):
    rows.append((f"{name} / sam", median_ratio(times, name, "sam"), ""))
  for name in ("momentum_sam", "look_sam/between"):
    rows.append((f"{name} / sgd", median_ratio(times, name, "sgd"), "~1"))
  sam_step = median_ratio(times, "look_sam/sam_step", "sam")
  between = median_ratio(times, "look_sam/between", "sam")
  if sam_step is not None and between is not None:
    k = LOOK_SAM_EVERY_K
    rows.append(
      (
        f"look_sam (k={k}, mean step) / sam",
        (sam_step + (k - 1) * between) / k,
        "",
      )
    )
  return [
    (label, value, target) for label, value, target in rows if value is not None
  ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.benchmark", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--model",
    default="auto",
    choices=["auto", "small_cnn", "resnet18"],
    help="auto: small_cnn on a CPU, resnet18 on a GPU/TPU.",
  )
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--num-classes", type=int, default=100)
  parser.add_argument(
    "--micro-batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64]
  )
  parser.add_argument(
    "--chunked-micro-batch-size",
    type=int,
    default=16,
    help="m of the chunked (memory-bounded) variants.",
  )
  parser.add_argument(
    "--sequential-micro-batch-sizes", type=int, nargs="+", default=[8, 16]
  )
  parser.add_argument(
    "--full",
    action="store_true",
    help="10 rounds of 3 steps (default: 3 rounds of 1).",
  )
  parser.add_argument("--repeats", type=int, help="rounds (overrides).")
  parser.add_argument("--steps", type=int, help="steps per round (overrides).")
  parser.add_argument(
    "--only",
    default=None,
    help="regex on variant names; sgd and sam always run.",
  )
  parser.add_argument("--json", default=None, help="write the results here.")
  args = parser.parse_args(argv)
  repeats = args.repeats or (10 if args.full else 3)
  steps = args.steps or (3 if args.full else 1)
  on_gpu = jax.default_backend() != "cpu"
  model_name = args.model
  if model_name == "auto":
    model_name = "resnet18" if on_gpu else "small_cnn"

  setup = make_setup(
    model_name,
    args.batch_size,
    args.num_classes,
    args.micro_batch_sizes,
    args.chunked_micro_batch_size,
    args.sequential_micro_batch_sizes,
  )
  entries = [
    v
    for v in variants(setup)
    if v.name in ("sgd", "sam")
    or args.only is None
    or re.search(args.only, v.name)
  ]
  machine = reporting.describe_machine(reporting.machine())
  print(machine)
  print(
    "command: python -m experiments.benchmark",
    shlex.join(sys.argv[1:] if argv is None else argv),
  )
  print(
    f"model {model_name}, batch {args.batch_size}, {repeats} rounds x"
    f" {steps} steps, {len(entries)} variants",
    flush=True,
  )

  runners = {}
  for variant in entries:
    runner = variant.build(setup)
    runner.run()  # warm up: first-run allocations
    runners[variant.name] = runner
    print(
      f"  compiled {variant.name} in {runner.compile_seconds:.1f} s", flush=True
    )

  times = interleaved_times(
    {name: without_round(runner.run) for name, runner in runners.items()},
    repeats,
    steps,
    on_round=lambda r: print(f"  round {r + 1}/{repeats} done", flush=True),
  )

  mib = 2.0**20
  print(
    "\n"
    + reporting.markdown_table(
      [
        (
          "variant",
          "median step (ms)",
          "/ sam",
          "GFLOP",
          "FLOPs / sam",
          "accessed (MiB)",
          "compile (s)",
          "temp (MiB)",
          "total (MiB)",
        )
      ]
      + [
        (
          name,
          f"{1e3 * statistics.median(times[name]):.1f}",
          f"{median_ratio(times, name, 'sam'):.2f}",
          f"{runners[name].flops / 1e9:.3f}",
          f"{runners[name].flops / runners['sam'].flops:.2f}",
          f"{runners[name].bytes_accessed / mib:.1f}",
          f"{runners[name].compile_seconds:.1f}",
          f"{runners[name].temp_bytes / mib:.1f}",
          f"{runners[name].total_bytes / mib:.1f}",
        )
        for name in runners
      ]
    )
  )
  ratios = report_ratios(times, setup, on_gpu)
  print(
    "\n"
    + reporting.markdown_table(
      [("ratio (median over rounds)", "value", "target")]
      + [(label, f"{value:.2f}", target) for label, value, target in ratios]
    )
  )
  if on_gpu:
    stats = jax.devices()[0].memory_stats() or {}
    print(
      f"\nprocess peak device memory:"
      f" {stats.get('peak_bytes_in_use', 0) / mib:.0f} MiB"
    )

  results = {
    "machine": machine,
    "argv": list(sys.argv[1:] if argv is None else argv),
    "model": model_name,
    "batch_size": args.batch_size,
    "repeats": repeats,
    "steps": steps,
    "times": times,
    "compile_seconds": {n: r.compile_seconds for n, r in runners.items()},
    "temp_bytes": {n: r.temp_bytes for n, r in runners.items()},
    "total_bytes": {n: r.total_bytes for n, r in runners.items()},
    "flops": {n: r.flops for n, r in runners.items()},
    "bytes_accessed": {n: r.bytes_accessed for n, r in runners.items()},
    "ratios": {label: value for label, value, _ in ratios},
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
