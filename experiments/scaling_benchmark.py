"""Scaling benchmark: every variant's cost across model families and sizes.

::

  python -m experiments.scaling_benchmark                  # quick (default)
  python -m experiments.scaling_benchmark --full           # up to ~25M params
  python -m experiments.scaling_benchmark --families mlp --only 'm_sam'

Four model families (:data:`SIZES`): the small CNN, ResNet-18 (CIFAR, with
BatchNorm), a deep tanh MLP and a decoder-only transformer LM (Flax NNX,
:mod:`experiments.models`), each in a few sizes, from about 0.1M to 25M
parameters and 10 to 300 leaves (``--quick``, the default, keeps the small
ones and runs in minutes on 2 CPU cores; ``--full`` adds the large ones).
Random data, nothing is downloaded.

On each model, every variant of the library gets a row: the registry is
:data:`experiments.optimizers.VARIANTS`, so a variant added there is measured
here without a change (called with its defaults; LookSAM's two kinds of step
are timed apart, as in :mod:`experiments.benchmark`). m-SAM gets a row for
``implementation="auto"`` (the plan its cost model chose is printed), for
each form (``vmap``, ``unrolled``, ``sequential``, ``vmap`` in chunks of
``c`` micro-batches) and for the papers' loop: a Python loop calling a
jitted SAM step per micro-batch, then averaging
(:func:`experiments.benchmark.sequential_runner`).

Each row: the median step time and its ratio to SGD's and SAM's (m-SAM's
also to the papers' loop), compile time, XLA's FLOPs and bytes accessed
(``compiled.cost_analysis()``) and temp memory (``memory_analysis()``), all
by :mod:`experiments.benchmark`'s helpers. Steps of one model are
interleaved (every variant once per round, rotating), and each ratio is the
median over rounds of the per-round ratio, so the machine's load hits all
rows alike. The load average is recorded before and after.

Writes ``results.json`` and plots (ratios against parameters and against
leaves; m-SAM's forms against the papers' loop; m-SAM's temp memory against
the chunk size) into ``--output-dir`` (``outputs/scaling``).
"""

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import functools
import math
import os
import pathlib
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

from experiments import benchmark
from experiments import models
from experiments import nnx_glue
from experiments import optimizers
from experiments import reporting
from experiments import steps as steps_lib
import sam_optax
from sam_optax import _micro_batches

PAPERS_LOOP = "m_sam/papers_loop"
"""The row of the papers' m-SAM (a Python loop of jitted SAM steps)."""


@dataclasses.dataclass(frozen=True)
class Size:
  """One model of the benchmark.

  Attributes:
    family: ``small_cnn``, ``resnet18``, ``mlp`` or ``transformer``.
    label: a short name of the size.
    model: the key of :data:`experiments.models.MODELS`.
    kwargs: the model's keyword arguments.
    inputs: ``"image"`` (``[B, 32, 32, 3]``), ``"vector"`` (``[B, d]``,
      ``d = kwargs["in_features"]``) or ``"tokens"`` (``[B, T]``).
    batch_size: ``B``.
    micro_batch_size: m-SAM's ``m``.
    setting: the smallest setting it runs in: ``"tiny"`` (the smoke test),
      ``"quick"`` or ``"full"``.
    num_classes: classes (the vocabulary for tokens).
    length: ``T`` for tokens.
  """

  family: str
  label: str
  model: str
  kwargs: dict[str, Any]
  inputs: str
  batch_size: int
  micro_batch_size: int
  setting: str
  num_classes: int = 10
  length: int = 0


SETTINGS = ("tiny", "quick", "full")

