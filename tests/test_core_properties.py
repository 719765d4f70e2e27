"""Properties of the core transforms (hypothesis) and their handling of bad input."""

import functools

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

from _problems import flatten
from _problems import mean_loss
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params
from _problems import quadratic_problem

seeds = st.integers(0, 2**16)
radii = st.floats(1e-3, 0.5)


def grad_mean(loss_fn, params, batch):
  return jax.grad(mean_loss, argnums=1)(loss_fn, params, batch)


@functools.partial(jax.jit, static_argnames=("make", "loss_fn"))
def _jitted_step(make, loss_fn, hyperparams, params, batch, extra):
  tx = make(*hyperparams)
  return tx.update(
    grad_mean(loss_fn, params, batch),
    tx.init(params),
    params,
    loss_fn=loss_fn,
    batch=batch,
    **extra,
  )[0]


def one_step(make, hyperparams, params, batch, loss_fn=mlp_loss, **extra):
  """One jitted step of ``make(*hyperparams)``, the hyperparameters traced.

  Tracing them (and keeping ``make`` and ``loss_fn`` the same functions)
  compiles once per test, not once per hypothesis example.
  """
  return _jitted_step(make, loss_fn, tuple(hyperparams), params, batch, extra)


def mlp_setup(seed):
  return (
    mlp_params(jax.random.key(seed)),
    mlp_batch(jax.random.key(seed + 1), size=8),
  )


ALL = {
  "sam": sam_optax.sam,
  "usam": sam_optax.usam,
  "asam": sam_optax.asam,
  "f_sam": sam_optax.f_sam,
  "n_sam": sam_optax.n_sam,
}


def scaled_mlp_loss(params, batch):
  return batch["scale"] * mlp_loss(params, batch)


def bias_only_loss(params, batch):
  hidden = jnp.tanh(batch["x"] + params["layer"]["bias"])
  return jnp.sum((hidden[:, :2] + params["head"]["bias"]) ** 2, axis=-1)


def _extra(name, batch):
  return {"ascent_batch": batch} if name == "n_sam" else {}


@pytest.mark.parametrize("name", sorted(ALL))
@hypothesis.given(seed=seeds)
def test_zero_radius_hands_on_the_clean_gradient(name, seed):
  params, batch = mlp_setup(seed)
  out = one_step(ALL[name], (0.0,), params, batch, **_extra(name, batch))
  chex.assert_trees_all_close(
    out, grad_mean(mlp_loss, params, batch), rtol=1e-6, atol=1e-7
  )


@hypothesis.given(seed=seeds, rho=radii, c=st.floats(0.01, 100.0))
def test_scaling_the_loss_scales_sam_output(seed, rho, c):
  # ε = ρ g/‖g‖ is scale-free, so ∇(cL)(w+ε) = c ∇L(w+ε).
  params, batch = mlp_setup(seed)
  scaled_batch = dict(batch, scale=jnp.full(batch["y"].shape, c, jnp.float32))
  base = one_step(sam_optax.sam, (rho,), params, batch)
  scaled = one_step(
    sam_optax.sam, (rho,), params, scaled_batch, loss_fn=scaled_mlp_loss
  )
  chex.assert_trees_all_close(
    scaled, jax.tree.map(lambda x: c * x, base), rtol=2e-4, atol=1e-6 * c
  )


@hypothesis.given(seed=seeds, rho=radii)
def test_usam_on_a_quadratic_is_g_plus_rho_h_g(seed, rho):
  params, batch, loss_fn, hessian = quadratic_problem(seed)
  g = np.asarray(flatten(grad_mean(loss_fn, params, batch)), np.float64)
  expected = g + rho * hessian @ g
  out = flatten(
    one_step(sam_optax.usam, (rho,), params, batch, loss_fn=loss_fn)
  )
  np.testing.assert_allclose(
    out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max()
  )


