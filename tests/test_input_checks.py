"""Bad input is a clear error, and extreme input a right result, in every variant.

Hyperparameters are checked when a transform is built, with a ``ValueError``
that names the argument; NumPy integers work wherever a Python int does.
Empty batches, parameters that cannot be perturbed (integer, boolean, complex
leaves) and transforms hidden inside ``optax.masked`` are errors at trace
time. Gradients of any finite size keep ``‖ε‖ = ρ``: no overflow turns SAM
into SGD, and no NaN appears.
"""

import functools

from absl.testing import parameterized
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

RHO = 0.1

# name -> factory(rho) for every transform with a radius.
TRANSFORMS = {
  "sam": sam_optax.sam,
  "usam": sam_optax.usam,
  "n_sam": sam_optax.n_sam,
  "asam": sam_optax.asam,
  "f_sam": sam_optax.f_sam,
  "rw_sam": sam_optax.rw_sam,
  "rw_asam": sam_optax.rw_asam,
  "m_sam": functools.partial(sam_optax.m_sam, micro_batch_size=2),
  "reference.m_sam": functools.partial(
    sam_optax.reference.m_sam, micro_batch_size=2
  ),
  "data_parallel_m_sam": functools.partial(
    sam_optax.data_parallel_m_sam, axis_name="data"
  ),
  "gsam": sam_optax.gsam,
  "wsam": sam_optax.wsam,
  "vasso": sam_optax.vasso,
  "look_sam": sam_optax.look_sam,
  "momentum_sam": sam_optax.momentum_sam,
}
# Transforms whose update runs outside shard_map.
LOCAL = [name for name in TRANSFORMS if name != "data_parallel_m_sam"]


def _update(tx, params, batch, loss_fn=mlp_loss):
  return tx.update(
    None,
    tx.init(params),
    params,
    loss_fn=loss_fn,
    batch=batch,
    ascent_batch=batch,
    key=jax.random.key(0),
  )[0]


# --- Hyperparameters --------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize(
  "rho", [None, jnp.inf, -jnp.inf, jnp.nan, -0.1, "0.1", True, [0.1, 0.2]]
)
def test_bad_rho(name, rho):
  with pytest.raises(ValueError, match=f"{name}: rho must be"):
    TRANSFORMS[name](rho)


def _rw_sam_sigma(value):
  return sam_optax.rw_sam(RHO, sigma=value)


def _rw_asam_sigma(value):
  return sam_optax.rw_asam(RHO, sigma=value)


# RW-SAM's sigma=None is its documented default (1e-4, with a warning for
# low-precision compute); every other None here is refused.
NONE_IS_THE_DEFAULT = (_rw_sam_sigma, _rw_asam_sigma)


@pytest.mark.parametrize(
  "make, argument",
  [
    (lambda v: sam_optax.f_sam(RHO, sigma=v), "sigma"),
    (_rw_sam_sigma, "sigma"),
    (_rw_asam_sigma, "sigma"),
    (lambda v: sam_optax.asam(RHO, eta=v), "eta"),
    (lambda v: sam_optax.rw_asam(RHO, eta=v), "eta"),
    (lambda v: sam_optax.rw_sam(RHO, lam=v), "lam"),
    (lambda v: sam_optax.gsam(RHO, alpha=v), "alpha"),
    (lambda v: sam_optax.wsam(RHO, gamma=v), "gamma"),
    (lambda v: sam_optax.vasso(RHO, theta=v), "theta"),
    (lambda v: sam_optax.look_sam(RHO, alpha=v), "alpha"),
    (lambda v: sam_optax.momentum_sam(RHO, momentum=v), "momentum"),
  ],
)
@pytest.mark.parametrize("value", [None, jnp.inf, jnp.nan, -1.0])
def test_bad_real_hyperparameters(make, argument, value):
  if argument == "lam" and value == jnp.inf:
    pytest.skip("lam = inf is allowed: uniform weights, mini-batch SAM")
  if value is None and make in NONE_IS_THE_DEFAULT:
    make(value)  # accepted: the documented default
    return
  with pytest.raises(ValueError, match=f"{argument} must be"):
    make(value)