SIZES: tuple[Size, ...] = (
  Size("mlp", "d2w32", "deep_mlp", dict(in_features=32, width=32, depth=2),
       "vector", 16, 4, "tiny"),
  Size("transformer", "d1w32", "transformer_lm",
       dict(dim=32, depth=1, num_heads=2, max_length=8), "tokens", 8, 2,
       "tiny", num_classes=64, length=8),
  Size("small_cnn", "c16", "small_cnn", dict(channels=(16, 32, 64)),
       "image", 64, 8, "full"),
  Size("small_cnn", "c32", "small_cnn", dict(channels=(32, 64, 128)),
       "image", 64, 8, "quick"),
  Size("small_cnn", "c128", "small_cnn", dict(channels=(128, 256, 512)),
       "image", 128, 16, "full"),
  Size("resnet18", "w8", "resnet18", dict(width=8), "image", 32, 8, "quick"),
  Size("resnet18", "w32", "resnet18", dict(width=32), "image", 128, 16,
       "full"),
  Size("resnet18", "w64", "resnet18", dict(width=64), "image", 128, 16,
       "full"),
  Size("mlp", "d8w128", "deep_mlp", dict(in_features=128, width=128, depth=8),
       "vector", 64, 8, "quick"),
  Size("mlp", "d32w128", "deep_mlp",
       dict(in_features=128, width=128, depth=32), "vector", 64, 8, "quick"),
  Size("mlp", "d64w256", "deep_mlp",
       dict(in_features=256, width=256, depth=64), "vector", 128, 16, "full"),
  Size("mlp", "d128w256", "deep_mlp",
       dict(in_features=256, width=256, depth=128), "vector", 128, 16, "full"),
  Size("mlp", "d150w400", "deep_mlp",
       dict(in_features=400, width=400, depth=150), "vector", 128, 16, "full"),
  Size("transformer", "d2w64", "transformer_lm",
       dict(dim=64, depth=2, num_heads=4, max_length=32), "tokens", 32, 8,
       "quick", num_classes=256, length=32),
  Size("transformer", "d4w128", "transformer_lm",
       dict(dim=128, depth=4, num_heads=4, max_length=64), "tokens", 32, 8,
       "quick", num_classes=512, length=64),
  Size("transformer", "d8w256", "transformer_lm",
       dict(dim=256, depth=8, num_heads=8, max_length=128), "tokens", 32, 8,
       "full", num_classes=4096, length=128),
  Size("transformer", "d16w384", "transformer_lm",
       dict(dim=384, depth=16, num_heads=8, max_length=128), "tokens", 32, 8,
       "full", num_classes=8192, length=128),
)  # fmt: skip
"""The models, smallest first within each family."""


def sizes(
  setting: str,
  families: Sequence[str] | None = None,
  labels: Sequence[str] | None = None,
) -> list[Size]:
  """The sizes that run in ``setting`` (quick ⊂ full; ``"tiny"`` runs only
  its own), of ``families`` and with ``labels`` (None: all)."""
  level = SETTINGS.index(setting)
  chosen = [
    size
    for size in SIZES
    if (
      size.setting == "tiny"
      if setting == "tiny"
      else 1 <= SETTINGS.index(size.setting) <= level
    )
  ]
  if families:
    chosen = [size for size in chosen if size.family in families]
  if labels:
    chosen = [size for size in chosen if size.label in labels]
  return chosen


def token_cross_entropy(
  logits: jax.Array, batch: dict[str, jax.Array]
) -> jax.Array:
  """Next-token cross-entropy of the logits ``[B, T, V]``, the mean over
  positions: the per-sequence losses ``[B]``."""
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits, batch["labels"]
  )
  return jnp.mean(losses, axis=-1)


token_loss = steps_lib.SplitPerExampleLoss(
  steps_lib.logits, token_cross_entropy
)
"""A language model's per-sequence loss (float32) and the logits, split into
the model's logits and :func:`token_cross_entropy` of them (so
``functional_sam`` gets the same model)."""


def make_setup(size: Size) -> benchmark.Setup:
  """The model of ``size``, split, and one random batch for it."""
  model = models.create_model(
    size.model, num_classes=size.num_classes, seed=0, **size.kwargs
  )
  split = nnx_glue.split(model)
  rng = np.random.default_rng(0)
  b = size.batch_size
  if size.inputs == "image":
    inputs = jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32)
    labels = rng.integers(0, size.num_classes, size=b)
  elif size.inputs == "vector":
    shape = (b, size.kwargs["in_features"])
    inputs = jnp.asarray(rng.normal(size=shape), jnp.float32)
    labels = rng.integers(0, size.num_classes, size=b)
  else:
    tokens = rng.integers(0, size.num_classes, size=(b, size.length + 1))
    inputs, labels = jnp.asarray(tokens[:, :-1]), tokens[:, 1:]
  m = size.micro_batch_size
  return benchmark.Setup(
    split.graphdef,
    split.params,
    split.state,
    {"inputs": inputs, "labels": jnp.asarray(labels)},
    (m,),
    m,
    (m,),
    token_loss if size.inputs == "tokens" else steps_lib.per_example_loss,
  )


def _m_sam(m: int, **options: Any) -> Callable[[benchmark.Setup], Any]:
  return benchmark.transform_runner(
    lambda: sam_optax.m_sam(benchmark.RHO, m, **options)
  )


