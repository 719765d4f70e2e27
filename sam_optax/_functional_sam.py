"""Functional-SAM and the preconditioned perturbation (Singh et al. 2025)."""

from collections.abc import Callable
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _per_example
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform


@dataclasses.dataclass(frozen=True)
class SplitLoss:
  """A per-example loss split into the model and a loss of its outputs.

  ``SplitLoss(model_fn, output_loss_fn)(params, batch)`` is
  ``output_loss_fn(model_fn(params, batch), batch)``, the per-example losses
  (shape ``[B]``): it is itself a ``loss_fn``, so every transform takes it,
  and :func:`functional_sam` uses its two halves.

  >>> def model_fn(params, batch):            # the logits F(w)
  ...   return batch["x"] @ params["w"] + params["b"]
  >>> def output_loss_fn(logits, batch):      # ℓ_i(F), shape [B]
  ...   return optax.softmax_cross_entropy_with_integer_labels(
  ...     logits, batch["y"])
  >>> loss_fn = sam_optax.SplitLoss(model_fn, output_loss_fn)
  >>> loss_fn(params, batch).shape
  (8,)

  With Flax NNX, :func:`sam_optax.flax.nnx_split_loss` builds it from the
  model. It is a frozen dataclass (hashable, so a static argument of
  ``jax.jit``; not a pytree).

  Attributes:
    model_fn: ``(params, batch) -> outputs``, any pytree of arrays (the
      logits); it may couple the batch's examples (BatchNorm).
    output_loss_fn: ``(outputs, batch) -> per-example losses [B]``.
  """

  model_fn: Callable[[Any, Any], Any]
  output_loss_fn: Callable[[Any, Any], jax.Array]

  def __call__(self, params: Any, batch: Any) -> jax.Array:
    return self.output_loss_fn(self.model_fn(params, batch), batch)

  @property
  def couples_examples(self) -> bool:
    """Whether ``model_fn`` declares that it couples the examples."""
    return _per_example.couples_examples(self.model_fn)


class PreconditionedAscentState(NamedTuple):
  """State of the preconditioned ascent direction.

  Attributes:
    count: the number of steps taken (int32), for the bias correction.
    nu: ``ν``, the EMA of the squared clean gradients (Adam's second
      moment, of the clean gradients).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  nu: optax.Updates


def preconditioned_ascent(
  b2: ArrayLike = 0.999, eps: ArrayLike = 1e-8, *, name: str = "sam"
) -> _transform.AscentDirection:
  r"""The ascent ``d = g / (\sqrt{\hat\nu} + \epsilon)``: Adam's preconditioner.

  .. math::
    \nu_t = \beta_2 \nu_{t-1} + (1-\beta_2)\, g^2, \quad
    \hat\nu_t = \nu_t / (1 - \beta_2^t), \quad
    d_t = g / (\sqrt{\hat\nu_t} + \epsilon),

  elementwise, ``ν_0 = 0``, ``g = ∇L_B(w)`` the clean gradient. The
  second-moment estimate is the direction's own EMA (so the transform does
  not reach into the base optimizer's state): with ``β_2`` and ``ε`` equal to
  AdamW's it is AdamW's ``ν`` updated with the clean gradients instead of
  the gradients AdamW receives.

  Args:
    b2: ``β_2 ∈ [0, 1)``, the EMA's decay.
    eps: ``ε > 0``, added to ``√ν̂``.
    name: the transform's name, for error messages.
  """
  _contract.check_number(b2, "b2", name, minimum=0, below=1)
  _contract.check_number(eps, "eps", name, above=0)
  b2 = jnp.asarray(b2, jnp.float32)
  eps = jnp.asarray(eps, jnp.float32)

  def init(params: optax.Params) -> PreconditionedAscentState:
    return PreconditionedAscentState(
      count=jnp.zeros([], jnp.int32),
      nu=optax.tree.zeros_like(optax.tree.cast(params, jnp.float32)),
    )

  def direction(
    updates: optax.Updates | None,
    state: PreconditionedAscentState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, PreconditionedAscentState]:
    del key, extra_args
    gradient = optax.tree.cast(
      _transform.clean_gradient_or_compute(updates, params, loss_fn, batch),
      jnp.float32,
    )
    count = optax.safe_increment(state.count)
    nu = optax.tree.update_moment_per_elem_norm(gradient, state.nu, b2, 2)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    ascent = jax.tree.map(
      lambda g, v: g / (jnp.sqrt(v) + eps), gradient, nu_hat
    )
    return ascent, PreconditionedAscentState(count=count, nu=nu)

  return _transform.AscentDirection(init=init, direction=direction)


def preconditioned_sam(
  rho: ArrayLike = 0.05,
  b2: ArrayLike = 0.999,
  eps: ArrayLike = 1e-8,
  *,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM with Adam's preconditioner on the perturbation.

  .. math::
    d = g_B / (\sqrt{\hat\nu} + \epsilon), \quad
    \varepsilon = \rho\, d / (\|d\| + \delta), \quad
    \text{returns } \nabla L_B(w + \varepsilon),

  with ``ν̂`` the bias-corrected EMA of ``g_B²`` of
  :func:`preconditioned_ascent`. ``eps → ∞`` is :func:`sam`.

  Args:
    rho: the perturbation radius ``ρ >= 0``.
    b2: ``β_2 ∈ [0, 1)``, the second moment's decay (AdamW's, to match it).
    eps: ``ε > 0`` (AdamW's).
    perturb_mask: which leaves to perturb; see :func:`sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`PreconditionedAscentState`.

  References:
    Singh, Mobahi, Agarwala & Dauphin, `Avoiding spurious sharpness
    minimization broadens applicability of SAM
    <https://arxiv.org/abs/2502.02407>`_, ICML 2025 (preconditioned SAM).
  """
  return _transform.sharpness_aware(
    preconditioned_ascent(b2, eps, name="preconditioned_sam"),
    rho,
    normalize=True,
    perturb_mask=perturb_mask,
    name="preconditioned_sam",
  )


