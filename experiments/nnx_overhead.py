"""What ``nnx.jit`` adds to a step, and what SAM costs once it is gone.

::

  python -m experiments.nnx_overhead            # about a minute on a CPU
  python -m experiments.nnx_overhead --rounds 40 --steps 20

A small transformer (``TinyTransformer``: 2 pre-norm blocks of 2-head
attention and an MLP, width 64, 32 tokens a sequence, batch 16, about 70k
parameters) trains with SGD (the base) and with SAM through
``nnx.Optimizer``, each step called three ways:

- ``nnx.jit``: ``train_step(model, optimizer, batch)``; every call walks the
  model's and the optimizer's graphs in Python, before and after the
  compiled program;
- ``nnx.cached_partial(train_step, model, optimizer)(batch)``: the walk is
  cached;
- the functional split: ``nnx.split`` once, a ``jax.jit`` of a pure step
  that ``nnx.merge``\\ s inside, the state carried by the caller.

Steps are timed in interleaved rounds (each form and optimizer in turn, the
loss blocked on), medians over rounds. Prints milliseconds per step, the SAM /
base ratio per form, and what ``nnx.jit`` adds over the functional split.
"""

import argparse
from collections.abc import Callable
import statistics
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import reporting
import sam_optax
import sam_optax.flax

VOCAB, LENGTH, WIDTH, HEADS, BLOCKS, CLASSES, BATCH = 64, 32, 64, 2, 2, 10, 16


class Block(nnx.Module):
  """Pre-norm attention and MLP, each with a residual."""

  def __init__(self, rngs: nnx.Rngs):
    self.attention_norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=HEADS,
      in_features=WIDTH,
      decode=False,
      deterministic=True,
      rngs=rngs,
    )
    self.mlp_norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.hidden = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.out = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x))
    return x + self.out(nnx.gelu(self.hidden(self.mlp_norm(x))))


class TinyTransformer(nnx.Module):
  """Token and position embeddings, ``BLOCKS`` blocks, a mean-pooled head."""

  def __init__(self, rngs: nnx.Rngs):
    self.tokens = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
    self.positions = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (LENGTH, WIDTH))
    )
    self.blocks = nnx.List([Block(rngs) for _ in range(BLOCKS)])
    self.norm = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.tokens(tokens) + self.positions[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(axis=1))


def per_example_loss(model: TinyTransformer, batch: dict) -> jax.Array:
  logits = model(batch["tokens"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


def make_batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {
    "tokens": jnp.asarray(rng.integers(0, VOCAB, (BATCH, LENGTH)), jnp.int32),
    "label": jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32),
  }


def train_step(model, optimizer, batch, use_sam: bool):
  """One step; SAM's transform gets ``loss_fn`` and ``batch``."""
  loss, grads = nnx.value_and_grad(lambda m: per_example_loss(m, batch).mean())(
    model
  )
  if use_sam:
    loss_fn = sam_optax.flax.nnx_loss_fn(model, per_example_loss)
    optimizer.update(model, grads, loss_fn=loss_fn, batch=batch)
  else:
    optimizer.update(model, grads)
  return loss


def tx_for(use_sam: bool) -> optax.GradientTransformation:
  base = optax.sgd(0.01, momentum=0.9)
  return optax.chain(sam_optax.sam(0.05), base) if use_sam else base


def steps(use_sam: bool) -> dict[str, Callable[[dict], Any]]:
  """The three forms of one step, each on its own model and optimizer;
  each is called as ``form(batch)`` and returns the loss."""
  forms = {}

  # nnx.jit, called with the graph nodes every time.
  model = TinyTransformer(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx_for(use_sam), wrt=nnx.Param)
  jitted = nnx.jit(train_step, static_argnames="use_sam")
  forms["nnx.jit"] = lambda batch, m=model, o=optimizer: jitted(
    m, o, batch, use_sam=use_sam
  )

  # nnx.cached_partial of the same nnx.jit step.
  model = TinyTransformer(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx_for(use_sam), wrt=nnx.Param)
  cached = nnx.cached_partial(
    nnx.jit(lambda m, o, batch: train_step(m, o, batch, use_sam)),
    model,
    optimizer,
  )
  forms["nnx.cached_partial"] = cached

  # The functional split: a pure step under jax.jit, state carried here.
  model = TinyTransformer(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx_for(use_sam), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def pure(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss = train_step(model, optimizer, batch, use_sam)
    return nnx.state((model, optimizer)), loss

  carried = {"state": state}

  def functional(batch):
    carried["state"], loss = pure(carried["state"], batch)
    return loss

  forms["functional split"] = functional
  return forms


def measure(rounds: int, steps_per_round: int) -> dict[str, dict[str, float]]:
  """Median milliseconds per step, per optimizer and form."""
  batches = [make_batch(seed) for seed in range(4)]
  every = {
    (optimizer, form): fn
    for optimizer in ("base", "sam")
    for form, fn in steps(optimizer == "sam").items()
  }
  for fn in every.values():  # compile, and a few warm steps
    for batch in batches:
      jax.block_until_ready(fn(batch))
  times: dict[tuple[str, str], list[float]] = {key: [] for key in every}
  for _ in range(rounds):
    for key, fn in every.items():
      start = time.perf_counter()
      for t in range(steps_per_round):
        loss = fn(batches[t % len(batches)])
      jax.block_until_ready(loss)
      times[key].append((time.perf_counter() - start) / steps_per_round)
  result: dict[str, dict[str, float]] = {}
  for (optimizer, form), values in times.items():
    result.setdefault(form, {})[optimizer] = 1e3 * statistics.median(values)
  return result


def main(argv=None) -> dict[str, dict[str, float]]:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.nnx_overhead",
    description=__doc__.split("\n")[0],
  )
  parser.add_argument("--rounds", type=int, default=20)
  parser.add_argument("--steps", type=int, default=10, help="per round")
  args = parser.parse_args(argv)
  model = TinyTransformer(nnx.Rngs(0))
  size = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  result = measure(args.rounds, args.steps)
  print(reporting.describe_machine(reporting.machine()))
  print(
    f"TinyTransformer, {size} parameters, batch {BATCH} × {LENGTH} tokens;"
    f" median of {args.rounds} rounds of {args.steps} steps"
  )
  functional = result["functional split"]
  rows = [("form", "base ms/step", "SAM ms/step", "SAM / base", "+ ms/step")]
  for form, entry in result.items():
    rows.append(
      (
        form,
        f"{entry['base']:.2f}",
        f"{entry['sam']:.2f}",
        f"{entry['sam'] / entry['base']:.2f}",
        f"{entry['base'] - functional['base']:+.2f} /"
        f" {entry['sam'] - functional['sam']:+.2f}",
      )
    )
  print(
    reporting.text_table("nnx.jit's per-call overhead", rows)
    + "\n(+ ms/step: over the functional split, base / SAM)"
  )
  return result


if __name__ == "__main__":
  main()
