"""Mini-batch SAM and USAM: the ascent taken along the clean batch gradient."""

from typing import Any

import jax
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


def clean_gradient_ascent() -> _transform.AscentDirection:
  """The ascent direction ``d = g_B = ∇L_B(w)`` (stateless).

  Uses the clean gradient passed as ``updates``; computes it from ``loss_fn``
  and ``batch`` when ``updates`` is None.
  """

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
    return (
      _transform.clean_gradient_or_compute(updates, params, loss_fn, batch),
      state,
    )

  return _transform.AscentDirection(
    init=lambda params: optax.EmptyState(), direction=direction
  )


def sam(
  rho: ArrayLike = 0.05, *, perturb_mask: _perturbation.PerturbMask = None
) -> optax.GradientTransformationExtraArgs:
  r"""Mini-batch sharpness-aware minimization (SAM).

  .. math::
    \varepsilon = \rho\, g_B / (\|g_B\| + \delta), \qquad
    \text{returns } \nabla L_B(w + \varepsilon),

  where ``g_B = ∇L_B(w)`` is the clean gradient (``updates``, or computed from
  ``loss_fn`` and ``batch`` when ``updates`` is None) and ``δ = 1e-12``. Chain
  a base optimizer after it; ``loss_fn(params, batch)`` returns per-example
  losses (shape ``[B]``):

  >>> tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1, momentum=0.9))
  >>> state = tx.init(params)
  >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
  >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
  ...                            batch=batch)
  >>> jax.tree.map(jnp.shape, updates)
  {'b': (3,), 'w': (4, 3)}

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    perturb_mask: which leaves to perturb: None (all), a pytree of bools
      with the structure of ``params``, or a function ``params -> that
      pytree``. Excluded leaves get ``ε = 0`` and do not count in the norm;
      the returned gradient covers every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return _transform.sharpness_aware(
    clean_gradient_ascent(),
    rho,
    normalize=True,
    perturb_mask=perturb_mask,
    name="sam",
  )


def usam(
  rho: ArrayLike = 0.05, *, perturb_mask: _perturbation.PerturbMask = None
) -> optax.GradientTransformationExtraArgs:
  r"""Unnormalized SAM (USAM).

  .. math::
    \varepsilon = \rho\, g_B, \qquad \text{returns } \nabla L_B(w + \varepsilon).

  On a quadratic loss this is exactly ``g_B + ρ H g_B``, the gradient of
  ``L_B + (ρ/2)‖g_B‖²``.

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    perturb_mask: which leaves to perturb; see :func:`sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Andriushchenko & Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022.
  """
  return _transform.sharpness_aware(
    clean_gradient_ascent(),
    rho,
    normalize=False,
    perturb_mask=perturb_mask,
    name="usam",
  )
