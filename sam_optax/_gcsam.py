"""GCSAM: SAM with gradient centralization of the ascent (and the descent)."""

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


def centralize(tree: Any, axis: int = -1) -> Any:
  """Gradient centralization: each leaf of rank ``>= 2`` less its mean over
  every axis but ``axis`` (the output axis); vectors and scalars unchanged.

  ``axis=-1`` for Flax and plain JAX kernels (``[..., in, out]``: one mean
  per output unit, over its incoming weights); ``axis=0`` is PyTorch's
  ``[out, in, ...]`` layout, that of ``optax.centralize``.
  """

  def leaf(x: jax.Array) -> jax.Array:
    if jnp.ndim(x) < 2:
      return x
    keep = axis % jnp.ndim(x)
    axes = tuple(a for a in range(jnp.ndim(x)) if a != keep)
    mean = jnp.mean(x.astype(jnp.float32), axis=axes, keepdims=True)
    return (x - mean).astype(x.dtype)

  return jax.tree.map(leaf, tree)


def centralized_ascent(axis: int = -1) -> _transform.AscentDirection:
  """The ascent direction ``d = GC(g_B)`` (:func:`centralize`; stateless)."""
  _contract.check_integer(axis, "axis", "gcsam", minimum=-(2**31))

  def direction(
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    del key, extra_args
    gradient = _transform.clean_gradient_or_compute(
      updates, params, loss_fn, batch
    )
    return centralize(gradient, axis), state

  return _transform.AscentDirection(
    init=lambda params: optax.EmptyState(), direction=direction
  )


def gradient_centralization(
  axis: int = -1,
) -> optax.GradientTransformationExtraArgs:
  """:func:`centralize` as a transform (GCSAM's descent, after the SAM member)."""
  _contract.check_integer(
    axis, "axis", "gradient_centralization", minimum=-(2**31)
  )

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    del params, extra_args
    return centralize(updates, axis), state

  return optax.GradientTransformationExtraArgs(
    lambda params: optax.EmptyState(), update_fn
  )


GCSAM_NORMS = ("centralized", "gradient")
"""The norms :func:`gcsam` divides its ascent by: ``‖GC(g_B)‖`` (the
paper's formula) or ``‖g_B‖`` (the authors' code)."""


def _gradient_normalized_ascent(axis: int) -> _transform.AscentDirection:
  """``d = GC(g_B) / (‖g_B‖ + δ)``: the authors' code's ascent, to be
  scaled by ``ρ`` without a further normalization."""
  centralized = centralized_ascent(axis)

  def direction(
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    gradient = _transform.clean_gradient_or_compute(
      updates, params, loss_fn, batch
    )
    d, state = centralized.direction(
      gradient, state, params, loss_fn=loss_fn, batch=batch, key=key
    )
    dtype = _perturbation.accumulation_dtype(gradient)
    norm = _perturbation.global_norm(gradient) + jnp.asarray(
      _perturbation.NORM_EPS, dtype
    )
    return jax.tree.map(lambda x: x.astype(dtype) / norm, d), state

  return _transform.AscentDirection(init=centralized.init, direction=direction)


def gcsam(
  rho: ArrayLike = 0.05,
  *,
  axis: int = -1,
  centralize_descent: bool = True,
  norm: str = "centralized",
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GCSAM: SAM perturbing along the centralized gradient.

  .. math::
    d = \mathrm{GC}(g_B), \quad
    \varepsilon = \rho\, d / (\|d\| + \delta), \quad
    \text{returns } \mathrm{GC}(\nabla L_B(w + \varepsilon))
    \ (\text{or } \nabla L_B(w + \varepsilon)
    \text{ if not } \texttt{centralize\_descent}),

  with ``GC`` :func:`centralize`: every kernel (a leaf of rank ``>= 2``)
  less its mean over all axes but the output ``axis``, one mean per output
  unit; biases and other vectors are left alone. Built from the shared
  machinery: ``sharpness_aware(centralized_ascent(axis), rho)`` followed by
  :func:`gradient_centralization` (an ``optax.chain``, so the state is a
  pair of ``EmptyState``). On a model with no kernels it is :func:`sam`.

  The authors' code (Mohamed-Hassan22/GCSAM, ``cifar10_gcsam_resnet50.py``)
  differs from the paper's formula in two places, both options here:
  it divides by the norm of the raw gradient, taken before centralizing,
  ``ε = ρ GC(g_B) / (‖g_B‖ + δ)`` (``norm="gradient"``, so ``‖ε‖ ≤ ρ``),
  and its descent is the plain ``∇L_B(w + ε)`` (its ``second_step`` has the
  centralization commented out: ``centralize_descent=False``).
  ``gcsam(rho, norm="gradient", centralize_descent=False)`` follows its
  trajectory to ~1e-7 (``tests/test_authors_code.py``).

  Args:
    rho: the perturbation radius ``ρ >= 0``.
    axis: the output axis of the kernels: ``-1`` for Flax/JAX layouts,
      ``0`` for PyTorch's.
    centralize_descent: centralize the gradient handed on too, as GC does
      for the base optimizer (the authors' code does not).
    norm: ``"centralized"``, divide ``d`` by ``‖GC(g_B)‖`` (the paper's
      ``ε = ρ ∇_GC L / ‖∇_GC L‖``), or ``"gradient"``, by ``‖g_B‖`` over
      every leaf (the authors' code; with ``perturb_mask`` the masked
      leaves still count in that norm).
    perturb_mask: which leaves to perturb; see :func:`sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Hassan, Vakanski, Zhang & Xian, `GCSAM: Gradient Centralized Sharpness
    Aware Minimization <https://arxiv.org/abs/2501.11584>`_, 2025; Yong et
    al., `Gradient Centralization <https://arxiv.org/abs/2004.01461>`_,
    ECCV 2020.
  """
  by_gradient = _contract.check_choice(norm, GCSAM_NORMS, "norm", "gcsam") == (
    "gradient"
  )
  member = _transform.sharpness_aware(
    _gradient_normalized_ascent(axis)
    if by_gradient
    else centralized_ascent(axis),
    rho,
    normalize=not by_gradient,
    perturb_mask=perturb_mask,
    name="gcsam",
  )
  if not centralize_descent:
    return member
  return optax.chain(member, gradient_centralization(axis))
