"""Lookbehind-SAM and the plain multi-step ascent."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


def multi_step_sam(
  rho: ArrayLike = 0.05,
  num_steps: int = 2,
  *,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM with ``n`` normalized ascent steps on the batch.

  .. math::
    \varepsilon_0 = 0, \quad
    \varepsilon_i = \varepsilon_{i-1}
      + \rho\, \frac{\nabla L_B(w + \varepsilon_{i-1})}
                    {\|\nabla L_B(w + \varepsilon_{i-1})\| + \delta}
    \ (i = 1..n), \quad
    \text{returns } \nabla L_B(w + \varepsilon_n),

  with ``∇L_B(w)`` the clean gradient (``updates``, or computed when
  ``updates`` is None). Each ascent step has length ``ρ``, so
  ``‖ε_n‖ <= nρ``. This is ``optax.contrib.sam(optimizer,
  optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
  sync_period=n + 1, opaque_mode=True)`` with its ``grad_fn`` on one batch,
  as a transform placed before the base optimizer. ``num_steps = 1`` is
  :func:`sam`.

  Cost: ``n + 1`` forward-backward passes (``n`` when ``updates`` is given).

  >>> tx = optax.chain(sam_optax.multi_step_sam(0.05, num_steps=3),
  ...                  optax.sgd(0.1))
  >>> updates, _ = tx.update(None, tx.init(params), params, loss_fn=loss_fn,
  ...                        batch=batch)

  Args:
    rho: the length ``ρ >= 0`` of each ascent step.
    num_steps: ``n >= 1``, the number of ascent steps (static: with
      ``optax.inject_hyperparams`` pass ``static_args=("num_steps",)``).
    perturb_mask: which leaves to perturb; see :func:`sam`. The result covers
      every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless).

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (the
    inner maximization by several ascent steps); optax.contrib.sam's
    ``sync_period``.
  """
  name = "multi_step_sam"
  _contract.check_rho(rho, name)
  num_steps = _contract.check_integer(num_steps, "num_steps", name)

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
    del key, extra_args
    mask = _perturbation.resolve_mask(perturb_mask, params, name)
    gradient = _transform.clean_gradient_or_compute(
      updates, params, loss_fn, batch
    )
    epsilon = optax.tree.zeros_like(optax.tree.cast(params, jnp.float32))
    for _ in range(num_steps):
      epsilon = optax.tree.add(
        epsilon, _perturbation.perturbation(gradient, rho, mask=mask)
      )
      gradient = _perturbation.perturbed_gradient(
        loss_fn, params, epsilon, batch
      )
    return optax.tree.cast_like(gradient, params), state

  return _transform.stateless(update, name)


