"""m-SAM: a SAM step on every micro-batch, all at once, averaged.

m-SAM splits the batch into ``k = B / m`` micro-batches, perturbs each with its
own gradient and averages the perturbed gradients. The papers' code runs the
micro-batches one after another; here one micro-batch's step is written once
(it *is* a :func:`sam` step on that micro-batch) and mapped over the
micro-batches, by ``jax.vmap`` or by unrolling, optionally in chunks that bound
memory.

Micro-batch ``j`` is the contiguous slice ``batch[j*m:(j+1)*m]`` of every leaf.
Contiguity is what makes data parallelism with a local perturbation (device
``d`` holds the contiguous shard ``d``) equal to :func:`m_sam` on one device.
"""

from collections.abc import Callable
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _sam

Implementation = Literal["auto", "vmap", "unrolled"]
_IMPLEMENTATIONS = ("auto", "vmap", "unrolled")

MAX_UNROLLED_MICRO_BATCHES = 32
"""``implementation="auto"`` unrolls at most this many micro-batches (on a CPU).

Compile time and program size grow linearly with the unrolled count (the
benchmark's small CNN: 7–10 s at 8 or 16 micro-batches, 17–22 s at 32, against
5–6 s for ``"vmap"``; BENCHMARKS.md).
"""


def num_micro_batches(
    batch: Any, micro_batch_size: int, name: str = "m_sam"
) -> int:
  """``k = B / m``, with a clear error if ``m`` does not divide ``B``."""
  size = _contract.batch_size(batch, name)
  if size % micro_batch_size:
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    raise ValueError(
        f"{name}: micro_batch_size={micro_batch_size} must divide the batch"
        f" size {size} (micro-batches are equal, contiguous slices); divisors"
        f" of {size}: {divisors}."
    )
  return size // micro_batch_size


def split_micro_batches(
    batch: Any, micro_batch_size: int, name: str = "m_sam"
) -> Any:
  """Reshapes every leaf from ``[B, ...]`` to ``[k, m, ...]``, row-major.

  Micro-batch ``j`` (index ``j`` of the new leading axis) holds the contiguous
  examples ``[j*m, (j+1)*m)``. This is deliberately not
  ``optax.microbatching.reshape_batch_axis``, whose column-major order puts the
  strided examples ``j, j+k, j+2k, ...`` together (the right choice for
  gradient accumulation on a sharded batch, the wrong one for m-SAM, where the
  assignment of examples to micro-batches is the algorithm).

  A batch sharded along its leading axis over ``D`` devices (explicit mesh
  axes) keeps that sharding on the micro-batch axis when ``D`` divides ``k``:
  each device then holds whole micro-batches.
  """
  count = num_micro_batches(batch, micro_batch_size, name)

  def split(x: jax.Array) -> jax.Array:
    shape = (count, micro_batch_size, *jnp.shape(x)[1:])
    out_sharding = _leading_axis_sharding(x, count)
    if out_sharding is None:
      return jnp.reshape(x, shape)
    return jnp.reshape(x, shape, out_sharding=out_sharding)

  return jax.tree.map(split, batch)