@pytest.mark.parametrize("ema_decay", [-0.1, 1.0, 1.5, jnp.inf, None])
def test_f_sam_ema_decay_in_unit_interval(ema_decay):
  with pytest.raises(ValueError, match="ema_decay must be"):
    sam_optax.f_sam(RHO, ema_decay=ema_decay)


@pytest.mark.parametrize(
  "make, argument, value",
  [
    (lambda v: sam_optax.wsam(RHO, gamma=v), "gamma", 1.0),
    (lambda v: sam_optax.vasso(RHO, theta=v), "theta", 0.0),
    (lambda v: sam_optax.vasso(RHO, theta=v), "theta", 1.5),
    (lambda v: sam_optax.momentum_sam(RHO, momentum=v), "momentum", 1.0),
  ],
)
def test_hyperparameters_out_of_their_interval(make, argument, value):
  with pytest.raises(ValueError, match=f"{argument} must be"):
    make(value)


def test_allowed_edge_values():
  sam_optax.gsam(RHO, alpha=0.0)
  sam_optax.wsam(RHO, gamma=0.0)
  sam_optax.vasso(RHO, theta=1.0)
  sam_optax.look_sam(RHO, every_k=1, alpha=0.0)
  sam_optax.momentum_sam(RHO, momentum=0.0)
  sam_optax.f_sam(RHO, sigma=0.0, ema_decay=0.0)
  sam_optax.asam(RHO, eta=0.0)
  sam_optax.rw_sam(RHO, lam=jnp.inf)
  sam_optax.sam(np.float32(0.0))
  sam_optax.sam(jnp.asarray(0.05))


def test_numpy_integers_are_ints():
  params = mlp_params(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1), size=8)
  two = np.int64(2)
  pairs = [
    (
      sam_optax.m_sam(RHO, two, micro_batches_per_chunk=np.int32(4)),
      sam_optax.m_sam(RHO, 2, micro_batches_per_chunk=4),
    ),
    (sam_optax.reference.m_sam(RHO, two), sam_optax.reference.m_sam(RHO, 2)),
    (
      sam_optax.rw_sam(
        RHO, num_probes=two, gradient_norms="exact", chunk_size=np.int16(4)
      ),
      sam_optax.rw_sam(RHO, num_probes=2, gradient_norms="exact", chunk_size=4),
    ),
  ]
  for with_numpy, with_python in pairs:
    jax.tree.map(
      np.testing.assert_array_equal,
      _update(with_numpy, params, batch),
      _update(with_python, params, batch),
    )
  sam_optax.data_parallel_m_sam(RHO, "data", micro_batch_size=two)
  norms = sam_optax.per_example_gradient_norms(
    mlp_loss, params, batch, chunk_size=two
  )
  assert norms.shape == (8,)
  assert sam_optax.diagnostics.micro_batch_coefficient(
    np.int64(2), 8
  ) == sam_optax.diagnostics.micro_batch_coefficient(2, 8)


@pytest.mark.parametrize("value", [True, 2.0, 0, jnp.asarray(2)])
def test_bad_integers(value):
  with pytest.raises(ValueError, match="micro_batch_size must be a positive"):
    sam_optax.m_sam(RHO, value)
  with pytest.raises(ValueError, match="num_probes must be a positive"):
    sam_optax.rw_sam(RHO, num_probes=value)
  with pytest.raises(ValueError, match="every_k must be a positive"):
    sam_optax.look_sam(RHO, every_k=value)


# --- Batches and parameters ---------------------------------------------------


@pytest.mark.parametrize("name", LOCAL)
def test_empty_batch(name):
  params = mlp_params(jax.random.key(0))
  empty = mlp_batch(jax.random.key(1), size=0)
  with pytest.raises(ValueError, match="`batch` is empty"):
    _update(TRANSFORMS[name](RHO), params, empty)


def _with_step_counter(params, dtype):
  return {**params, "step": jnp.zeros([], dtype)}