class LookbehindSamState(NamedTuple):
  """Lookbehind-SAM's state.

  Attributes:
    count: the step within the current cycle of ``k`` (int32).
    slow: ``θ``, the slow weights the cycle started from.
    offset: ``ε_1 + … + ε_j``, the ascent so far in the cycle (float32).
    base_state: the base optimizer's state.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  slow: optax.Params
  offset: optax.Updates
  base_state: optax.OptState


def lookbehind_sam(
  rho: ArrayLike = 0.05,
  k: int = 2,
  alpha: ArrayLike = 0.5,
  *,
  optimizer: optax.GradientTransformation,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Lookbehind-SAM: ``k`` ascent steps, each with a descent, then a
  lookahead-style interpolation.

  A cycle starts at the slow weights ``θ`` (``φ_0 = θ``, ``a_0 = θ``); its
  step ``j = 1..k``, on batch ``B_j``:

  .. math::
    a_j = a_{j-1} + \rho\, \frac{\nabla L_{B_j}(a_{j-1})}
                                {\|\nabla L_{B_j}(a_{j-1})\| + \delta},
    \quad
    \varphi_j = \varphi_{j-1} + u(\nabla L_{B_j}(a_j)),

  with ``u`` the base ``optimizer``'s step (its state carried across steps
  and cycles); after step ``k``, ``θ ← θ + α (φ_k − θ)`` and the next cycle
  starts there. The ascent points ``a_j`` move by the ascent steps only
  (``a_j = θ + ε_1 + … + ε_j``); the descents move ``φ``, the parameters
  the caller holds. ``k = 1, alpha = 1`` is :func:`sam` followed by
  ``optimizer``.

  The transform is the whole optimizer (it ends the chain, like
  ``optax.lookahead``): its ``update`` returns ``φ_j − φ_{j−1}``, and on a
  cycle's last step the interpolated weights less the current ones. The
  caller's parameters are ``φ``; ``updates`` is not used (each step takes
  its ascent gradient at ``a_{j−1}``, not at ``φ``).

  To skip non-finite steps, wrap the base: ``optimizer=
  optax.apply_if_finite(base, n)``; a step whose update is not finite then
  leaves the cycle as it was (the same ascent point and count; the
  wrapped base skips its own update).

  Cost: two forward-backward passes a step, as SAM; the state holds two
  copies of the parameters (``θ`` and the ascent so far) besides the base
  optimizer's.

  >>> tx = sam_optax.lookbehind_sam(0.05, k=2, alpha=0.5,
  ...                               optimizer=optax.sgd(0.1, momentum=0.9))
  >>> state = tx.init(params)
  >>> for _ in range(2):  # one cycle
  ...   updates, state = tx.update(None, state, params, loss_fn=loss_fn,
  ...                              batch=batch)
  ...   params = optax.apply_updates(params, updates)
  >>> int(state.count)
  0

  As the official code (chandar-lab/Lookbehind-SAM, ``lookbehind.py``,
  ``LookbehindSAM``) with a fixed ``α``; its adaptive ``α = −1`` is not
  provided. ``δ = 1e-12`` (the official code's is ``1e-16``).

  Args:
    rho: the length ``ρ >= 0`` of each ascent step.
    k: ``k >= 1``, the number of ascent-descent steps per cycle (static).
    alpha: ``α ∈ [0, 1]``, the slow weights' step size.
    optimizer: the base optimizer (e.g. ``optax.sgd(0.1, momentum=0.9)``).
    perturb_mask: which leaves to perturb; see :func:`sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`LookbehindSamState`.

  References:
    Mordido et al., `Lookbehind-SAM: k steps back, 1 step forward
    <https://arxiv.org/abs/2307.16704>`_, ICML 2024.
  """
  name = "lookbehind_sam"
  _contract.check_rho(rho, name)
  k = _contract.check_integer(k, "k", name)
  _contract.check_number(alpha, "alpha", name, minimum=0, maximum=1)
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f"{name}: optimizer must be an optax.GradientTransformation (the base"
      f" optimizer, e.g. optax.sgd(0.1, momentum=0.9)), got {optimizer!r}."
    )
  alpha = jnp.asarray(alpha, jnp.float32)  # float32 arithmetic, as injected

  def init(params: optax.Params) -> LookbehindSamState:
    return LookbehindSamState(
      count=jnp.zeros([], jnp.int32),
      # A copy: a train step that donates its state may not hold the
      # parameters' buffers twice.
      slow=jax.tree.map(jnp.copy, params),
      offset=optax.tree.zeros_like(optax.tree.cast(params, jnp.float32)),
      base_state=optimizer.init(params),
    )

  def update(
    updates: optax.Updates | None,
    state: LookbehindSamState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, LookbehindSamState]:
    del updates, key, extra_args  # the ascent gradient is at a_{j-1}
    mask = _perturbation.resolve_mask(perturb_mask, params, name)
    ascent = _perturbation.perturbed_gradient(
      loss_fn, state.slow, state.offset, batch
    )
    offset = optax.tree.add(
      state.offset, _perturbation.perturbation(ascent, rho, mask=mask)
    )
    adversarial = _perturbation.perturbed_gradient(
      loss_fn, state.slow, offset, batch
    )
    step, base_state = optimizer.update(
      optax.tree.cast_like(adversarial, params), state.base_state, params
    )
    # A non-finite step (skipped by an optax.apply_if_finite ``optimizer``)
    # leaves the cycle as it was: the same ascent point, the same count.
    finite = jnp.all(
      jnp.array(
        [
          jnp.all(jnp.isfinite(x))
          for x in jax.tree.leaves((adversarial, offset))
        ]
      )
    )
    last = jnp.logical_and(state.count == k - 1, finite)
    # On the cycle's last step: θ + α(φ + u − θ) − φ = α u + (1 − α)(θ − φ).
    fast = optax.apply_updates(params, step)
    slow = jax.tree.map(
      lambda s, f: (s + alpha * (f - s)).astype(jnp.result_type(s)),
      state.slow,
      fast,
    )
    synced = jax.tree.map(lambda s, p: s - p, slow, params)
    result = optax.tree.where(last, synced, step)
    offset = optax.tree.where(finite, offset, state.offset)
    new_state = LookbehindSamState(
      count=jnp.where(
        last, 0, jnp.where(finite, state.count + 1, state.count)
      ).astype(jnp.int32),
      slow=optax.tree.where(last, slow, state.slow),
      offset=optax.tree.where(last, optax.tree.zeros_like(offset), offset),
      base_state=base_state,
    )
    return optax.tree.cast_like(result, params), new_state

  return optax.GradientTransformationExtraArgs(
    init, _transform.checked_update(update, init, name, uses_updates=False)
  )