def _explicit_shards(x: jax.Array) -> int:
  """Over how many devices the leading axis of ``x`` is explicitly sharded.

  1 unless ``x`` lives on a mesh with explicit axes
  (``jax.sharding.AxisType.Explicit``) and its leading axis is sharded.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not getattr(mesh, "are_all_axes_explicit", False):
    return 1
  spec = tuple(sharding.spec)
  if not spec or spec[0] is None:
    return 1
  return jnp.shape(x)[0] // sharding.shard_shape(jnp.shape(x))[0]


def _leading_axis_sharding(x: jax.Array, count: int) -> Any:
  """The sharding of ``x.reshape(count, -1, ...)`` under explicit mesh axes.

  Explicit sharding asks for the output sharding of a reshape that splits a
  sharded axis: the batch axis's sharding moves to the micro-batch axis. None
  where JAX infers it (the usual case).
  """
  shards = _explicit_shards(x)
  if shards == 1:
    return None
  if count % shards:
    raise ValueError(
        f"m_sam: the batch axis is sharded over {shards} devices, which must"
        f" divide the number of micro-batches {count} (each device holds whole"
        " micro-batches)."
    )
  sharding = jax.typeof(x).sharding
  spec = tuple(sharding.spec)
  new_spec = jax.sharding.PartitionSpec(spec[0], None, *spec[1:])
  return jax.sharding.NamedSharding(sharding.mesh, new_spec)


def _micro_batch_step(
    rho: ArrayLike, normalize: bool, perturb_mask: _perturbation.PerturbMask
) -> Callable[[_contract.LossFn, Any, Any], Any]:
  """One micro-batch's step: exactly a :func:`sam` (or :func:`usam`) update.

  Returns ``(loss_fn, params, micro_batch) -> ∇L_{B_j}(w + ε_j)`` in float32,
  so that the average over micro-batches accumulates in float32.
  """
  inner = (_sam.sam if normalize else _sam.usam)(
      rho, perturb_mask=perturb_mask)

  def step(loss_fn: _contract.LossFn, params: Any, micro_batch: Any) -> Any:
    gradient, _ = inner.update(
        None, optax.EmptyState(), params, loss_fn=loss_fn, batch=micro_batch
    )
    return optax.tree.cast(gradient, jnp.float32)

  return step


def resolve_implementation(
    implementation: Implementation, micro_batches: Any
) -> str:
  """Resolves ``"auto"``: unrolled on a CPU for few micro-batches, else vmap.

  ``micro_batches`` is the chunk mapped at once (leaves ``[c, m, ...]``). A
  batch sharded over devices (explicit mesh axes) always takes ``"vmap"``.
  """
  if implementation != "auto":
    return implementation
  leaves = jax.tree.leaves(micro_batches)
  count = leaves[0].shape[0]
  if (jax.default_backend() == "cpu" and count <= MAX_UNROLLED_MICRO_BATCHES
      and all(_explicit_shards(x) == 1 for x in leaves)):
    return "unrolled"
  return "vmap"


def _mean_over_micro_batches(
    step: Callable[[_contract.LossFn, Any, Any], Any],
    loss_fn: _contract.LossFn,
    params: Any,
    micro_batches: Any,
    implementation: Implementation,
) -> Any:
  """``(1/k) Σ_j step(w, B_j)`` over the leading axis of ``micro_batches``."""
  implementation = resolve_implementation(implementation, micro_batches)
  if implementation == "vmap":
    gradients = jax.vmap(functools.partial(step, loss_fn), in_axes=(None, 0))(
        params, micro_batches
    )
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), gradients)
  # Unrolled: k independent subgraphs in one program, which XLA schedules
  # freely (on a CPU this beats the grouped convolutions that vmap produces).
  if any(_explicit_shards(x) > 1 for x in jax.tree.leaves(micro_batches)):
    raise ValueError(
        "m_sam: implementation='unrolled' slices the micro-batches apart and"
        " cannot keep a batch sharded over devices (explicit mesh axes); use"
        " implementation='vmap', which computes each device's micro-batches"
        " where they live."
    )
  count = jax.tree.leaves(micro_batches)[0].shape[0]
  total = None
  for j in range(count):
    micro_batch = jax.tree.map(lambda x, j=j: x[j], micro_batches)
    gradient = step(loss_fn, params, micro_batch)
    total = gradient if total is None else optax.tree.add(total, gradient)
  return optax.tree.scale(1.0 / count, total)


def m_sam(
    rho: ArrayLike,
    micro_batch_size: int,
    *,
    normalize: bool = True,
    implementation: Implementation = "auto",
    micro_batches_per_chunk: int | None = None,
    perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""m-SAM (and m-USAM): a SAM step on each micro-batch, averaged.

  .. math::
    \varepsilon_j = \rho\, g_{B_j} / (\|g_{B_j}\| + \delta)
    \ (\text{m-USAM: } \rho\, g_{B_j}), \qquad
    \text{returns } \frac{1}{k} \sum_{j=1}^{k}
    \nabla L_{B_j}(w + \varepsilon_j),

  with the batch split into ``k = B / m`` micro-batches ``B_j`` of
  ``m = micro_batch_size`` examples: ``B_j`` is the contiguous slice
  ``[j*m, (j+1)*m)`` of every leaf of ``batch``. ``m = B`` is :func:`sam`
  (:func:`usam` with ``normalize=False``); smaller ``m`` regularizes the
  gradient noise more (2509.18001, Thm 3.5). Each micro-batch needs its own
  clean gradient, so the ``updates`` passed in are not used (None is fine)::

    tx = optax.chain(sam_optax.m_sam(0.05, micro_batch_size=16),
                     optax.sgd(0.1, momentum=0.9))
    updates, state = tx.update(None, state, params, loss_fn=loss_fn,
                               batch=batch)

  ``micro_batch_size`` sets shapes, so it stays a Python int: to schedule
  ``rho``, use ``optax.inject_hyperparams(sam_optax.m_sam,
  static_args=("micro_batch_size",))``.

  The micro-batches are processed together, with the FLOPs of one SAM step
  on the whole batch; ``implementation`` picks how:

  - ``"vmap"``: ``jax.vmap`` of the per-micro-batch step. Each micro-batch
    has its own perturbed weights, so its layers become batched matrix
    products and grouped convolutions. One program whatever ``k``; the form
    for GPUs and TPUs; and it shards: under ``jax.jit`` with the batch
    sharded over ``D`` devices and ``m = B/D``, each device computes its own
    micro-batch and one all-reduce averages the gradients (see
    :func:`data_parallel_m_sam` for the explicit ``shard_map`` form).
  - ``"unrolled"``: a Python loop inside the traced function: ``k``
    independent subgraphs, dense layers only, which XLA schedules freely.
    The fastest form on a CPU, where XLA's grouped convolutions are slow
    (measured: about SAM's step time, against 1.8× for ``"vmap"``), but
    compile time and program size grow with ``k``.
  - ``"auto"`` (default): ``"unrolled"`` on a CPU backend for at most
    :data:`MAX_UNROLLED_MICRO_BATCHES` micro-batches in flight and an
    unsharded batch, ``"vmap"`` otherwise.

  Memory: with ``c`` micro-batches in flight, a step holds about
  ``c · (A_m + 3P)`` floats on top of its inputs, with ``P`` the number of
  parameters (each micro-batch's perturbation, perturbed weights and
  gradient) and ``A_m`` the activations of one micro-batch's
  forward-backward; with ``c = k`` that is SAM's activation memory
  ``A_B = k A_m`` plus ``3kP``. ``micro_batches_per_chunk = c`` bounds it:
  chunks of ``c`` micro-batches run one after another in a loop
  (``optax.microbatching.microbatch``, a ``lax.fori_loop``), each chunk
  mapped as above. ``c = k`` (or None) is one chunk, the fastest; ``c = 1``
  is the sequential loop, the leanest. On a CPU, XLA (jax 0.10) runs the
  backward convolutions inside loop bodies without its YNNPACK kernels, so
  chunked steps took 7–20× SAM's time there: chunk for memory on
  accelerators. The chunk loop averages in float32; which micro-batches
  share a chunk does not change the result.

  Args:
    rho: the perturbation radius ``ρ``.
    micro_batch_size: ``m``, the examples per micro-batch; must divide the
      batch size.
    normalize: m-SAM (True) or m-USAM (False, ``ε_j = ρ g_{B_j}``).
    implementation: ``"auto"``, ``"vmap"`` or ``"unrolled"``, see above.
    micro_batches_per_chunk: how many micro-batches are processed at once
      (must divide ``k``); None processes all ``k`` at once.
    perturb_mask: which leaves to perturb; see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless).

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021
    (m-sharpness);
    `Unveiling m-Sharpness Through the Structure of Stochastic Gradient
    Noise <https://arxiv.org/abs/2509.18001>`_, 2025.
  """
  name = "m_sam" if normalize else "m_usam"
  _contract.check_rho(rho, name)
  micro_batch_size = _contract.check_integer(
      micro_batch_size, "micro_batch_size", name)
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(
        f"{name}: implementation must be one of {_IMPLEMENTATIONS}, got"
        f" {implementation!r}."
    )
  if micro_batches_per_chunk is not None:
    micro_batches_per_chunk = _contract.check_integer(
        micro_batches_per_chunk, "micro_batches_per_chunk", name)
  step = _micro_batch_step(rho, normalize, perturb_mask)

  def update_fn(
      updates: optax.Updates | None,
      state: optax.OptState,
      params: optax.Params | None = None,
      *,
      loss_fn: _contract.LossFn | None = None,
      batch: Any = None,
      key: jax.Array | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    del updates, key, extra_args  # each micro-batch takes its own gradient
    params, loss_fn, batch = _contract.require_arguments(
        params, loss_fn, batch, name)
    _contract.check_per_example_losses(loss_fn, params, batch, name)
    count = num_micro_batches(batch, micro_batch_size, name)
    micro_batches = split_micro_batches(batch, micro_batch_size, name)
    per_chunk = micro_batches_per_chunk or count
    if count % per_chunk:
      raise ValueError(
          f"{name}: micro_batches_per_chunk={per_chunk} must divide the"
          f" number of micro-batches {count} (batch size / micro_batch_size)."
      )

    def chunk_mean(params: Any, chunk: Any) -> Any:
      return _mean_over_micro_batches(step, loss_fn, params, chunk,
                                      implementation)

    if per_chunk == count:
      mean = chunk_mean(params, micro_batches)
    else:
      # The loop over chunks. optax's column-major split of the micro-batch
      # axis puts micro-batches j, j+k/c, ... in one chunk: harmless, since
      # the micro-batches themselves are fixed above and only their mean is
      # kept.
      mean = optax.microbatching.microbatch(
          chunk_mean, argnums=1, microbatch_size=per_chunk,
          accumulator=optax.microbatching.AccumulationType.MEAN,
      )(params, micro_batches)
    return optax.tree.cast_like(mean, params), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn
  )


