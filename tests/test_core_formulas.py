"""One step of each core transform against its formula, written out with jax.grad."""

from absl.testing import parameterized
import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

from _problems import add
from _problems import global_norm
from _problems import mean_loss
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

DELTA = 1e-12
RHO = 0.1


def grad_mean(params, batch):
  return jax.grad(mean_loss, argnums=1)(mlp_loss, params, batch)


# Each reference: (params, batch, ascent_batch) -> the gradient handed on.
def sam_formula(params, batch, unused_ascent_batch):
  g = grad_mean(params, batch)
  eps = jax.tree.map(lambda x: RHO * x / (global_norm(g) + DELTA), g)
  return grad_mean(add(params, eps), batch)


def usam_formula(params, batch, unused_ascent_batch):
  g = grad_mean(params, batch)
  return grad_mean(add(params, g, RHO), batch)


def n_sam_formula(params, batch, ascent_batch):
  g_ascent = grad_mean(params, ascent_batch)
  eps = jax.tree.map(
    lambda x: RHO * x / (global_norm(g_ascent) + DELTA), g_ascent
  )
  return grad_mean(add(params, eps), batch)


def asam_formula(params, batch, unused_ascent_batch, eta=0.01):
  g = grad_mean(params, batch)
  # T = |w| + η on kernels, T = 1 on biases (official ASAM code).
  t = {
    layer: {
      "kernel": jnp.abs(p["kernel"]) + eta,
      "bias": jnp.ones_like(p["bias"]),
    }
    for layer, p in params.items()
  }
  tg = jax.tree.map(jnp.multiply, t, g)
  eps = jax.tree.map(
    lambda ti, x: RHO * ti * x / (global_norm(tg) + DELTA), t, tg
  )
  return grad_mean(add(params, eps), batch)


TRANSFORMS = {
  "sam": (lambda: sam_optax.sam(RHO), sam_formula),
  "usam": (lambda: sam_optax.usam(RHO), usam_formula),
  "n_sam": (lambda: sam_optax.n_sam(RHO), n_sam_formula),
  "asam": (lambda: sam_optax.asam(RHO, eta=0.01), asam_formula),
  # F-SAM's first step is plain SAM (official code); later steps below.
  "f_sam": (
    lambda: sam_optax.f_sam(RHO, sigma=0.7, ema_decay=0.6),
    sam_formula,
  ),
}


def _setup(seed=0):
  params = mlp_params(jax.random.key(seed))
  batch = mlp_batch(jax.random.key(seed + 1), size=8)
  ascent_batch = mlp_batch(jax.random.key(seed + 2), size=32)
  return params, batch, ascent_batch


class OneStepFormulaTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, name) for name in TRANSFORMS])
  def test_alone(self, name):
    make, formula = TRANSFORMS[name]
    params, batch, ascent_batch = _setup()
    tx = make()
    state = tx.init(params)
    extra = {"ascent_batch": ascent_batch} if name == "n_sam" else {}

    @self.variant
    def step(grads, state, params, batch, extra):
      return tx.update(
        grads, state, params, loss_fn=mlp_loss, batch=batch, **extra
      )

    updates, _ = step(grad_mean(params, batch), state, params, batch, extra)
    expected = formula(params, batch, ascent_batch)
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal_structs(updates, params)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(name, name) for name in TRANSFORMS])
  def test_in_chain(self, name):
    make, formula = TRANSFORMS[name]
    params, batch, ascent_batch = _setup(seed=3)
    learning_rate = 0.3
    tx = optax.chain(
      make(), optax.add_decayed_weights(1e-3), optax.sgd(learning_rate)
    )
    state = tx.init(params)
    extra = {"ascent_batch": ascent_batch} if name == "n_sam" else {}

    @self.variant
    def step(grads, state, params, batch, extra):
      return tx.update(
        grads, state, params, loss_fn=mlp_loss, batch=batch, **extra
      )

    updates, _ = step(grad_mean(params, batch), state, params, batch, extra)
    gradient = formula(params, batch, ascent_batch)
    # Weight decay is the base optimizer's business, added after the ascent.
    expected = jax.tree.map(
      lambda g, w: -learning_rate * (g + 1e-3 * w), gradient, params
    )
    chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)

  @parameterized.named_parameters(*[(name, name) for name in TRANSFORMS])
  def test_updates_none_computes_the_clean_gradient(self, name):
    make, _ = TRANSFORMS[name]
    params, batch, ascent_batch = _setup(seed=5)
    tx = make()
    extra = {"ascent_batch": ascent_batch} if name == "n_sam" else {}
    with_grads, _ = tx.update(
      grad_mean(params, batch),
      tx.init(params),
      params,
      loss_fn=mlp_loss,
      batch=batch,
      **extra,
    )
    without, _ = tx.update(
      None, tx.init(params), params, loss_fn=mlp_loss, batch=batch, **extra
    )
    chex.assert_trees_all_close(with_grads, without, rtol=1e-6, atol=1e-7)


