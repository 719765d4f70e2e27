"""A batch as ``k`` contiguous micro-batches, and a step averaged over them.

Micro-batch ``j`` of a batch of ``B`` examples split into micro-batches of
``m`` is the contiguous slice ``batch[j*m:(j+1)*m]`` of every leaf.
Contiguity is what makes data parallelism with a local perturbation (device
``d`` holds the contiguous shard ``d``) equal to :func:`sam_optax.m_sam` on
one device.

:func:`mean_over_micro_batches` runs a per-micro-batch step on all of them at
once, by ``jax.vmap`` or by unrolling (the :data:`Implementation`), optionally
in chunks that bound memory, and averages the results in float32.
"""

from collections.abc import Callable
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from sam_optax import _contract
from sam_optax import _sharding

Implementation = Literal["auto", "vmap", "unrolled"]
IMPLEMENTATIONS = ("auto", "vmap", "unrolled")

MAX_UNROLLED_MICRO_BATCHES = 32
"""``implementation="auto"`` unrolls at most this many micro-batches (on a CPU).

Compile time and program size grow linearly with the unrolled count (the
benchmark's small CNN: 7–10 s at 8 or 16 micro-batches, 17–22 s at 32, against
5–6 s for ``"vmap"``; BENCHMARKS.md).
"""

MicroBatchStep = Callable[[Any, Any], Any]
"""``(params, micro_batch) -> pytree of float32 arrays`` to average."""


def num_micro_batches(batch: Any, micro_batch_size: int, name: str) -> int:
  """``k = B / m``, with a clear error if ``m`` does not divide ``B``."""
  return _contract.check_divides(
    micro_batch_size,
    _contract.batch_size(batch, name),
    "micro_batch_size",
    "the batch size",
    name,
    why="micro-batches are equal, contiguous slices",
  )


def split_micro_batches(batch: Any, micro_batch_size: int, name: str) -> Any:
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
    out_sharding = _sharding.split_leading_axis_sharding(x, count, name)
    if out_sharding is None:
      return jnp.reshape(x, shape)
    return jnp.reshape(x, shape, out_sharding=out_sharding)

  return jax.tree.map(split, batch)


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
  if (
    jax.default_backend() == "cpu"
    and count <= MAX_UNROLLED_MICRO_BATCHES
    and all(_sharding.explicit_shards(x) == 1 for x in leaves)
  ):
    return "unrolled"
  return "vmap"


def _mean_of_chunk(
  step: MicroBatchStep,
  params: Any,
  micro_batches: Any,
  implementation: Implementation,
  name: str,
) -> Any:
  """``(1/c) Σ_j step(w, B_j)`` over the leading axis of ``micro_batches``."""
  if resolve_implementation(implementation, micro_batches) == "vmap":
    results = jax.vmap(step, in_axes=(None, 0))(params, micro_batches)
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), results)
  # Unrolled: c independent subgraphs in one program, which XLA schedules
  # freely (on a CPU this beats the grouped convolutions that vmap produces).
  if any(
    _sharding.explicit_shards(x) > 1 for x in jax.tree.leaves(micro_batches)
  ):
    raise ValueError(
      f"{name}: implementation='unrolled' slices the micro-batches apart and"
      " cannot keep a batch sharded over devices (explicit mesh axes); use"
      " implementation='vmap', which computes each device's micro-batches"
      " where they live."
    )
  count = jax.tree.leaves(micro_batches)[0].shape[0]
  total = None
  for j in range(count):
    result = step(params, jax.tree.map(lambda x, j=j: x[j], micro_batches))
    total = result if total is None else optax.tree.add(total, result)
  return optax.tree.scale(1.0 / count, total)


def mean_over_micro_batches(
  step: MicroBatchStep,
  params: Any,
  batch: Any,
  micro_batch_size: int,
  *,
  implementation: Implementation = "auto",
  micro_batches_per_chunk: int | None = None,
  name: str,
) -> Any:
  """``(1/k) Σ_j step(w, B_j)`` over the ``k`` contiguous micro-batches ``B_j``.

  ``micro_batches_per_chunk = c`` micro-batches are mapped at once
  (``implementation``); the ``k / c`` chunks run one after another in a loop
  (``optax.microbatching.microbatch``, a ``lax.fori_loop``) that averages in
  float32. None maps all ``k`` at once.

  Raises:
    ValueError: if ``m`` does not divide ``B`` or ``c`` does not divide ``k``.
  """
  count = num_micro_batches(batch, micro_batch_size, name)
  micro_batches = split_micro_batches(batch, micro_batch_size, name)
  per_chunk = micro_batches_per_chunk or count
  _contract.check_divides(
    per_chunk,
    count,
    "micro_batches_per_chunk",
    "the number of micro-batches",
    name,
    why="batch size / micro_batch_size",
  )
  chunk_mean = functools.partial(
    _mean_of_chunk, step, implementation=implementation, name=name
  )
  if per_chunk == count:
    return chunk_mean(params, micro_batches)
  # optax's column-major split of the micro-batch axis puts micro-batches
  # j, j+k/c, ... in one chunk: harmless, since the micro-batches themselves
  # are fixed above and only their mean is kept.
  return optax.microbatching.microbatch(
    chunk_mean,
    argnums=1,
    microbatch_size=per_chunk,
    accumulator=optax.microbatching.AccumulationType.MEAN,
  )(params, micro_batches)
