"""The ascent step shared by the SAM family: ``ε`` from a direction, and ``∇L(w+ε)``.

Every variant picks an ascent direction ``d`` (the clean gradient for SAM, a
full-data gradient for n-SAM, a reweighted gradient for RW-SAM, ...) and then
does the same two things:

1. ``ε = ρ T ⊙ u / (‖u‖ + δ)`` with ``u = T ⊙ d`` (``ε = ρ T ⊙ u`` unnormalized,
   as in USAM), where ``T`` is ASAM's elementwise scale and ``T = 1`` otherwise;
2. the gradient handed on, ``∇L_B(w + ε)``.

Norms are global L2 norms over every leaf, accumulated in float32 whatever the
parameters' dtype, and ``δ = 1e-12`` guards the division, so a zero direction
gives a zero perturbation, never NaN.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract

NORM_EPS = 1e-12
"""``δ``: guards every division by a norm (a zero gradient gives ``ε = 0``)."""


def global_norm(tree: Any) -> jax.Array:
  """The global L2 norm over every leaf, accumulated in float32."""
  return optax.tree.norm(optax.tree.cast(tree, jnp.float32))


def perturbation(
    direction: Any,
    rho: ArrayLike,
    *,
    normalize: bool = True,
    scale: Any | None = None,
) -> Any:
  """The ascent perturbation ``ε`` (float32 leaves).

  ``ε = ρ T ⊙ u / (‖u‖ + δ)`` with ``u = T ⊙ d`` if ``normalize`` (SAM, ASAM),
  else ``ε = ρ T ⊙ u`` (USAM); ``T = 1`` when ``scale`` is None.

  Args:
    direction: the ascent direction ``d``, a pytree like the parameters.
    rho: the radius ``ρ``.
    normalize: divide by the norm of ``u`` (SAM) or not (USAM).
    scale: ASAM's elementwise scale ``T`` (a pytree like ``direction``), or None.

  Returns:
    ``ε``, a pytree like ``direction`` with float32 leaves.
  """
  scaled = optax.tree.cast(direction, jnp.float32)
  if scale is not None:
    scaled = optax.tree.mul(optax.tree.cast(scale, jnp.float32), scaled)
  factor = jnp.asarray(rho, jnp.float32)
  if normalize:
    factor = factor / (global_norm(scaled) + NORM_EPS)
  epsilon = optax.tree.scale(factor, scaled)
  if scale is not None:
    epsilon = optax.tree.mul(optax.tree.cast(scale, jnp.float32), epsilon)
  return epsilon


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
