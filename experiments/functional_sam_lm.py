"""AdamW, AdamW + SAM and AdamW + Functional-SAM on a small transformer LM.

A decoder-only transformer (NNX; token and position embeddings, pre-LayerNorm
blocks of causal self-attention and an MLP, a separate output layer) trained
on a synthetic corpus generated here (nothing is downloaded): sequences of a
first-order (``--order 2``: second-order) Markov chain over ``vocab`` tokens whose transition rows are
Dirichlet draws, so the corpus has structure to learn and a known entropy
rate (the best achievable held-out loss). A small training set makes the
held-out loss sensitive to how the optimizer generalizes.

Every optimizer is ``optax.chain(member, optax.adamw(lr, weight_decay))``,
``member`` one of ``identity`` (AdamW), ``sam(rho)``,
``functional_sam(rho)`` and ``functional_sam(rho, precondition=True)``; the
SAM family's ``loss_fn`` is ``sam_optax.flax.nnx_split_loss(model, forward,
output_loss)`` (the logits, then the per-sequence mean token cross-entropy).

  python -m experiments.functional_sam_lm            # the RESULTS.md table
  python -m experiments.functional_sam_lm --steps 20 # a quick smoke run
"""

import argparse
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
import sam_optax.flax


class Block(nnx.Module):
  """Pre-LayerNorm causal self-attention and MLP, with residuals."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    mask = nnx.make_causal_mask(x[..., 0])
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class TransformerLM(nnx.Module):
  """A decoder-only transformer language model: tokens ``[B, T]`` -> logits
  ``[B, T, vocab]``."""

  def __init__(
    self,
    vocab: int,
    length: int,
    dim: int,
    depth: int,
    heads: int,
    rngs: nnx.Rngs,
  ):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.position = nnx.Param(
      0.02 * jax.random.normal(rngs.params(), (length, dim))
    )
    self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[: tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def markov_corpus(
  seed: int,
  vocab: int,
  count: int,
  length: int,
  concentration: float,
  order: int = 1,
) -> tuple[np.ndarray, float]:
  """``count`` sequences of ``length`` tokens from a Markov chain of
  ``order`` 1 or 2 with Dirichlet(``concentration``) rows; and its entropy
  rate (nats per token: the mean entropy of the next-token distribution over
  the sequences' contexts, the best achievable mean loss after the first
  ``order`` tokens)."""
  rng = np.random.default_rng(seed)
  table = rng.dirichlet(np.full(vocab, concentration), size=(vocab,) * order)
  tokens = np.zeros((count, length), np.int32)
  tokens[:, :order] = rng.integers(0, vocab, size=(count, order))
  for t in range(order, length):
    context = tuple(tokens[:, t - k] for k in range(order, 0, -1))
    cumulative = table[context].cumsum(axis=1)
    tokens[:, t] = (rng.random((count, 1)) > cumulative).sum(axis=1)
  tokens = np.minimum(tokens, vocab - 1)
  entropy = -(table * np.log(np.maximum(table, 1e-30))).sum(axis=-1)
  contexts = tuple(
    tokens[:, order - k : length - k] for k in range(order, 0, -1)
  )
  return tokens, float(entropy[contexts].mean())


def forward(model: TransformerLM, batch: dict) -> jax.Array:
  return model(batch["tokens"][:, :-1])


def output_loss(logits: jax.Array, batch: dict) -> jax.Array:
  """Per-sequence mean next-token cross-entropy, shape ``[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch["tokens"][:, 1:]
  ).mean(axis=-1)


def members(rho: float) -> dict:
  return {
    "adamw": optax.with_extra_args_support(optax.identity()),
    "adamw+sam": sam_optax.sam(rho),
    "adamw+functional_sam": sam_optax.functional_sam(rho),
    "adamw+preconditioned_functional_sam": sam_optax.functional_sam(
      rho, precondition=True
    ),
  }


def train(name: str, args: argparse.Namespace, seed: int) -> dict:
  train_tokens, rate = markov_corpus(
    args.corpus_seed,
    args.vocab,
    args.train + args.heldout,
    args.length + 1,
    args.concentration,
    args.order,
  )
  heldout = {"tokens": jnp.asarray(train_tokens[args.train :])}
  train_tokens = train_tokens[: args.train]
  model = TransformerLM(
    args.vocab,
    args.length,
    args.dim,
    args.depth,
    args.heads,
    nnx.Rngs(seed),
  )
  loss_fn = sam_optax.flax.nnx_split_loss(model, forward, output_loss)
  params = nnx.state(model, nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, args.lr, max(args.steps // 10, 1), args.steps
  )
  tx = optax.chain(
    members(args.rho)[name],
    optax.adamw(schedule, weight_decay=args.weight_decay),
  )
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(p, batch).mean())(params)
    updates, state = tx.update(
      grads, state, params, loss_fn=loss_fn, batch=batch
    )
    return optax.apply_updates(params, updates), state, loss

  evaluate = jax.jit(lambda p, b: loss_fn(p, b).mean())
  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  curve = []
  for t in range(args.steps):
    rows = rng.choice(args.train, args.batch, replace=False)
    params, state, _ = step(
      params, state, {"tokens": jnp.asarray(train_tokens[rows])}
    )
    if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
      curve.append((t + 1, float(evaluate(params, heldout))))
  seconds = time.perf_counter() - start
  return {
    "final_heldout": curve[-1][1],
    "best_heldout": min(v for _, v in curve),
    "train_loss": float(
      evaluate(params, {"tokens": jnp.asarray(train_tokens)})
    ),
    "entropy_rate": rate,
    "seconds": seconds,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vocab", type=int, default=32)
  parser.add_argument("--length", type=int, default=32)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--train", type=int, default=256)
  parser.add_argument("--heldout", type=int, default=512)
  parser.add_argument("--concentration", type=float, default=0.2)
  parser.add_argument("--order", type=int, default=1, choices=(1, 2))
  parser.add_argument("--corpus-seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--weight-decay", type=float, default=0.1)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--only", default=None, help="one optimizer name")
  args = parser.parse_args()
  names = [args.only] if args.only else list(members(args.rho))
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {vars(args)}")
  print(
    "| optimizer | held-out loss, final (mean ± sd over seeds) | best |"
    " train loss | s/run |"
  )
  print("|---|---|---|---|---|")
  rate = None
  for name in names:
    runs = [train(name, args, seed) for seed in range(args.seeds)]
    final = np.array([r["final_heldout"] for r in runs])
    best = np.array([r["best_heldout"] for r in runs])
    train_loss = np.array([r["train_loss"] for r in runs])
    rate = runs[0]["entropy_rate"]
    print(
      f"| {name} | {final.mean():.4f} ± {final.std():.4f} |"
      f" {best.mean():.4f} | {train_loss.mean():.4f} |"
      f" {np.mean([r['seconds'] for r in runs]):.0f} |"
    )
  print(f"entropy rate of the corpus (the best held-out loss): {rate:.4f}")


if __name__ == "__main__":
  main()
