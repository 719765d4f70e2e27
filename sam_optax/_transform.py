"""One transform for the whole family: an ascent direction, then the SAM step.

A variant of SAM is an :class:`AscentDirection` (how ``d`` is chosen, with any
state it keeps) plus the options of :func:`sharpness_aware` (normalized or not,
ASAM's elementwise scale or not). ``sam``, ``usam``, ``n_sam``, ``asam``,
``f_sam``, ``rw_sam``, ``rw_asam`` and ``vasso`` are such pairs; new variants
are small additions, not copies. :func:`sharpness_aware_step` is the same step
returning the direction too, for the variants that mix the clean and the
perturbed gradients (``gsam``, ``wsam`` through
:func:`combined_sharpness_aware`; ``look_sam``'s SAM steps) or keep the
perturbed gradient (``momentum_sam``). Variants that average several SAM steps
(``m_sam`` and its data-parallel form) are :func:`from_gradient_fn` around
them. Every ``update`` of the family, these and the variants with their own
step (``look_sam``, ``esam``, ``functional_sam``, ``multi_step_sam``,
``lookbehind_sam``, ``bsam``, ``sampa``), runs the same checks first:
:func:`checked_update`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation


class DirectionFn(Protocol):
  """``(updates, state, params, *, loss_fn, batch, key, **extra) -> (d, state)``.

  ``updates`` is the clean mean gradient ``∇L_B(w)`` or None; a direction that
  needs it computes it when it is None.
  """

  def __call__(
    self,
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]: ...


class AscentDirection(NamedTuple):
  """How a variant picks its ascent direction ``d``.

  Attributes:
    init: ``params -> state`` of the direction (``optax.EmptyState()`` if none).
    direction: a :class:`DirectionFn`.
  """

  init: Callable[[optax.Params], optax.OptState]
  direction: DirectionFn


_Result = TypeVar("_Result")


def checked_update(
  update: Callable[..., _Result],
  init: Callable[[optax.Params], Any],
  name: str,
  *,
  uses_updates: bool = True,
) -> Callable[..., _Result]:
  """``update`` behind the checks every ``update`` of the family runs first.

  The returned function has the family's signature ``(updates, state,
  params=None, *, loss_fn=None, batch=None, key=None, **extra_args)``; at
  trace time it runs :func:`_contract.check_update_call` (``params``,
  ``loss_fn`` and ``batch`` given, ``updates`` shaped like ``params``,
  per-example losses) and :func:`_contract.check_state` (``state`` shaped
  like ``init(params)``), then calls ``update`` with the same arguments,
  ``params``, ``loss_fn`` and ``batch`` no longer None. A body that needs
  the clean gradient ``∇L_B(w)`` takes it from
  :func:`clean_gradient_or_compute` (``updates``, or computed when None).
  The checks run on shapes only (``jax.eval_shape``): nothing at run time.

  Args:
    update: ``(updates, state, params, *, loss_fn, batch, key, **extra)``,
      the body of the update (its result is returned as it is).
    init: the transform's ``init``, for the state check.
    name: the name used in error messages.
    uses_updates: False for the transforms that take every gradient
      themselves and ignore ``updates`` (it is then not checked).

  Returns:
    The ``update`` of an ``optax.GradientTransformationExtraArgs``.
  """

  def update_fn(
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params | None = None,
    *,
    loss_fn: _contract.LossFn | None = None,
    batch: Any = None,
    key: jax.Array | None = None,
    **extra_args: Any,
  ) -> _Result:
    params, loss_fn, batch = _contract.check_update_call(
      updates if uses_updates else None, params, loss_fn, batch, name
    )
    _contract.check_state(state, init, params, name)
    return update(
      updates,
      state,
      params,
      loss_fn=loss_fn,
      batch=batch,
      key=key,
      **extra_args,
    )

  return update_fn


def clean_gradient_or_compute(
  updates: optax.Updates | None,
  params: optax.Params,
  loss_fn: _contract.LossFn,
  batch: Any,
) -> optax.Updates:
  """The clean gradient ``∇L_B(w)``: ``updates`` if given, else computed."""
  if updates is not None:
    return updates
  return _contract.mean_gradient(loss_fn, params, batch)


class SharpnessAwareStep(Protocol):
  """``(updates, state, params, *, loss_fn, batch, key, **extra)`` -> ``(d,
  g_adv, state)``.

  The SAM step of :func:`sharpness_aware_step`: the ascent direction ``d`` it
  perturbed along, the perturbed gradient ``g_adv = ∇L_B(w + ε)`` and the
  direction's new state. With :func:`clean_gradient_ascent` as the direction,
  ``d`` is the clean gradient ``g = ∇L_B(w)`` (``updates``, or computed when
  ``updates`` is None).
  """

  def __call__(
    self,
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params | None = None,
    *,
    loss_fn: _contract.LossFn | None = None,
    batch: Any = None,
    key: jax.Array | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.Updates, optax.OptState]: ...


def check_ascent(ascent: Any, name: str) -> None:
  """Raises unless ``ascent`` is an :class:`AscentDirection` (or alike).

  Anything with a callable ``init`` and a callable ``direction`` is
  accepted.

  Raises:
    TypeError: naming ``ascent``; for a plain function, what to wrap it in.
  """
  if callable(getattr(ascent, "init", None)) and callable(
    getattr(ascent, "direction", None)
  ):
    return
  hint = ""
  if callable(ascent):
    hint = (
      " For a stateless direction function, pass"
      " sam_optax.AscentDirection(init=lambda params: optax.EmptyState(),"
      " direction=your_function)."
    )
  raise TypeError(
    f"{name}: `ascent` must be a sam_optax.AscentDirection(init, direction),"
    f" got {ascent!r}.{hint}"
  )


def _checked_direction(
  result: Any, ascent: AscentDirection, params: optax.Params, name: str
) -> tuple[optax.Updates, optax.OptState]:
  """``(d, state)`` from an ascent direction, checked against ``params``.

  ``d`` must have the structure and shapes of ``params``, and the state
  those of ``ascent.init(params)``.

  Raises:
    TypeError: if the direction did not return a pair.
    ValueError: if ``d`` or the state is shaped wrongly.
  """
  if not (isinstance(result, tuple) and len(result) == 2):
    raise TypeError(
      f"{name}: the ascent direction must return a pair (d, state), d"
      " shaped like params and state like its init(params); got"
      f" {_contract.describe(result)}."
    )
  direction, state = result
  _contract.check_same_shapes(
    direction, params, "d (the ascent direction's result)", name
  )
  _contract.check_state(
    state, ascent.init, params, name, "state (the ascent direction's result)"
  )
  return direction, state


def sharpness_aware_step(
  ascent: AscentDirection,
  rho: ArrayLike,
  *,
  normalize: bool = True,
  scale_fn: Callable[[optax.Params], Any] | None = None,
  perturb_mask: _perturbation.PerturbMask = None,
  name: str = "sharpness_aware",
) -> SharpnessAwareStep:
  """The step of :func:`sharpness_aware`, returning the direction too.

  For variants that do more than hand on ``∇L_B(w + ε)``: those that mix the
  clean and the perturbed gradients (GSAM, WSAM, LookSAM's SAM steps, through
  :func:`combined_sharpness_aware`) and those whose state needs the perturbed
  gradient (Momentum-SAM). The arguments are :func:`sharpness_aware`'s (and
  checked the same way, when the step is built and at trace time).

  Returns:
    A :class:`SharpnessAwareStep`: ``(d, ∇L_B(w + ε), state)`` from the
    arguments of an ``update``.
  """
  _contract.check_rho(rho, name)
  normalize = _contract.check_bool(normalize, "normalize", name)
  check_ascent(ascent, name)
  if scale_fn is not None and not callable(scale_fn):
    raise TypeError(
      f"{name}: scale_fn must be a function params -> T (a pytree shaped"
      f" like params) or None, got {scale_fn!r}."
    )

  def step(
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.Updates, optax.OptState]:
    mask = _perturbation.resolve_mask(perturb_mask, params, name)
    direction, state = _checked_direction(
      ascent.direction(
        updates,
        state,
        params,
        loss_fn=loss_fn,
        batch=batch,
        key=key,
        **extra_args,
      ),
      ascent,
      params,
      name,
    )
    scale = None
    if scale_fn is not None:
      scale = scale_fn(params)
      _contract.check_same_shapes(scale, params, "scale_fn(params)", name)
    epsilon = _perturbation.perturbation(
      direction, rho, normalize=normalize, scale=scale, mask=mask
    )
    return (
      direction,
      _perturbation.perturbed_gradient(loss_fn, params, epsilon, batch),
      state,
    )

  return checked_update(step, ascent.init, name)


def sharpness_aware(
  ascent: AscentDirection,
  rho: ArrayLike,
  *,
  normalize: bool = True,
  scale_fn: Callable[[optax.Params], Any] | None = None,
  perturb_mask: _perturbation.PerturbMask = None,
  name: str = "sharpness_aware",
) -> optax.GradientTransformationExtraArgs:
  r"""The SAM step around any ascent direction.

  .. math::
    u = T \odot d, \quad
    \varepsilon = \rho\, T \odot u / (\|u\| + \delta)
    \ (\text{or } \rho\, T \odot u \text{ if not normalized}), \quad
    \text{returns } \nabla L_B(w + \varepsilon),

  with ``d`` from ``ascent`` and ``T = scale_fn(w)`` (``T = 1`` if None).
  With ``perturb_mask``, ``d`` is zeroed on the leaves it excludes first: they
  are not perturbed and do not count in ``‖u‖``; the returned gradient still
  covers every leaf.

  Hyperparameters are checked when the transform is built: ``rho`` must be a
  finite number ``>= 0``. Traced values (e.g. under ``jax.jit`` with
  ``optax.inject_hyperparams``) cannot be checked and are used as given.

  Args:
    ascent: the ascent direction and its state.
    rho: the perturbation radius ``ρ >= 0``.
    normalize: SAM-style normalized ascent (True) or USAM-style (False).
    scale_fn: ``params -> T``, ASAM's elementwise scale, or None.
    perturb_mask: which leaves to perturb: None (all), a pytree of bools with
      the structure of the parameters, or a function ``params -> that
      pytree``.
    name: the name used in error messages.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``loss_fn`` and ``batch`` (and ``key``) as keyword arguments and returns
    ``∇L_B(w+ε)``. Its state is the ascent direction's state.
  """
  return combined_sharpness_aware(
    ascent,
    rho,
    _perturbed_gradient,
    normalize=normalize,
    scale_fn=scale_fn,
    perturb_mask=perturb_mask,
    name=name,
  )


Combine = Callable[[optax.Updates, optax.Updates], optax.Updates]
"""``(d, g_adv) -> the gradient to hand on`` (leaves in float32 at least)."""


def _at_least_float32(tree: Any) -> Any:
  """``tree`` with its half-precision leaves in float32 (the rest as given)."""
  return jax.tree.map(
    lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree
  )


def _perturbed_gradient(
  direction: optax.Updates, gradient: optax.Updates
) -> optax.Updates:
  """SAM's :data:`Combine`: ``g_adv`` itself."""
  del direction
  return gradient


