"""RW-SAM's norm estimates under bfloat16 compute, and its checks for it.

::

  python -m experiments.precision_check            # every model, 10 draws
  python -m experiments.precision_check --draws 3

(``3e-2`` is what ``calibrate_sigma`` picks for each bfloat16 model here.)

Models (random data, nothing is downloaded; batches of 32):

* ``mlp-f32``: a 5-7-3 tanh MLP, float32 throughout;
* ``mlp-bf16``: the same computing in bfloat16, its loss too;
* ``mlp-bf16-f32-head``: bfloat16 layers with Flax's zero biases and a
  float32 loss head (``logits.astype(float32)``), as ``nnx.Linear(...,
  dtype=jnp.bfloat16)``;
* ``nnx-bf16``: two ``nnx.Linear(dtype=jnp.bfloat16)`` layers (5-8-3) and a
  float32 loss head, through ``sam_optax.flax.nnx_loss_fn``;
* ``cnn-f32``: a 3×3 convolution and a dense head; ``attention-f32``: one
  causal attention block with RMS normalization and a tied head.

For each model and ``σ``: the compute dtype RW-SAM reads from the jaxpr and
whether it warned; over ``draws`` probe draws, one compiled ``rw_sam`` step
each (λ = 0.5, one probe): the effective sample size and
``unresolved_fraction`` of its state, how often the step fell back to SAM's
weights, and how often the old rule (more than a quarter of the estimates
exactly zero) would have; the correlation with the exact norms
(``sam_optax.per_example_gradient_norms``) of one-probe and of 16-probe
estimates.
"""

import argparse
import warnings

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import _precision
import sam_optax.flax

B = 32
LIMIT = sam_optax._rw_sam.UNRESOLVED_LIMIT


def _mlp(key, zero_bias=False):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  bias = lambda k, n: (0.0 if zero_bias else 0.1) * jax.random.normal(k, (n,))
  return {
    "hidden": {
      "kernel": 0.5 * jax.random.normal(k1, (5, 7)),
      "bias": bias(k2, 7),
    },
    "out": {"kernel": 0.5 * jax.random.normal(k3, (7, 3)), "bias": bias(k4, 3)},
  }


def _mlp_loss(dtype, head):
  def loss_fn(params, batch):
    p = jax.tree.map(lambda x: x.astype(dtype), params)
    x = batch["x"].astype(dtype) @ p["hidden"]["kernel"]
    logits = jnp.tanh(x + p["hidden"]["bias"]) @ p["out"]["kernel"]
    logits = (logits + p["out"]["bias"]).astype(head)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  return loss_fn


def _classes(key, shape):
  kx, ky = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (B, *shape)),
    "y": jax.random.randint(ky, (B,), 0, 3),
  }


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 8, dtype=jnp.bfloat16, rngs=rngs)
    self.head = nnx.Linear(8, 3, dtype=jnp.bfloat16, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))


