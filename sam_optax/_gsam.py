"""GSAM: SAM's gradient less a step along the clean gradient's orthogonal
part."""

import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform


def gsam(
  rho: ArrayLike = 0.05,
  alpha: ArrayLike = 0.1,
  *,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate-gap guided SAM (GSAM).

  .. math::
    \varepsilon = \rho\, g / (\|g\| + \delta), \quad
    g_{adv} = \nabla L_B(w + \varepsilon), \quad
    g_\perp = g - (g \cdot \hat g_{adv})\, \hat g_{adv}, \quad
    \text{returns } g_{adv} - \alpha\, g_\perp,

  with ``g = ∇L_B(w)`` the clean gradient (``updates``, or computed from
  ``loss_fn`` and ``batch`` when ``updates`` is None) and
  ``ĝ_adv = g_adv / (‖g_adv‖ + δ)``, so that ``(g·ĝ_adv) ĝ_adv`` is the
  paper's ``(g·g_adv / ‖g_adv‖²) g_adv`` guarded by ``δ = 1e-12``.
  (big_vision's ``gsam_gradient`` divides by ``‖g_adv‖`` unguarded in this
  projection; only its perturbation ``ρ g/(‖g‖ + ε)`` adds an epsilon. The
  two agree unless ``g_adv`` is zero, where the guard gives ``g_⊥ = g``
  instead of NaN.) Descending along ``−g_adv`` lowers the
  perturbed loss ``f_p``; the term ``+α g_⊥`` of the step raises the clean
  loss ``f`` along a direction orthogonal to ``g_adv``, which lowers the
  surrogate gap ``h = f_p − f`` without changing ``f_p`` to first order (the
  paper's sign, and big_vision's ``minimize_fp=True``). ``alpha = 0`` is
  :func:`sam`.

  Cost: two forward-backward passes, as SAM (the clean gradient, then at
  ``w + ε``), plus O(d) elementwise work (a dot product and two norms).

  >>> tx = optax.chain(sam_optax.gsam(0.05, alpha=0.1),
  ...                  optax.sgd(0.1, momentum=0.9))
  >>> opt_state = tx.init(params)
  >>> clean = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
  >>> step, opt_state = tx.update(clean, opt_state, params, loss_fn=loss_fn,
  ...                             batch=batch)
  >>> params_after = optax.apply_updates(params, step)

  Where the paper is silent or this differs: the paper and big_vision tie
  ``ρ`` to the learning rate (``ρ_t`` an affine function of it, ``ρ_max`` at
  the peak learning rate, ``ρ_min`` at the lowest) and keep ``α`` fixed;
  here ``rho`` and ``alpha`` are plain hyperparameters, either of which
  ``optax.inject_hyperparams`` can schedule (``rho`` with the learning
  rate's schedule rescaled to ``[ρ_min, ρ_max]`` gives big_vision's rule).
  ``alpha`` needs tuning (big_vision's ViT config: ``α = 0.6``, ``ρ`` from
  0.6 to 0.1); the default ``0.1`` is a starting point.

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    alpha: ``α >= 0``, the weight of the orthogonal step.
    perturb_mask: which leaves to perturb; see :func:`sam`. ``g_⊥`` and the
      result cover every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless).

  References:
    Zhuang et al., `Surrogate Gap Minimization Improves Sharpness-Aware
    Training <https://arxiv.org/abs/2203.08065>`_, ICLR 2022.
  """
  _contract.check_number(alpha, "alpha", "gsam", minimum=0)
  # float32 from the start: a Python float and the float32 array
  # optax.inject_hyperparams passes then give the same arithmetic.
  alpha = jnp.asarray(alpha, jnp.float32)

  def combine(
    gradient: optax.Updates, adversarial: optax.Updates
  ) -> optax.Updates:
    orthogonal = _perturbation.orthogonal_part(gradient, adversarial)
    return optax.tree.add_scale(adversarial, -alpha, orthogonal)

  return _transform.combined_sharpness_aware(
    _sam.clean_gradient_ascent(),
    rho,
    combine,
    perturb_mask=perturb_mask,
    name="gsam",
  )
