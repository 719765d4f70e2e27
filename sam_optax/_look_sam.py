"""LookSAM: a SAM step every k steps, its orthogonal part reused in between."""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform

ROUNDING_TOLERANCE = 8.0
"""``c`` in :func:`resolved_orthogonal_part`'s rounding threshold."""


def resolved_orthogonal_part(
  adversarial: optax.Updates, gradient: optax.Updates
) -> optax.Updates:
  r"""``g_v = g_adv − (g_adv·ĝ) ĝ``, or zero where it is rounding noise.

  When ``g_adv ∥ g`` (``ρ = 0``, an all-False ``perturb_mask``, a batch of
  one, an isotropic Hessian) the computed ``g_v`` is not zero but rounding
  noise, and normalizing it would add ``α‖g‖`` along noise on every step in
  between. ``g_v`` is taken as zero when

  .. math::
    \|g_v\| \le c\, u \sqrt{n}\, \max(\|g\|, \|g_{adv}\|),

  with ``u`` the unit roundoff of the arithmetic: float32's ``2^{-24}``, or
  that of the coarsest dtype among the leaves of ``g`` and ``g_adv`` if
  coarser (bfloat16, float16); ``n`` the number of entries of ``g`` and ``c = 8``
  (:data:`ROUNDING_TOLERANCE`): a bound on the rounding error of the
  projection's dot product and of the two gradients themselves. A ``g_v``
  this small carries no direction.

  Returns:
    ``g_v`` (float32 leaves), zero where it is not resolved.
  """
  orthogonal = _perturbation.orthogonal_part(adversarial, gradient)
  leaves = jax.tree.leaves(adversarial) + jax.tree.leaves(gradient)
  # The arithmetic is float32 (or coarser, for half-precision gradients).
  roundoff = max(
    [float(jnp.finfo(jnp.float32).eps) / 2]
    + [
      float(jnp.finfo(jnp.result_type(x)).eps) / 2
      for x in leaves
      if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
  )
  size = sum(int(jnp.size(x)) for x in jax.tree.leaves(gradient))
  scale = jnp.maximum(
    _perturbation.global_norm(gradient), _perturbation.global_norm(adversarial)
  )
  threshold = ROUNDING_TOLERANCE * roundoff * math.sqrt(max(size, 1)) * scale
  resolved = _perturbation.global_norm(orthogonal) > threshold
  return jax.tree.map(
    lambda x: jnp.where(resolved, x, jnp.zeros_like(x)), orthogonal
  )


class LookSamState(NamedTuple):
  """LookSAM's state.

  Attributes:
    count: the number of steps taken (int32); steps ``0, k, 2k, …`` are SAM
      steps.
    orthogonal: ``g_v``, the part of the last SAM step's perturbed gradient
      orthogonal to its clean gradient (zeros before the first step).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  orthogonal: optax.Updates


def look_sam(
  rho: ArrayLike = 0.05,
  every_k: int = 5,
  alpha: ArrayLike = 0.7,
  *,
  layerwise: bool = False,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""LookSAM: SAM every ``k`` steps, a cheap correction in between.

  On steps ``0, k, 2k, …`` (a SAM step):

  .. math::
    \varepsilon = \rho\, g / (\|g\| + \delta), \quad
    g_{adv} = \nabla L_B(w + \varepsilon), \quad
    g_v = g_{adv} - (g_{adv} \cdot \hat g)\, \hat g, \quad
    \text{returns } g_{adv},

  keeping ``g_v`` in the state; on the other steps, with no perturbed pass:

  .. math::
    \text{returns } g + \alpha\, \|g\|\, g_v / (\|g_v\| + \delta),

  where ``g = ∇L_B(w)`` is the clean gradient of the current step
  (``updates``, or computed from ``loss_fn`` and ``batch`` when ``updates``
  is None) and ``ĝ = g / (‖g‖ + δ)``, so ``(g_adv·ĝ) ĝ`` is the paper's
  ``(g_adv·g / ‖g‖²) g`` guarded by ``δ = 1e-12``. ``every_k = 1`` is
  :func:`sam`.

  Cost: a SAM step is two forward-backward passes (the clean gradient, then
  at ``w + ε``); the steps in between are one, the clean gradient, plus O(d)
  elementwise work. Under ``jit`` the choice is a ``jax.lax.cond`` on the
  step counter, so the steps in between skip the perturbed pass at run time
  (without ``jit`` it is a Python ``if``): over ``k`` steps LookSAM costs
  ``k + 1`` passes where SAM costs ``2k``. (XLA's cost analysis of the
  compiled step reports the costlier branch, SAM's.) On a CPU, XLA runs
  convolutions inside a conditional on a slower generic path (as inside a
  loop; see ``BENCHMARKS.md``): on a small CNN the SAM steps then took ~5×
  a SAM step, where on a dense MLP they take SAM's time.

  >>> tx = optax.chain(sam_optax.look_sam(0.05, every_k=5, alpha=0.7),
  ...                  optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
  >>> for _ in range(3):   # a SAM step, then two steps reusing its g_v
  ...   updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
  ...                              batch=batch)
  >>> int(state[0].count)
  3

  Where the paper is silent: the first step (``count = 0``) is a SAM step,
  so ``g_v`` is set before it is reused, with or without ``updates`` (the
  clean gradient is computed by the transform when ``updates`` is None: both
  kinds of step use it). If ``‖g_v‖ = 0`` (``g_adv`` parallel to ``g``), the
  steps in between hand on ``g``; so they do when ``g_v`` is zero up to
  rounding, relative to ``‖g‖`` and ``‖g_adv‖`` (``ρ = 0``, an all-False
  ``perturb_mask``, a batch of one: see :func:`resolved_orthogonal_part`).
  ``g_v`` is stored in the parameters' dtypes.

  ``layerwise=True`` projects and normalizes leaf by leaf (each leaf ``l``
  of the parameters a layer), as the public PyTorch implementations do:
  ``g_v^l = g_adv^l − (g_adv^l·ĝ^l) ĝ^l`` on the SAM steps and
  ``g^l + α ‖g^l‖ g_v^l / (‖g_v^l‖ + δ)`` on the others, with the rounding
  guard per layer (a layer whose ``g_v^l`` is rounding noise hands on
  ``g^l``). The paper's
  layer-wise variant for large batches, Look-LayerSAM, is layer-wise in
  the same sense and also rescales the perturbation layer by layer, as LAMB
  rescales its steps; that rescaling is not reproduced here (the SAM steps'
  perturbation stays the global ``ρ g/‖g‖``; a layer-wise base such as
  ``optax.lamb`` is the base optimizer's part).

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    every_k: ``k >= 1``, the period of SAM steps: a Python or NumPy int (it
      is static; with ``optax.inject_hyperparams`` pass
      ``static_args=("every_k",)``).
    alpha: ``α >= 0``, the weight of the reused orthogonal part (0.7 as in
      the paper).
    layerwise: project and normalize per leaf (Look-LayerSAM) instead of
      over the whole pytree.
    perturb_mask: which leaves to perturb on the SAM steps; see :func:`sam`.
      ``g_v`` and the result cover every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`LookSamState`.

  References:
    Liu et al., `Towards Efficient and Scalable Sharpness-Aware Minimization
    <https://arxiv.org/abs/2203.02714>`_, CVPR 2022.
  """
  if not isinstance(layerwise, (bool, np.bool_)):
    raise ValueError(
      f"look_sam: layerwise must be True or False, got {layerwise!r}."
    )
  every_k = _contract.check_integer(every_k, "every_k", "look_sam")
  _contract.check_number(alpha, "alpha", "look_sam", minimum=0)
  alpha = jnp.asarray(alpha, jnp.float32)  # float32 arithmetic, as injected
  sam_step = _transform.sharpness_aware_step(
    _sam.clean_gradient_ascent(),
    rho,
    perturb_mask=perturb_mask,
    name="look_sam",
  )

  def init(params: optax.Params) -> LookSamState:
    return LookSamState(
      count=jnp.zeros([], jnp.int32), orthogonal=optax.tree.zeros_like(params)
    )

  def update(
    updates: optax.Updates | None,
    state: LookSamState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, LookSamState]:
    gradient = _transform.clean_gradient_or_compute(
      updates, params, loss_fn, batch
    )

    def perturbed() -> tuple[optax.Updates, optax.Updates]:
      _, adversarial, _ = sam_step(
        gradient,
        optax.EmptyState(),
        params,
        loss_fn=loss_fn,
        batch=batch,
        key=key,
        **extra_args,
      )
      orthogonal = (
        _layerwise_orthogonal_part if layerwise else resolved_orthogonal_part
      )(adversarial, gradient)
      return (
        optax.tree.cast_like(adversarial, params),
        optax.tree.cast_like(orthogonal, state.orthogonal),
      )

    def reused() -> tuple[optax.Updates, optax.Updates]:
      clean = optax.tree.cast(gradient, jnp.float32)
      if layerwise:
        corrected = jax.tree.map(
          lambda g, v: (
            g
            + alpha
            * _perturbation.global_norm(g)
            * _perturbation.unit_vector(v)
          ),
          clean,
          state.orthogonal,
        )
        return optax.tree.cast_like(corrected, params), state.orthogonal
      weight = alpha * _perturbation.global_norm(clean)
      corrected = optax.tree.add_scale(
        clean, weight, _perturbation.unit_vector(state.orthogonal)
      )
      return optax.tree.cast_like(corrected, params), state.orthogonal

    is_sam_step = state.count % every_k == 0
    if isinstance(is_sam_step, jax.core.Tracer):  # under jit: at run time
      result, orthogonal = jax.lax.cond(is_sam_step, perturbed, reused)
    else:  # a concrete counter (no jit): the branch is chosen here
      result, orthogonal = perturbed() if is_sam_step else reused()
    return result, LookSamState(
      count=optax.safe_increment(state.count), orthogonal=orthogonal
    )

  return optax.GradientTransformationExtraArgs(
    init, _transform.checked_update(update, init, "look_sam")
  )


def _layerwise_orthogonal_part(
  adversarial: optax.Updates, gradient: optax.Updates
) -> optax.Updates:
  r""":func:`resolved_orthogonal_part` leaf by leaf (Look-LayerSAM).

  Each leaf ``l`` is a layer: ``g_v^l = g_adv^l − (g_adv^l·ĝ^l) ĝ^l``, taken
  as zero when ``‖g_v^l‖ ≤ c u √n_l max(‖g^l‖, ‖g_adv^l‖)`` (the global
  guard, with the layer's norms and its ``n_l`` entries), so a layer whose
  ``g_v^l`` is rounding noise hands on ``g^l`` on the steps in between.
  """
  return jax.tree.map(resolved_orthogonal_part, adversarial, gradient)
