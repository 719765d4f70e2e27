"""Curvature of the training loss: Hessian-vector products, trace, top eigenvalue.

``H = ∇²L(w)`` with ``L = mean_i ℓ_i`` over a dataset ``data`` (see
:mod:`sam_optax.diagnostics._dataset`). ``H`` is never formed: everything goes
through Hessian-vector products (forward-over-reverse, the cost of about two
gradients), summed over the dataset ``chunk_size`` examples at a time.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from sam_optax import _contract
from sam_optax import _per_example
from sam_optax.diagnostics import _dataset
from sam_optax.diagnostics import _estimate


def _tangent(vector: Any, params: Any) -> Any:
  """``vector`` in the parameters' dtypes (as ``jax.jvp`` needs)."""
  return jax.tree.map(
    lambda v, w: jnp.asarray(v).astype(jnp.result_type(w)), vector, params
  )


def _chunk_hvp(
  loss_fn: _contract.LossFn, params: Any, chunk: Any, tangent: Any
) -> Any:
  """``Σ_{i∈chunk} ∇²ℓ_i(w) v``, forward-over-reverse, float32."""

  def chunk_loss(p: Any) -> jax.Array:
    return jnp.sum(loss_fn(p, chunk).astype(jnp.float32))

  _, product = jax.jvp(jax.grad(chunk_loss), (params,), (tangent,))
  return optax.tree.cast(product, jnp.float32)


