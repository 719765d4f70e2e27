"""``perturb_mask``: every variant perturbs only the chosen leaves.

Excluded leaves get ``ε = 0`` and do not count in the norm; the returned
gradient ``∇L_B(w + ε)`` still covers every leaf. Each variant is compared
with its formula written out with ``jax.grad`` on the masked direction.
"""

import functools

from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import sam_optax

from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

RHO = 0.1
DELTA = 1e-12
# Perturb the kernels of the hidden layer and the bias of the output layer.
MASK = {
  "hidden": {"kernel": True, "bias": False},
  "out": {"kernel": False, "bias": True},
}


def mask_fn(params):
  """The same mask, as a function of the parameters."""
  del params
  return MASK


def grad_mean(params, batch):
  return jax.grad(lambda p: jnp.mean(mlp_loss(p, batch)))(params)


def masked(tree):
  return jax.tree.map(
    lambda x, keep: x if keep else jnp.zeros_like(x), tree, MASK
  )


def norm(tree):
  return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def normalized_step(params, batch, direction, scale=None):
  """``∇L_B(w + ε)``, ``ε = ρ T u/‖u‖``, ``u = T ⊙ M ⊙ d`` (T = 1 if None)."""
  u = masked(direction)
  if scale is not None:
    u = jax.tree.map(jnp.multiply, scale, u)
  eps = jax.tree.map(lambda x: RHO * x / (norm(u) + DELTA), u)
  if scale is not None:
    eps = jax.tree.map(jnp.multiply, scale, eps)
  return grad_mean(jax.tree.map(jnp.add, params, eps), batch)


def sam_formula(params, batch, ascent_batch):
  del ascent_batch
  return normalized_step(params, batch, grad_mean(params, batch))


def usam_formula(params, batch, ascent_batch):
  del ascent_batch
  g = masked(grad_mean(params, batch))
  return grad_mean(jax.tree.map(lambda w, x: w + RHO * x, params, g), batch)


def n_sam_formula(params, batch, ascent_batch):
  return normalized_step(params, batch, grad_mean(params, ascent_batch))


def asam_formula(params, batch, ascent_batch, eta=0.01):
  del ascent_batch
  scale = {
    layer: {
      "kernel": jnp.abs(p["kernel"]) + eta,
      "bias": jnp.ones_like(p["bias"]),
    }
    for layer, p in params.items()
  }
  return normalized_step(params, batch, grad_mean(params, batch), scale)


def m_sam_formula(params, batch, ascent_batch, micro_batch_size=2):
  del ascent_batch
  size = batch["x"].shape[0]
  steps = [
    sam_formula(
      params,
      jax.tree.map(lambda x, j=j: x[j : j + micro_batch_size], batch),
      None,
    )
    for j in range(0, size, micro_batch_size)
  ]
  return jax.tree.map(lambda *g: sum(g) / len(g), *steps)


def rw_sam_formula(params, batch, ascent_batch, lam=0.5):
  """Exact per-example norms over every leaf; the ascent masked."""
  del ascent_batch
  per_example = jax.vmap(
    lambda example: norm(
      grad_mean(params, jax.tree.map(lambda x: x[None], example))
    )
  )(batch)
  weights = jax.nn.softmax(per_example / jnp.mean(per_example) / lam)
  g_p = jax.grad(lambda p: jnp.sum(weights * mlp_loss(p, batch)))(params)
  return normalized_step(params, batch, g_p)


def dot(tree, other):
  return sum(
    jnp.vdot(a, b)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other))
  )


def gsam_formula(params, batch, ascent_batch, alpha=0.3):
  """``g_adv − α g_⊥``: ``g_adv`` at the masked ``ε``, ``g_⊥`` on every leaf."""
  g, g_adv = grad_mean(params, batch), sam_formula(params, batch, ascent_batch)
  coefficient = dot(g, g_adv) / dot(g_adv, g_adv)
  return jax.tree.map(lambda a, x: a - alpha * (x - coefficient * a), g_adv, g)


def wsam_formula(params, batch, ascent_batch, gamma=0.8):
  g, g_adv = grad_mean(params, batch), sam_formula(params, batch, ascent_batch)
  return jax.tree.map(lambda x, a: x + gamma / (1 - gamma) * (a - x), g, g_adv)


