"""The ascent step shared by the SAM family: ``ε`` from a direction, and ``∇L(w+ε)``.

Every variant picks an ascent direction ``d`` (the clean gradient for SAM, a
full-data gradient for n-SAM, a reweighted gradient for RW-SAM, ...) and then
does the same two things:

1. ``ε = ρ T ⊙ u / (‖u‖ + δ)`` with ``u = T ⊙ d`` (``ε = ρ T ⊙ u`` unnormalized,
   as in USAM), where ``T`` is ASAM's elementwise scale and ``T = 1`` otherwise;
2. the gradient handed on, ``∇L_B(w + ε)``.

Norms are global L2 norms over every leaf, accumulated in float32 (float64
when a leaf is float64, under ``jax_enable_x64``), and ``δ = 1e-12`` guards
the division. On the common path a norm is the plain ``sqrt(Σ x²)`` and ``ε``
one multiplication per entry, the cost of the step written by hand. Only
when that sum is not finite (overflow: ``‖x‖ ≳ 1.8e19`` in float32) or too
small to be accurate (squares flushed to zero), or the factor ``ρ/(‖u‖ + δ)``
is not representable (a huge ``ρ``), a ``lax.cond`` takes the scaled
computation, which divides by the largest entry first, so that no finite
direction overflows, a zero direction gives ``ε = 0`` exactly at any finite
``ρ``, never NaN, and ``‖ε‖ = ρ`` for any finite nonzero one. A
``perturb_mask`` restricts ``ε`` (and the norm) to some leaves.
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


def accumulation_dtype(*trees: Any) -> jnp.dtype:
  """float64 if a leaf of ``trees`` is float64 (under ``jax_enable_x64``),
  else float32: the dtype norms and ``ε`` are computed in."""
  for leaf in jax.tree.leaves(trees):
    if jnp.result_type(leaf) == jnp.float64:
      return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def _size(tree: Any) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def _accurate(squares: jax.Array, size: int) -> jax.Array:
  """Whether a plain ``Σ x²`` over ``size`` entries is its true value to a
  rounding: finite (nothing overflowed), and at least ``size · tiny / eps``,
  so that squares flushed to zero (each below ``tiny``) lose at most ``eps``
  of it."""
  info = jnp.finfo(squares.dtype)
  floor = size * float(info.tiny) / float(info.eps)
  return jnp.isfinite(squares) & (squares >= floor)


def _choose(
  plain: jax.Array,
  plain_fn: Callable[[Any], Any],
  scaled_fn: Callable[[Any], Any],
  tree: Any,
) -> Any:
  """``plain_fn(tree)`` where ``plain``, else ``scaled_fn(tree)``.

  A ``lax.cond``, so that only one branch runs. Under a mesh with explicit
  axes (``jax.set_mesh``) both are computed and one selected: there a
  ``vmap`` of ``lax.cond`` over a sharded axis (m-SAM's micro-batches of a
  sharded batch) fails in JAX 0.10 ("All operands should have the same
  sharding"), and under ``vmap`` a ``cond`` computes both branches anyway.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and any(
    kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types
  ):
    return jax.tree.map(
      lambda a, b: jnp.where(plain, a, b), plain_fn(tree), scaled_fn(tree)
    )
  return jax.lax.cond(plain, plain_fn, scaled_fn, tree)


def _scaled_norm(tree: Any) -> jax.Array:
  """``a ‖x/a‖`` with ``a = max_j |x_j|``: finite for any finite ``x``."""
  scale = magnitude_scale(tree)
  return scale * optax.tree.norm(divide(tree, scale))


def global_norm(tree: Any) -> jax.Array:
  """The global L2 norm over every leaf (float32, or float64 for float64
  leaves).

  The plain ``sqrt(Σ x²)`` (one pass) when that sum is finite and not so
  small that squares flushed to zero matter; otherwise (``‖x‖ ≳ 1.8e19`` in
  float32, tiny entries, a zero ``x``) ``a ‖x/a‖`` with ``a = max_j |x_j|``,
  so it stays finite for any finite ``x``.
  """
  dtype = accumulation_dtype(tree)
  tree = optax.tree.cast(tree, dtype)
  size = _size(tree)
  if size == 0:
    return jnp.zeros([], dtype)
  squares = optax.tree.norm(tree, squared=True)
  return _choose(
    _accurate(squares, size),
    lambda tree: jnp.sqrt(squares),
    _scaled_norm,
    tree,
  )