_chunk_hvp_jit = jax.jit(_chunk_hvp, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _chunk_quadratic_forms(
  loss_fn: _contract.LossFn, params: Any, chunk: Any, probes: Any
) -> jax.Array:
  """``Σ_{i∈chunk} v_kᵀ ∇²ℓ_i(w) v_k`` for each probe ``v_k`` (leading axis)."""

  def quadratic_form(probe: Any) -> jax.Array:
    product = _chunk_hvp(loss_fn, params, chunk, _tangent(probe, params))
    return optax.tree.vdot(probe, product)

  return jax.vmap(quadratic_form)(probes)


@jax.jit
def _rademacher_probes(keys: jax.Array, params: Any) -> Any:
  return jax.vmap(lambda key: _per_example.rademacher_like(key, params))(keys)


def _hvp(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  vector: Any,
  chunk_size: int | None,
) -> Any:
  tangent = _tangent(vector, params)
  total = _dataset.dataset_sum(
    lambda chunk: _chunk_hvp_jit(loss_fn, params, chunk, tangent),
    data,
    chunk_size,
  )
  return optax.tree.scale(1.0 / _dataset.num_examples(data), total)


def hessian_vector_product(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  vector: Any,
  *,
  chunk_size: int | None = None,
) -> Any:
  r"""``H v`` with ``H = ∇²L(w)``, ``L = mean_i ℓ_i`` over ``data``.

  Forward-over-reverse: ``H v = ∂/∂t ∇L(w + t v)|_{t=0}``, a ``jax.jvp`` of
  ``jax.grad`` (Pearlmutter, 1994), about the cost of two gradients.

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w`` (any pytree).
    data: the dataset: a pytree whose leaves share a leading axis ``N``.
    vector: ``v``, a pytree like ``params``.
    chunk_size: examples per chunk (bounds memory), or None for all at once.

  Returns:
    ``H v``, a pytree like ``params`` with float32 leaves.
  """
  name = "hessian_vector_product"
  _, chunk_size = _dataset.check_call(loss_fn, params, data, chunk_size, name)
  _contract.check_same_shapes(vector, params, "vector", name)
  return _hvp(loss_fn, params, data, vector, chunk_size)


def hessian_trace(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  num_probes: int = 64,
  chunk_size: int | None = None,
  probe_chunk_size: int | None = 1,
) -> _estimate.Estimate:
  r"""Hutchinson's estimate of ``tr H``, with its standard error.

  .. math::
    \operatorname{tr} H \approx \frac{1}{K} \sum_{k=1}^K v_k^\top H v_k,
    \qquad v_k \in \{\pm 1\}^d \text{ (Rademacher)},

  unbiased, with variance ``2 Σ_{i≠j} H_ij² / K`` (zero for a diagonal
  ``H``) (Hutchinson, 1990). The standard error is the sample standard
  deviation of ``v_kᵀ H v_k`` over ``√K``.

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    data: the dataset (leaves share a leading axis ``N``).
    key: a PRNG key for the probes.
    num_probes: ``K >= 2``.
    chunk_size: examples per chunk, or None for all at once.
    probe_chunk_size: probes evaluated at once (``jax.vmap``), groups of
      them one after another; None evaluates all ``K`` at once. Memory grows
      with ``probe_chunk_size × chunk_size``. The default, one at a time, is
      the fastest on a CPU (vmapped convolutions compile slowly and run no
      faster there); raise it on an accelerator.

  Returns:
    An :class:`Estimate` of ``tr H`` (float32).
  """
  name = "hessian_trace"
  _, chunk_size = _dataset.check_call(loss_fn, params, data, chunk_size, name)
  num_probes = _contract.check_integer(
    num_probes, "num_probes", name, minimum=2, static_hint=False
  )
  if probe_chunk_size is not None:
    probe_chunk_size = _contract.check_integer(
      probe_chunk_size, "probe_chunk_size", name, static_hint=False
    )

  return _hutchinson(
    loss_fn, params, data, key, num_probes, chunk_size, probe_chunk_size
  )


def _hutchinson(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  key: jax.Array,
  num_probes: int,
  chunk_size: int | None,
  probe_chunk_size: int | None,
) -> _estimate.Estimate:
  keys = jax.random.split(key, num_probes)
  group = num_probes if probe_chunk_size is None else probe_chunk_size
  forms = []
  for start in range(0, num_probes, group):
    probes = _rademacher_probes(keys[start : start + group], params)

    def chunk_forms(chunk: Any, probes: Any = probes) -> jax.Array:
      return _chunk_quadratic_forms(loss_fn, params, chunk, probes)

    forms.append(_dataset.dataset_sum(chunk_forms, data, chunk_size))
  samples = jnp.concatenate(forms) / _dataset.num_examples(data)
  return _estimate.from_samples(samples)


class HessianEigenpair(NamedTuple):
  """The largest eigenvalue of ``H`` and its eigenvector, from Lanczos.

  Attributes:
    value: ``λ_max``, the largest (algebraic, not absolute) eigenvalue.
    vector: a unit eigenvector, a pytree like the parameters (float32).
    residual_norm: ``‖H u − λ u‖`` for the returned pair (``β_k |y_k|``, free
      from the iteration): some eigenvalue of ``H`` lies within it of
      ``value``. Small means converged.
  """

  value: jax.Array
  vector: Any
  residual_norm: jax.Array


class _LanczosState(NamedTuple):
  basis: jax.Array  # [k, d]: the Lanczos vectors, zero rows not yet filled
  alphas: jax.Array  # [k]: the diagonal of the tridiagonal matrix
  betas: jax.Array  # [k]: residual norms (the off-diagonal, then β_k)
  vector: jax.Array  # [d]: the next Lanczos vector (zero after a breakdown)
  active: jax.Array  # bool: no breakdown yet
  num_active: jax.Array  # int32: steps taken before the breakdown, if any
  scale: jax.Array  # max_i ‖H q_i‖, the scale of the breakdown test


@functools.partial(jax.jit, static_argnums=1)
def _lanczos_init(start: jax.Array, num_iterations: int) -> _LanczosState:
  dim, dtype = start.shape[0], start.dtype
  start_norm = jnp.linalg.norm(start)
  return _LanczosState(
    basis=jnp.zeros((num_iterations, dim), dtype),
    alphas=jnp.zeros((num_iterations,), dtype),
    betas=jnp.zeros((num_iterations,), dtype),
    vector=start / jnp.where(start_norm > 0, start_norm, 1),
    active=start_norm > 0,
    num_active=jnp.zeros((), jnp.int32),
    scale=jnp.zeros((), dtype),
  )


@jax.jit
def _lanczos_step(
  state: _LanczosState, product: jax.Array, index: jax.Array
) -> _LanczosState:
  """Lanczos step ``index``, given ``product = H q``, ``q = state.vector``."""
  q = state.vector
  basis = state.basis.at[index].set(q)
  w = jnp.where(state.active, product, 0)
  scale = jnp.maximum(state.scale, jnp.linalg.norm(w))
  alpha = jnp.vdot(q, w)
  # Against every basis vector, twice: unfilled rows of `basis` are zero.
  w = w - basis.T @ (basis @ w)
  w = w - basis.T @ (basis @ w)
  beta = jnp.linalg.norm(w)
  # Invariant Krylov space: its Ritz values are exact eigenvalues; stop.
  next_active = state.active & (beta > 100 * jnp.finfo(w.dtype).eps * scale)
  return _LanczosState(
    basis=basis,
    alphas=state.alphas.at[index].set(jnp.where(state.active, alpha, 0)),
    betas=state.betas.at[index].set(jnp.where(state.active, beta, 0)),
    vector=jnp.where(next_active, w / jnp.where(next_active, beta, 1), 0),
    active=next_active,
    num_active=state.num_active + state.active.astype(jnp.int32),
    scale=scale,
  )


@jax.jit
def _lanczos_top_pair(
  state: _LanczosState,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The top Ritz value and vector, and the residual norm ``β_j |y_j|``."""
  num_iterations = state.alphas.shape[0]
  index = jnp.arange(num_iterations)
  in_block = index < state.num_active
  # Steps after a breakdown get a diagonal strictly below every eigenvalue of
  # the active block (Gershgorin), so they change neither its top pair.
  floor = (
    jnp.min(jnp.where(in_block, state.alphas, jnp.inf))
    - 2 * jnp.max(state.betas)
    - 1
  )
  diagonal = jnp.where(in_block, state.alphas, floor)
  off_diagonal = jnp.where(index[1:] < state.num_active, state.betas[:-1], 0)
  tridiagonal = (
    jnp.diag(diagonal) + jnp.diag(off_diagonal, 1) + jnp.diag(off_diagonal, -1)
  )
  values, vectors = jnp.linalg.eigh(tridiagonal)
  ritz = vectors[:, -1]
  last = jnp.maximum(state.num_active - 1, 0)
  residual_norm = jnp.abs(state.betas[last] * ritz[last])
  top_vector = state.basis.T @ jnp.where(in_block, ritz, 0)
  top_vector = top_vector / jnp.maximum(
    jnp.linalg.norm(top_vector), jnp.finfo(top_vector.dtype).tiny
  )
  return values[-1], top_vector, residual_norm


def _lanczos_top(
  matvec: Any, start: jax.Array, num_iterations: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The top Ritz pair of a symmetric operator on flat vectors, and residual.

  Lanczos with full reorthogonalization (twice against the whole basis, which
  keeps it orthonormal to float precision). When the Krylov space becomes
  invariant (the new residual vanishes, e.g. after as many steps as ``H`` has
  distinct eigenvalues), the iteration stops: its Ritz values are then exact
  eigenvalues, and no later step divides by a vanishing norm. The steps run
  in a Python loop (no host synchronization: a stopped iteration multiplies
  zeros), so ``matvec`` is compiled once, outside any ``lax`` loop.

  Written here rather than taken from ``matfree`` (0.6.3), whose Lanczos
  (``decomp.tridiag_sym``, full reorthogonalization) has no breakdown test:
  run for more steps than ``H`` has distinct eigenvalues, it divides by a
  vanishing residual and returns NaN (``H = 3I``) or Ritz values outside the
  spectrum; it also runs its steps in a ``lax`` loop.
  """
  state = _lanczos_init(start, num_iterations)
  for index in range(num_iterations):
    state = _lanczos_step(state, matvec(state.vector), jnp.int32(index))
  return _lanczos_top_pair(state)


def hessian_top_eigenpair(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  key: jax.Array,
  *,
  num_iterations: int = 20,
  chunk_size: int | None = None,
) -> HessianEigenpair:
  r"""The largest eigenvalue ``λ_max`` of ``H`` and its eigenvector, by Lanczos.

  ``num_iterations`` Hessian-vector products span a Krylov space from a
  random start; the top eigenvalue of ``H`` restricted to it converges to
  ``λ_max`` much faster than power iteration (and is exact once
  ``num_iterations`` reaches the number of distinct eigenvalues, e.g. the
  dimension ``d``; ``num_iterations`` is capped at ``d``). Full
  reorthogonalization keeps the basis orthonormal in float32; it stores
  ``num_iterations × d`` floats. Check ``residual_norm`` for convergence.

  The "top" eigenvalue is the largest algebraic one: away from a minimum a
  negative eigenvalue can be larger in magnitude.

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    data: the dataset (leaves share a leading axis ``N``).
    key: a PRNG key for the start vector.
    num_iterations: Lanczos steps (Hessian-vector products), ``>= 1``.
    chunk_size: examples per chunk, or None for all at once.

  Returns:
    A :class:`HessianEigenpair` (float32).
  """
  name = "hessian_top_eigenpair"
  _, chunk_size = _dataset.check_call(loss_fn, params, data, chunk_size, name)
  num_iterations = _contract.check_integer(
    num_iterations, "num_iterations", name, static_hint=False
  )
  return _top_eigenpair(loss_fn, params, data, key, num_iterations, chunk_size)


def _top_eigenpair(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Any,
  key: jax.Array,
  num_iterations: int,
  chunk_size: int | None,
) -> HessianEigenpair:
  like = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)
  flat, unravel = jax.flatten_util.ravel_pytree(like)
  dim = flat.shape[0]

  def matvec(vector: jax.Array) -> jax.Array:
    product = _hvp(loss_fn, params, data, unravel(vector), chunk_size)
    return jax.flatten_util.ravel_pytree(product)[0]

  start = jax.random.normal(key, (dim,), jnp.float32)
  value, vector, residual_norm = _lanczos_top(
    matvec, start, min(num_iterations, dim)
  )
  return HessianEigenpair(value, unravel(vector), residual_norm)