VARIANTS = {
  "sam": (sam_optax.sam, sam_formula),
  "usam": (sam_optax.usam, usam_formula),
  "n_sam": (sam_optax.n_sam, n_sam_formula),
  "asam": (functools.partial(sam_optax.asam, eta=0.01), asam_formula),
  # F-SAM's first step is SAM's (official code).
  "f_sam": (sam_optax.f_sam, sam_formula),
  "m_sam": (
    functools.partial(sam_optax.m_sam, micro_batch_size=2),
    m_sam_formula,
  ),
  "reference.m_sam": (
    functools.partial(sam_optax.reference.m_sam, micro_batch_size=2),
    m_sam_formula,
  ),
  "rw_sam": (
    functools.partial(sam_optax.rw_sam, gradient_norms="exact"),
    rw_sam_formula,
  ),
  "gsam": (functools.partial(sam_optax.gsam, alpha=0.3), gsam_formula),
  "wsam": (functools.partial(sam_optax.wsam, gamma=0.8), wsam_formula),
  # VaSSO's and LookSAM's first steps are SAM's (d_1 = θ g_1; step 0 is a
  # SAM step); Momentum-SAM's mask: tests/test_new_variants.py.
  "vasso": (functools.partial(sam_optax.vasso, theta=0.4), sam_formula),
  "look_sam": (functools.partial(sam_optax.look_sam, every_k=2), sam_formula),
}


def _setup():
  return (
    mlp_params(jax.random.key(0)),
    mlp_batch(jax.random.key(1), size=8),
    mlp_batch(jax.random.key(2), size=16),
  )


def _update(tx, params, batch, ascent_batch, updates):
  return tx.update(
    updates,
    tx.init(params),
    params,
    loss_fn=mlp_loss,
    batch=batch,
    ascent_batch=ascent_batch,
    key=jax.random.key(3),
  )[0]


class PerturbMaskTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(name, name) for name in VARIANTS])
  def test_formula(self, name):
    factory, formula = VARIANTS[name]
    params, batch, ascent_batch = _setup()
    expected = formula(params, batch, ascent_batch)
    unmasked = _update(factory(RHO), params, batch, ascent_batch, None)
    # A pytree of bools, jitted; the same mask as a function, not jitted.
    as_tree = jax.jit(
      functools.partial(_update, factory(RHO, perturb_mask=MASK))
    )
    got = as_tree(params, batch, ascent_batch, grad_mean(params, batch))
    got_fn = _update(
      factory(RHO, perturb_mask=mask_fn), params, batch, ascent_batch, None
    )
    for result in (got, got_fn):
      self.assertEqual(jax.tree.structure(result), jax.tree.structure(params))
      for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(result)):
        np.testing.assert_allclose(y, x, rtol=2e-5, atol=1e-6)
    # The mask matters: the result differs from perturbing every leaf.
    self.assertGreater(norm(jax.tree.map(jnp.subtract, got, unmasked)), 1e-4)

  def test_rw_asam_scale_applies_within_the_mask(self):
    params, batch, _ = _setup()
    everything = lambda p: jax.tree.map(lambda _: True, p)
    # With ASAM's scale off everywhere, RW-ASAM is RW-SAM, mask and all.
    a = _update(
      sam_optax.rw_asam(
        RHO,
        0.5,
        scale_mask=lambda p: jax.tree.map(lambda _: False, p),
        gradient_norms="exact",
        perturb_mask=MASK,
      ),
      params,
      batch,
      None,
      None,
    )
    b = _update(
      sam_optax.rw_sam(RHO, 0.5, gradient_norms="exact", perturb_mask=MASK),
      params,
      batch,
      None,
      None,
    )
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)
    # Masking every leaf in is the same as no mask.
    c = _update(
      sam_optax.rw_asam(
        RHO, 0.5, gradient_norms="exact", perturb_mask=everything
      ),
      params,
      batch,
      None,
      None,
    )
    d = _update(
      sam_optax.rw_asam(RHO, 0.5, gradient_norms="exact"),
      params,
      batch,
      None,
      None,
    )
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), c, d)

  def test_nothing_perturbed_is_the_clean_gradient(self):
    params, batch, _ = _setup()
    nothing = jax.tree.map(lambda _: False, params)
    got = _update(
      sam_optax.sam(RHO, perturb_mask=nothing), params, batch, None, None
    )
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6),
      got,
      grad_mean(params, batch),
    )

  def test_mask_of_the_wrong_structure_is_an_error(self):
    params, batch, _ = _setup()
    with self.assertRaisesRegex(ValueError, "perturb_mask.*structure"):
      _update(
        sam_optax.sam(RHO, perturb_mask={"hidden": True}),
        params,
        batch,
        None,
        None,
      )
