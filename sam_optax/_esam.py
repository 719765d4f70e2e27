"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection."""

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


def _bernoulli_mask(key: jax.Array, beta: jax.Array, tree: Any) -> Any:
  """A Bernoulli(β) draw per element of ``tree`` (float32 0/1 leaves)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef,
    [
      jax.random.bernoulli(k, beta, jnp.shape(x)).astype(jnp.float32)
      for k, x in zip(keys, leaves, strict=True)
    ],
  )


def selected_count(gamma: float, batch_size: int) -> int:
  """ESAM's ``k = max(1, ⌊γ B⌋)``: how many examples the second pass takes."""
  return max(1, math.floor(gamma * batch_size + 1e-9))


def esam(
  rho: ArrayLike = 0.05,
  beta: ArrayLike = 1.0,
  gamma: float = 1.0,
  *,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Efficient SAM (ESAM): a random part of the weights, the sharpest examples.

  .. math::
    m \sim \mathrm{Bernoulli}(\beta)^{d}, \quad
    \varepsilon = \frac{\rho}{\beta}\, \frac{m \odot g}{\|m \odot g\| + \delta},
    \quad s_i = \ell_i(w + \varepsilon) - \ell_i(w), \quad
    \text{returns } \nabla L_{B^+}(w + \varepsilon),

  with ``g = ∇L_B(w)`` the clean gradient (``updates``, or computed when
  ``updates`` is None) and ``B^+`` the ``k = max(1, ⌊γB⌋)`` examples of the
  batch whose loss rises most under the perturbation (``jax.lax.top_k`` of
  ``s``: a static shape, so the second pass is a forward-backward pass over
  ``k`` examples). Stochastic weight perturbation (SWP, ``β < 1``) draws
  ``m`` per weight from ``key`` (a keyword argument of ``update``, required
  then); sharpness-sensitive data selection (SDS, ``γ < 1``) costs a forward
  pass at ``w + ε`` (and one at ``w`` when ``updates`` is given, for
  ``ℓ_i(w)``). ``beta = 1, gamma = 1`` is :func:`sam`.

  Cost: the clean gradient, then (``γ < 1``) one or two forward passes over
  ``B`` and a forward-backward pass over ``k ≈ γB`` examples: the second
  pass's FLOPs are ``≈ γ`` of SAM's. In JAX the clean gradient is computed
  for every weight, so SWP changes the perturbation, not the cost (the
  paper's saving from SWP is in the backward pass of the unperturbed
  weights, which a whole-pytree ``jax.grad`` does not skip).

  >>> tx = optax.chain(sam_optax.esam(0.05, beta=0.6, gamma=0.5),
  ...                  optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> updates, state = tx.update(None, state, params, loss_fn=loss_fn,
  ...                            batch=batch, key=jax.random.key(0))

  Where this differs from the official code (dydjw9/Efficient_SAM,
  ``utils/Esam.py``): it keeps each parameter *tensor* with probability
  ``β`` (drawn at the previous step) rather than each weight, and selects
  the examples whose rise is strictly above the ``⌊γB⌋``-th largest, i.e.
  ``⌊γB⌋ − 1`` of them (without ties); here the ``k`` largest are taken, as
  the paper's "the γ fraction". Its ``δ`` is ``1e-7``; here ``1e-12``.

  Args:
    rho: the perturbation radius ``ρ >= 0`` (finite; checked unless traced).
    beta: ``β ∈ (0, 1]``, the probability that a weight is perturbed.
    gamma: ``γ ∈ (0, 1]``, the fraction of the batch the second pass takes
      (a Python number: it sets the second pass's shape).
    perturb_mask: which leaves to perturb; see :func:`sam` (SWP draws within
      it). The result covers every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless).

  References:
    Du et al., `Efficient Sharpness-aware Minimization for Improved Training
    of Neural Networks <https://arxiv.org/abs/2110.03141>`_, ICLR 2022.
  """
  name = "esam"
  _contract.check_rho(rho, name)
  _contract.check_number(beta, "beta", name, above=0, maximum=1)
  if isinstance(gamma, jax.Array) or isinstance(gamma, jax.core.Tracer):
    raise ValueError(
      "esam: gamma must be a Python number (it sets the second pass's"
      " shape); with optax.inject_hyperparams pass static_args=('gamma',)."
    )
  _contract.check_number(gamma, "gamma", name, above=0, maximum=1)
  gamma = float(gamma)
  # Only a concrete β = 1 skips the draw; a traced β (injected) always draws.
  always = not isinstance(beta, jax.core.Tracer) and bool(np.asarray(beta) == 1)
  beta_f32 = jnp.asarray(beta, jnp.float32)

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
    del extra_args
    mask = _perturbation.resolve_mask(perturb_mask, params, name)
    select = gamma < 1.0
    before = None
    if updates is not None:
      gradient = updates
      if select:
        before = loss_fn(params, batch)
    elif select:
      gradient, before = jax.grad(
        lambda p: (lambda losses: (jnp.mean(losses), losses))(
          loss_fn(p, batch)
        ),
        has_aux=True,
      )(params)
    else:
      gradient = _contract.mean_gradient(loss_fn, params, batch)
    direction = optax.tree.cast(gradient, jnp.float32)
    scale = jnp.float32(1.0)
    if not always:
      if key is None:
        raise TypeError(
          "esam.update needs the keyword argument `key` when beta < 1 (the"
          " stochastic weight perturbation draws its mask from it)."
        )
      keep = _bernoulli_mask(key, beta_f32, params)
      direction = optax.tree.mul(keep, direction)
      scale = 1 / beta_f32
    epsilon = optax.tree.scale(
      scale, _perturbation.perturbation(direction, rho, mask=mask)
    )
    perturbed = _perturbation.perturb(params, epsilon)
    if select:
      size = _contract.batch_size(batch, name)
      assert before is not None
      rise = loss_fn(perturbed, batch) - before
      _, chosen = jax.lax.top_k(rise, selected_count(gamma, size))
      batch = jax.tree.map(lambda x: jnp.take(x, chosen, axis=0), batch)
    adversarial = _contract.mean_gradient(loss_fn, perturbed, batch)
    return optax.tree.cast_like(adversarial, params), state

  return _transform.stateless(update, name)
