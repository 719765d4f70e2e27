"""SAMPa: SAM's two gradients made independent, so they run in parallel."""

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


class SampaState(NamedTuple):
  """SAMPa's state.

  Attributes:
    auxiliary_gradient: ``∇f(y_t)``, the gradient at the auxiliary iterate
      that the next step perturbs along (zeros before the first step).
    auxiliary_state: the state of the auxiliary step ``u`` (a copy of the
      base optimizer's, advanced with the gradient SAMPa hands on).
  """

  auxiliary_gradient: optax.Updates
  auxiliary_state: optax.OptState


def _all_finite(tree: Any) -> jax.Array:
  """Whether every element of ``tree`` is finite (a scalar bool)."""
  return jnp.all(
    jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
  )


def _pair_gradients(
  loss_fn: _contract.LossFn,
  points: tuple[optax.Params, optax.Params],
  batches: tuple[Any, Any],
  same_batch: bool,
  axis_name: Hashable | None,
) -> tuple[optax.Updates, optax.Updates]:
  """``(∇L_{b_0}(p_0), ∇L_{b_1}(p_1))``: one vmapped pair, or one gradient
  per device of a 2-way mesh axis."""
  gradient = lambda p, b: _contract.mean_gradient(loss_fn, p, b)
  if axis_name is None:
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), *points)
    if same_batch:
      both = jax.vmap(gradient, in_axes=(0, None))(stacked, batches[0])
    else:
      batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), *batches)
      both = jax.vmap(gradient)(stacked, batch)
    return (
      jax.tree.map(lambda x: x[0], both),
      jax.tree.map(lambda x: x[1], both),
    )
  try:
    size = jax.lax.axis_size(axis_name)
  except NameError as error:
    raise NameError(
      f"sampa: the mesh axis {axis_name!r} (pair_axis_name) is not bound;"
      " call update inside jax.shard_map over a mesh with that axis, of"
      " size 2."
    ) from error
  if size != 2:
    raise ValueError(
      f"sampa: pair_axis_name={axis_name!r} must name a mesh axis of size 2"
      f" (one gradient per device), got size {size}."
    )
  index = jax.lax.axis_index(axis_name)
  pick = lambda a, b: jnp.where(index == 0, a, b)
  point = jax.tree.map(pick, *points)
  batch = batches[0] if same_batch else jax.tree.map(pick, *batches)
  local = optax.tree.cast(gradient(point, batch), jnp.float32)
  # Each device puts its gradient in its own slot; one all-reduce gives
  # both to both (and a value replicated over the axis, as the state is).
  slots = jax.tree.map(
    lambda g: jnp.stack([jnp.where(index == k, g, 0.0) for k in (0, 1)]),
    local,
  )
  both = jax.lax.psum(slots, axis_name)
  return (
    jax.tree.map(lambda x: x[0], both),
    jax.tree.map(lambda x: x[1], both),
  )