def chunk_sizes(count: int) -> list[int]:
  """The chunk sizes of the memory rows: 1, 2, 4, ... below ``count``."""
  return [c for c in (1, 2, 4, 8, 16) if c < count and count % c == 0]


def m_sam_variants(setup: benchmark.Setup) -> list[benchmark.Variant]:
  """m-SAM's rows: auto, every form, chunks, the papers' loop."""
  m = setup.chunked_micro_batch_size
  count = setup.batch["labels"].shape[0] // m
  entries = [benchmark.Variant("m_sam", _m_sam(m))]
  for form in ("vmap", "unrolled", "sequential", "low_rank"):
    entries.append(
      benchmark.Variant(f"m_sam/{form}", _m_sam(m, implementation=form))
    )
  for per_chunk in chunk_sizes(count):
    entries.append(
      benchmark.Variant(
        f"m_sam/vmap/chunk={per_chunk}",
        _m_sam(m, implementation="vmap", micro_batches_per_chunk=per_chunk),
      )
    )
  entries.append(benchmark.Variant(PAPERS_LOOP, benchmark.sequential_runner(m)))
  return entries


BSAM_NUM_DATA = 50_000
"""bSAM's ``N`` in its row (CIFAR's training set; it sets the noise's scale,
not the cost)."""


def variants(setup: benchmark.Setup) -> list[benchmark.Variant]:
  """One row per entry of :data:`experiments.optimizers.VARIANTS` (m-SAM and
  LookSAM: several), each called with its defaults.

  Every row's ``loss_fn`` is the setup's split loss (a
  :class:`sam_optax.SplitLoss`: the model's logits, then a loss of them), so
  ``functional_sam`` runs on the same model as the rest. The whole
  optimizers (:data:`experiments.optimizers.WHOLE_OPTIMIZERS`, bSAM) run
  alone, no SGD after them: their ratios compare their step with SAM +
  SGD's (:data:`WHOLE_NOTE`).
  """
  entries = []
  for name, function in optimizers.VARIANTS.items():
    if function is None:
      entries.append(benchmark.Variant(name, benchmark.transform_runner(None)))
    elif name in optimizers.WHOLE_OPTIMIZERS:
      entries.append(
        benchmark.Variant(
          name,
          benchmark.transform_runner(
            functools.partial(function, benchmark.LEARNING_RATE, BSAM_NUM_DATA),
            whole=True,
          ),
        )
      )
    elif function is sam_optax.m_sam:
      entries += m_sam_variants(setup)
    elif function is sam_optax.look_sam:
      for kind, count in (("sam_step", 0), ("between", 1)):
        entries.append(
          benchmark.Variant(
            f"{name}/{kind}",
            benchmark.transform_runner(
              function, functools.partial(benchmark._at_step, count=count)
            ),
          )
        )
    else:
      entries.append(
        benchmark.Variant(name, benchmark.transform_runner(function))
      )
  return entries


def auto_plan(setup: benchmark.Setup) -> dict[str, Any]:
  """The workload m-SAM's ``"auto"`` sees on ``setup`` and the plan it picks,
  with every form's estimate (relative units)."""
  loss_fn = steps_lib.passes_loss_fn(
    setup.graphdef, setup.params, setup.state, setup.per_example_loss
  )
  micro_batches = _micro_batches.split_micro_batches(
    setup.batch, setup.chunked_micro_batch_size, "scaling_benchmark"
  )
  work = _micro_batches.workload(setup.params, micro_batches, loss_fn)
  plan = _micro_batches.choose(work)._asdict()
  # m_sam's "auto" first asks whether the low-rank form pays (it is not
  # one of _micro_batches' copy forms): report what m_sam actually runs.
  if sam_optax._m_sam.takes_low_rank(
    loss_fn, setup.params, setup.batch, setup.chunked_micro_batch_size
  ):
    plan = {"implementation": "low_rank", "micro_batches_per_chunk": None}
  return {
    "workload": work._asdict(),
    "plan": plan,
    "estimates": {
      name: estimate.cost
      for name, estimate in _micro_batches.estimates(work).items()
    },
  }


