r"""Gradient noise over a dataset: ``tr Σ``, and micro-batch gradients of size ``m``.

With per-example gradients ``g_i = ∇ℓ_i(w)`` over ``N`` examples and
``∇L = mean_i g_i``, the gradient-noise covariance is
``Σ = mean_i (g_i − ∇L)(g_i − ∇L)ᵀ`` and its trace
``tr Σ = mean_i ‖g_i − ∇L‖²`` (2509.18001, §3). For a micro-batch ``S`` of
``m`` examples drawn uniformly without replacement and
``g_S = mean_{i∈S} g_i``,

.. math::
  \mathbb{E}_S \|g_S\|^2 = \|\nabla L\|^2 + c_m \operatorname{tr}\Sigma,
  \qquad c_m = \frac{N - m}{m (N - 1)}

(``c_m = 1/m`` with replacement): the finite-population variance of a sample
mean. m-USAM's implicit regularizer is ``(ρ/2) E_S‖g_S‖²``, so the noise term
grows as ``m`` shrinks (Thm 3.5).

Per-example gradients see each example as a batch of one (computed by
``optax.microbatching.micro_grad``), and are held ``chunk_size`` at a time.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _contract
from sam_optax import _per_example
from sam_optax.diagnostics import _dataset
from sam_optax.diagnostics import _estimate


def _sq_norm(tree: Any) -> jax.Array:
  return optax.tree.norm(optax.tree.cast(tree, jnp.float32), squared=True)


def _total_loss(loss_fn: _contract.LossFn, params: Any, batch: Any):
  return jnp.sum(loss_fn(params, batch).astype(jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def _chunk_gradient(loss_fn: _contract.LossFn, params: Any, chunk: Any) -> Any:
  """``Σ_{i∈chunk} ∇ℓ_i(w)`` (float32), one backward pass."""
  gradient = jax.grad(_total_loss, argnums=1)(loss_fn, params, chunk)
  return optax.tree.cast(gradient, jnp.float32)


def _dataset_mean_gradient(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  chunk_size: int | None,
) -> Any:
  total = _dataset.dataset_sum(
    lambda chunk: _chunk_gradient(loss_fn, params, chunk), data, chunk_size
  )
  return optax.tree.scale(1.0 / _dataset.num_examples(data), total)


def mean_gradient(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  *,
  chunk_size: int | None = None,
) -> Any:
  """``∇L(w)`` with ``L = mean_i ℓ_i`` over ``data`` (float32 leaves).

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    data: the dataset: a pytree whose leaves share a leading axis ``N``.
    chunk_size: examples per chunk (bounds memory), or None for all at once.
  """
  name = "mean_gradient"
  _, chunk_size = _dataset.check_call(loss_fn, params, data, chunk_size, name)
  return _dataset_mean_gradient(loss_fn, params, data, chunk_size)


class GradientNoise(NamedTuple):
  """The gradient noise over a dataset.

  Attributes:
    trace: ``tr Σ = mean_i ‖∇ℓ_i − ∇L‖²``.
    mean_gradient: ``∇L``, a pytree like the parameters (float32).
    mean_gradient_sq_norm: ``‖∇L‖²``.
  """

  trace: jax.Array
  mean_gradient: Any
  mean_gradient_sq_norm: jax.Array


def gradient_noise(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  *,
  chunk_size: int | None = None,
) -> GradientNoise:
  r"""The trace of the gradient-noise covariance, ``tr Σ``, over a dataset.

  .. math::
    \operatorname{tr}\Sigma = \frac{1}{N} \sum_{i=1}^N
      \|\nabla\ell_i(w) - \nabla L(w)\|^2,

  computed in two passes (first ``∇L``, then the deviations, never the
  cancellation-prone ``mean_i ‖g_i‖² − ‖∇L‖²``), each holding at most
  ``chunk_size`` per-example gradients. Near a minimum of an NLL loss,
  ``tr Σ ≈ tr H`` (Fisher ≈ Hessian; 2509.18001, Table 6).

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    data: the dataset (leaves share a leading axis ``N``).
    chunk_size: examples per chunk, or None for all at once.

  Returns:
    A :class:`GradientNoise` (float32).
  """
  name = "gradient_noise"
  _, chunk_size = _dataset.check_call(loss_fn, params, data, chunk_size, name)
  return _gradient_noise(loss_fn, params, data, chunk_size)


@functools.partial(jax.jit, static_argnums=0)
def _chunk_sq_deviations(
  loss_fn: _contract.LossFn, params: Any, chunk: Any, mean: Any
) -> jax.Array:
  """``Σ_{i∈chunk} ‖∇ℓ_i(w) − mean‖²``, from per-example gradients."""
  sq_deviations = _per_example.map_per_example_gradients(
    lambda gradient: _sq_norm(optax.tree.sub(gradient, mean)),
    loss_fn,
    params,
    chunk,
  )
  return jnp.sum(sq_deviations)


def _gradient_noise(
  loss_fn: _contract.LossFn, params: Any, data: Any, chunk_size: int | None
) -> GradientNoise:
  gradient = _dataset_mean_gradient(loss_fn, params, data, chunk_size)
  total = _dataset.dataset_sum(
    lambda chunk: _chunk_sq_deviations(loss_fn, params, chunk, gradient),
    data,
    chunk_size,
  )
  trace = total / _dataset.num_examples(data)
  return GradientNoise(trace, gradient, _sq_norm(gradient))


def _check_micro_batch_size(
  micro_batch_size: Any, size: int, with_replacement: bool, name: str
) -> int:
  # Without replacement, a micro-batch has at most the N examples there are.
  return _contract.check_integer(
    micro_batch_size,
    "micro_batch_size",
    name,
    maximum=None if with_replacement else size,
    static_hint=False,
  )


def micro_batch_coefficient(
  micro_batch_size: int, num_examples: int, *, with_replacement: bool = False
) -> float:
  """``c_m`` in ``E_S‖g_S‖² = ‖∇L‖² + c_m tr Σ``.

  ``c_m = (N − m) / (m (N − 1))`` for ``m`` examples drawn without replacement
  from ``N`` (so ``c_N = 0``: the full batch has no noise); ``c_m = 1/m`` with
  replacement (i.i.d. draws).

  Args:
    micro_batch_size: ``m``.
    num_examples: ``N``.
    with_replacement: draws with (True) or without (False) replacement.
  """
  name = "micro_batch_coefficient"
  with_replacement = _contract.check_bool(
    with_replacement, "with_replacement", name
  )
  num_examples = int(
    _contract.check_integer(
      num_examples, "num_examples", name, static_hint=False
    )
    or 0
  )
  micro_batch_size = _check_micro_batch_size(
    micro_batch_size, num_examples, with_replacement, name
  )
  m, n = micro_batch_size, num_examples
  if with_replacement:
    return 1.0 / m
  if n == 1:
    return 0.0
  return (n - m) / (m * (n - 1))


def micro_batch_gradient_sq_norm(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  micro_batch_size: int,
  *,
  with_replacement: bool = False,
  chunk_size: int | None = None,
) -> jax.Array:
  r"""The m-sharpness quantity ``E_S‖g_S‖²``, exactly, over all ``|S| = m``.

  .. math::
    \mathbb{E}_S \|g_S\|^2 = \|\nabla L\|^2 + c_m \operatorname{tr}\Sigma

  with ``c_m`` from :func:`micro_batch_coefficient`: an identity, not an
  approximation, for ``S`` uniform over the size-``m`` subsets of the ``N``
  examples (or i.i.d. draws with ``with_replacement``), so one pass of
  per-example gradients (:func:`gradient_noise`) gives the exact average over
  all ``C(N, m)`` micro-batches, for any ``N``. To sample micro-batches
  instead, use :func:`sample_micro_batch_gradients`.

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    data: the dataset (leaves share a leading axis ``N``).
    micro_batch_size: ``m``.
    with_replacement: how ``S`` is drawn.
    chunk_size: examples per chunk, or None for all at once.

  Returns:
    ``E_S‖g_S‖²`` (float32 scalar).
  """
  name = "micro_batch_gradient_sq_norm"
  _contract.check_differentiable_params(params, name)
  size = _contract.check_per_example_losses(loss_fn, params, data, name)
  coefficient = micro_batch_coefficient(
    micro_batch_size, size, with_replacement=with_replacement
  )
  noise = gradient_noise(loss_fn, params, data, chunk_size=chunk_size)
  return noise.mean_gradient_sq_norm + coefficient * noise.trace


class MicroBatchGradients(NamedTuple):
  """Sampled statistics of micro-batch gradients ``g_S``, ``|S| = m``.

  Attributes:
    sq_norm: an :class:`Estimate` of ``E_S‖g_S‖²`` (the m-sharpness quantity).
    noise_norm: an :class:`Estimate` of ``E_S‖g_S − ∇L‖``, the norm of the
      mean noise of ``m`` examples (2509.18001, Prop. 3.9: non-increasing in
      ``m`` for log-concave noise).
  """

  sq_norm: _estimate.Estimate
  noise_norm: _estimate.Estimate


def sample_micro_batch_gradients(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  micro_batch_size: int,
  key: jax.Array,
  *,
  num_samples: int = 256,
  chunk_size: int | None = None,
  full_gradient: Any = None,
) -> MicroBatchGradients:
  """Monte Carlo statistics of ``g_S`` over random micro-batches of size ``m``.

  Draws ``num_samples`` independent micro-batches ``S``, each ``m`` distinct
  examples chosen uniformly from ``data`` (as one micro-batch of an m-SAM
  step), and computes ``‖g_S‖²`` and ``‖g_S − ∇L‖`` for each. For
  ``E_S‖g_S‖²`` exactly, see :func:`micro_batch_gradient_sq_norm`; the norm
  ``E_S‖g_S − ∇L‖`` has no closed form.

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    data: the dataset (leaves share a leading axis ``N``).
    micro_batch_size: ``m``, in ``[1, N]``.
    key: a PRNG key for the draws.
    num_samples: micro-batches drawn, ``>= 2``.
    chunk_size: examples processed at once: ``max(1, chunk_size // m)``
      micro-batches at a time; None for all at once. (``data`` itself is
      put on the device whole: the micro-batches are gathered there.)
    full_gradient: ``∇L`` over ``data`` if already computed (e.g.
      ``gradient_noise(...).mean_gradient``), else one more pass over
      ``data``.

  Returns:
    A :class:`MicroBatchGradients`.
  """
  name = "sample_micro_batch_gradients"
  size, chunk_size = _dataset.check_call(
    loss_fn, params, data, chunk_size, name
  )
  micro_batch_size = _check_micro_batch_size(
    micro_batch_size, size, False, name
  )
  num_samples = _contract.check_integer(
    num_samples, "num_samples", name, minimum=2, static_hint=False
  )
  if full_gradient is not None:
    _contract.check_same_shapes(full_gradient, params, "full_gradient", name)
  return _sample_micro_batches(
    loss_fn,
    params,
    data,
    micro_batch_size,
    key,
    num_samples,
    chunk_size,
    full_gradient,
  )


@functools.partial(jax.jit, static_argnums=(0, 3))
def _micro_batch_norms(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  micro_batch_size: int,
  keys: jax.Array,
  full_gradient: Any,
) -> tuple[jax.Array, jax.Array]:
  """``‖g_S‖²`` and ``‖g_S − ∇L‖`` for one random micro-batch per key."""
  size = _dataset.num_examples(data)

  def one_micro_batch(draw_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    # The m largest of N random keys: a uniform m-subset, in O(N log m)
    # (jax.random.choice without replacement sorts all N).
    random_keys = jax.random.bits(draw_key, (size,), jnp.uint32)
    _, index = jax.lax.top_k(random_keys, micro_batch_size)
    micro_batch = jax.tree.map(lambda x: x[index], data)
    gradient = _contract.mean_gradient(loss_fn, params, micro_batch)
    noise = optax.tree.sub(
      optax.tree.cast(gradient, jnp.float32), full_gradient
    )
    return _sq_norm(gradient), jnp.sqrt(_sq_norm(noise))

  return jax.vmap(one_micro_batch)(keys)


def _sample_micro_batches(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  micro_batch_size: int,
  key: jax.Array,
  num_samples: int,
  chunk_size: int | None,
  full_gradient: Any,
) -> MicroBatchGradients:
  if full_gradient is None:
    full_gradient = _dataset_mean_gradient(loss_fn, params, data, chunk_size)
  full_gradient = optax.tree.cast(full_gradient, jnp.float32)
  data = jax.device_put(data)  # micro-batches are gathered on the device
  keys = jax.random.split(key, num_samples)
  group = (
    num_samples
    if chunk_size is None
    else max(1, chunk_size // micro_batch_size)
  )
  sq_norms, noise_norms = [], []
  for start in range(0, num_samples, group):
    sq_norm, noise_norm = _micro_batch_norms(
      loss_fn,
      params,
      data,
      micro_batch_size,
      keys[start : start + group],
      full_gradient,
    )
    sq_norms.append(sq_norm)
    noise_norms.append(noise_norm)
  return MicroBatchGradients(
    _estimate.from_samples(jnp.concatenate(sq_norms)),
    _estimate.from_samples(jnp.concatenate(noise_norms)),
  )
