"""VaSSO: the ascent along an EMA of clean gradients (variance suppression)."""

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


class VarianceSuppressedAscentState(NamedTuple):
  """State of VaSSO's ascent direction.

  Attributes:
    direction: ``d_t``, the EMA of clean gradients the last step perturbed
      along (zeros before the first step).
    count: the number of steps taken (int32): the first step starts the EMA.
  """

  direction: optax.Updates
  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do


Start = Literal["gradient", "zero"]
"""How VaSSO's EMA starts: ``d_1 = g_1`` (``"gradient"``) or ``d_0 = 0``."""


def variance_suppressed_ascent(
  theta: ArrayLike = 0.9,
  start: Start = "gradient",
) -> _transform.AscentDirection:
  """VaSSO's ascent direction: ``d_t = (1−θ) d_{t−1} + θ g_t``.

  ``g_t`` is the clean gradient (``updates``, or computed when None). The
  EMA starts at ``d_1 = g_1`` (``start="gradient"``, the official code) or
  at ``d_0 = 0`` (``start="zero"``).
  """
  _contract.check_number(theta, "theta", "vasso", above=0, maximum=1)
  _contract.check_choice(start, ("gradient", "zero"), "start", "vasso")
  # float32 from the start, so that a Python float and the float32 array
  # optax.inject_hyperparams passes give the same arithmetic.
  decay = 1 - jnp.asarray(theta, jnp.float32)

  def init(params: optax.Params) -> VarianceSuppressedAscentState:
    return VarianceSuppressedAscentState(
      optax.tree.zeros_like(params), jnp.zeros([], jnp.int32)
    )

  def direction(
    updates: optax.Updates | None,
    state: VarianceSuppressedAscentState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, VarianceSuppressedAscentState]:
    del key, extra_args
    gradient = _transform.clean_gradient_or_compute(
      updates, params, loss_fn, batch
    )
    ascent = optax.tree.update_moment(gradient, state.direction, decay, 1)
    if start == "gradient":
      ascent = optax.tree.where(
        state.count == 0, optax.tree.cast(gradient, jnp.float32), ascent
      )
    return ascent, VarianceSuppressedAscentState(
      optax.tree.cast_like(ascent, state.direction),
      optax.safe_increment(state.count),
    )

  return _transform.AscentDirection(init=init, direction=direction)


def vasso(
  rho: ArrayLike = 0.05,
  theta: ArrayLike = 0.9,
  *,
  start: Start = "gradient",
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Variance-suppressed sharpness-aware optimization (VaSSO).

  .. math::
    d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t, \quad d_1 = g_1, \quad
    \varepsilon = \rho\, d_t / (\|d_t\| + \delta), \quad
    \text{returns } \nabla L_B(w + \varepsilon),

  with ``g_t = ∇L_B(w)`` the clean gradient (``updates``, or computed when
  ``updates`` is None). The EMA ``d_t`` estimates the full gradient with less
  noise than ``g_t``, which stabilizes the ascent. ``theta = 1`` is
  :func:`sam`; the first step is SAM's for any ``θ`` and either start.

  Cost: two forward-backward passes, as SAM, plus O(d) elementwise work; the
  state holds one copy of the parameters.

  >>> tx = optax.chain(sam_optax.vasso(0.05, theta=0.9), optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
  >>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
  ...                            batch=batch)
  >>> type(state[0]).__name__
  'VarianceSuppressedAscentState'

  As the official code (BingcongLi/VaSSO, ``solver/vasso.py``) and its
  training script (``--theta 0.9``): ``θ = 0.9`` by default and the EMA
  starts at the first gradient, ``d_1 = g_1`` (the paper is silent on the
  start). ``start="zero"`` starts it at ``d_0 = 0`` instead (this library's
  form before 0.2), which gives the same first step and afterwards weights
  the first gradient by ``θ(1−θ)^{t−1}`` instead of ``(1−θ)^{t−1}``; the
  two differ in the first ``~1/θ`` steps only. ``δ = 1e-12`` (the official
  code's is ``1e-7``).

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    theta: ``θ ∈ (0, 1]``, the EMA's weight on the new gradient (0.9, as the
      official code's training script).
    start: ``"gradient"`` (``d_1 = g_1``, the official code) or ``"zero"``
      (``d_0 = 0``).
    perturb_mask: which leaves to perturb; see :func:`sam`. The EMA covers
      every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`VarianceSuppressedAscentState`.

  References:
    Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
    Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
  """
  return _transform.sharpness_aware(
    variance_suppressed_ascent(theta, start),
    rho,
    normalize=True,
    perturb_mask=perturb_mask,
    name="vasso",
  )