def measure(
  size: Size,
  only: str | None,
  repeats: int,
  round_seconds: float,
) -> dict[str, Any]:
  """Compiles and times every variant on ``size``; returns its results."""
  setup = make_setup(size)
  params = sum(x.size for x in jax.tree.leaves(setup.params))
  leaves = len(jax.tree.leaves(setup.params))
  entries = [
    v
    for v in variants(setup)
    if v.name in ("sgd", "sam") or only is None or re.search(only, v.name)
  ]
  print(
    f"\n== {size.family} {size.label}: {params / 1e6:.2f}M parameters,"
    f" {leaves} leaves, batch {size.batch_size}, m-SAM m ="
    f" {size.micro_batch_size} ({size.batch_size // size.micro_batch_size}"
    f" micro-batches), {len(entries)} rows",
    flush=True,
  )
  plan = auto_plan(setup)
  print(f"  auto's plan: {plan['plan']}", flush=True)
  runners, errors = {}, {}
  for variant in entries:
    try:
      runner = variant.build(setup)
      runner.run()  # warm up: first-run allocations
    except Exception as error:
      errors[variant.name] = f"{type(error).__name__}: {error}"[:300]
      print(f"  {variant.name}: {errors[variant.name]}", flush=True)
      continue
    runners[variant.name] = runner
    print(
      f"  compiled {variant.name} in {runner.compile_seconds:.1f} s",
      flush=True,
    )
  # Steps per round: about round_seconds for the slowest row.
  start = time.perf_counter()
  runners["sam"].run()
  steps = max(1, min(20, round(round_seconds / (time.perf_counter() - start))))
  times = benchmark.interleaved_times(
    {
      name: benchmark.without_round(runner.run)
      for name, runner in runners.items()
    },
    repeats,
    steps,
  )
  rows = {}
  for name in runners:
    runner = runners[name]
    rows[name] = {
      "step_seconds": statistics.median(times[name]),
      "vs_sgd": benchmark.median_ratio(times, name, "sgd"),
      "vs_sam": benchmark.median_ratio(times, name, "sam"),
      "vs_papers_loop": (
        benchmark.median_ratio(times, name, PAPERS_LOOP)
        if name.startswith("m_sam")
        else None
      ),
      "compile_seconds": runner.compile_seconds,
      "flops": runner.flops,
      "bytes_accessed": runner.bytes_accessed,
      "temp_bytes": runner.temp_bytes,
      "total_bytes": runner.total_bytes,
    }
  return {
    "family": size.family,
    "label": size.label,
    "model": size.model,
    "kwargs": size.kwargs,
    "batch_size": size.batch_size,
    "micro_batch_size": size.micro_batch_size,
    "params": params,
    "leaves": leaves,
    "param_bytes": sum(x.nbytes for x in jax.tree.leaves(setup.params)),
    "steps_per_round": steps,
    "repeats": repeats,
    "auto": plan,
    "times": times,
    "rows": rows,
    "errors": errors,
    "verdict": verdict(rows, plan),
    "looped": [name for name in rows if _in_a_loop(name, plan)],
  }


def _in_a_loop(name: str, plan: dict[str, Any]) -> bool:
  """Whether row ``name`` runs its micro-batches in a ``lax`` loop."""
  if name == "m_sam":
    chosen = plan["plan"]
    return bool(chosen["micro_batches_per_chunk"]) or (
      chosen["implementation"] == "sequential"
    )
  return name == "m_sam/sequential" or "/chunk=" in name


def verdict(rows: dict[str, Any], plan: dict[str, Any]) -> str:
  """Whether ``m_sam`` (auto) is no slower than the papers' loop, and why not.

  "No slower" allows 5% for timing noise on a shared machine.
  """
  if "m_sam" not in rows or PAPERS_LOOP not in rows:
    return "not measured"
  auto = rows["m_sam"]["vs_papers_loop"]
  chose = plan["plan"]["implementation"]
  if plan["plan"]["micro_batches_per_chunk"]:
    chose += f"/chunk={plan['plan']['micro_batches_per_chunk']}"
  forms = {
    name: row["vs_papers_loop"]
    for name, row in rows.items()
    if name.startswith("m_sam/") and name != PAPERS_LOOP
  }
  best = min(forms, key=forms.get) if forms else None
  if auto <= 1.05:
    return f"ok: auto ({chose}) at {auto:.2f}x the papers' loop"
  if best is not None and forms[best] <= 1.05:
    return (
      f"MISSED: auto ({chose}) at {auto:.2f}x the papers' loop, {best} at"
      f" {forms[best]:.2f}x: the cost model chose wrong here"
    )
  loop, auto_row = rows[PAPERS_LOOP], rows["m_sam"]
  return (
    f"NO FORM REACHES IT: auto ({chose}) at {auto:.2f}x, best form"
    f" {best} at {forms.get(best, float('nan')):.2f}x the papers' loop;"
    f" bytes accessed {auto_row['bytes_accessed'] / 2**20:.0f} MiB vs the"
    f" loop's {loop['bytes_accessed'] / 2**20:.0f} MiB, temp"
    f" {auto_row['temp_bytes'] / 2**20:.1f} vs"
    f" {loop['temp_bytes'] / 2**20:.1f} MiB"
  )


