"""RW-SAM and RW-ASAM: limits, weights, keys, exact mode, cost, bad input."""

import itertools

from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import _per_example

from _problems import compiled_flops
from _problems import global_norm
from _problems import mean_loss
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

RHO = 0.1
DELTA = 1e-12


def grad_mean(params, batch):
  return jax.grad(mean_loss, argnums=1)(mlp_loss, params, batch)


def sam_step_along(direction, params, batch, rho=RHO):
  """``∇L_B(w + ρ d/‖d‖)``, written out."""
  scale = rho / (global_norm(direction) + DELTA)
  perturbed = jax.tree.map(lambda w, d: w + scale * d, params, direction)
  return grad_mean(perturbed, batch)


def example_gradient(params, batch, i):
  example = jax.tree.map(lambda x: x[i : i + 1], batch)
  return jax.grad(lambda p: mlp_loss(p, example)[0])(params)


def _setup(seed=0, size=8):
  return (
    mlp_params(jax.random.key(seed)),
    mlp_batch(jax.random.key(seed + 1), size=size),
  )


def _update(tx, params, batch, key=None, grads=None):
  return tx.update(
    grads, tx.init(params), params, loss_fn=mlp_loss, batch=batch, key=key
  )


def _one_loud_example(seed=0, size=8, loud=3):
  """A batch whose example ``loud`` has by far the largest gradient."""
  params, batch = _setup(seed, size)
  logits_of = lambda x: (
    jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    @ params["out"]["kernel"]
    + params["out"]["bias"]
  )
  x = batch["x"].at[loud].multiply(6.0)
  # A confidently wrong label.
  y = batch["y"].at[loud].set(jnp.argmin(logits_of(x[loud])))
  return params, {"x": x, "y": y}, loud


class LimitsTest(chex.TestCase):
  @chex.variants(with_jit=True)
  @parameterized.parameters(
    ("mean", float("inf")),
    ("zscore", float("inf")),
    ("none", float("inf")),
    ("max", float("inf")),
    ("mean", 1e9),
  )
  def test_large_lam_is_sam(self, norm_scaling, lam):
    params, batch = _setup()
    tx = sam_optax.rw_sam(RHO, lam, norm_scaling=norm_scaling)

    @self.variant
    def step(params, batch, key):
      return _update(tx, params, batch, key)

    updates, state = step(params, batch, jax.random.key(0))
    expected, _ = _update(sam_optax.sam(RHO), params, batch)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.effective_sample_size, 8.0, rtol=1e-5)
    np.testing.assert_allclose(state.weight_entropy, np.log(8.0), rtol=1e-5)

  def test_large_lam_rw_asam_is_asam(self):
    params, batch = _setup(seed=2)
    updates, _ = _update(
      sam_optax.rw_asam(0.5, jnp.inf, eta=0.01),
      params,
      batch,
      jax.random.key(0),
    )
    expected, _ = _update(sam_optax.asam(0.5, eta=0.01), params, batch)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)

  @parameterized.parameters("finite_difference", "exact")
  def test_small_lam_puts_the_ascent_on_the_loudest_example(self, norms):
    params, batch, loud = _one_loud_example()
    # K = 16 probes: s_i² within about sqrt(2/16) = 35% of ‖∇ℓ_i‖², far less
    # than the gap to the loud example.
    tx = sam_optax.rw_sam(RHO, lam=0.01, num_probes=16, gradient_norms=norms)
    updates, state = _update(tx, params, batch, jax.random.key(1))
    np.testing.assert_allclose(state.effective_sample_size, 1.0, rtol=1e-4)
    expected = sam_step_along(
      example_gradient(params, batch, loud), params, batch
    )
    chex.assert_trees_all_close(updates, expected, rtol=1e-4, atol=1e-6)
    # ... which is not SAM's step.
    sam_updates, _ = _update(sam_optax.sam(RHO), params, batch)
    assert global_norm(jax.tree.map(jnp.subtract, updates, sam_updates)) > 1e-3

  def test_rw_asam_composes_asam_scale_with_the_weights(self):
    params, batch = _setup(seed=3)
    key = jax.random.key(4)
    unscaled = sam_optax.rw_asam(
      RHO, 0.5, scale_mask=lambda p: jax.tree.map(lambda _: False, p)
    )
    a, _ = _update(unscaled, params, batch, key)
    b, _ = _update(sam_optax.rw_sam(RHO, 0.5), params, batch, key)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-8)
    c, _ = _update(sam_optax.rw_asam(RHO, 0.5), params, batch, key)
    assert global_norm(jax.tree.map(jnp.subtract, a, c)) > 1e-4


