"""RW-SAM with low-precision compute (issue 18, item 6): found and handled.

A model whose layers compute in bfloat16 casts the probe's ``w + σv`` back
to bfloat16 inside, so ``probe_in_float32`` cannot help. RW-SAM reads the
compute precision from the jaxpr of ``loss_fn`` at trace time (a warning
when ``σ`` is the default) and checks every step's loss changes against
that precision's rounding of the losses (SAM's weights when too many are
unresolved), not only for exact zeros.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import precision_check
import sam_optax
from sam_optax import _precision

from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

PARAMS = mlp_params(jax.random.key(0))
BATCH = mlp_batch(jax.random.key(3), size=32)
KEY = jax.random.key(2)
LIMIT = sam_optax._rw_sam.UNRESOLVED_LIMIT
# Zero biases, as Flax initializes them: 0 + σv is exact in bfloat16, so the
# biases' share of the estimates survives the cast and few are exactly 0.
FLAX_INIT = {
  layer: {**leaves, "bias": jnp.zeros_like(leaves["bias"])}
  for layer, leaves in PARAMS.items()
}


def _bf16_layers(params, batch):
  """bfloat16 layers, as Flax's dtype=bfloat16, and a float32 loss head."""
  p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  hidden = jnp.tanh(
    batch["x"].astype(jnp.bfloat16) @ p["hidden"]["kernel"]
    + p["hidden"]["bias"]
  )
  logits = hidden @ p["out"]["kernel"] + p["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch["y"]
  )


def _in_scan(params, batch):
  # The bfloat16 cast of a parameter-derived value is reached only through
  # the loop carry, on the second iteration.
  def body(carry, _):
    h, acc = carry
    new = h @ params["hidden"]["kernel"][:, :5]
    return (acc.astype(jnp.bfloat16).astype(jnp.float32), new), None

  (h, _), _ = jax.lax.scan(body, (batch["x"], batch["x"]), None, length=3)
  return jnp.sum(h, -1)


def _in_while(params, batch):
  def body(carry):
    i, h = carry
    kernel = params["hidden"]["kernel"][:, :5].astype(jnp.float16)
    return i + 1, jnp.tanh(h @ kernel.astype(jnp.float32))

  _, h = jax.lax.while_loop(lambda c: c[0] < 3, body, (0, batch["x"]))
  return jnp.sum(h, -1)


def _in_cond(params, batch):
  return jax.lax.cond(
    batch["x"][0, 0] > 0,
    lambda p: _bf16_layers(p, batch),
    lambda p: mlp_loss(p, batch),
    params,
  )


def _bf16_inputs(params, batch):
  # Inputs cast to bfloat16 meet float32 weights: the matmul is float32.
  return mlp_loss(params, {**batch, "x": batch["x"].astype(jnp.bfloat16)})


@pytest.mark.parametrize(
  "loss_fn, expected",
  [
    (mlp_loss, jnp.float32),
    (_bf16_layers, jnp.bfloat16),
    (jax.jit(_bf16_layers), jnp.bfloat16),
    (jax.checkpoint(_bf16_layers), jnp.bfloat16),
    (_in_scan, jnp.bfloat16),
    (_in_while, jnp.float16),
    (_in_cond, jnp.bfloat16),
    (_bf16_inputs, jnp.float32),
  ],
  ids=["f32", "bf16", "jit", "remat", "scan", "while", "cond", "inputs"],
)
def test_compute_dtype_follows_the_parameters(loss_fn, expected):
  assert _precision.compute_dtype(loss_fn, PARAMS, BATCH) == expected


def test_compute_dtype_of_bfloat16_parameters():
  params16 = optax.tree.cast(PARAMS, jnp.bfloat16)
  assert _precision.compute_dtype(mlp_loss, params16, BATCH) == jnp.bfloat16
  promoted = sam_optax._gradient_norms.probe_parameters(params16)
  assert _precision.compute_dtype(mlp_loss, promoted, BATCH) == jnp.float32


