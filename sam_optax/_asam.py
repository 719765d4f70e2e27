"""ASAM: adaptive sharpness, with an elementwise scale ``T = |w| + η``."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform

Mask = Any | Callable[[optax.Params], Any] | None
"""A pytree of bools like the parameters, a function of them returning one, or
None for the default (:func:`not_bias_mask`)."""


def _path_names(path: tuple[Any, ...]) -> list[str]:
  names = []
  for entry in path:
    for attribute in ("key", "name"):
      value = getattr(entry, attribute, None)
      if isinstance(value, str):
        names.append(value)
  return names


def not_bias_mask(params: optax.Params) -> Any:
  """True for every leaf except those with a path entry named ``bias``.

  The official ASAM code leaves biases unscaled (``T = 1``); this reproduces it
  for dict-like pytrees (Flax Linen params, Flax NNX ``State``).
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "bias" not in _path_names(path), params
  )


def adaptive_scale(
  eta: ArrayLike = 0.01, scale_mask: Mask = None
) -> Callable[[optax.Params], Any]:
  """Returns ``params -> T`` with ``T = |w| + η`` where ``scale_mask`` is True,
  else 1.

  Args:
    eta: ``η >= 0``, keeps the scale away from zero (finite; checked
      unless traced).
    scale_mask: which leaves are scaled: a pytree of bools or ``params ->
      pytree``; None (the default) scales every leaf not named ``bias``
      (:func:`not_bias_mask`).
  """
  _contract.check_number(eta, "eta", "adaptive_scale", minimum=0)
  if scale_mask is None:
    scale_mask = not_bias_mask

  def scale_fn(params: optax.Params) -> Any:
    leaf_mask = _perturbation.resolve_mask(
      scale_mask, params, "asam", "scale_mask"
    )
    return jax.tree.map(
      lambda w, scaled: (
        jnp.abs(jnp.asarray(w, jnp.float32)) + eta
        if scaled
        else jnp.ones(jnp.shape(w), jnp.float32)
      ),
      params,
      leaf_mask,
    )

  return scale_fn


def asam(
  rho: ArrayLike = 0.5,
  eta: ArrayLike = 0.01,
  *,
  normalize: bool = True,
  scale_mask: Mask = None,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adaptive SAM (ASAM).

  .. math::
    T = |w| + \eta, \qquad
    \varepsilon = \rho\, T^2 g_B / (\|T g_B\| + \delta), \qquad
    \text{returns } \nabla L_B(w + \varepsilon),

  elementwise, with ``T = 1`` on leaves where ``scale_mask`` is False (by
  default those named ``bias``, as in the official code). With every leaf
  unscaled this is :func:`sam`. ``normalize=False`` gives ``ε = ρ T² g_B``.
  With ``perturb_mask``, ``g_B`` is zeroed outside it before scaling: the
  scale applies within the mask.

  A callable ``scale_mask`` or ``perturb_mask`` inside
  ``optax.inject_hyperparams`` needs ``static_args`` naming it (optax takes
  callables for schedules); the defaults need nothing.

  Args:
    rho: the perturbation radius ``ρ >= 0`` (ASAM's papers use larger radii
      than SAM, e.g. 0.5 on CIFAR-10, since ``T`` shrinks the perturbation).
    eta: ``η >= 0``, the offset of the scale (finite).
    normalize: normalized (ASAM) or unnormalized ascent.
    scale_mask: the leaves to scale; see :func:`adaptive_scale`.
    perturb_mask: which leaves to perturb; see :func:`sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  _contract.check_number(eta, "eta", "asam", minimum=0)
  return _transform.sharpness_aware(
    _sam.clean_gradient_ascent(),
    rho,
    normalize=normalize,
    scale_fn=adaptive_scale(eta, scale_mask),
    perturb_mask=perturb_mask,
    name="asam",
  )