def _clean_pass(
  loss_fn: SplitLoss, params: Any, batch: Any, need_gradient: bool
) -> tuple[Any, optax.Updates | None]:
  """``(∇_F L_B at F(w), ∇L_B(w) or None)`` from one pass at ``w``.

  ``L_B(F) = mean_i ℓ_i(F)`` in float32; ``∇L_B(w) = J_F(w)ᵀ ∇_F L_B``
  reuses the same linearization.
  """
  outputs, model_vjp = jax.vjp(lambda p: loss_fn.model_fn(p, batch), params)
  cotangent = jax.grad(
    lambda f: jnp.mean(loss_fn.output_loss_fn(f, batch).astype(jnp.float32))
  )(outputs)
  gradient = model_vjp(cotangent)[0] if need_gradient else None
  return cotangent, gradient


def functional_sam(
  rho: ArrayLike = 0.05,
  *,
  precondition: bool = False,
  b2: ArrayLike = 0.999,
  eps: ArrayLike = 1e-8,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Functional-SAM: the Jacobian at ``w + ε``, the loss derivative at ``w``.

  With ``loss_fn = SplitLoss(F, ℓ)`` (``L_B(w) = mean_i ℓ_i(F(w))``):

  .. math::
    \varepsilon = \rho\, d / (\|d\| + \delta), \quad
    \text{returns } J_F(w + \varepsilon)^\top\, \nabla_F L_B(F(w)),

  a VJP of the model at the perturbed point with the cotangent taken at the
  clean outputs: SAM's gradient ``J_F(w+ε)ᵀ ∇_F L_B(F(w+ε))`` without the
  "logit path" through ``∇_F L_B``, which in language models regularizes
  the logit statistics rather than the function. ``d = g_B``
  (Functional-SAM) or, with ``precondition=True``, ``d = g_B / (√ν̂ + ε)``
  (:func:`preconditioned_ascent`, preconditioned Functional-SAM).

  Cost: two forward-backward passes, as SAM. With ``updates=None`` the clean
  pass gives ``g_B`` and the cotangent together; with the clean gradient
  given, it adds one forward pass at ``w`` (the cotangent needs the clean
  outputs).

  Limits: ``ρ = 0`` returns ``g_B``. An output loss linear in the outputs
  (``∇_F L_B`` constant) makes it :func:`sam`. A linear model (``J_F``
  constant, e.g. least squares) makes it ``g_B`` for every ``ρ``: all of
  SAM's effect there is the logit path.

  Args:
    rho: the perturbation radius ``ρ >= 0``.
    precondition: perturb along Adam's preconditioned gradient.
    b2: ``β_2`` of the preconditioner (used if ``precondition``).
    eps: ``ε`` of the preconditioner (used if ``precondition``).
    perturb_mask: which leaves to perturb; see :func:`sam`.

  ``update`` needs ``loss_fn`` to be a :class:`SplitLoss` (any object with
  ``model_fn`` and ``output_loss_fn``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (state: ``EmptyState``, or
    a :class:`PreconditionedAscentState`).

  References:
    Singh, Mobahi, Agarwala & Dauphin, `Avoiding spurious sharpness
    minimization broadens applicability of SAM
    <https://arxiv.org/abs/2502.02407>`_, ICML 2025.
  """
  name = "functional_sam"
  _contract.check_rho(rho, name)
  ascent = (
    preconditioned_ascent(b2, eps, name=name)
    if precondition
    else _sam.clean_gradient_ascent()
  )

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
    split = _contract.require_split_loss(loss_fn, name)
    mask = _perturbation.resolve_mask(perturb_mask, params, name)
    cotangent, clean = _clean_pass(split, params, batch, updates is None)
    direction, state = ascent.direction(
      updates if updates is not None else clean,
      state,
      params,
      loss_fn=loss_fn,
      batch=batch,
      key=key,
      **extra_args,
    )
    epsilon = _perturbation.perturbation(
      direction, rho, normalize=True, mask=mask
    )
    _, model_vjp = jax.vjp(
      lambda p: split.model_fn(p, batch),
      _perturbation.perturb(params, epsilon),
    )
    (gradient,) = model_vjp(cotangent)
    return optax.tree.cast_like(gradient, params), state

  return optax.GradientTransformationExtraArgs(
    ascent.init, _transform.checked_update(update, ascent.init, name)
  )