class ExactModeTest(chex.TestCase):
  # Every combination without jit, and the four scalings with jit too (one
  # compile each; the squared scores add no branch that jit could change).
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
    norm_scaling=["mean", "max", "zscore", "none"], score=["norm"]
  )
  def test_equals_the_formula(self, norm_scaling, score):
    self._check_formula(norm_scaling, score)

  @chex.variants(without_jit=True)
  @parameterized.product(
    norm_scaling=["mean", "max", "zscore", "none"], score=["squared_norm"]
  )
  def test_squared_norm_equals_the_formula(self, norm_scaling, score):
    self._check_formula(norm_scaling, score)

  def _check_formula(self, norm_scaling, score):
    params, batch = _setup(seed=5)
    lam = 0.5
    gradients = [example_gradient(params, batch, i) for i in range(8)]
    s = jnp.stack([global_norm(g) for g in gradients])
    x = s if score == "norm" else s**2
    s_hat = {
      "mean": x / (jnp.mean(x) + DELTA),
      "max": x / (jnp.max(x) + DELTA),
      "zscore": (x - jnp.mean(x)) / (jnp.std(x) + DELTA),
      "none": x,
    }[norm_scaling]
    p = jnp.exp(s_hat / lam) / jnp.sum(jnp.exp(s_hat / lam))
    g_p = jax.tree.map(
      lambda *g: sum(pi * gi for pi, gi in zip(p, g)), *gradients
    )
    expected = sam_step_along(g_p, params, batch)

    tx = sam_optax.rw_sam(
      RHO, lam, norm_scaling=norm_scaling, score=score, gradient_norms="exact"
    )

    @self.variant
    def step(params, batch):
      return _update(tx, params, batch)  # no key needed

    updates, state = step(params, batch)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.gradient_norm_mean, jnp.mean(s), rtol=1e-5)
    np.testing.assert_allclose(
      state.effective_sample_size, 1 / jnp.sum(p**2), rtol=1e-5
    )


class KeysTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_same_key_same_step_other_key_other_step(self):
    params, batch = _setup(seed=6)
    tx = sam_optax.rw_sam(RHO, 0.5)

    @self.variant
    def step(key):
      return _update(tx, params, batch, key)[0]

    first = step(jax.random.key(0))
    chex.assert_trees_all_equal(first, step(jax.random.key(0)))
    assert (
      global_norm(jax.tree.map(jnp.subtract, first, step(jax.random.key(1))))
      > 1e-6
    )
    # Legacy uint32 keys work too.
    chex.assert_tree_all_finite(step(jax.random.PRNGKey(0)))

  def test_vmap_over_keys(self):
    params, batch = _setup(seed=7)
    tx = sam_optax.rw_sam(RHO, 0.5)
    keys = jax.random.split(jax.random.key(3), 3)
    step = lambda key: _update(tx, params, batch, key)
    batched, states = jax.jit(jax.vmap(step))(keys)
    for i in range(3):
      single, state = step(keys[i])
      # vmap batches the matmuls, so float32 rounding differs, and the
      # finite difference divides it by σ = 1e-4: a ~1e-4 relative change.
      difference = jax.tree.map(lambda a, b: a[i] - b, batched, single)
      assert global_norm(difference) < 1e-3 * global_norm(single)
      np.testing.assert_allclose(
        states.clean_loss[i], state.clean_loss, rtol=1e-6
      )
      np.testing.assert_allclose(
        states.gradient_norm_mean[i], state.gradient_norm_mean, rtol=1e-3
      )

  def test_missing_key_is_a_clear_error(self):
    params, batch = _setup()
    with pytest.raises(TypeError, match="needs the keyword argument `key`"):
      _update(sam_optax.rw_sam(RHO), params, batch)
    with pytest.raises(TypeError, match=r"rw_asam\.update needs .*`key`"):
      _update(sam_optax.rw_asam(RHO), params, batch)


class DiagnosticsTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_state_holds_the_steps_diagnostics(self):
    params, batch = _setup(seed=8)
    key = jax.random.key(5)
    tx = optax.chain(sam_optax.rw_sam(RHO, 0.5, num_probes=2), optax.sgd(0.1))

    @self.variant
    def step(params, batch, key):
      return tx.update(
        None, tx.init(params), params, loss_fn=mlp_loss, batch=batch, key=key
      )

    _, state = step(params, batch, key)
    losses = mlp_loss(params, batch)
    norms = sam_optax.finite_difference_gradient_norms(
      mlp_loss, params, batch, key, num_probes=2, losses=losses
    )
    weights = sam_optax.gibbs_weights(norms, 0.5)
    get = lambda name: optax.tree.get(state, name)
    np.testing.assert_allclose(get("clean_loss"), jnp.mean(losses), rtol=1e-6)
    # The estimates divide a loss difference by σ = 1e-4: where the step and
    # this recomputation round ℓ differently (jit against eager, XLA's
    # optimization level), they differ by up to ~1e-7 / 1e-4 relative.
    fd_rtol = 2e-3
    np.testing.assert_allclose(
      get("gradient_norm_mean"), jnp.mean(norms), rtol=fd_rtol
    )
    np.testing.assert_allclose(
      get("gradient_norm_std"), jnp.std(norms), rtol=fd_rtol
    )
    np.testing.assert_allclose(
      get("gradient_norm_max"), jnp.max(norms), rtol=fd_rtol
    )
    np.testing.assert_allclose(
      get("effective_sample_size"), 1 / jnp.sum(weights**2), rtol=fd_rtol
    )
    np.testing.assert_allclose(
      get("weight_entropy"),
      -jnp.sum(weights * jnp.log(weights)),
      rtol=fd_rtol,
    )
    assert 1.0 <= get("effective_sample_size") <= 8.0

  def test_identical_examples_give_uniform_weights(self):
    params, batch = _setup(seed=9)
    same = jax.tree.map(lambda x: jnp.repeat(x[:1], 8, axis=0), batch)
    for norm_scaling in ("mean", "max", "zscore", "none"):
      tx = sam_optax.rw_sam(RHO, 0.1, norm_scaling=norm_scaling)
      updates, state = _update(tx, params, same, jax.random.key(0))
      np.testing.assert_allclose(state.effective_sample_size, 8.0, rtol=1e-5)
      np.testing.assert_allclose(state.gradient_norm_std, 0.0, atol=1e-5)
      expected, _ = _update(sam_optax.sam(RHO), params, same)
      chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)


def test_zero_gradient_gives_no_nan():
  """At a minimum of every example, ``s ≈ 0`` and ``g_p = 0``: ``ε = 0``."""
  params = {"w": jnp.ones(3)}
  batch = {"target": jnp.ones((4, 3))}
  loss_fn = lambda p, b: 0.5 * jnp.sum((p["w"] - b["target"]) ** 2, axis=1)
  for norm_scaling, score in itertools.product(
    ("mean", "max", "zscore", "none"), ("norm", "squared_norm")
  ):
    tx = sam_optax.rw_sam(RHO, 0.5, norm_scaling=norm_scaling, score=score)
    updates, state = tx.update(
      None,
      tx.init(params),
      params,
      loss_fn=loss_fn,
      batch=batch,
      key=jax.random.key(0),
    )
    chex.assert_trees_all_close(updates, {"w": jnp.zeros(3)}, atol=1e-6)
    chex.assert_tree_all_finite(state)


