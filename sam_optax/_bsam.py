"""bSAM (Bayesian SAM): SAM as a relaxation of Bayes, a whole optimizer."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _micro_batches
from sam_optax import _perturbation
from sam_optax import _transform


class BsamState(NamedTuple):
  """bSAM's state: the Gaussian posterior ``N(w, 1/(N s))`` and the momentum.

  The posterior mean is the parameters themselves (``params``; not copied
  here), its variance ``σ² = 1/(N s)`` (:func:`bsam_variance`).

  Attributes:
    count: the number of steps taken (int32); indexes the learning-rate
      schedule.
    momentum: ``g_m``, the EMA of the perturbed gradients plus ``δ w``.
    precision: ``s``, the per-parameter precision, ``s_0 = init_precision``.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as optax's states do
  momentum: optax.Updates
  precision: optax.Updates


def bsam_variance(state: BsamState, num_data: ArrayLike) -> optax.Updates:
  """The posterior variance ``σ² = 1/(N s)`` of a :class:`BsamState`."""
  return jax.tree.map(
    lambda s: 1.0 / (jnp.asarray(num_data, jnp.float32) * s), state.precision
  )


def _standard_normal(key: jax.Array, params: Any, count: int) -> Any:
  """``count`` standard-normal draws like ``params`` (leaves ``[count, ...]``),
  each leaf from its own key (``jax.random.split(key, number of leaves)``)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef,
    [
      jax.random.normal(k, (count, *jnp.shape(x)), jnp.float32)
      for k, x in zip(keys, leaves, strict=True)
    ],
  )


def bsam(
  learning_rate: optax.ScalarOrSchedule,
  num_data: ArrayLike,
  rho: ArrayLike = 0.01,
  *,
  b1: ArrayLike = 0.9,
  b2: ArrayLike = 0.999,
  weight_decay: ArrayLike = 0.0,
  damping: ArrayLike = 0.1,
  init_precision: ArrayLike = 1.0,
  micro_batch_size: int | None = None,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""bSAM (Bayesian SAM): an Adam-like optimizer with a Gaussian posterior.

  The posterior is ``N(w, σ²)`` with ``σ² = 1/(N s)``; each step, on each
  micro-batch ``B_j`` (the whole batch if ``micro_batch_size`` is None) with
  its own standard-normal draw ``z_j``:

  .. math::
    g_j = \nabla L_{B_j}(w + z_j / \sqrt{N s}), \quad
    \varepsilon_j = \rho\, g_j / s, \quad
    \bar g = \tfrac1k \textstyle\sum_j \nabla L_{B_j}(w + \varepsilon_j), \quad
    \bar h = \tfrac1k \textstyle\sum_j \sqrt{s}\, |g_j|,

  .. math::
    g_m \leftarrow \beta_1 g_m + (1-\beta_1)(\bar g + \delta w), \quad
    \text{returns } -\alpha_t\, g_m / s, \quad
    s \leftarrow \beta_2 s + (1-\beta_2)(\bar h + \gamma + \delta),

  elementwise, with ``s_0 = init_precision`` and ``g_m = 0`` at the start.
  The update divides by the precision before this step's update, as the
  authors' code (``optim.py``) does; ``δ`` is the prior precision divided
  by ``N`` (the authors' ``wdecay``), ``γ`` the damping.

  **It ends the chain.** bSAM is a whole optimizer (its own momentum, its
  own preconditioner ``1/s``, its weight decay ``δ``): it returns the
  parameter update, not a gradient, so nothing should follow it
  (``optax.chain(clip, sam_optax.bsam(...))`` is fine, a base optimizer
  after it is not). The clean gradient ``updates`` is not used and may be
  None; its gradients are taken at the noisy and the perturbed points. Call
  it with ``key`` (the noise; split a new one each step) or with ``noise``
  (the draws ``z``, a pytree like ``params``, leaves ``[k, ...]`` when
  ``micro_batch_size`` is set: to reproduce a run, or for tests)::

    updates, state = tx.update(None, state, params, loss_fn=loss_fn,
                               batch=batch, key=key)

  Limits: with ``b2 = 1`` (``s = s_0`` fixed) and zero noise it is USAM with
  radius ``ρ/s_0`` followed by weight decay ``δ``, an EMA of decay
  ``β_1`` and the step ``−α/s_0``: the paper's reading of SAM as bSAM with
  the variance held fixed (and the noise dropped). ``ρ = 0`` is the
  noisy-gradient Adam-like method the paper starts from (the variational
  online-Newton form with ``√s |g|`` for the curvature).

  Args:
    learning_rate: ``α``, a number or an ``optax`` schedule of the step count.
    num_data: ``N``, the number of training examples (the noise has variance
      ``1/(N s)``; the authors multiply it by their augmentation factor).
    rho: ``ρ >= 0``, the ascent's scale (not a radius: ``ε = ρ g / s``).
    b1: ``β_1 ∈ [0, 1)``, the momentum's decay.
    b2: ``β_2 ∈ [0, 1]``, the precision's decay.
    weight_decay: ``δ >= 0``, the prior precision over ``N``.
    damping: ``γ >= 0``, added to the precision's target.
    init_precision: ``s_0 > 0``.
    micro_batch_size: None (one noise draw and one ascent for the batch) or
      the size of the contiguous micro-batches each with its own draw and
      ascent (the authors' ``batchsplit`` is ``B / micro_batch_size``).
    perturb_mask: which leaves the ascent ``ε`` perturbs; see
      :func:`sam_optax.sam`. The noise, the momentum and the precision cover
      every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a :class:`BsamState`.

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023; the authors' code,
    `team-approx-bayes/bayesian-sam
    <https://github.com/team-approx-bayes/bayesian-sam>`_ (``optim.py``).
  """
  name = "bsam"
  if not callable(learning_rate):
    _contract.check_number(learning_rate, "learning_rate", name, minimum=0)
  _contract.check_number(num_data, "num_data", name, above=0)
  _contract.check_rho(rho, name)
  _contract.check_number(b1, "b1", name, minimum=0, below=1)
  _contract.check_number(b2, "b2", name, minimum=0, maximum=1)
  _contract.check_number(weight_decay, "weight_decay", name, minimum=0)
  _contract.check_number(damping, "damping", name, minimum=0)
  _contract.check_number(init_precision, "init_precision", name, above=0)
  _contract.check_integer(
    micro_batch_size, "micro_batch_size", name, optional=True
  )

  def init_fn(params: optax.Params) -> BsamState:
    return BsamState(
      count=jnp.zeros([], jnp.int32),
      momentum=optax.tree.zeros_like(params),
      precision=jax.tree.map(
        lambda w: jnp.full_like(w, init_precision), params
      ),
    )

  def update(
    updates: optax.Updates | None,
    state: BsamState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    noise: Any = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, BsamState]:
    del extra_args
    mask = _perturbation.resolve_mask(perturb_mask, params, name)
    size = _contract.batch_size(batch, name)
    micro = size if micro_batch_size is None else micro_batch_size
    count = _micro_batches.num_micro_batches(batch, micro, name)
    micro_batches = _micro_batches.split_micro_batches(batch, micro, name)
    if noise is None:
      key = _contract.require(key, "key", name)
      noise = _standard_normal(key, params, count)
    else:
      if micro_batch_size is None:
        noise = jax.tree.map(lambda z: z[None], noise)
      _contract.check_leaf_shapes(
        noise, params, "noise", name, leading=(count,)
      )
    params32 = optax.tree.cast(params, jnp.float32)
    s = optax.tree.cast(state.precision, jnp.float32)
    std = jax.tree.map(
      lambda p: jnp.sqrt(1.0 / (jnp.asarray(num_data, jnp.float32) * p)), s
    )
    rho32 = jnp.asarray(rho, jnp.float32)

    def micro_step(w: Any, part: tuple[Any, Any]) -> tuple[Any, Any]:
      micro_batch, z = part
      noisy = _perturbation.perturb(params, optax.tree.mul(std, z))
      g = optax.tree.cast(
        _contract.mean_gradient(loss_fn, noisy, micro_batch), jnp.float32
      )
      epsilon = _perturbation.apply_mask(optax.tree.div(g, s), mask)
      g_adv = _perturbation.perturbed_gradient(
        loss_fn, w, optax.tree.scale(rho32, epsilon), micro_batch
      )
      curvature = jax.tree.map(lambda p, x: jnp.sqrt(p * x**2), s, g)
      return optax.tree.cast(g_adv, jnp.float32), curvature

    g_bar, h_bar = _micro_batches._mean_of_chunk(
      micro_step, params, (micro_batches, noise), "auto", name
    )
    b1_, b2_ = (jnp.asarray(b, jnp.float32) for b in (b1, b2))
    decay = jnp.asarray(weight_decay, jnp.float32)
    momentum = jax.tree.map(
      lambda m, g, w: b1_ * m + (1 - b1_) * (g + decay * w),
      optax.tree.cast(state.momentum, jnp.float32),
      g_bar,
      params32,
    )
    alpha = (
      learning_rate(state.count) if callable(learning_rate) else learning_rate
    )
    step = optax.tree.scale(
      -jnp.asarray(alpha, jnp.float32), optax.tree.div(momentum, s)
    )
    gamma = jnp.asarray(damping, jnp.float32)
    precision = jax.tree.map(
      lambda p, h: b2_ * p + (1 - b2_) * (h + gamma + decay), s, h_bar
    )
    new_state = BsamState(
      count=optax.safe_increment(state.count),
      momentum=optax.tree.cast_like(momentum, state.momentum),
      precision=optax.tree.cast_like(precision, state.precision),
    )
    return optax.tree.cast_like(step, params), new_state

  return optax.GradientTransformationExtraArgs(
    init_fn, _transform.checked_update(update, init_fn, name)
  )
