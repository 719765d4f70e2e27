"""Per-example gradients of a loss that couples examples (BatchNorm).

With BatchNorm in training mode, example ``i``'s loss depends on the whole
batch. RW-SAM's finite-difference probe runs the whole batch, so it estimates
the norm of row ``i`` of the Jacobian of the loss vector; the exact norms
(``per_example_gradient_norms``, ``calibrate_sigma``,
``rw_sam(gradient_norms="exact")``) must measure the same, not gradients on
batches of one, and still take the cheap batch-of-one route for a loss that
does not couple examples.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
import sam_optax.flax

from _flax_problem import DenseNet
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

# One loss_fn, built once, serves several one-off jitted checks.
pytestmark = pytest.mark.filterwarnings("ignore:sam_optax.flax.nnx_loss_fn")

BATCH = 8


def _per_example_loss(model, batch):
  return optax.softmax_cross_entropy_with_integer_labels(
    model(batch["x"]), batch["y"]
  )


@functools.cache
def _coupled_problem():
  model = DenseNet(nnx.Rngs(0), features=5)
  loss_fn = sam_optax.flax.nnx_loss_fn(model, _per_example_loss)
  return loss_fn, nnx.state(model, nnx.Param), mlp_batch(jax.random.key(1))


def _jacobian_row_norms(loss_fn, params, batch):
  """``‖e_iᵀ J‖`` from ``jax.jacrev`` of the loss vector: the definition."""
  jacobian = jax.jacrev(loss_fn)(params, batch)  # leaves [B, *leaf]
  squares = [
    jnp.sum(x.reshape(BATCH, -1) ** 2, axis=1)
    for x in jax.tree.leaves(jacobian)
  ]
  return jnp.sqrt(sum(squares))


def test_uncoupled_loss_keeps_batch_of_one_and_jacobian_agrees():
  params, batch = mlp_params(jax.random.key(0)), mlp_batch(jax.random.key(1))

  @jax.jit
  def norms(params):
    norms = functools.partial(
      sam_optax.per_example_gradient_norms, mlp_loss, params, batch
    )
    return (
      norms(),
      norms(per_example_gradients="batch_of_one"),
      norms(per_example_gradients="jacobian"),
    )

  auto, one, jacobian = norms(params)
  np.testing.assert_array_equal(auto, one)  # "auto": today's route
  np.testing.assert_allclose(jacobian, one, rtol=1e-5)


def test_coupled_loss_takes_jacobian_rows():
  loss_fn, params, batch = _coupled_problem()
  assert loss_fn.couples_examples

  @jax.jit
  def norms(params):
    norms = functools.partial(
      sam_optax.per_example_gradient_norms, loss_fn, params, batch
    )
    return (
      _jacobian_row_norms(loss_fn, params, batch),
      norms(),
      norms(chunk_size=4),
      norms(per_example_gradients="batch_of_one"),
    )

  expected, auto, chunked, one = norms(params)
  np.testing.assert_allclose(auto, expected, rtol=1e-5)
  np.testing.assert_allclose(chunked, expected, rtol=1e-5)
  # A batch of one has other statistics (and masks): another quantity.
  assert float(jnp.max(jnp.abs(one - expected) / expected)) > 0.1


def test_calibration_compares_the_probe_with_what_it_estimates():
  loss_fn, params, batch = _coupled_problem()

  @jax.jit
  def calibrate(params):
    calibrate = functools.partial(
      sam_optax.calibrate_sigma,
      loss_fn,
      params,
      batch,
      jax.random.key(0),
      candidates=(1e-4, 1e-1),
      num_probes=1,
    )
    return (
      _jacobian_row_norms(loss_fn, params, batch),
      calibrate(),
      calibrate(per_example_gradients="batch_of_one"),
    )

  expected, coupled, one = calibrate(params)
  np.testing.assert_allclose(coupled.exact_norms, expected, rtol=1e-5)
  # The finite differences match the Jacobian's directional derivatives up
  # to rounding and curvature, and the small σ wins ...
  assert float(coupled.sigma) == pytest.approx(1e-4)
  assert float(coupled.finite_difference_errors[0]) < 0.01
  # ... where batch-of-one gradients (other statistics) are off by more than
  # their size whatever σ, and would pick the large one.
  assert float(jnp.min(one.finite_difference_errors)) > 0.5
  assert float(one.sigma) == pytest.approx(1e-1)


def test_rw_sam_exact_norms_are_jacobian_rows():
  loss_fn, params, batch = _coupled_problem()
  tx = sam_optax.rw_sam(0.05, gradient_norms="exact")

  @jax.jit
  def step(params):
    _, state = tx.update(
      None, tx.init(params), params, loss_fn=loss_fn, batch=batch
    )
    return state, _jacobian_row_norms(loss_fn, params, batch)

  state, expected = step(params)
  np.testing.assert_allclose(
    optax.tree.get(state, "gradient_norm_mean"), jnp.mean(expected), rtol=1e-5
  )
  np.testing.assert_allclose(
    optax.tree.get(state, "gradient_norm_max"), jnp.max(expected), rtol=1e-5
  )
  # The explicit override reaches the norms: batches of one measure another
  # quantity on this coupled loss.
  alone = sam_optax.rw_sam(
    0.05, gradient_norms="exact", per_example_gradients="batch_of_one"
  )
  _, other = alone.update(
    None, alone.init(params), params, loss_fn=loss_fn, batch=batch
  )
  assert not np.allclose(
    optax.tree.get(other, "gradient_norm_mean"), jnp.mean(expected), rtol=1e-2
  )


def test_bad_choice_is_an_error_naming_it():
  params, batch = mlp_params(jax.random.key(0)), mlp_batch(jax.random.key(1))
  with pytest.raises(ValueError, match="per_example_gradients"):
    sam_optax.per_example_gradient_norms(
      mlp_loss, params, batch, per_example_gradients="exact"
    )
  with pytest.raises(ValueError, match="rw_sam: per_example_gradients"):
    sam_optax.rw_sam(0.05, per_example_gradients="rows")
  with pytest.raises(ValueError, match="calibrate_sigma: per_example_grad"):
    sam_optax.calibrate_sigma(
      mlp_loss, params, batch, jax.random.key(0), per_example_gradients=None
    )
