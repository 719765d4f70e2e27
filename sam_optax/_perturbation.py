"""The ascent step shared by the SAM family: ``ε`` from a direction, and ``∇L(w+ε)``.

Every variant picks an ascent direction ``d`` (the clean gradient for SAM, a
full-data gradient for n-SAM, a reweighted gradient for RW-SAM, ...) and then
does the same two things:

1. ``ε = ρ T ⊙ u / (‖u‖ + δ)`` with ``u = T ⊙ d`` (``ε = ρ T ⊙ u`` unnormalized,
   as in USAM), where ``T`` is ASAM's elementwise scale and ``T = 1`` otherwise;
2. the gradient handed on, ``∇L_B(w + ε)``.

Norms are global L2 norms over every leaf, accumulated in float32 whatever the
parameters' dtype and scaled by the largest entry so that no finite gradient
overflows them, and ``δ = 1e-12`` guards the division, so a zero direction
gives a zero perturbation, never NaN. A ``perturb_mask`` restricts ``ε`` (and
the norm) to some leaves.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from sam_optax import _contract

NORM_EPS = 1e-12
"""``δ``: guards every division by a norm (a zero gradient gives ``ε = 0``)."""


PerturbMask = Any | Callable[[Any], Any] | None
"""Which leaves SAM perturbs: None (all), a pytree of bools shaped like the
parameters, or a function ``params -> that pytree``."""


def magnitude_scale(tree: Any) -> jax.Array:
  """``max_j |x_j|`` over every entry of a float32 ``tree``, or 1 if that is
  zero, infinite or NaN: dividing by it keeps squares from overflowing."""
  largest = optax.tree.norm(tree, ord="inf")
  return jnp.where(jnp.isfinite(largest) & (largest > 0), largest, 1.0)


def divide(tree: Any, scale: jax.Array) -> Any:
  """``tree / scale``, as two multiplications by ``1/sqrt(scale)``.

  XLA turns a division by a scalar into a multiplication by its reciprocal,
  which is subnormal, so flushed to zero, for scales above ~8.5e37; the
  reciprocal of the square root is a normal number for every normal scale.
  """
  root = jax.lax.rsqrt(scale)
  return jax.tree.map(lambda x: (x * root) * root, tree)


def global_norm(tree: Any) -> jax.Array:
  """The global L2 norm over every leaf, accumulated in float32.

  Computed as ``a ‖x/a‖`` with ``a = max_j |x_j|``, so it stays finite for any
  finite ``x`` (a plain float32 sum of squares overflows from ``‖x‖ ≈
  1.8e19``).
  """
  tree = optax.tree.cast(tree, jnp.float32)
  scale = magnitude_scale(tree)
  return scale * optax.tree.norm(divide(tree, scale))


def resolve_mask(
  mask: PerturbMask,
  params: Any,
  transform_name: str,
  argument: str = "perturb_mask",
) -> Any | None:
  """The pytree of bools ``mask`` stands for at ``params`` (None stays None).

  Raises:
    ValueError: if it does not have the structure of ``params``, or a leaf
      is not a bool (or a boolean array).
  """
  if mask is None:
    return None
  tree = mask(params) if callable(mask) else mask
  _contract.check_same_structure(
    tree,
    params,
    argument,
    transform_name,
    hint=(
      f"Pass a pytree of bools shaped like params, or a function of"
      " params returning one. (Inside optax.inject_hyperparams a"
      " callable argument is taken for a schedule: pass"
      f" static_args=({argument!r},).)"
    ),
  )
  _contract.check_bool_leaves(tree, argument, transform_name)
  return tree


def apply_mask(tree: Any, mask: Any | None) -> Any:
  """``tree`` with the leaves where ``mask`` is False set to zero."""
  if mask is None:
    return tree

  def leaf(x: jax.Array, keep: Any) -> jax.Array:
    if isinstance(keep, (bool, np.bool_)):
      return x if keep else jnp.zeros_like(x)
    return jnp.where(keep, x, jnp.zeros_like(x))  # a traced or array mask

  return jax.tree.map(leaf, tree, mask)


def perturbation(
  direction: Any,
  rho: ArrayLike,
  *,
  normalize: bool = True,
  scale: Any | None = None,
  mask: Any | None = None,
) -> Any:
  """The ascent perturbation ``ε`` (float32 leaves).

  ``ε = ρ T ⊙ u / (‖u‖ + δ)`` with ``u = T ⊙ M ⊙ d`` if ``normalize`` (SAM,
  ASAM), else ``ε = ρ T ⊙ u`` (USAM); ``T = 1`` when ``scale`` is None and
  ``M`` (0 or 1 per leaf) is ``mask``, 1 everywhere when None. The normalized
  form divides ``u`` by its largest magnitude first, so ``‖ε‖ = ρ`` for any
  finite nonzero ``u`` (no overflow to ``ε = 0``).

  Args:
    direction: the ascent direction ``d``, a pytree like the parameters.
    rho: the radius ``ρ``.
    normalize: divide by the norm of ``u`` (SAM) or not (USAM).
    scale: ASAM's elementwise scale ``T`` (a pytree like ``direction``), or None.
    mask: a pytree of bools like ``direction`` (see
      :func:`resolve_mask`): leaves where it is False are not
      perturbed and do not count in the norm. None perturbs every leaf.

  Returns:
    ``ε``, a pytree like ``direction`` with float32 leaves.
  """
  scaled = apply_mask(optax.tree.cast(direction, jnp.float32), mask)
  if scale is not None:
    scaled = optax.tree.mul(optax.tree.cast(scale, jnp.float32), scaled)
  factor = jnp.asarray(rho, jnp.float32)
  if normalize:
    # u / (‖u‖ + δ) = (u/a) / (‖u/a‖ + δ/a): the same, without overflow.
    magnitude = magnitude_scale(scaled)
    scaled = divide(scaled, magnitude)
    factor = factor / (optax.tree.norm(scaled) + NORM_EPS / magnitude)
  epsilon = optax.tree.scale(factor, scaled)
  if scale is not None:
    epsilon = optax.tree.mul(optax.tree.cast(scale, jnp.float32), epsilon)
  return epsilon


def unit_vector(tree: Any) -> Any:
  """``x / (‖x‖ + δ)`` (float32 leaves; zero for a zero ``x``, never NaN).

  :func:`perturbation` with ``ρ = 1``: no finite ``x`` overflows it.
  """
  return perturbation(tree, 1.0)


def orthogonal_part(tree: Any, onto: Any) -> Any:
  """``x − (x·û) û`` with ``û = u / (‖u‖ + δ)``: ``x`` less its component
  along ``u`` (float32 leaves).

  ``x`` itself when ``u = 0``. ``x·û`` is bounded by ``‖x‖`` (``û`` has norm
  at most one), so it overflows only if ``x`` does.
  """
  tree = optax.tree.cast(tree, jnp.float32)
  direction = unit_vector(onto)
  return optax.tree.add_scale(
    tree, -optax.tree.vdot(tree, direction), direction
  )


def perturb(params: Any, epsilon: Any) -> Any:
  """``w + ε``, in the parameters' own dtypes."""
  return jax.tree.map(
    lambda w, e: (w + e).astype(jnp.result_type(w)), params, epsilon
  )


def perturbed_gradient(
  loss_fn: _contract.LossFn, params: Any, epsilon: Any, batch: Any
) -> Any:
  """``∇L_B(w + ε)``: the gradient SAM hands on to the base optimizer."""
  return _contract.mean_gradient(loss_fn, perturb(params, epsilon), batch)
