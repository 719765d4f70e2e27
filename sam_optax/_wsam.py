"""WSAM: the clean gradient plus a weighted sharpness term."""

import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform


def wsam(
  rho: ArrayLike = 0.05,
  gamma: ArrayLike = 0.9,
  *,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM (WSAM): sharpness as a regularization term of weight γ.

  .. math::
    \varepsilon = \rho\, g / (\|g\| + \delta), \quad
    g_{adv} = \nabla L_B(w + \varepsilon), \quad
    \text{returns } g + \frac{\gamma}{1 - \gamma}\, (g_{adv} - g),

  the gradient of ``L_B(w) + γ/(1−γ) (L_B(w+ε) − L_B(w))``, with
  ``g = ∇L_B(w)`` the clean gradient (``updates``, or computed when
  ``updates`` is None). ``gamma = 1/2`` is :func:`sam` and ``gamma = 0`` the
  clean gradient.

  Cost: two forward-backward passes, as SAM, plus O(d) elementwise work.

  The clean gradient may be left to the transform (``updates=None``); with
  ``γ = 1/2`` the result is SAM's:

  >>> half, _ = sam_optax.wsam(0.05, gamma=0.5).update(
  ...     None, optax.EmptyState(), params, loss_fn=loss_fn, batch=batch)
  >>> plain, _ = sam_optax.sam(0.05).update(
  ...     None, optax.EmptyState(), params, loss_fn=loss_fn, batch=batch)
  >>> jax.tree.all(jax.tree.map(jnp.allclose, half, plain))
  True

  This is the paper's coupled form (the official code's ``decouple=False``):
  the whole combination goes through the base optimizer. The official code's
  default, ``decouple=True``, gives the base optimizer ``g`` only and adds
  ``−lr γ/(1−γ) (g_adv − g)`` to the weights directly; that needs the
  learning rate, so it is not a transform placed before the base optimizer,
  and it is not provided.

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    gamma: ``γ ∈ [0, 1)``, the weight of the sharpness term (0.9 as in the
      paper's experiments).
    perturb_mask: which leaves to perturb; see :func:`sam`. The result covers
      every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless).

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness
    as a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023.
  """
  _contract.check_number(gamma, "gamma", "wsam", minimum=0, below=1)
  gamma = jnp.asarray(gamma, jnp.float32)  # float32 arithmetic, as injected
  weight = gamma / (1 - gamma)

  def combine(
    gradient: optax.Updates, adversarial: optax.Updates
  ) -> optax.Updates:
    return optax.tree.add_scale(
      gradient, weight, optax.tree.sub(adversarial, gradient)
    )

  return _transform.combined_sharpness_aware(
    _sam.clean_gradient_ascent(),
    rho,
    combine,
    perturb_mask=perturb_mask,
    name="wsam",
  )