def _nnx_problem():
  model = _Net(nnx.Rngs(0))

  def per_example_loss(model, batch):
    logits = model(batch["x"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  loss_fn = sam_optax.flax.nnx_loss_fn(model, per_example_loss)
  return loss_fn, nnx.state(model, nnx.Param), _classes(jax.random.key(3), (5,))


def cnn_problem():
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  params = {
    "conv": 0.3 * jax.random.normal(k1, (3, 3, 2, 4)),
    "dense": 0.2 * jax.random.normal(k2, (64, 3)),
  }

  def loss_fn(p, b):
    x = jax.lax.conv_general_dilated(
      b["x"],
      p["conv"],
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    logits = jnp.tanh(x).reshape(x.shape[0], -1) @ p["dense"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  return loss_fn, params, _classes(k3, (4, 4, 2))


def attention_problem():
  keys = jax.random.split(jax.random.key(6), 3)
  d, t, v = 8, 4, 7
  params = {
    "embed": jax.random.normal(keys[0], (v, d)),
    "qkv": jax.random.normal(keys[1], (3, d, d)) / np.sqrt(d),
    "scale": jnp.ones(d),
  }
  batch = {"tokens": jax.random.randint(keys[2], (B, t + 1), 0, v)}

  def loss_fn(p, b):
    x = p["embed"][b["tokens"][:, :-1]]
    x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5)
    q, k, w = (x * p["scale"] @ p["qkv"][i] for i in range(3))
    causal = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(d), -1e9)
    logits = (x + jax.nn.softmax(scores) @ w) @ p["embed"].T
    losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, b["tokens"][:, 1:]
    )
    return jnp.mean(losses, -1)

  return loss_fn, params, batch


def problems():
  mlp_batch = _classes(jax.random.key(3), (5,))
  return {
    "mlp-f32": (
      _mlp_loss(jnp.float32, jnp.float32),
      _mlp(jax.random.key(0)),
      mlp_batch,
    ),
    "mlp-bf16": (
      _mlp_loss(jnp.bfloat16, jnp.bfloat16),
      _mlp(jax.random.key(0)),
      mlp_batch,
    ),
    "mlp-bf16-f32-head": (
      _mlp_loss(jnp.bfloat16, jnp.float32),
      _mlp(jax.random.key(0), zero_bias=True),
      mlp_batch,
    ),
    "nnx-bf16": _nnx_problem(),
    "cnn-f32": cnn_problem(),
    "attention-f32": attention_problem(),
  }


def measure(loss_fn, params, batch, sigma, draws):
  tx = sam_optax.rw_sam(0.05, 0.5, sigma=sigma)
  step = jax.jit(
    lambda key: tx.update(
      None, tx.init(params), params, loss_fn=loss_fn, batch=batch, key=key
    )[1]
  )
  # An explicit σ never warns; whether the default (None) does.
  default = sam_optax.rw_sam(0.05, 0.5)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(
      lambda key: default.update(
        None,
        default.init(params),
        params,
        loss_fn=loss_fn,
        batch=batch,
        key=key,
      )[1]
    ).lower(jax.random.key(0))
  warned = any("calibrate_sigma" in str(w.message) for w in caught)
  norms = jax.jit(
    lambda key, k: sam_optax.finite_difference_gradient_norms(
      loss_fn, params, batch, key, sigma=sigma, num_probes=k
    ),
    static_argnums=1,
  )
  exact = np.asarray(
    sam_optax.per_example_gradient_norms(loss_fn, params, batch)
  )
  ess, unresolved, corr, old = [], [], [], []
  for i in range(draws):
    key = jax.random.key(100 + i)
    state = step(key)
    ess.append(float(state.effective_sample_size))
    unresolved.append(float(state.unresolved_fraction))
    estimate = np.asarray(norms(key, 1))
    corr.append(np.corrcoef(estimate, exact)[0, 1])
    old.append(float(np.mean(estimate == 0)) > LIMIT)
  corr16 = np.corrcoef(np.asarray(norms(jax.random.key(7), 16)), exact)[0, 1]
  return {
    "dtype": jnp.dtype(_precision.compute_dtype(loss_fn, params, batch)).name,
    "warned": warned,
    "ess": np.mean(ess),
    "unresolved": np.mean(unresolved),
    "fallback": np.mean(np.asarray(unresolved) > LIMIT),
    "old_fallback": np.mean(old),
    "corr1": np.nanmean(corr),
    "corr16": corr16,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--draws", type=int, default=10)
  args = parser.parse_args()
  print(
    "| model | compute | warns (default σ) | σ | ESS of 32 | unresolved |"
    " falls back | old rule would | corr, 1 probe | corr, 16 probes |"
  )
  print("|" + "---|" * 10)
  for name, (loss_fn, params, batch) in problems().items():
    sigmas = [1e-4, 1e-3, 1e-2, 3e-2] if "bf16" in name else [1e-4]
    for sigma in sigmas:
      r = measure(loss_fn, params, batch, sigma, args.draws)
      print(
        f"| {name} | {r['dtype']} | {'yes' if r['warned'] else 'no'} |"
        f" {sigma:g} | {r['ess']:.2f} | {r['unresolved']:.2f} |"
        f" {r['fallback']:.0%} | {r['old_fallback']:.0%} |"
        f" {r['corr1']:.2f} | {r['corr16']:.2f} |"
      )


if __name__ == "__main__":
  main()
