"""Per-example gradient norms: exact, finite differences, σ calibration."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import _gradient_norms
from sam_optax import _per_example

from _problems import flatten
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params


def _example(batch, i):
  return jax.tree.map(lambda x: x[i : i + 1], batch)


def per_example_gradients(params, batch):
  """Flat ``∇ℓ_i`` for each example, one ``jax.grad`` per example: [B, d]."""
  size = batch["x"].shape[0]
  return np.stack(
    [
      np.asarray(
        flatten(jax.grad(lambda p: mlp_loss(p, _example(batch, i))[0])(params))
      )
      for i in range(size)
    ]
  )


def _setup(seed=0, size=8):
  return (
    mlp_params(jax.random.key(seed)),
    mlp_batch(jax.random.key(seed + 1), size=size),
  )


def test_rademacher_like_gives_independent_signs():
  params, _ = _setup()
  probe = _per_example.rademacher_like(jax.random.key(0), params)
  chex.assert_trees_all_equal_shapes(probe, params)
  values = np.asarray(flatten(probe))
  assert values.dtype == np.float32
  np.testing.assert_array_equal(np.abs(values), 1.0)
  # Both signs occur, in about equal numbers (66 entries: |mean| < 4/sqrt(66)).
  assert abs(values.mean()) < 0.5
  again = _per_example.rademacher_like(jax.random.key(0), params)
  chex.assert_trees_all_equal(probe, again)
  other = flatten(_per_example.rademacher_like(jax.random.key(1), params))
  assert np.any(np.asarray(other) != values)


class ExactNormsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_one_grad_per_example(self):
    params, batch = _setup()
    expected = np.linalg.norm(per_example_gradients(params, batch), axis=1)

    @self.variant
    def norms(params, batch):
      return sam_optax.per_example_gradient_norms(mlp_loss, params, batch)

    np.testing.assert_allclose(norms(params, batch), expected, rtol=1e-5)

  def test_microbatching_gives_the_same_norms(self):
    params, batch = _setup(seed=2)
    # Jitted: two compiles, not one per primitive of each chunk's vmap.
    norms = jax.jit(
      sam_optax.per_example_gradient_norms,
      static_argnums=0,
      static_argnames="chunk_size",
    )
    full = norms(mlp_loss, params, batch)
    chunked = norms(mlp_loss, params, batch, chunk_size=2)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
      sam_optax.per_example_gradient_norms(
        mlp_loss, params, batch, chunk_size=3
      )


def test_estimator_matches_exact_squared_norms_over_many_probes():
  r"""``mean_k (Δ_ik/σ)² → ‖g_i‖²`` within a tolerance derived from the probes.

  With ``X = (v·g)²`` for Rademacher ``v``: ``E X = ‖g‖²`` and
  ``Var X = 2(‖g‖⁴ − Σ_j g_j⁴)`` (the diagonal ``v_j² = 1`` terms are fixed),
  so the mean over ``K`` probes has standard error
  ``SE = sqrt(2(‖g‖⁴ − Σ_j g_j⁴)/K)``. The finite difference adds
  ``Δ/σ = v·g + (σ/2) vᵀHv + O(σ²)``; squared and averaged over ``v``, the
  ``O(σ)`` cross term ``σ (v·g)(vᵀHv)`` has mean zero (odd moments of ``v``
  vanish), leaving an ``O(σ²)`` bias, ~1e-6 at σ = 1e-3, and float32
  rounding of the two losses, ``|δΔ/σ| ≲ 1e-4``, i.e. ``≲ 1e-3 ‖g‖²`` after
  squaring. Tolerance: ``5 SE + 1e-3 ‖g‖²`` per example.
  """
  params, batch = _setup(seed=4)
  sigma, num_probes = 1e-3, 4000
  gradients = per_example_gradients(params, batch)
  squared = np.sum(gradients**2, axis=1)
  standard_error = np.sqrt(
    2 * (squared**2 - np.sum(gradients**4, axis=1)) / num_probes
  )

  one_probe = jax.jit(
    jax.vmap(
      lambda key: _gradient_norms.directional_derivative_estimate(
        mlp_loss, params, batch, key, sigma
      )
    )
  )
  estimates = one_probe(jax.random.split(jax.random.key(0), num_probes))
  mean_square = np.mean(np.asarray(estimates, np.float64) ** 2, axis=0)
  error = np.abs(mean_square - squared)
  assert np.all(error <= 5 * standard_error + 1e-3 * squared), (
    error,
    standard_error,
  )
  # The tolerance is tight: the estimator is noisy at K = 1 and not at K.
  assert np.all(standard_error < 0.05 * squared)


def test_norms_are_the_root_mean_square_over_probes():
  params, batch = _setup(seed=5)
  key = jax.random.key(3)
  norms = sam_optax.finite_difference_gradient_norms(
    mlp_loss, params, batch, key, sigma=1e-3, num_probes=3
  )
  per_probe = jnp.stack(
    [
      _gradient_norms.directional_derivative_estimate(
        mlp_loss, params, batch, k, 1e-3
      )
      for k in jax.random.split(key, 3)
    ]
  )
  np.testing.assert_allclose(
    norms, jnp.sqrt(jnp.mean(per_probe**2, axis=0)), rtol=1e-6
  )
  # With the clean losses given, the result is the same (one pass saved).
  given = sam_optax.finite_difference_gradient_norms(
    mlp_loss,
    params,
    batch,
    key,
    sigma=1e-3,
    num_probes=3,
    losses=mlp_loss(params, batch),
  )
  np.testing.assert_allclose(given, norms, rtol=1e-6)


def test_error_shrinks_with_sigma():
  """Same probes, smaller σ: estimates closer to the exact ``(v·g)²`` means.

  For fixed probes the error of ``Δ/σ`` is ``(σ/2) vᵀHv + O(σ²)``, linear in
  ``σ`` while σ is large enough for float32 rounding not to matter.
  """
  params, batch = _setup(seed=6)
  keys = jax.random.split(jax.random.key(1), 32)
  gradients = per_example_gradients(params, batch)
  exact = np.stack(
    [
      gradients @ np.asarray(flatten(_per_example.rademacher_like(k, params)))
      for k in keys
    ]
  )  # [K, B]: v_k·g_i
  target = np.mean(exact**2, axis=0)
  errors = []
  for sigma in (0.3, 0.1, 0.03, 0.01):
    norms = sam_optax.finite_difference_gradient_norms(
      mlp_loss, params, batch, jax.random.key(1), sigma=sigma, num_probes=32
    )
    errors.append(np.max(np.abs(np.asarray(norms) ** 2 - target) / target))
  assert all(a > b for a, b in itertools.pairwise(errors)), errors
  assert errors[-1] < errors[0] / 10, errors


def test_central_difference_is_more_accurate():
  """Central differences err by O(σ²), forward ones by O(σ): halving σ
  quarters the one error and halves the other (the error at one σ depends on
  the probe drawn, the orders do not)."""
  params, batch = _setup(seed=7)
  key = jax.random.key(2)
  gradients = per_example_gradients(params, batch)
  exact = gradients @ np.asarray(
    flatten(_per_example.rademacher_like(key, params))
  )

  def error(sigma, difference):
    estimate = _gradient_norms.directional_derivative_estimate(
      mlp_loss, params, batch, key, sigma, difference=difference
    )
    return float(np.max(np.abs(estimate - exact)))

  forward = [error(sigma, "forward") for sigma in (0.1, 0.05)]
  central = [error(sigma, "central") for sigma in (0.1, 0.05)]
  assert central[0] < forward[0] and central[1] < forward[1] / 5
  assert 1.5 < forward[0] / forward[1] < 2.5, forward
  assert central[0] / central[1] > 3.5, central


def test_calibration_avoids_rounding_and_curvature():
  params, batch = _setup(seed=8)
  candidates = (1e-7, 1e-3, 1.0)
  result = sam_optax.calibrate_sigma(
    mlp_loss,
    params,
    batch,
    jax.random.key(0),
    candidates=candidates,
    num_probes=8,
  )
  # 1e-7: the two float32 losses agree to all but their last digits;
  # 1.0: the curvature term dominates.
  np.testing.assert_allclose(result.sigma, 1e-3)
  errors = np.asarray(result.finite_difference_errors)
  assert errors.shape == (3,)
  assert errors[1] < errors[0] / 10 and errors[1] < errors[2] / 10, errors
  np.testing.assert_allclose(
    result.exact_norms,
    sam_optax.per_example_gradient_norms(mlp_loss, params, batch),
    rtol=1e-5,
  )
  # At the chosen σ the norm error is the probes' Monte Carlo error.
  assert abs(result.norm_errors[1] - result.monte_carlo_error) < 0.02


def _bfloat16_loss(params, batch):
  """An MLP that computes in the parameters' dtype (bfloat16 matmuls)."""
  kernel = params["hidden"]["kernel"]
  hidden = jnp.tanh(
    batch["x"].astype(kernel.dtype) @ kernel + params["hidden"]["bias"]
  )
  logits = hidden @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch["y"]
  )