def _step(loss_fn, params=PARAMS, batch=BATCH, **kwargs):
  tx = sam_optax.rw_sam(0.1, 0.5, **kwargs)
  return jax.jit(
    lambda key: tx.update(
      None, tx.init(params), params, loss_fn=loss_fn, batch=batch, key=key
    )
  )


def _probe_norms(params, key):
  return sam_optax.finite_difference_gradient_norms(
    _bf16_layers, params, BATCH, key
  )


def test_bf16_layers_with_a_float32_head_warn_and_fall_back_to_sam():
  # Compiled, few estimates are exactly zero (XLA keeps the bias additions
  # in float32, and 0 + σv is exact in bfloat16), yet the kernels' share is
  # lost: |Δ_i| is below ε_bf16 |ℓ_i|, and
  # the ascent must not follow the estimates.
  norms = jax.jit(_probe_norms)(FLAX_INIT, KEY)
  assert float(jnp.mean(norms == 0)) <= LIMIT  # the old check: no trigger
  step = _step(_bf16_layers, FLAX_INIT)
  with pytest.warns(UserWarning, match="bfloat16") as caught:
    _, state = step(KEY)
    step(jax.random.key(5))  # compiled: no second trace, no warning
  messages = [str(w.message) for w in caught]
  assert len(messages) == 1, messages
  assert "sigma=" in messages[0] and "calibrate_sigma" in messages[0]
  assert state.unresolved_fraction > LIMIT
  # SAM's weights: uniform, so all 32 examples count.
  np.testing.assert_allclose(state.effective_sample_size, 32.0, rtol=1e-5)
  np.testing.assert_allclose(state.weight_entropy, np.log(32), rtol=1e-5)


def test_an_explicit_sigma_is_respected_without_a_warning():
  # The default's value, given explicitly: the user's choice, no warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    _, state = _step(_bf16_layers, FLAX_INIT, sigma=1e-4)(KEY)
  assert state.unresolved_fraction > LIMIT  # still checked every step


@pytest.mark.parametrize(
  "problem",
  [
    "mlp",
    pytest.param("cnn", marks=pytest.mark.slow),
    pytest.param("attention", marks=pytest.mark.slow),
  ],
)
def test_float32_models_are_resolved_and_not_warned(problem):
  loss_fn, params, batch = {
    "mlp": lambda: (mlp_loss, PARAMS, BATCH),
    # The float32 models of experiments/precision_check.py.
    "cnn": precision_check.cnn_problem,
    "attention": precision_check.attention_problem,
  }[problem]()
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    step = _step(loss_fn, params, batch)
    fractions = [
      float(step(jax.random.key(i))[1].unresolved_fraction) for i in range(2)
    ]
  assert max(fractions) <= 1 / 32, fractions


def test_nnx_bf16_linear_layers_are_found_and_fall_back():
  nnx = pytest.importorskip("flax.nnx")
  import sam_optax.flax  # Flax is an optional extra

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.hidden = nnx.Linear(5, 8, dtype=jnp.bfloat16, rngs=rngs)
      self.head = nnx.Linear(8, 3, dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, x):
      return self.head(jnp.tanh(self.hidden(x)))

  def per_example_loss(model, batch):
    logits = model(batch["x"]).astype(jnp.float32)  # a float32 loss head
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  model = Net(nnx.Rngs(0))
  loss_fn = sam_optax.flax.nnx_loss_fn(model, per_example_loss)
  params = nnx.state(model, nnx.Param)
  assert _precision.compute_dtype(loss_fn, params, BATCH) == jnp.bfloat16
  with pytest.warns(UserWarning, match="calibrate_sigma"):
    _, state = _step(loss_fn, params)(KEY)
  assert state.unresolved_fraction > LIMIT
  np.testing.assert_allclose(state.effective_sample_size, 32.0, rtol=1e-5)