def _normalizing_factors(
  tree: Any, rho: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Scalars ``(a, b, c)`` with ``((x a) b) c = ρ x / (‖x‖ + δ)`` entrywise.

  Common path: ``(ρ/(‖x‖ + δ), 1, 1)`` from the plain norm, so ``ε`` is one
  multiplication per entry (multiplying by 1 is exact). Otherwise, with
  ``m = max_j |x_j|`` (1 if zero or not finite) and ``r = m^{-1/2}``:
  ``(r, r/(‖x/m‖ + δ/m), ρ)``. Then ``|x r| ≤ √m``, ``|x r b| ≤ 1`` and
  each factor is a normal number for any finite ``x`` and ``ρ``; a zero
  ``x`` gives ``((0 a) b) c = 0`` at any finite ``ρ``.
  """
  size = _size(tree)
  squares = optax.tree.norm(tree, squared=True)
  factor = rho / (jnp.sqrt(squares) + NORM_EPS)
  tiny = jnp.finfo(factor.dtype).tiny
  plain = (
    _accurate(squares, size)
    & jnp.isfinite(factor)
    & ((factor >= tiny) | (rho == 0))
  )
  # 1 with factor's type: inside jax.shard_map it varies over the mesh axes
  # that the tree and ρ vary over, and every output of both branches is
  # multiplied by it (exactly), so that the branches' types match.
  one = jnp.ones_like(factor)

  def scaled(tree: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    largest = magnitude_scale(tree)
    root = jax.lax.rsqrt(largest)
    norm = optax.tree.norm(divide(tree, largest))
    second = root / (norm + NORM_EPS / largest)
    return root * one, second * one, rho * one

  return _choose(plain, lambda tree: (factor, one, one), scaled, tree)


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
  """The ascent perturbation ``ε`` (float32 leaves; float64 for float64 ones).

  ``ε = ρ T ⊙ u / (‖u‖ + δ)`` with ``u = T ⊙ M ⊙ d`` if ``normalize`` (SAM,
  ASAM), else ``ε = ρ T ⊙ u`` (USAM); ``T = 1`` when ``scale`` is None and
  ``M`` (0 or 1 per leaf) is ``mask``, 1 everywhere when None. The normalized
  form costs one pass for ``‖u‖`` and one multiplication per entry; when the
  plain norm overflows or underflows, or ``ρ/(‖u‖ + δ)`` does, it divides
  ``u`` by its largest magnitude first (see :func:`_normalizing_factors`),
  so ``‖ε‖ = ρ`` for any finite nonzero ``u`` and ``ε = 0`` exactly for
  ``u = 0``, at any finite ``ρ``.

  Args:
    direction: the ascent direction ``d``, a pytree like the parameters.
    rho: the radius ``ρ``.
    normalize: divide by the norm of ``u`` (SAM) or not (USAM).
    scale: ASAM's elementwise scale ``T`` (a pytree like ``direction``), or None.
    mask: a pytree of bools like ``direction`` (see
      :func:`resolve_mask`): leaves where it is False are not
      perturbed and do not count in the norm. None perturbs every leaf.

  Returns:
    ``ε``, a pytree like ``direction`` with float32 leaves (float64 if
    ``direction`` or ``scale`` has a float64 leaf).
  """
  dtype = accumulation_dtype(direction, scale)
  scaled = apply_mask(optax.tree.cast(direction, dtype), mask)
  if scale is not None:
    scale = optax.tree.cast(scale, dtype)
    scaled = optax.tree.mul(scale, scaled)
  rho = jnp.asarray(rho, dtype)
  if not normalize:
    factors: tuple[jax.Array, ...] = (rho,)
  elif _size(scaled) == 0:
    factors = ()
  else:
    factors = _normalizing_factors(scaled, rho)

  def multiply(x: jax.Array) -> jax.Array:
    for factor in factors:
      x = x * factor
    return x

  epsilon = jax.tree.map(multiply, scaled)
  if scale is not None:
    epsilon = optax.tree.mul(scale, epsilon)
  return epsilon


def unit_vector(tree: Any) -> Any:
  """``x / (‖x‖ + δ)`` (float32 leaves, float64 for float64 ones; zero for a
  zero ``x``, never NaN).

  :func:`perturbation` with ``ρ = 1``: no finite ``x`` overflows it.
  """
  return perturbation(tree, 1.0)


def orthogonal_part(tree: Any, onto: Any) -> Any:
  """``x − (x·û) û`` with ``û = u / (‖u‖ + δ)``: ``x`` less its component
  along ``u`` (float32 leaves, float64 if either has float64 ones).

  ``x`` itself when ``u = 0``. ``x·û`` is bounded by ``‖x‖`` (``û`` has norm
  at most one), so it overflows only if ``x`` does.
  """
  dtype = accumulation_dtype(tree, onto)
  tree = optax.tree.cast(tree, dtype)
  direction = unit_vector(optax.tree.cast(onto, dtype))
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