class FriendlySamStepsTest(chex.TestCase):
  """F-SAM over three steps, both conventions, against the written-out EMA."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("previous", "current")
  def test_three_steps(self, convention):
    sigma, ema_decay = 0.8, 0.6
    params, _, _ = _setup(seed=7)
    batches = [mlp_batch(jax.random.key(10 + t), size=8) for t in range(3)]
    tx = sam_optax.f_sam(
      RHO, sigma=sigma, ema_decay=ema_decay, momentum_in_direction=convention
    )
    step = self.variant(
      lambda g, s, p, b: tx.update(g, s, p, loss_fn=mlp_loss, batch=b)
    )
    state = tx.init(params)
    momentum = jax.tree.map(jnp.zeros_like, params)
    for t, batch in enumerate(batches):
      g = grad_mean(params, batch)
      if convention == "previous":
        if t == 0:
          direction, momentum = g, g
        else:
          direction = add(g, momentum, -sigma)
          momentum = jax.tree.map(
            lambda m, x: ema_decay * m + (1 - ema_decay) * x, momentum, g
          )
      else:
        momentum = jax.tree.map(
          lambda m, x: ema_decay * m + (1 - ema_decay) * x, momentum, g
        )
        direction = add(g, momentum, -sigma)
      eps = jax.tree.map(
        lambda d: RHO * d / (global_norm(direction) + DELTA), direction
      )
      expected = grad_mean(add(params, eps), batch)
      updates, state = step(g, state, params, batch)
      chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_close(
        state.momentum, momentum, rtol=1e-5, atol=1e-7
      )
      self.assertEqual(int(state.count), t + 1)
      # Move the parameters so that the gradients differ between steps.
      params = add(params, updates, -0.5)


class PeerTest(chex.TestCase):
  """``sam`` + ``sgd`` against optax's own SAM (``optax.contrib.sam``)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_optax_contrib_sam(self):
    params, batch, _ = _setup(seed=11)
    learning_rate = 0.2
    ours = optax.chain(sam_optax.sam(RHO), optax.sgd(learning_rate))
    peer = optax.contrib.sam(
      optax.sgd(learning_rate),
      optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
      sync_period=2,
      opaque_mode=True,
    )
    grads = grad_mean(params, batch)
    ours_updates, _ = self.variant(
      lambda g, s, p: ours.update(g, s, p, loss_fn=mlp_loss, batch=batch)
    )(grads, ours.init(params), params)
    peer_updates, _ = self.variant(
      lambda g, s, p: peer.update(
        g, s, p, grad_fn=lambda w, _: grad_mean(w, batch)
      )
    )(grads, peer.init(params), params)
    chex.assert_trees_all_close(
      ours_updates, peer_updates, rtol=1e-5, atol=1e-6
    )


class Bfloat16Test(chex.TestCase):
  @parameterized.named_parameters(*[(name, name) for name in TRANSFORMS])
  def test_bfloat16_params(self, name):
    make, _ = TRANSFORMS[name]
    params, batch, ascent_batch = _setup(seed=13)
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    extra = {"ascent_batch": ascent_batch} if name == "n_sam" else {}
    tx = make()
    step = jax.jit(
      lambda p, s: tx.update(None, s, p, loss_fn=mlp_loss, batch=batch, **extra)
    )
    low_updates, low_state = step(low, tx.init(low))
    full_updates, _ = step(params, tx.init(params))
    for leaf in jax.tree.leaves(low_updates):
      self.assertEqual(leaf.dtype, jnp.bfloat16)
      self.assertTrue(bool(jnp.all(jnp.isfinite(leaf))))
    chex.assert_trees_all_equal_dtypes(low_state, tx.init(low))
    # bfloat16 keeps ~3 significant digits: compare loosely against float32.
    np.testing.assert_allclose(
      np.asarray(
        jax.flatten_util.ravel_pytree(
          optax.tree.cast(low_updates, jnp.float32)
        )[0]
      ),
      np.asarray(jax.flatten_util.ravel_pytree(full_updates)[0]),
      rtol=0.05,
      atol=0.05,
    )