def combined_sharpness_aware(
  ascent: AscentDirection,
  rho: ArrayLike,
  combine: Combine,
  *,
  normalize: bool = True,
  scale_fn: Callable[[optax.Params], Any] | None = None,
  perturb_mask: _perturbation.PerturbMask = None,
  name: str = "sharpness_aware",
) -> optax.GradientTransformationExtraArgs:
  """:func:`sharpness_aware_step` handing on ``combine(d, ∇L_B(w + ε))``.

  :func:`sharpness_aware` hands on ``∇L_B(w + ε)`` itself; the variants that
  mix the clean gradient with the perturbed one (GSAM, WSAM) take the
  clean-gradient ascent, so that ``d = g = ∇L_B(w)``, and their own
  ``combine``. ``d`` and ``∇L_B(w + ε)`` reach ``combine`` in float32 at
  least (half-precision leaves are promoted) and its result is cast to the
  parameters' dtypes (exact for ``∇L_B(w + ε)`` itself).

  Args:
    ascent: the ascent direction and its state.
    rho: the perturbation radius ``ρ >= 0``.
    combine: ``(d, g_adv) -> the gradient to hand on``.
    normalize: as in :func:`sharpness_aware`.
    scale_fn: as in :func:`sharpness_aware`.
    perturb_mask: which leaves to perturb; see :func:`sharpness_aware`.
    name: the name used in error messages.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is the ascent
    direction's.
  """
  step = sharpness_aware_step(
    ascent,
    rho,
    normalize=normalize,
    scale_fn=scale_fn,
    perturb_mask=perturb_mask,
    name=name,
  )

  def update_fn(
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params | None = None,
    **kwargs: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    direction, gradient, state = step(updates, state, params, **kwargs)
    combined = combine(
      _at_least_float32(direction), _at_least_float32(gradient)
    )
    return optax.tree.cast_like(combined, gradient), state

  return optax.GradientTransformationExtraArgs(ascent.init, update_fn)


GradientFn = Callable[[_contract.LossFn, optax.Params, Any], optax.Updates]
"""``(loss_fn, params, batch) -> the gradient to hand on``."""


def from_gradient_fn(
  gradient_fn: GradientFn, name: str
) -> optax.GradientTransformationExtraArgs:
  """A stateless transform that returns ``gradient_fn(loss_fn, params, batch)``.

  The skeleton of the variants that take every gradient they need themselves
  (one per micro-batch or device, so the incoming ``updates`` are not used and
  may be None, and are only checked against ``params``): the calling
  contract is checked, and the result is cast to the parameters' dtypes.

  Args:
    gradient_fn: computes the gradient to hand on.
    name: the name used in error messages.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``optax.EmptyState``.
  """

  def update(
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    del updates, key, extra_args  # gradient_fn takes its own gradients
    gradient = gradient_fn(loss_fn, params, batch)
    return optax.tree.cast_like(gradient, params), state

  return stateless(update, name)


def stateless(
  update: Callable[..., tuple[optax.Updates, optax.OptState]],
  name: str,
  *,
  uses_updates: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """A transform that keeps no state, around a :func:`checked_update` body.

  Args:
    update: the body, as in :func:`checked_update` (its ``state`` is the
      ``optax.EmptyState`` it hands back).
    name: the name used in error messages.
    uses_updates: as in :func:`checked_update`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``optax.EmptyState``.
  """
  init = lambda params: optax.EmptyState()
  return optax.GradientTransformationExtraArgs(
    init, checked_update(update, init, name, uses_updates=uses_updates)
  )
