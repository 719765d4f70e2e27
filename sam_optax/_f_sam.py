"""F-SAM (Friendly SAM): the ascent along the batch-specific gradient noise."""

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


class FriendlyAscentState(NamedTuple):
  """State of F-SAM's ascent direction.

  Attributes:
    count: the number of steps taken (int32).
    momentum: ``m``, the EMA of clean gradients estimating the full gradient.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  momentum: optax.Updates


def friendly_ascent(
  sigma: ArrayLike = 1.0,
  ema_decay: ArrayLike = 0.6,
  momentum_in_direction: Literal["previous", "current"] = "previous",
) -> _transform.AscentDirection:
  """F-SAM's ascent direction: the clean gradient minus its EMA.

  ``"previous"`` (the official code): step 1 uses ``d_1 = g_1`` and sets
  ``m_1 = g_1``; later ``d_t = g_t − σ m_{t−1}``, then
  ``m_t = λ m_{t−1} + (1−λ) g_t``.
  ``"current"`` (the paper's formula): ``m_0 = 0``,
  ``m_t = λ m_{t−1} + (1−λ) g_t`` first, then ``d_t = g_t − σ m_t``.
  """
  _contract.check_choice(
    momentum_in_direction,
    ("previous", "current"),
    "momentum_in_direction",
    "f_sam",
  )
  _contract.check_number(sigma, "sigma", "f_sam", minimum=0)
  _contract.check_number(ema_decay, "ema_decay", "f_sam", minimum=0, below=1)
  # float32 from the start, so that a Python float and the float32 array
  # optax.inject_hyperparams passes give the same arithmetic (1 − λ in
  # float64 then rounded differs from 1 − λ in float32 by an ulp).
  sigma = jnp.asarray(sigma, jnp.float32)
  ema_decay = jnp.asarray(ema_decay, jnp.float32)

  def init(params: optax.Params) -> FriendlyAscentState:
    return FriendlyAscentState(
      count=jnp.zeros([], jnp.int32), momentum=optax.tree.zeros_like(params)
    )

  def direction(
    updates: optax.Updates | None,
    state: FriendlyAscentState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, FriendlyAscentState]:
    del key, extra_args
    gradient = _transform.clean_gradient_or_compute(
      updates, params, loss_fn, batch
    )
    ema = optax.tree.update_moment(gradient, state.momentum, ema_decay, 1)
    if momentum_in_direction == "current":
      momentum = ema
      ascent = optax.tree.add_scale(gradient, -sigma, momentum)
    else:
      first = state.count == 0
      momentum = optax.tree.where(first, gradient, ema)
      ascent = optax.tree.where(
        first,
        gradient,
        optax.tree.add_scale(gradient, -sigma, state.momentum),
      )
    momentum = optax.tree.cast_like(momentum, state.momentum)
    new_state = FriendlyAscentState(
      count=optax.safe_increment(state.count), momentum=momentum
    )
    return ascent, new_state

  return _transform.AscentDirection(init=init, direction=direction)


def f_sam(
  rho: ArrayLike = 0.05,
  sigma: ArrayLike = 1.0,
  ema_decay: ArrayLike = 0.6,
  *,
  momentum_in_direction: Literal["previous", "current"] = "previous",
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Friendly SAM (F-SAM): remove the EMA of gradients from the ascent.

  .. math::
    d_t = g_B - \sigma m_{t-1}, \quad
    \varepsilon = \rho\, d_t / (\|d_t\| + \delta), \quad
    m_t = \lambda m_{t-1} + (1-\lambda) g_B, \quad
    \text{returns } \nabla L_B(w + \varepsilon),

  with ``m_1 = g_B`` and a plain SAM step first, as in the official code
  (``momentum_in_direction="previous"``). ``"current"`` uses the paper's
  ``d_t = g_B − σ m_t`` with ``m_0 = 0``. ``sigma = 0`` is :func:`sam`.

  At the paper's ``σ = 1`` the two differ only in where the average starts:
  ``g − m_t = λ (g − m_{t−1})``, so ``"current"``'s direction is
  ``"previous"``'s scaled by ``λ``, which the normalization removes; what
  remains is the start (``m_1 = g_1`` and a SAM first step for
  ``"previous"``, ``m_0 = 0`` for ``"current"``). For ``σ ≠ 1`` the
  directions differ at every step.

  Args:
    rho: the perturbation radius ``ρ >= 0``.
    sigma: ``σ >= 0``, how much of the EMA (the full-gradient estimate) to
      remove.
    ema_decay: ``λ ∈ [0, 1)``, the EMA's decay.
    momentum_in_direction: ``"previous"`` (official code) or ``"current"``
      (paper).
    perturb_mask: which leaves to perturb; see :func:`sam`. The EMA covers
      every leaf.

  Hyperparameters are checked when the transform is built (traced values,
  e.g. under ``jax.jit`` with ``optax.inject_hyperparams``, cannot be).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`FriendlyAscentState`.

  References:
    Li et al., `Friendly Sharpness-Aware Minimization
    <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
  """
  return _transform.sharpness_aware(
    friendly_ascent(sigma, ema_decay, momentum_in_direction),
    rho,
    normalize=True,
    perturb_mask=perturb_mask,
    name="f_sam",
  )