def m_sam_reference(
    rho: ArrayLike,
    micro_batch_size: int,
    *,
    normalize: bool = True,
    perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  """m-SAM by its definition: a loop of :func:`sam` steps, one per micro-batch.

  The sequential reference for tests and benchmarks, built from ``sam`` (or
  ``usam``) alone: for each contiguous slice ``batch[j*m:(j+1)*m]`` it calls
  ``sam(rho).update`` and averages the results. Run eagerly it processes one
  micro-batch at a time, like the papers' code; under ``jax.jit`` XLA sees the
  ``k`` steps unrolled. Same contract and result as :func:`m_sam`.

  Args:
    rho: the perturbation radius ``ρ``.
    micro_batch_size: ``m``; must divide the batch size.
    normalize: m-SAM (True) or m-USAM (False).
    perturb_mask: which leaves to perturb; see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless).
  """
  name = "m_sam_reference"
  _contract.check_rho(rho, name)
  micro_batch_size = _contract.check_integer(
      micro_batch_size, "micro_batch_size", name)
  inner = (_sam.sam if normalize else _sam.usam)(
      rho, perturb_mask=perturb_mask)

  def update_fn(
      updates: optax.Updates | None,
      state: optax.OptState,
      params: optax.Params | None = None,
      *,
      loss_fn: _contract.LossFn | None = None,
      batch: Any = None,
      key: jax.Array | None = None,
      **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    del updates, key, extra_args
    params, loss_fn, batch = _contract.require_arguments(
        params, loss_fn, batch, name)
    count = num_micro_batches(batch, micro_batch_size, name)
    gradients = []
    for j in range(count):
      micro_batch = jax.tree.map(
          lambda x, j=j: x[j * micro_batch_size:(j + 1) * micro_batch_size],
          batch,
      )
      gradient, _ = inner.update(None, optax.EmptyState(), params,
                                 loss_fn=loss_fn, batch=micro_batch)
      gradients.append(optax.tree.cast(gradient, jnp.float32))
    mean = jax.tree.map(lambda *gs: sum(gs) / count, *gradients)
    return optax.tree.cast_like(mean, params), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn
  )
