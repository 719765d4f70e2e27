"""The perturbation's promises at the edges of the floating range.

``ε = ρ u / (‖u‖ + δ)`` is computed with a plain norm on the common path and
a scaled one (divided by the largest entry) only where the plain one would
overflow or underflow or ``ρ/(‖u‖ + δ)`` is not representable. These tests
pin, for both paths and under ``vmap`` (where ``lax.cond`` becomes a
select): a zero direction gives ``ε = 0`` exactly at any finite ``ρ`` (issue
18, item 7), tiny and huge directions keep the formula, and float64
parameters get float64 arithmetic (issue 18, item 8), checked under the
``jax.enable_x64`` context manager so that no other test sees float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import _perturbation

from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

DELTA = _perturbation.NORM_EPS
HUGE_RHOS = (0.05, 3.5e26, 1e27, 1e30, 3e38)


def _oracle(direction, rho):
  """``ρ u / (‖u‖ + δ)`` in numpy float64 (float32 inputs are exact in it)."""
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(direction)]
  return [rho * x / (_norm64(leaves) + DELTA) for x in leaves]


def _norm64(leaves):
  """``‖x‖`` in numpy float64, scaled so that 1e200 does not overflow."""
  largest = max(float(np.max(np.abs(x), initial=0.0)) for x in leaves)
  if largest == 0:
    return 0.0
  return largest * np.sqrt(sum(np.sum((x / largest) ** 2) for x in leaves))


def _direction(magnitude, dtype=jnp.float32):
  return {
    "a": jnp.asarray([magnitude, -0.5 * magnitude, 0.25 * magnitude], dtype),
    "b": jnp.asarray([[0.0, magnitude]], dtype),
  }


@pytest.mark.parametrize("rho", HUGE_RHOS)
def test_zero_gradient_gives_zero_perturbation_never_nan_at_any_rho(rho):
  zero = _direction(0.0)
  for fn in (_perturbation.perturbation, jax.jit(_perturbation.perturbation)):
    for leaf in jax.tree.leaves(fn(zero, rho)):
      np.testing.assert_array_equal(leaf, 0.0)
  params = mlp_params(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1))
  zero_loss = lambda p, b: 0.0 * mlp_loss(p, b)
  tx = sam_optax.sam(rho)
  updates, _ = jax.jit(
    lambda p: tx.update(None, tx.init(p), p, loss_fn=zero_loss, batch=batch)
  )(params)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("rho", (1e27, 1e30))
def test_momentum_sam_first_step_at_a_huge_rho_is_a_gradient_step(rho):
  """``v_0 = 0``: the first perturbation is zero, so the first update is the
  clean gradient, finite (it was NaN: ``ρ/δ`` overflowed)."""
  params = mlp_params(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1))
  tx = sam_optax.momentum_sam(rho, momentum=0.9)
  updates, _ = jax.jit(
    lambda p: tx.update(None, tx.init(p), p, loss_fn=mlp_loss, batch=batch)
  )(params)
  clean = jax.grad(lambda p: jnp.mean(mlp_loss(p, batch)))(params)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(clean)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("magnitude", (1e-30, 1e-20, 1e-6, 1.0, 1e19, 1e30))
@pytest.mark.parametrize("rho", HUGE_RHOS)
def test_perturbation_follows_the_formula_for_any_magnitude_and_rho(
  magnitude, rho
):
  """Both paths (plain for moderate sizes, scaled beyond) against the
  float64 formula, tiny directions with ``δ`` in it as written."""
  direction = _direction(magnitude)
  got = jax.jit(_perturbation.perturbation)(direction, rho)
  for leaf, want in zip(jax.tree.leaves(got), _oracle(direction, rho)):
    assert leaf.dtype == jnp.float32
    assert np.all(np.isfinite(leaf))
    # Entries below float32's normal range are flushed to zero on a CPU.
    np.testing.assert_allclose(leaf, want, rtol=1e-5, atol=1e-37)


def test_vmapped_perturbation_matches_one_at_a_time():
  """Under ``vmap`` each direction still gets its own path: zero, tiny,
  moderate and near float32's largest, in one batch."""
  magnitudes = (0.0, 1e-30, 1.0, 1e19, 3e38)
  batch = jax.tree.map(
    lambda *xs: jnp.stack(xs), *[_direction(m) for m in magnitudes]
  )
  for rho in (0.05, 1e30):
    stacked = jax.vmap(lambda d, rho=rho: _perturbation.perturbation(d, rho))(
      batch
    )
    for i, magnitude in enumerate(magnitudes):
      one = _perturbation.perturbation(_direction(magnitude), rho)
      for got, want in zip(jax.tree.leaves(stacked), jax.tree.leaves(one)):
        np.testing.assert_allclose(got[i], want, rtol=1e-6)
    norms = jax.vmap(_perturbation.global_norm)(batch)
    for i, magnitude in enumerate(magnitudes):
      want = float(_perturbation.global_norm(_direction(magnitude)))
      np.testing.assert_allclose(float(norms[i]), want, rtol=1e-6)


@pytest.mark.parametrize("magnitude", (0.0, 1e-30, 1.0, 1e19, 1e30))
def test_global_norm_is_the_norm_for_any_finite_entries(magnitude):
  direction = _direction(magnitude)
  want = _norm64(
    [np.asarray(x, np.float64) for x in jax.tree.leaves(direction)]
  )
  got = jax.jit(_perturbation.global_norm)(direction)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_unit_vector_and_orthogonal_part_of_a_zero_direction():
  x = _direction(1.0)
  zero = _direction(0.0)
  for leaf in jax.tree.leaves(_perturbation.unit_vector(zero)):
    np.testing.assert_array_equal(leaf, 0.0)
  for got, want in zip(
    jax.tree.leaves(_perturbation.orthogonal_part(x, zero)),
    jax.tree.leaves(x),
  ):
    np.testing.assert_array_equal(got, want)