@pytest.mark.parametrize("name", LOCAL)
@pytest.mark.parametrize(
  "dtype, kind",
  [
    (jnp.int32, "non-floating"),
    (jnp.bool_, "non-floating"),
    (jnp.complex64, "complex"),
  ],
)
def test_leaves_that_cannot_be_perturbed(name, dtype, kind):
  """Named, with its path, rather than a jax.grad error or a dropped part."""
  params = _with_step_counter(mlp_params(jax.random.key(0)), dtype)
  batch = mlp_batch(jax.random.key(1), size=4)
  loss_fn = lambda p, b: mlp_loss(
    {k: v for k, v in p.items() if k != "step"}, b
  )
  with pytest.raises(ValueError, match=rf"\['step'\] has the {kind} dtype"):
    _update(TRANSFORMS[name](RHO), params, batch, loss_fn)


@pytest.mark.parametrize("name", ["sam", "rw_sam", "m_sam"])
def test_inside_optax_masked_points_to_perturb_mask(name):
  params = mlp_params(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1), size=4)
  mask = {
    "hidden": {"kernel": True, "bias": True},
    "out": {"kernel": True, "bias": False},
  }
  tx = optax.masked(TRANSFORMS[name](RHO), mask)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r"MaskedNode.*perturb_mask"):
    tx.update(
      grads,
      tx.init(params),
      params,
      loss_fn=mlp_loss,
      batch=batch,
      key=jax.random.key(0),
    )


# --- Huge and zero gradients ---------------------------------------------------


class ScaleTest(parameterized.TestCase):
  """Multiplying the loss by ``c`` multiplies every variant's output by ``c``.

  ``ε`` is normalized, so it does not depend on ``c``; before the norms were
  scaled, ``c = 1e25`` overflowed ``‖g‖²`` and ``ε`` silently became 0 (SAM
  turned into SGD), and RW-SAM's weights became NaN.
  """

  # USAM's ε = ρ g grows with c: it is not scale-free by design.
  @parameterized.named_parameters(
    *[(name, name) for name in LOCAL if name != "usam"]
  )
  def test_huge_gradients_keep_the_perturbation(self, name):
    params = mlp_params(jax.random.key(0))
    batch = mlp_batch(jax.random.key(1), size=8)
    tx = TRANSFORMS[name](RHO)
    scale = 1e25
    reference = _update(tx, params, batch)
    huge = _update(tx, params, batch, lambda p, b: scale * mlp_loss(p, b))
    # RW-SAM's finite differences carry float32 rounding of the huge losses.
    rtol = 1e-3 if name.startswith("rw_") else 1e-5
    for x, y in zip(jax.tree.leaves(reference), jax.tree.leaves(huge)):
      assert np.all(np.isfinite(y))
      np.testing.assert_allclose(y / scale, x, rtol=rtol, atol=1e-6)

  def test_perturbation_norm_is_rho_for_any_finite_gradient(self):
    for magnitude in (1e-30, 1.0, 1e19, 1e30, 3e38):
      direction = {
        "a": jnp.full((3,), magnitude, jnp.float32),
        "b": jnp.asarray([-magnitude, 0.0], jnp.float32),
      }
      epsilon = _perturbation.perturbation(direction, RHO)
      norm = float(_perturbation.global_norm(epsilon))
      if magnitude >= 1e-10:  # tiny ones are damped by δ, as the formula says
        np.testing.assert_allclose(norm, RHO, rtol=1e-6)
      if magnitude < 1e38:  # 2 · 3e38 is beyond float32
        np.testing.assert_allclose(
          float(_perturbation.global_norm(direction)), 2 * magnitude, rtol=1e-6
        )

  def test_zero_gradient_gives_no_nan(self):
    params = mlp_params(jax.random.key(0))
    batch = mlp_batch(jax.random.key(1), size=8)
    zero_loss = lambda p, b: 0.0 * mlp_loss(p, b)
    for name in LOCAL:
      out = _update(TRANSFORMS[name](RHO), params, batch, zero_loss)
      for leaf in jax.tree.leaves(out):
        np.testing.assert_array_equal(leaf, 0.0, err_msg=name)