def sampa(
  rho: ArrayLike = 0.05,
  learning_rate: optax.ScalarOrSchedule | None = None,
  lam: ArrayLike = 0.0,
  *,
  auxiliary_step: optax.GradientTransformation | None = None,
  pair_axis_name: Hashable | None = None,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAMPa: sharpness-aware minimization parallelized.

  .. math::
    \tilde x_t = x_t + \rho\, \nabla f(y_t) / (\|\nabla f(y_t)\| + \delta),
    \quad y_{t+1} = x_t + u_t(\nabla f(y_t)), \quad
    \text{returns } (1 - \lambda)\, \nabla f(\tilde x_t)
    + \lambda\, \nabla f(y_{t+1}),

  with ``u_t(g) = −η_t g`` (the paper's ``y_{t+1} = x_t − η_t ∇f(y_t)``)
  for a ``learning_rate`` ``η_t``, or the step ``auxiliary_step`` would take
  for the gradient ``g`` (the official code: the base SGD's step with its
  momentum, ``y_{t+1} = x_t − η(∇f(y_t) + μ b_t)``). The ascent direction
  is the gradient at the auxiliary iterate ``y_t`` of the previous step, not
  at ``x_t``, so the step's two gradients, at ``x̃_t`` and at ``y_{t+1}``,
  depend on nothing computed in the step: they are computed together, as one
  ``jax.vmap`` over the pair on one device, or one per device on a 2-way mesh
  axis (``pair_axis_name``, inside ``jax.shard_map``), with one all-reduce.
  ``lam = 0`` is SAMPa-0 (the paper's SAMPa), ``lam > 0`` SAMPa-λ (the
  paper's experiments and the official code use ``λ = 0.2``). ``ε_0 = 0``
  (``∇f(y_0)`` starts at zero, as the official code): the first step hands
  on ``∇f(x_0)`` mixed with ``∇f(y_1)``, ``y_1 = x_0 + u_0(0)``.

  The auxiliary step must be the base optimizer's: ``learning_rate`` the base
  SGD's learning rate (a number or the same schedule), or
  ``auxiliary_step=`` a copy of the base optimizer (e.g.
  ``optax.sgd(η, momentum=0.9)``); the transform keeps that copy's state
  and advances it with the gradient it hands on, so that it tracks the base
  optimizer placed after it. (Transforms between the two, such as
  ``optax.add_decayed_weights``, belong in the copy too:
  ``optax.chain(optax.add_decayed_weights(wd), optax.sgd(η, μ))``.)

  Batches: both gradients are taken on ``batch`` by default, so the ascent
  direction ``∇f(y_t)`` comes from the previous step's batch. The paper and
  the official code take ``∇f(x̃_t)`` on the batch ``∇f(y_t)`` was taken
  on and ``∇f(y_{t+1})`` on the next: pass that next batch as
  ``next_batch=`` (with the same shapes) and step ``t``'s batch as
  ``batch``.

  A step whose result is not finite leaves the state as it was, so that
  ``optax.apply_if_finite`` around the base optimizer skips it cleanly.

  Cost: two forward-backward passes, computed as one pair; none at ``x_t``,
  so the clean gradient ``updates`` is not used (pass None). On two devices
  (``pair_axis_name``) each device computes one gradient: a SAMPa step has
  one gradient's FLOPs per device, and one all-reduce of two gradients.

  >>> tx = optax.chain(sam_optax.sampa(0.05, learning_rate=0.1, lam=0.2),
  ...                  optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> updates, state = tx.update(None, state, params, loss_fn=loss_fn,
  ...                            batch=batch)
  >>> type(state[0]).__name__
  'SampaState'

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    learning_rate: ``η_t`` of the auxiliary step ``y_{t+1} = x_t − η_t
      ∇f(y_t)``: a number or a schedule (the base optimizer's); or None with
      ``auxiliary_step``.
    lam: ``λ ∈ [0, 1]``, the weight of ``∇f(y_{t+1})`` (SAMPa-λ).
    auxiliary_step: instead of ``learning_rate``, a copy of the base
      optimizer whose step gives ``y_{t+1}``.
    pair_axis_name: None (the pair vmapped on one device), or a mesh axis of
      size 2 bound by ``jax.shard_map``: device 0 computes ``∇f(x̃_t)``,
      device 1 ``∇f(y_{t+1})``. The parameters, the batch and the state are
      replicated over it.
    perturb_mask: which leaves to perturb; see :func:`sam`. The result covers
      every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`SampaState`;
    ``update`` takes ``next_batch=`` too.

  References:
    Xie, Pethick & Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
    <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024.
  """
  name = "sampa"
  _contract.check_rho(rho, name)
  _contract.check_number(lam, "lam", name, minimum=0, maximum=1)
  if (learning_rate is None) == (auxiliary_step is None):
    raise ValueError(
      "sampa: pass exactly one of learning_rate (y_{t+1} = x_t − η_t ∇f(y_t))"
      " and auxiliary_step (a copy of the base optimizer); got "
      + ("both." if learning_rate is not None else "neither.")
    )
  if learning_rate is not None:
    if not callable(learning_rate):
      _contract.check_number(learning_rate, "learning_rate", name, minimum=0)
    auxiliary_step = optax.sgd(learning_rate)
  assert auxiliary_step is not None
  lam = jnp.asarray(lam, jnp.float32)  # float32 arithmetic, as injected

  def init(params: optax.Params) -> SampaState:
    return SampaState(
      auxiliary_gradient=optax.tree.zeros_like(params),
      auxiliary_state=auxiliary_step.init(params),
    )

  def update(
    updates: optax.Updates | None,
    state: SampaState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    next_batch: Any = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, SampaState]:
    del updates, key, extra_args  # both gradients are taken here
    if next_batch is not None:
      _contract.check_per_example_losses(loss_fn, params, next_batch, name)
      shapes = lambda tree: jax.tree.map(jnp.shape, tree)
      if shapes(next_batch) != shapes(batch):
        raise ValueError(
          "sampa: next_batch must have the structure and shapes of batch"
          " (the two gradients are computed as one pair)."
        )
    mask = _perturbation.resolve_mask(perturb_mask, params, name)
    previous = state.auxiliary_gradient
    step, _ = auxiliary_step.update(previous, state.auxiliary_state, params)
    auxiliary = optax.apply_updates(params, step)
    epsilon = _perturbation.perturbation(previous, rho, mask=mask)
    perturbed = _perturbation.perturb(params, epsilon)
    adversarial, gradient = _pair_gradients(
      loss_fn,
      (perturbed, auxiliary),
      (batch, next_batch),
      next_batch is None,
      pair_axis_name,
    )
    combined = optax.tree.add_scale(
      optax.tree.scale(1 - lam, optax.tree.cast(adversarial, jnp.float32)),
      lam,
      optax.tree.cast(gradient, jnp.float32),
    )
    combined = optax.tree.cast_like(combined, params)
    _, auxiliary_state = auxiliary_step.update(
      combined, state.auxiliary_state, params
    )
    # A non-finite step (skipped by optax.apply_if_finite around the base
    # optimizer) must not poison the next ascent: keep the state as it was.
    finite = _all_finite(combined)
    return combined, SampaState(
      auxiliary_gradient=optax.tree.where(
        finite, optax.tree.cast_like(gradient, previous), previous
      ),
      auxiliary_state=optax.tree.where(
        finite, auxiliary_state, state.auxiliary_state
      ),
    )

  return optax.GradientTransformationExtraArgs(
    init, _transform.checked_update(update, init, name, uses_updates=False)
  )
