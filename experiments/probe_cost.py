"""What RW-SAM's probe and SAM's perturbation cost on a deep, wide MLP.

::

  python -m experiments.probe_cost                       # RW-SAM vs SAM
  python -m experiments.probe_cost --depth 128 --compile-only
  python -m experiments.probe_cost --plain               # SAM vs by hand

A ``depth``-layer tanh MLP of width ``width`` (``2 · depth`` leaves: a kernel
and a bias per layer; 64 × 256 is 4.2M float32 parameters, 128 leaves), on a
random batch of ``batch`` examples with 10 classes (nothing is downloaded).
Each variant is one jitted train step: the transform, then ``optax.sgd``.

* The default compares ``rw_sam`` (one Rademacher probe, forward
  differences) with ``sam`` and ``sgd``; the targets (issue 21) are RW-SAM's
  step at most 1.25× SAM's and its compile time within 2× SAM's.
* ``--plain`` compares ``sam``'s step with the same step written by hand in
  JAX (``g = ∇L(w)``, ``ε = ρ g / (‖g‖ + δ)``, ``∇L(w + ε)``), with
  ``optax.contrib.sam`` in opaque mode, and with the by-hand step made
  overflow-safe on every step as ``sam`` was before (``by_hand_scaled``:
  the largest entry, a division by it, the norm); the target is ``sam`` at
  most 1.02× the first two.

Steps are interleaved (each variant once per round, the order rotating), so
the machine's load hits all alike; a ratio is the median over rounds of the
per-round ratio. Compile time is ``lower(...).compile()`` of each step (XLA
only, not tracing), taken once per variant in this process, as wall time
and as the process's CPU time (steadier on a shared machine). XLA's
cost analysis gives each step's FLOPs and bytes accessed.
"""

import argparse
from collections.abc import Callable
import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import benchmark
from experiments import reporting
import sam_optax

RHO = 0.05
LEARNING_RATE = 0.01
CLASSES = 10


def mlp(depth: int, width: int, seed: int = 0) -> dict[str, Any]:
  """``depth`` dense layers ``width → width`` (the last ``width → 10``)."""
  rng = np.random.default_rng(seed)
  params = {}
  for layer in range(depth):
    out = CLASSES if layer == depth - 1 else width
    params[f"layer_{layer:03d}"] = {
      "kernel": jnp.asarray(
        rng.normal(size=(width, out)) / np.sqrt(width), jnp.float32
      ),
      "bias": jnp.zeros((out,), jnp.float32),
    }
  return params


def loss_fn(params: Any, batch: Any) -> jax.Array:
  """Per-example softmax cross-entropy of the tanh MLP, shape ``[B]``."""
  x = batch["x"]
  layers = sorted(params)
  for name in layers[:-1]:
    x = jnp.tanh(x @ params[name]["kernel"] + params[name]["bias"])
  logits = x @ params[layers[-1]]["kernel"] + params[layers[-1]]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def mean_loss(params: Any, batch: Any) -> jax.Array:
  return jnp.mean(loss_fn(params, batch))


def random_batch(size: int, width: int, seed: int = 1) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  return {
    "x": jnp.asarray(rng.normal(size=(size, width)), jnp.float32),
    "y": jnp.asarray(rng.integers(0, CLASSES, size=size), jnp.int32),
  }


Step = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any]]


def transform_step(
  tx: optax.GradientTransformationExtraArgs, clean_gradient: bool
) -> tuple[Callable[[Any], Any], Step]:
  """``(init, step)``: ``tx`` then SGD, the clean gradient computed in the
  step when ``clean_gradient`` (else ``updates=None``)."""
  chain = optax.chain(tx, optax.sgd(LEARNING_RATE))

  def step(params: Any, state: Any, batch: Any, key: jax.Array) -> Any:
    grads = jax.grad(mean_loss)(params, batch) if clean_gradient else None
    updates, state = chain.update(
      grads, state, params, loss_fn=loss_fn, batch=batch, key=key
    )
    return optax.apply_updates(params, updates), state

  return chain.init, step


def by_hand_sam_step() -> tuple[Callable[[Any], Any], Step]:
  """SAM then SGD written directly in JAX: one norm, one scale."""

  def step(params: Any, state: Any, batch: Any, key: jax.Array) -> Any:
    del key
    grads = jax.grad(mean_loss)(params, batch)
    norm = optax.tree.norm(grads)
    epsilon = optax.tree.scale(RHO / (norm + 1e-12), grads)
    perturbed = jax.grad(mean_loss)(optax.tree.add(params, epsilon), batch)
    return optax.tree.add_scale(params, -LEARNING_RATE, perturbed), state

  return lambda params: (), step