@hypothesis.given(
  norms=st.lists(st.floats(0.0, 1e3), min_size=2, max_size=12),
  lam=st.floats(0.05, 10.0),
  scale=st.floats(1e-3, 1e3),
)
def test_gibbs_weights_properties(norms, lam, scale):
  norms = jnp.asarray(norms, jnp.float32)
  hypothesis.assume(float(jnp.mean(norms)) > 1e-3)
  weights = sam_optax.gibbs_weights(norms, lam)
  np.testing.assert_allclose(jnp.sum(weights), 1.0, rtol=1e-5)
  assert np.all(np.asarray(weights) >= 0)
  # Larger norm, no smaller weight.
  order = np.argsort(np.asarray(norms), kind="stable")
  assert np.all(np.diff(np.asarray(weights)[order]) >= -1e-7)
  # Every scaling but "none" makes λ scale-free: s and c·s weigh alike.
  for norm_scaling in ("mean", "max", "zscore"):
    for score in ("norm", "squared_norm"):
      np.testing.assert_allclose(
        sam_optax.gibbs_weights(scale * norms, lam, norm_scaling, score),
        sam_optax.gibbs_weights(norms, lam, norm_scaling, score),
        rtol=1e-3,
        atol=1e-7,
      )
  np.testing.assert_allclose(
    sam_optax.gibbs_weights(norms, jnp.inf), 1 / len(norms), rtol=1e-6
  )


def test_rho_in_the_exponent_is_no_scaling_with_lam_over_rho():
  norms = jnp.asarray([0.5, 2.0, 1.0, 3.0])
  rho, lam = 0.05, 0.5
  np.testing.assert_allclose(
    sam_optax.gibbs_weights(norms, lam / rho, norm_scaling="none"),
    jax.nn.softmax(rho * norms / lam),
    rtol=1e-6,
  )


@pytest.mark.parametrize("norm_scaling", ["mean", "max", "zscore", "none"])
@pytest.mark.parametrize("score", ["norm", "squared_norm"])
def test_huge_norms_give_finite_weights(norm_scaling, score):
  # s² overflows float32 here, and s/λ too for "none" with a small λ.
  norms = jnp.asarray([1e30, 3e30, 2e30, 0.0])
  weights = sam_optax.gibbs_weights(norms, 1e-3, norm_scaling, score)
  assert np.all(np.isfinite(weights))
  np.testing.assert_allclose(jnp.sum(weights), 1.0, rtol=1e-5)
  if norm_scaling != "none":  # unscaled, the overflowing logits are clipped
    assert int(jnp.argmax(weights)) == 1


def test_cost_is_sam_plus_one_forward():
  """Compiled FLOPs of one training step: RW-SAM = SAM + one forward.

  SAM's step is two forward-backward passes (the clean gradient, then at
  ``w + ε``); RW-SAM's is the VJP of the clean losses pulled back once, the
  probe forward, and the pass at ``w + ε``. Beyond that one forward, RW-SAM
  adds O(d + B) elementwise work: the probe's PRNG (counted below), the
  shift ``w + σv``, the softmax. The MLP has B·d ≫ d, so that rest is a few
  percent of a forward; the bound allows 10%. A clean gradient passed as
  ``updates`` is dead code under ``jit``.
  """
  params = mlp_params(jax.random.key(0), in_dim=64, hidden=128, out_dim=10)
  batch = mlp_batch(jax.random.key(1), size=64, in_dim=64, out_dim=10)
  key = jax.random.key(2)

  def step(tx, pass_gradient):
    def fn(params, key):
      grads = grad_mean(params, batch) if pass_gradient else None
      return _update(tx, params, batch, key, grads)[0]

    return fn

  flops = compiled_flops
  forward = flops(lambda p: mlp_loss(p, batch), params)
  probe = flops(lambda k: _per_example.rademacher_like(k, params), key)
  sam = flops(step(sam_optax.sam(RHO), True), params, key)
  rw = flops(step(sam_optax.rw_sam(RHO), True), params, key)
  rw_without_gradient = flops(step(sam_optax.rw_sam(RHO), False), params, key)
  two_probes = flops(
    step(sam_optax.rw_sam(RHO, num_probes=2), False), params, key
  )
  assert rw == rw_without_gradient
  assert 0 <= rw - sam - forward - probe <= 0.1 * forward, (
    rw,
    sam,
    forward,
    probe,
  )
  assert 0 <= two_probes - rw - forward - probe <= 0.1 * forward