# --- float64 ------------------------------------------------------------------


def _sam_oracle64(loss_fn, params, batch, rho):
  """SAM's update written out in float64: ``∇L(w + ρ g/(‖g‖ + δ))``."""
  grad = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))
  g = grad(params)
  norm = _norm64([np.asarray(x) for x in jax.tree.leaves(g)])
  epsilon = jax.tree.map(lambda x: rho * x / (norm + DELTA), g)
  return grad(jax.tree.map(jnp.add, params, epsilon))


@pytest.mark.parametrize("scale", (1.0, 1e50, 1e-50, 1e200))
def test_float64_parameters_get_float64_accuracy(scale):
  """Under ``jax_enable_x64``, SAM on float64 parameters agrees with the
  float64 formula to float64 accuracy, for gradients far outside float32's
  range (1e50 gave NaN, 1e-50 a zero perturbation) and beyond float64's
  plain sum of squares (1e200: the scaled path)."""
  with jax.enable_x64(True):
    params = optax.tree.cast(mlp_params(jax.random.key(0)), jnp.float64)
    batch = mlp_batch(jax.random.key(1))
    batch = {**batch, "x": batch["x"].astype(jnp.float64)}

    def loss_fn(p, b):
      hidden = jnp.tanh(b["x"] @ p["hidden"]["kernel"] + p["hidden"]["bias"])
      logits = hidden @ p["out"]["kernel"] + p["out"]["bias"]
      return scale * optax.softmax_cross_entropy_with_integer_labels(
        logits, b["y"]
      )

    tx = sam_optax.sam(0.05)
    updates, _ = jax.jit(
      lambda p: tx.update(None, tx.init(p), p, loss_fn=loss_fn, batch=batch)
    )(params)
    want = _sam_oracle64(loss_fn, params, batch, 0.05)
    for got, expected in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
      assert got.dtype == jnp.float64
      assert np.all(np.isfinite(got))
      np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("magnitude", (1e-50, 1.0, 1e50, 1e200))
def test_float64_perturbation_and_norm_are_float64(magnitude):
  with jax.enable_x64(True):
    direction = _direction(magnitude, jnp.float64)
    epsilon = jax.jit(_perturbation.perturbation)(direction, 0.05)
    norm = np.sqrt(2.3125) * magnitude  # 1 + 1/4 + 1/16 + 1
    for leaf, want in zip(jax.tree.leaves(epsilon), _oracle(direction, 0.05)):
      assert leaf.dtype == jnp.float64
      np.testing.assert_allclose(leaf, want, rtol=1e-13, atol=0)
    got = jax.jit(_perturbation.global_norm)(direction)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(float(got), norm, rtol=1e-13)


def test_gsam_keeps_a_tiny_float64_orthogonal_part():
  """GSAM's ``g_⊥`` from float64 gradients of 1e-50 (it was dropped: the
  gradients were cast to float32, where they are zero)."""
  with jax.enable_x64(True):
    g = {"w": jnp.asarray([3e-50, 0.0], jnp.float64)}
    onto = {"w": jnp.asarray([1.0, 1.0], jnp.float64)}
    orthogonal = _perturbation.orthogonal_part(g, onto)
    unit = np.asarray([1.0, 1.0]) / (np.sqrt(2.0) + DELTA)
    want = np.asarray([3e-50, 0.0]) - np.dot([3e-50, 0.0], unit) * unit
    assert orthogonal["w"].dtype == jnp.float64
    np.testing.assert_allclose(orthogonal["w"], want, rtol=1e-12)
    assert abs(float(orthogonal["w"][1])) > 1e-51


def test_m_sam_keeps_float64_accuracy_under_x64():
  # Issue 18, item 8: float64 gradients of 1e-50 made m_sam return 0.
  with jax.enable_x64(True):
    params = {
      "w": jnp.asarray([0.4, -0.8, 1.2], jnp.float64),
      "b": jnp.asarray(0.1, jnp.float64),
    }
    batch = {
      "x": jnp.eye(4, 3, dtype=jnp.float64),
      "y": jnp.asarray([1.0, -1.0, 0.5, 0.0], jnp.float64),
    }

    def loss_fn(p, b):
      return 1e-50 * (b["x"] @ p["w"] + p["b"] - b["y"]) ** 2

    def sam_gradient(p, b):
      tx = sam_optax.sam(0.05)
      grads = jax.grad(lambda q: loss_fn(q, b).mean())(p)
      return tx.update(grads, tx.init(p), p, loss_fn=loss_fn, batch=b)[0]

    tx = sam_optax.m_sam(0.05, micro_batch_size=2)
    got = tx.update(
      None, tx.init(params), params, loss_fn=loss_fn, batch=batch
    )[0]
    halves = [
      jax.tree.map(lambda x, i=i: x[2 * i : 2 * i + 2], batch) for i in range(2)
    ]
    expected = jax.tree.map(
      lambda a, c: (a + c) / 2, *[sam_gradient(params, h) for h in halves]
    )
    for key in params:
      assert got[key].dtype == jnp.float64
      assert np.all(np.abs(np.asarray(got[key])) > 0)
      np.testing.assert_allclose(got[key], expected[key], rtol=1e-12)