LOOP_NOTE = (
  "* a lax loop inside the step: XLA's cost analysis counts a loop body"
  " once, so its GFLOP and bytes are those of one iteration plus the rest"
  " of the step."
)

WHOLE_NOTE = (
  "bsam is the whole optimizer (bsam(0.1, num_data=50000), its own momentum"
  " and preconditioner, no SGD after it); every other row is the variant"
  " then SGD with momentum, so bsam's / sam compares its step with SAM +"
  " SGD's. It uses no clean gradient: its two passes are at a noisy point"
  " w + z/sqrt(N s) and at the perturbed point (XLA drops the step's unused"
  " clean backward pass; with BatchNorm the clean forward pass stays, for"
  " the running statistics)."
)

FUNCTIONAL_NOTE = (
  "functional_sam runs on the same model through the split loss"
  " (sam_optax.SplitLoss: the logits, then their cross-entropy): with the"
  " clean gradient given it takes a forward pass at w for the clean logits"
  " and one VJP of the model at w + eps, beside the step's clean pass."
)

NOTES = (LOOP_NOTE, WHOLE_NOTE, FUNCTIONAL_NOTE)
"""The notes printed under the tables (and kept in the JSON)."""


def _fmt(value: float | None, form: str = ".2f") -> str:
  return "" if value is None or not math.isfinite(value) else f"{value:{form}}"


def table(result: dict[str, Any]) -> str:
  """``result``'s rows as a Markdown table."""
  mib = 2.0**20
  rows = [
    (
      "variant",
      "step (ms)",
      "/ sgd",
      "/ sam",
      "/ papers' loop",
      "compile (s)",
      "GFLOP",
      "accessed (MiB)",
      "temp (MiB)",
    )
  ]
  for name, row in result["rows"].items():
    looped = name in result.get("looped", ())
    rows.append(
      (
        name + (" *" if looped else ""),
        _fmt(1e3 * row["step_seconds"], ".1f"),
        _fmt(row["vs_sgd"]),
        _fmt(row["vs_sam"]),
        _fmt(row["vs_papers_loop"]),
        _fmt(row["compile_seconds"], ".1f"),
        _fmt(row["flops"] / 1e9, ".3f"),
        _fmt(row["bytes_accessed"] / mib, ".1f"),
        _fmt(row["temp_bytes"] / mib, ".2f"),
      )
    )
  for name, error in result["errors"].items():
    rows.append((name, f"failed: {error}", *[""] * 7))
  return reporting.markdown_table(rows)