@hypothesis.given(
  seed=seeds, rho=radii, convention=st.sampled_from(["previous", "current"])
)
def test_f_sam_without_sigma_is_sam(seed, rho, convention):
  params, _ = mlp_setup(seed)
  f_sam = sam_optax.f_sam(
    rho, sigma=0.0, ema_decay=0.6, momentum_in_direction=convention
  )
  sam = sam_optax.sam(rho)
  state = f_sam.init(params)
  for t in range(3):  # the EMA is carried but, with σ = 0, never used
    batch = mlp_batch(jax.random.key(seed + 10 + t), size=8)
    grads = grad_mean(mlp_loss, params, batch)
    ours, state = f_sam.update(
      grads, state, params, loss_fn=mlp_loss, batch=batch
    )
    reference, _ = sam.update(
      grads, sam.init(params), params, loss_fn=mlp_loss, batch=batch
    )
    chex.assert_trees_all_close(ours, reference, rtol=1e-6, atol=1e-7)
    params = jax.tree.map(lambda w, u: w - 0.3 * u, params, ours)


@hypothesis.given(seed=seeds, rho=radii, eta=st.floats(0.0, 1.0))
def test_asam_with_only_bias_leaves_is_sam(seed, rho, eta):
  # Biases are unscaled (T = 1), so a model of biases alone is plain SAM.
  rng = np.random.default_rng(seed)
  params = {
    "layer": {"bias": jnp.asarray(rng.normal(size=4), jnp.float32)},
    "head": {"bias": jnp.asarray(rng.normal(size=2), jnp.float32)},
  }
  batch = {"x": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}
  ours = one_step(
    sam_optax.asam, (rho, eta), params, batch, loss_fn=bias_only_loss
  )
  reference = one_step(
    sam_optax.sam, (rho,), params, batch, loss_fn=bias_only_loss
  )
  chex.assert_trees_all_close(ours, reference, rtol=1e-6, atol=1e-7)


def test_asam_mask_can_scale_every_leaf():
  params, batch = mlp_setup(0)
  everything = one_step(
    lambda rho: sam_optax.asam(
      rho, scale_mask=lambda p: jax.tree.map(lambda _: True, p)
    ),
    (0.1,),
    params,
    batch,
  )
  default = one_step(sam_optax.asam, (0.1,), params, batch)
  assert not np.allclose(flatten(everything), flatten(default))


def test_n_sam_ascent_batch_and_ascent_gradient_agree():
  params, batch = mlp_setup(1)
  ascent_batch = mlp_batch(jax.random.key(99), size=64)
  tx = sam_optax.n_sam
  from_batch = one_step(tx, (0.1,), params, batch, ascent_batch=ascent_batch)
  from_gradient = one_step(
    tx,
    (0.1,),
    params,
    batch,
    ascent_gradient=grad_mean(mlp_loss, params, ascent_batch),
  )
  chex.assert_trees_all_close(from_batch, from_gradient, rtol=1e-5, atol=1e-7)
  # With the ascent taken on the descent batch itself, n-SAM is mini-batch SAM.
  chex.assert_trees_all_close(
    one_step(tx, (0.1,), params, batch, ascent_batch=batch),
    one_step(sam_optax.sam, (0.1,), params, batch),
    rtol=1e-5,
    atol=1e-7,
  )


# --- bad input ---------------------------------------------------------------