def by_hand_scaled_sam_step() -> tuple[Callable[[Any], Any], Step]:
  """SAM then SGD with the overflow-safe norm on every step, as ``sam`` did
  before 0.x: the largest entry, a division by it, then the norm."""

  def step(params: Any, state: Any, batch: Any, key: jax.Array) -> Any:
    del key
    grads = jax.grad(mean_loss)(params, batch)
    largest = optax.tree.norm(grads, ord="inf")
    largest = jnp.where(largest > 0, largest, 1.0)
    root = jax.lax.rsqrt(largest)
    scaled = jax.tree.map(lambda g: (g * root) * root, grads)
    factor = RHO / (optax.tree.norm(scaled) + 1e-12 / largest)
    epsilon = optax.tree.scale(factor, scaled)
    perturbed = jax.grad(mean_loss)(optax.tree.add(params, epsilon), batch)
    return optax.tree.add_scale(params, -LEARNING_RATE, perturbed), state

  return lambda params: (), step


def optax_contrib_sam_step() -> tuple[Callable[[Any], Any], Step]:
  """``optax.contrib.sam`` (opaque mode), SGD outer optimizer."""
  # optax's documented SAM: a normalized SGD step as the adversary.
  tx = optax.contrib.sam(
    optax.sgd(LEARNING_RATE),
    optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
    sync_period=2,
    opaque_mode=True,
  )

  def step(params: Any, state: Any, batch: Any, key: jax.Array) -> Any:
    del key
    grads = jax.grad(mean_loss)(params, batch)
    grad_fn = lambda p, _: jax.grad(mean_loss)(p, batch)
    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  return tx.init, step


def variants(plain: bool) -> dict[str, tuple[Callable[[Any], Any], Step]]:
  if plain:
    return {
      "sam": transform_step(sam_optax.sam(RHO), True),
      "by_hand": by_hand_sam_step(),
      "optax_contrib_sam": optax_contrib_sam_step(),
      "by_hand_scaled": by_hand_scaled_sam_step(),
    }
  return {
    "sgd": transform_step(optax.identity(), True),
    "sam": transform_step(sam_optax.sam(RHO), True),
    "rw_sam": transform_step(sam_optax.rw_sam(RHO, 0.5), False),
  }


def cost(compiled: Any) -> dict[str, float]:
  """GFLOPs and GB accessed by XLA's cost analysis (NaN if not reported)."""
  return {
    name: value / 1e9 if value >= 0 else float("nan")
    for name, value in zip(
      ("gflops", "gbytes"), benchmark.compiled_cost(compiled), strict=True
    )
  }


def measure(
  depth: int,
  width: int,
  batch_size: int,
  rounds: int,
  plain: bool,
  compile_only: bool,
) -> None:
  params = mlp(depth, width)
  batch = random_batch(batch_size, width)
  key = jax.random.key(0)
  size = sum(x.size for x in jax.tree.leaves(params))
  print(
    f"MLP depth {depth}, width {width}: {len(jax.tree.leaves(params))}"
    f" leaves, {size / 1e6:.2f}M parameters, batch {batch_size}"
  )
  compiled, states, rows = {}, {}, {}
  for name, (init, step) in variants(plain).items():
    states[name] = init(params)
    lowered = jax.jit(step).lower(params, states[name], batch, key)
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled[name] = lowered.compile()
    rows[name] = {
      "compile_s": time.perf_counter() - start,
      "compile_cpu_s": time.process_time() - cpu_start,
      **cost(compiled[name]),
    }
  times: dict[str, list[float]] = {name: [] for name in compiled}
  if not compile_only:
    for name in compiled:  # warm up
      jax.block_until_ready(compiled[name](params, states[name], batch, key))
    round_keys = [jax.random.fold_in(key, r) for r in range(rounds)]
    times = benchmark.interleaved_times(
      {
        name: functools.partial(
          lambda step, state, r: step(params, state, batch, round_keys[r]),
          step,
          states[name],
        )
        for name, step in compiled.items()
      },
      rounds,
    )
  reference = "sam"
  print(
    f"{'variant':<18} {'step ms':>9} {'/sam':>6} {'compile s':>10}"
    f" {'/sam':>6} {'cpu s':>7} {'/sam':>6} {'GFLOP':>7} {'GB':>7}"
  )
  for name, row in rows.items():
    if times[name]:
      step_ms = 1e3 * statistics.median(times[name])
      ratio = benchmark.median_ratio(times, name, reference)
    else:
      step_ms = ratio = float("nan")
    compile_ratio = row["compile_s"] / rows[reference]["compile_s"]
    cpu_ratio = row["compile_cpu_s"] / rows[reference]["compile_cpu_s"]
    print(
      f"{name:<18} {step_ms:9.1f} {ratio:6.3f} {row['compile_s']:10.2f}"
      f" {compile_ratio:6.2f} {row['compile_cpu_s']:7.2f} {cpu_ratio:6.2f}"
      f" {row['gflops']:7.3f} {row['gbytes']:7.3f}"
    )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depth", type=int, default=64)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--plain", action="store_true")
  parser.add_argument("--compile-only", action="store_true")
  args = parser.parse_args(argv)
  print(reporting.describe_machine(reporting.machine()))
  measure(
    args.depth,
    args.width,
    args.batch,
    args.rounds,
    args.plain,
    args.compile_only,
  )


if __name__ == "__main__":
  main()