def test_bfloat16_probes_in_float32():
  """``w + σv`` in bfloat16 rounds back to ``w``; in float32 it does not."""
  params, batch = _setup(seed=9)
  params16 = optax.tree.cast(params, jnp.bfloat16)
  exact = sam_optax.per_example_gradient_norms(
    _bfloat16_loss, optax.tree.cast(params16, jnp.float32), batch
  )
  estimate = lambda flag: sam_optax.finite_difference_gradient_norms(
    _bfloat16_loss,
    params16,
    batch,
    jax.random.key(0),
    num_probes=128,
    probe_in_float32=flag,
  )
  promoted, kept = estimate(True), estimate(False)
  assert promoted.dtype == jnp.float32
  relative = lambda norms: float(
    jnp.mean(jnp.abs(norms - exact)) / jnp.mean(exact)
  )
  # 128 probes: relative standard error of s_i at most sqrt(2/128)/2 = 0.06.
  assert relative(promoted) < 0.1
  assert relative(kept) > 3 * relative(promoted)


def test_bad_input_is_a_clear_error():
  params, batch = _setup()
  key = jax.random.key(0)
  norms = sam_optax.finite_difference_gradient_norms
  with pytest.raises(ValueError, match="sigma must be > 0"):
    norms(mlp_loss, params, batch, key, sigma=0.0)
  with pytest.raises(ValueError, match="num_probes"):
    norms(mlp_loss, params, batch, key, num_probes=0)
  with pytest.raises(ValueError, match="difference"):
    norms(mlp_loss, params, batch, key, difference="backward")
  with pytest.raises(ValueError, match="per-example"):
    norms(lambda p, b: jnp.mean(mlp_loss(p, b)), params, batch, key)
  with pytest.raises(ValueError, match="candidates"):
    sam_optax.calibrate_sigma(mlp_loss, params, batch, key, candidates=())
