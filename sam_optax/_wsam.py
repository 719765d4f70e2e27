"""WSAM: the clean gradient plus a weighted sharpness term."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform


class DecoupledWsamState(NamedTuple):
  """State of the decoupled :func:`wsam` (with ``decoupled_base``).

  Attributes:
    count: the number of steps taken (int32), for a learning-rate schedule.
    base_state: the base optimizer's state.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  base_state: optax.OptState


def wsam(
  rho: ArrayLike = 0.05,
  gamma: ArrayLike = 0.9,
  *,
  decoupled_base: optax.GradientTransformation | None = None,
  learning_rate: optax.ScalarOrSchedule | None = None,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Weighted SAM (WSAM): sharpness as a regularization term of weight γ.

  Coupled (the default, ``decoupled_base=None``): a transform placed before
  the base optimizer,

  .. math::
    \varepsilon = \rho\, g / (\|g\| + \delta), \quad
    g_{adv} = \nabla L_B(w + \varepsilon), \quad
    \text{returns } g + \frac{\gamma}{1 - \gamma}\, (g_{adv} - g),

  the gradient of ``L_B(w) + γ/(1−γ) (L_B(w+ε) − L_B(w))``, with
  ``g = ∇L_B(w)`` the clean gradient (``updates``, or computed when
  ``updates`` is None). ``gamma = 1/2`` is :func:`sam` and ``gamma = 0`` the
  clean gradient. This is the official code's ``decouple=False``: the whole
  combination goes through the base optimizer's momentum.

  Decoupled (``decoupled_base=`` the base optimizer, with its
  ``learning_rate`` ``η_t``): the whole optimizer, ending the chain,

  .. math::
    \text{returns } u_t(g) - \eta_t\, \frac{\gamma}{1 - \gamma}\,
    (g_{adv} - g),

  where ``u_t(g)`` is the base optimizer's update for the clean gradient
  alone (its momentum and moments see ``g`` only). This is the form the
  paper proposes (its "weight decouple": the sharpness term acts on the
  current step only and does not accumulate in the base optimizer's
  moments; the paper's ablation favours it) and the official code's
  default ``decouple=True``, which adds ``−lr·γ/(1−γ)·(g_adv − g)`` to the
  weights after the base optimizer's step. ``learning_rate`` must be the
  base optimizer's (a number or the same schedule, counted from 0 by this
  transform's own step counter). With momentum 0.9 the two forms differ by
  ~14% in the weights after 10 steps (issue 19); with plain SGD
  (``optax.sgd(η)``) they are the same.

  Cost: two forward-backward passes, as SAM, plus O(d) elementwise work.

  The clean gradient may be left to the transform (``updates=None``); with
  ``γ = 1/2`` the result is SAM's:

  >>> half, _ = sam_optax.wsam(0.05, gamma=0.5).update(
  ...     None, optax.EmptyState(), params, loss_fn=loss_fn, batch=batch)
  >>> plain, _ = sam_optax.sam(0.05).update(
  ...     None, optax.EmptyState(), params, loss_fn=loss_fn, batch=batch)
  >>> jax.tree.all(jax.tree.map(jnp.allclose, half, plain))
  True

  The decoupled form owns the base optimizer:

  >>> tx = sam_optax.wsam(0.05, 0.9, learning_rate=0.1,
  ...                     decoupled_base=optax.sgd(0.1, momentum=0.9))
  >>> state = tx.init(params)
  >>> updates, state = tx.update(None, state, params, loss_fn=loss_fn,
  ...                            batch=batch)
  >>> params_after = optax.apply_updates(params, updates)

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    gamma: ``γ ∈ [0, 1)``, the weight of the sharpness term (0.9 as in the
      paper's experiments).
    decoupled_base: None (coupled), or the base optimizer for the decoupled
      form; the transform then returns the whole step (put nothing after it
      that expects a gradient).
    learning_rate: the base optimizer's learning rate ``η_t`` (a number or a
      schedule); required with ``decoupled_base``, not used without.
    perturb_mask: which leaves to perturb; see :func:`sam`. The result covers
      every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: stateless (coupled), or
    with a :class:`DecoupledWsamState` (decoupled).

  References:
    Yue et al., `Sharpness-Aware Minimization Revisited: Weighted Sharpness
    as a Regularization Term <https://arxiv.org/abs/2305.15817>`_, KDD 2023.
  """
  _contract.check_number(gamma, "gamma", "wsam", minimum=0, below=1)
  gamma = jnp.asarray(gamma, jnp.float32)  # float32 arithmetic, as injected
  weight = gamma / (1 - gamma)

  if decoupled_base is None:
    if learning_rate is not None:
      raise ValueError(
        "wsam: learning_rate is used by the decoupled form only; pass"
        " decoupled_base=<the base optimizer> too, or drop learning_rate"
        " (the coupled form goes before the base optimizer in a chain)."
      )

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

  if learning_rate is None:
    raise ValueError(
      "wsam: the decoupled form (decoupled_base=...) needs learning_rate,"
      " the base optimizer's learning rate (a number or its schedule)."
    )
  if not callable(learning_rate):
    _contract.check_number(learning_rate, "learning_rate", "wsam", minimum=0)
  step = _transform.sharpness_aware_step(
    _sam.clean_gradient_ascent(),
    rho,
    perturb_mask=perturb_mask,
    name="wsam",
  )

  def init(params: optax.Params) -> DecoupledWsamState:
    return DecoupledWsamState(
      count=jnp.zeros([], jnp.int32), base_state=decoupled_base.init(params)
    )

  def update_fn(
    updates: optax.Updates | None,
    state: DecoupledWsamState,
    params: optax.Params | None = None,
    **kwargs: Any,
  ) -> tuple[optax.Updates, DecoupledWsamState]:
    gradient, adversarial, _ = step(
      updates, optax.EmptyState(), params, **kwargs
    )
    base_updates, base_state = decoupled_base.update(
      optax.tree.cast_like(gradient, params), state.base_state, params
    )
    rate = (
      learning_rate(state.count) if callable(learning_rate) else (learning_rate)
    )
    factor = -jnp.asarray(rate, jnp.float32) * weight
    sharpness = optax.tree.sub(
      optax.tree.cast(adversarial, jnp.float32),
      optax.tree.cast(gradient, jnp.float32),
    )
    combined = optax.tree.add_scale(
      optax.tree.cast(base_updates, jnp.float32), factor, sharpness
    )
    return optax.tree.cast_like(combined, base_updates), DecoupledWsamState(
      count=optax.safe_increment(state.count), base_state=base_state
    )

  return optax.GradientTransformationExtraArgs(
    init, _transform.checked_update(update_fn, init, "wsam")
  )