def plot(results: Sequence[dict[str, Any]], output_dir: pathlib.Path) -> list:
  """The figures: ratios against parameters and leaves, m-SAM's forms."""
  plt = reporting.pyplot()
  families = sorted({r["family"] for r in results})
  paths = []
  names = sorted({name for r in results for name in r["rows"]})
  for x_key, x_label in (("params", "parameters"), ("leaves", "leaves")):
    figure, axes = plt.subplots(
      1, len(families), figsize=(4.5 * len(families), 4), squeeze=False
    )
    for axis, family in zip(axes[0], families):
      ours = sorted(
        (r for r in results if r["family"] == family), key=lambda r: r[x_key]
      )
      for name in names:
        if name in ("sam",) or "/chunk=" in name:
          continue
        points = [
          (r[x_key], r["rows"][name]["vs_sam"])
          for r in ours
          if name in r["rows"]
        ]
        if points:
          style = "-" if name.startswith("m_sam") else "--"
          axis.plot(*zip(*points), style, marker="o", label=name)
      axis.set_xscale("log")
      axis.set_yscale("log")
      axis.axhline(1.0, color="gray", linewidth=0.5)
      axis.set_title(family)
      axis.set_xlabel(x_label)
      axis.set_ylabel("step time / SAM's")
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    path = output_dir / f"step_vs_sam_by_{x_key}.png"
    reporting.save_figure(figure, path, f"Step time / SAM's, by {x_label}")
    paths.append(path)
  # m-SAM: its forms against the papers' loop, and temp memory by chunk.
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for name in names:
    if not name.startswith("m_sam") or "/chunk=" in name:
      continue
    points = sorted(
      (r["params"], r["rows"][name]["vs_papers_loop"])
      for r in results
      if name in r["rows"]
    )
    left.plot(*zip(*points), "o", label=name)
  left.axhline(1.0, color="gray", linewidth=0.5)
  left.set_xscale("log")
  left.set_yscale("log")
  left.set_xlabel("parameters")
  left.set_ylabel("step time / the papers' loop")
  left.legend(fontsize=7)
  for r in results:
    count = r["batch_size"] // r["micro_batch_size"]
    points = [
      (c, r["rows"][name]["temp_bytes"] / 2**20)
      for c, name in [(c, f"m_sam/vmap/chunk={c}") for c in chunk_sizes(count)]
      + [(count, "m_sam/vmap")]
      if name in r["rows"]
    ]
    if points:
      right.plot(*zip(*points), "o-", label=f"{r['family']} {r['label']}")
  right.set_xscale("log", base=2)
  right.set_yscale("log")
  right.set_xlabel("micro-batches in flight (chunk size; k = vmap)")
  right.set_ylabel("XLA temp memory (MiB)")
  right.legend(fontsize=7)
  path = output_dir / "m_sam_forms.png"
  reporting.save_figure(figure, path, "m-SAM: forms and memory")
  paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.scaling_benchmark",
    description=__doc__.split("\n")[0],
  )
  group = parser.add_mutually_exclusive_group()
  group.add_argument(
    "--quick", action="store_true", help="small sizes (default)."
  )
  group.add_argument("--full", action="store_true", help="all sizes.")
  group.add_argument(
    "--tiny", action="store_true", help="two toy sizes (the smoke test)."
  )
  parser.add_argument(
    "--families",
    nargs="+",
    choices=sorted({s.family for s in SIZES}),
    help="only these families.",
  )
  parser.add_argument(
    "--sizes", nargs="+", help="only these sizes (labels, e.g. d64w256)."
  )
  parser.add_argument(
    "--only", default=None, help="regex on row names; sgd and sam always run."
  )
  parser.add_argument("--repeats", type=int, help="interleaved rounds.")
  parser.add_argument(
    "--round-seconds",
    type=float,
    default=None,
    help="about this long per row and round (sets steps per round).",
  )
  parser.add_argument("--output-dir", default="outputs/scaling")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(argv)
  setting = "full" if args.full else "tiny" if args.tiny else "quick"
  repeats = args.repeats or {"tiny": 2, "quick": 5, "full": 7}[setting]
  round_seconds = args.round_seconds or (0.01 if setting == "tiny" else 0.2)
  argv_list = list(sys.argv[1:] if argv is None else argv)
  machine = reporting.machine()
  print(reporting.describe_machine(machine))
  command = "python -m experiments.scaling_benchmark " + shlex.join(argv_list)
  print("command:", command)
  load_before = os.getloadavg()
  print(f"load average before: {load_before}", flush=True)
  output_dir = pathlib.Path(args.output_dir)
  summary = {
    "machine": machine,
    "command": command,
    "setting": setting,
    "load_average": {"before": load_before},
    "notes": list(NOTES),
    "results": [],
  }
  for size in sizes(setting, args.families, args.sizes):
    summary["results"].append(measure(size, args.only, repeats, round_seconds))
    reporting.write_results(summary, str(output_dir))  # partial results
  results = summary["results"]
  load_after = os.getloadavg()
  summary["load_average"]["after"] = load_after
  for result in results:
    print(
      f"\n### {result['family']} {result['label']}:"
      f" {result['params'] / 1e6:.2f}M parameters, {result['leaves']}"
      f" leaves, batch {result['batch_size']}, m = "
      f"{result['micro_batch_size']}\n"
    )
    print(table(result))
    print(f"\nauto: {result['auto']['plan']}; {result['verdict']}")
  print(f"\nload average after: {load_after}")
  for note in NOTES:
    print(note)
  path = reporting.write_results(summary, str(output_dir))
  print(f"wrote {path}")
  if not args.no_plots:
    for figure in plot(results, output_dir):
      print(f"wrote {figure}")
  return summary


if __name__ == "__main__":
  main()