class BFloat16Test(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_step_is_finite_and_close_to_float32(self):
    def loss_fn(params, batch):  # computes in the parameters' dtype
      kernel = params["hidden"]["kernel"]
      hidden = jnp.tanh(
        batch["x"].astype(kernel.dtype) @ kernel + params["hidden"]["bias"]
      )
      logits = hidden @ params["out"]["kernel"] + params["out"]["bias"]
      return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["y"]
      )

    params, batch = _setup(seed=10)
    params16 = optax.tree.cast(params, jnp.bfloat16)
    params32 = optax.tree.cast(params16, jnp.float32)
    tx = sam_optax.rw_sam(RHO, 0.5)
    step = self.variant(
      lambda p: tx.update(
        None, tx.init(p), p, loss_fn=loss_fn, batch=batch, key=jax.random.key(0)
      )
    )
    updates16, state16 = step(params16)
    updates32, state32 = step(params32)
    chex.assert_trees_all_equal_dtypes(updates16, params16)
    chex.assert_tree_all_finite(updates16)
    # The probe pass runs in float32 in both: the same weights.
    np.testing.assert_allclose(
      state16.gradient_norm_mean, state32.gradient_norm_mean, rtol=1e-3
    )
    difference = jax.tree.map(
      lambda a, b: a.astype(jnp.float32) - b, updates16, updates32
    )
    # bfloat16 has 8 significant bits: relative rounding ~ 4e-3 per op.
    assert global_norm(difference) < 0.05 * global_norm(updates32)


def test_trains():
  params, batch = _setup(seed=11, size=16)
  tx = optax.chain(sam_optax.rw_sam(0.05, 0.5), optax.sgd(0.3))

  @jax.jit
  def step(params, state, key):
    updates, state = tx.update(
      None, state, params, loss_fn=mlp_loss, batch=batch, key=key
    )
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  first = float(mean_loss(mlp_loss, params, batch))
  for i in range(30):
    params, state = step(
      params, state, jax.random.fold_in(jax.random.key(0), i)
    )
  assert float(mean_loss(mlp_loss, params, batch)) < 0.7 * first
  # The state's clean loss is the loss at the last step's parameters.
  assert 0 < float(optax.tree.get(state, "clean_loss")) < first


def test_bad_options_are_clear_errors():
  with pytest.raises(ValueError, match="lam must be > 0"):
    sam_optax.rw_sam(RHO, 0.0)
  with pytest.raises(ValueError, match="sigma must be > 0"):
    sam_optax.rw_sam(RHO, sigma=-1e-3)
  with pytest.raises(ValueError, match="norm_scaling must be one of"):
    sam_optax.rw_sam(RHO, norm_scaling="median")
  with pytest.raises(ValueError, match="score must be one of"):
    sam_optax.rw_sam(RHO, score="cube")
  with pytest.raises(ValueError, match="gradient_norms"):
    sam_optax.rw_sam(RHO, gradient_norms="hutchinson")
  with pytest.raises(ValueError, match="num_probes"):
    sam_optax.rw_sam(RHO, num_probes=0)
  with pytest.raises(ValueError, match="rho"):
    sam_optax.rw_sam(-1.0)
  with pytest.raises(ValueError, match="eta"):
    sam_optax.rw_asam(RHO, eta=-1.0)