class BadInputTest(chex.TestCase):
  def setUp(self):
    super().setUp()
    self.params, self.batch = mlp_setup(2)

  def test_scalar_loss_is_a_clear_error(self):
    mean_only = lambda p, b: jnp.mean(mlp_loss(p, b))
    for name, make in ALL.items():
      tx = make(0.05)
      with self.assertRaisesRegex(ValueError, "per-example losses of shape"):
        tx.update(
          None,
          tx.init(self.params),
          self.params,
          loss_fn=mean_only,
          batch=self.batch,
          **_extra(name, self.batch),
        )

  def test_missing_loss_fn_or_batch_is_a_clear_error(self):
    tx = sam_optax.sam(0.05)
    state = tx.init(self.params)
    with self.assertRaisesRegex(TypeError, "keyword argument `loss_fn`"):
      tx.update(None, state, self.params, batch=self.batch)
    with self.assertRaisesRegex(TypeError, "keyword argument `batch`"):
      tx.update(None, state, self.params, loss_fn=mlp_loss)
    with self.assertRaisesRegex(TypeError, "keyword argument `params`"):
      tx.update(None, state, None, loss_fn=mlp_loss, batch=self.batch)
    # Inside a chain, the error names the argument too.
    chained = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1))
    with self.assertRaisesRegex(TypeError, "keyword argument `loss_fn`"):
      chained.update(
        None, chained.init(self.params), self.params, batch=self.batch
      )

  def test_mismatched_batch_leaves_are_a_clear_error(self):
    bad = {"x": self.batch["x"], "y": self.batch["y"][:5]}
    tx = sam_optax.sam(0.05)
    with self.assertRaisesRegex(ValueError, "share their leading"):
      jax.jit(
        lambda p, b: tx.update(None, tx.init(p), p, loss_fn=mlp_loss, batch=b)
      )(self.params, bad)

  def test_n_sam_needs_exactly_one_ascent_set(self):
    tx = sam_optax.n_sam(0.05)
    state = tx.init(self.params)
    with self.assertRaisesRegex(TypeError, "neither"):
      tx.update(None, state, self.params, loss_fn=mlp_loss, batch=self.batch)
    with self.assertRaisesRegex(TypeError, "both"):
      tx.update(
        None,
        state,
        self.params,
        loss_fn=mlp_loss,
        batch=self.batch,
        ascent_batch=self.batch,
        ascent_gradient=self.params,
      )

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "rho must be >= 0"):
      sam_optax.sam(-0.1)
    with self.assertRaisesRegex(ValueError, "momentum_in_direction"):
      sam_optax.f_sam(0.05, momentum_in_direction="next")
    tx = sam_optax.sam(0.05)
    with self.assertRaisesRegex(ValueError, "structure of `params`"):
      tx.update(
        {"other": jnp.zeros(3)},
        tx.init(self.params),
        self.params,
        loss_fn=mlp_loss,
        batch=self.batch,
      )

  @parameterized.named_parameters(*[(name, name) for name in sorted(ALL)])
  def test_zero_gradient_gives_zero_perturbation_not_nan(self, name):
    # Every example sits at its minimum: g = 0, so ε must be 0 (δ guards ‖g‖).
    params = {"a": jnp.ones(3), "b": jnp.full((2,), -1.0)}
    batch = {"target": jnp.tile(jnp.array([1.0, 1.0, 1.0, -1.0, -1.0]), (4, 1))}

    def loss_fn(p, b):
      w = jnp.concatenate([p["a"], p["b"]])
      return 0.5 * jnp.sum((w - b["target"]) ** 2, axis=-1)

    tx = ALL[name](0.05)
    updates, state = jax.jit(
      lambda p: tx.update(
        None, tx.init(p), p, loss_fn=loss_fn, batch=batch, **_extra(name, batch)
      )
    )(params)
    for leaf in jax.tree.leaves((updates, state)):
      self.assertTrue(bool(jnp.all(jnp.isfinite(leaf))))
    chex.assert_trees_all_close(
      updates, jax.tree.map(jnp.zeros_like, params), atol=1e-7
    )


def test_rho_schedule_through_inject_hyperparams():
  # optax's own mechanism schedules ρ: step t uses rho=schedule(t).
  params, batch = mlp_setup(4)
  schedule = optax.linear_schedule(0.0, 0.2, transition_steps=4)
  tx = optax.inject_hyperparams(sam_optax.sam)(rho=schedule)
  state = tx.init(params)
  step = jax.jit(
    lambda s, p: tx.update(None, s, p, loss_fn=mlp_loss, batch=batch)
  )
  for t in range(3):
    updates, state = step(state, params)
    reference = one_step(sam_optax.sam, (float(schedule(t)),), params, batch)
    chex.assert_trees_all_close(updates, reference, rtol=1e-5, atol=1e-7)
