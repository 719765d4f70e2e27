"""Momentum-SAM: the perturbation along the negative momentum, one pass a
step."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


class MomentumSamState(NamedTuple):
  """Momentum-SAM's state.

  Attributes:
    momentum: ``v_t = μ v_{t−1} + (the gradient handed on)``, ``v_0 = 0``:
      the trace ``optax.sgd(lr, momentum=μ)`` keeps when it comes right after.
  """

  momentum: optax.Updates


def _negative_momentum_ascent() -> _transform.AscentDirection:
  """The ascent direction ``d = −v_{t−1}`` (the state's momentum).

  The state is left as it is: :func:`momentum_sam` updates it with the
  perturbed gradient, once that is computed.
  """

  def init(params: optax.Params) -> MomentumSamState:
    return MomentumSamState(optax.tree.zeros_like(params))

  def direction(
    updates: optax.Updates | None,
    state: MomentumSamState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, MomentumSamState]:
    del updates, params, loss_fn, batch, key, extra_args  # no clean gradient
    return optax.tree.scale(-1.0, state.momentum), state

  return _transform.AscentDirection(init=init, direction=direction)


def momentum_sam(
  rho: ArrayLike = 0.3,
  momentum: ArrayLike = 0.9,
  *,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Momentum-SAM (MSAM): perturb along the negative momentum, no extra pass.

  .. math::
    \varepsilon = -\rho\, v_{t-1} / (\|v_{t-1}\| + \delta), \quad
    \text{returns } g_t = \nabla L_B(w + \varepsilon), \quad
    v_t = \mu\, v_{t-1} + g_t, \quad v_0 = 0.

  ``v_t`` is the momentum ``optax.sgd(lr, momentum=μ)`` keeps when it comes
  right after this transform (``optax.trace``: ``t ← g + μ t``), so chain it
  with the same ``μ``. The clean gradient is not used: pass ``updates=None``
  and nothing else is computed (a clean gradient computed in the same jitted
  step and passed in is dead code).

  Cost: one forward-backward pass (at ``w + ε``), as SGD, plus O(d)
  elementwise work; the state holds one copy of the parameters.

  >>> tx = optax.chain(sam_optax.momentum_sam(0.3, momentum=0.9),
  ...                  optax.sgd(0.1, momentum=0.9))
  >>> state = tx.init(params)
  >>> for _ in range(2):   # the first step is a plain gradient step (v_0 = 0)
  ...   updates, state = tx.update(None, state, params, loss_fn=loss_fn,
  ...                              batch=batch)
  ...   params = optax.apply_updates(params, updates)
  >>> bool(jnp.allclose(state[0].momentum["w"], state[1][0].trace["w"]))
  True

  As in the paper and its official code: ``v_0 = 0``, so the first step's
  perturbation is zero (``ε = 0``, not NaN: ``δ = 1e-12``) and the first step
  is a plain gradient step. The official code keeps the parameters at
  ``w + ε`` between steps; here they stay at ``w`` and each step evaluates
  the gradient at ``w + ε``, the same iterates. Where the official code
  adds weight decay to the gradient before the momentum, the decay belongs
  to the base optimizer here (``optax.add_decayed_weights`` after this
  transform): ``v_t`` then leaves the decay out, and the perturbation
  direction differs from the official code's by it. ``rho = 0.3`` is the
  official code's default for SGD (the momentum's direction moves less than
  a gradient's, so MSAM takes a larger ``ρ`` than SAM).

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    momentum: ``μ ∈ [0, 1)``, the base optimizer's momentum.
    perturb_mask: which leaves to perturb; see :func:`sam`. ``v_t`` covers
      every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`MomentumSamState`.

  References:
    Becker et al., `Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
  """
  _contract.check_number(
    momentum, "momentum", "momentum_sam", minimum=0, below=1
  )
  momentum = jnp.asarray(momentum, jnp.float32)  # as injected: float32
  ascent = _negative_momentum_ascent()
  step = _transform.sharpness_aware_step(
    ascent, rho, perturb_mask=perturb_mask, name="momentum_sam"
  )

  def update_fn(
    updates: optax.Updates | None,
    state: MomentumSamState,
    params: optax.Params | None = None,
    **kwargs: Any,
  ) -> tuple[optax.Updates, MomentumSamState]:
    _, gradient, state = step(updates, state, params, **kwargs)
    trace = jax.tree.map(
      lambda g, v: g + momentum * v, gradient, state.momentum
    )
    return gradient, MomentumSamState(
      optax.tree.cast_like(trace, state.momentum)
    )

  return optax.GradientTransformationExtraArgs(ascent.init, update_fn)
