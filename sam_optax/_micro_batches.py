"""A batch as ``k`` contiguous micro-batches, and a step averaged over them.

Micro-batch ``j`` of a batch of ``B`` examples split into micro-batches of
``m`` is the contiguous slice ``batch[j*m:(j+1)*m]`` of every leaf.
Contiguity is what makes data parallelism with a local perturbation (device
``d`` holds the contiguous shard ``d``) equal to :func:`sam_optax.m_sam` on
one device.

:func:`mean_over_micro_batches` runs a per-micro-batch step on all of them and
averages the results in float32, in one of the forms of :data:`FORMS`:

- ``"vmap"``: ``jax.vmap`` over the micro-batches, one program whatever ``k``;
- ``"unrolled"``: ``k`` independent subgraphs in one program (a Python loop
  at trace time); compile time grows with ``k`` times the parameter leaves;
- ``"sequential"``: a ``lax.scan`` over the micro-batches inside the step,
  one micro-batch's weights, perturbation and gradient live at a time;
- chunked (``micro_batches_per_chunk = c``): chunks of ``c`` micro-batches,
  each mapped by one of the above, one chunk after another in a loop.

``implementation="auto"`` asks the cost model (:func:`choose`) for a
:class:`Plan`: each entry of :data:`FORMS` estimates the step's cost on a
:class:`Workload` (parameter bytes, one micro-batch's activation bytes, the
number of micro-batches, the backend, whether the model has convolutions, the
unrolled program size as a proxy for compile time) and the cheapest feasible
entry wins. A new form is one more entry.
"""

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _contract
from sam_optax import _jaxprs
from sam_optax import _sharding

Implementation = Literal["auto", "vmap", "unrolled", "sequential"]
IMPLEMENTATIONS = ("auto", "vmap", "unrolled", "sequential")

MicroBatchStep = Callable[[Any, Any], Any]
"""``(params, micro_batch) -> pytree of float32 arrays`` to average."""

# --- The cost model of implementation="auto" ------------------------------

MAX_UNROLLED_MICRO_BATCHES = 32
"""``"auto"`` unrolls at most this many micro-batches."""

MAX_UNROLLED_LEAVES = 512
"""``"auto"`` unrolls only while micro-batches × parameter leaves ≤ this.

The unrolled program has one copy of every leaf's update per micro-batch, and
XLA's compile time grows faster than linearly in it (the 64-layer MLP of
BENCHMARKS.md, 8 micro-batches: 15 s at 128 leaves, 65 s at 256, against
2 s for one SAM step; the small CNN, 10 leaves: 7–10 s at 8 or 16).
"""

CPU_VMAP_FACTOR = 2.5
"""Step time of ``"vmap"`` over ``"unrolled"`` on a CPU.

Measured on 2 cores (BENCHMARKS.md): XLA:CPU runs the per-micro-batch weights
of ``vmap`` as batched matrix products and grouped convolutions, slower than
``k`` plain ones (small CNN: 1.9–2.3× SAM against 0.72×; 64-layer MLP: 8×
against 3.3×).
"""

CPU_LOOP_CONV_FACTOR = 15.0
"""Step time of a ``lax`` loop body with convolutions over the unrolled form,
on a CPU (XLA:CPU runs convolutions inside loop bodies without its fast
kernels: the small CNN, 11× SAM against 0.72×)."""

LOOP_FACTOR = 1.1
"""Step time of a ``lax`` loop over the same work unrolled, without
convolutions (the loop keeps XLA from overlapping micro-batches)."""

CPU_UNROLLED_WEIGHT_PENALTY = 0.5
"""On a CPU, the unrolled form's extra cost per unit of :attr:`Workload.
weight_fraction`: its ``k`` live weight copies leave the caches, where a loop
reuses one copy's buffers (the scaling benchmark, 2 cores: deep tanh MLPs,
weight fraction 0.9, unrolled 1.1–1.8× the sequential form's step;
transformer LMs, weight fraction 0.05, 0.8–1.0×)."""

ACCELERATOR_SERIAL_FACTOR = 2.0
"""On a GPU/TPU, one micro-batch at a time (unrolled or in a loop) leaves the
device underused where ``vmap`` batches them: an estimate, not a
measurement (no accelerator was available to the benchmark yet)."""

MEMORY_FRACTION = 0.5
"""``"auto"`` chunks ``vmap`` when its estimated working memory exceeds this
fraction of the device's memory (accelerators only)."""

WEIGHT_PASSES = 3
"""Per micro-batch, each form reads and writes about three weight-sized
arrays (the ascent gradient, the perturbed weights, the perturbed gradient)."""


class Workload(NamedTuple):
  """What the cost model of ``implementation="auto"`` looks at.

  Attributes:
    backend: ``jax.default_backend()``: ``"cpu"``, ``"gpu"``, ``"tpu"``.
    micro_batches: ``k``, the micro-batches to average.
    param_bytes: the bytes of the parameters (one weight copy).
    param_leaves: the number of parameter leaves.
    activation_bytes: the bytes of every intermediate of one micro-batch's
      forward pass, a proxy for its activation memory and traffic
      (:func:`loss_profile`); 0 if unknown.
    has_convolutions: whether the forward pass has a convolution.
    sharded: whether the batch is sharded over devices (explicit axes).
    memory_bytes: the device memory ``"auto"`` may plan for, None if
      unbounded or unknown (a CPU).
  """

  backend: str
  micro_batches: int
  param_bytes: int
  param_leaves: int
  activation_bytes: int = 0
  has_convolutions: bool = False
  sharded: bool = False
  memory_bytes: int | None = None

  @property
  def micro_batch_bytes(self) -> int:
    """One micro-batch's working set: its weight copies and activations."""
    return WEIGHT_PASSES * self.param_bytes + 2 * self.activation_bytes

  @property
  def weight_fraction(self) -> float:
    """The share of weight copies in one micro-batch's working set."""
    total = self.micro_batch_bytes
    return WEIGHT_PASSES * self.param_bytes / total if total else 1.0

  @property
  def traffic(self) -> float:
    """Bytes a step moves, about: every micro-batch's working set."""
    return float(self.micro_batches * self.micro_batch_bytes)


class Plan(NamedTuple):
  """A form: how many micro-batches are in flight and how they are mapped.

  ``micro_batches_per_chunk`` None is all of them at once.
  """

  implementation: str
  micro_batches_per_chunk: int | None = None


class Estimate(NamedTuple):
  """A form's plan and its estimated step cost (relative units)."""

  plan: Plan
  cost: float


@dataclasses.dataclass(frozen=True)
class Form:
  """An entry of the cost model: a name and ``estimate(workload)``.

  ``estimate`` returns an :class:`Estimate`, or None where the form does not
  apply (a sharded batch, a compile-time or memory limit).
  """

  name: str
  estimate: Callable[[Workload], Estimate | None]


def _serial_factor(workload: Workload) -> float:
  """A form that runs micro-batches one after another in a ``lax`` loop."""
  if workload.backend != "cpu":
    return ACCELERATOR_SERIAL_FACTOR
  return CPU_LOOP_CONV_FACTOR if workload.has_convolutions else LOOP_FACTOR


def _fits(workload: Workload, in_flight: int) -> bool:
  if workload.memory_bytes is None:
    return True
  budget = MEMORY_FRACTION * workload.memory_bytes
  return in_flight * workload.micro_batch_bytes <= budget


def _vmap(workload: Workload) -> Estimate | None:
  if not _fits(workload, workload.micro_batches):
    return None
  factor = CPU_VMAP_FACTOR if workload.backend == "cpu" else 1.0
  return Estimate(Plan("vmap"), factor * workload.traffic)


def _unrolled(workload: Workload) -> Estimate | None:
  count = workload.micro_batches
  if (
    workload.sharded
    or count > MAX_UNROLLED_MICRO_BATCHES
    or count * workload.param_leaves > MAX_UNROLLED_LEAVES
    or not _fits(workload, count)
  ):
    return None
  if workload.backend == "cpu":
    factor = 1.0 + CPU_UNROLLED_WEIGHT_PENALTY * workload.weight_fraction
  else:
    factor = ACCELERATOR_SERIAL_FACTOR
  return Estimate(Plan("unrolled"), factor * workload.traffic)


def _sequential(workload: Workload) -> Estimate | None:
  if workload.sharded:
    return None
  return Estimate(
    Plan("sequential"), _serial_factor(workload) * workload.traffic
  )


def _chunked(workload: Workload) -> Estimate | None:
  """``vmap`` over the largest chunk that fits in memory, chunks in a loop."""
  count = workload.micro_batches
  if workload.memory_bytes is None or _fits(workload, count):
    return None  # all at once fits: chunking only adds a loop
  sizes = [c for c in range(count - 1, 1, -1) if count % c == 0]
  fitting = [c for c in sizes if _fits(workload, c)]
  if not fitting:
    return None
  factor = 1.0 if workload.backend != "cpu" else CPU_VMAP_FACTOR
  return Estimate(
    Plan("vmap", fitting[0]),
    factor * _serial_factor(workload) ** (1 / fitting[0]) * workload.traffic,
  )


FORMS: list[Form] = [
  Form("vmap", _vmap),
  Form("unrolled", _unrolled),
  Form("sequential", _sequential),
  Form("chunked", _chunked),
]
"""The candidates of ``implementation="auto"``, in order of preference on a
tie. Each estimate is relative (bytes moved times a measured factor), so only
their order matters."""


def estimates(workload: Workload) -> dict[str, Estimate]:
  """Every applicable form's :class:`Estimate` for ``workload``, by name."""
  out = {}
  for form in FORMS:
    estimate = form.estimate(workload)
    if estimate is not None:
      out[form.name] = estimate
  return out


def choose(workload: Workload) -> Plan:
  """The cheapest applicable form of :data:`FORMS` (``"vmap"`` if none)."""
  candidates = estimates(workload)
  if not candidates:
    return Plan("vmap")
  return min(candidates.values(), key=lambda e: e.cost).plan


class LossProfile(NamedTuple):
  """What a forward pass costs, from its jaxpr (:func:`loss_profile`)."""

  activation_bytes: int
  has_convolutions: bool


def _dtype(x: Any) -> Any:
  """``x``'s dtype, extended ones (PRNG keys) included."""
  return getattr(x, "dtype", None) or jnp.result_type(x)


def _itemsize(dtype: Any) -> int:
  """Bytes per element; 0 for a dtype without a size (a PRNG key type)."""
  return int(getattr(dtype, "itemsize", 0) or 0)


def _walk(jaxpr: Any, totals: list[int], repeat: int = 1) -> None:
  for equation in jaxpr.eqns:
    if equation.primitive.name == "conv_general_dilated":
      totals[1] = 1
    times = repeat * int(equation.params.get("length", 1) or 1)
    subs = _jaxprs.sub_jaxprs(equation.params)
    if subs:
      for sub in subs:
        _walk(sub, totals, times)
      continue
    for var in equation.outvars:
      aval = getattr(var, "aval", None)
      shape = getattr(aval, "shape", None)
      dtype = getattr(aval, "dtype", None)
      if shape is not None and dtype is not None:
        totals[0] += repeat * math.prod(shape) * _itemsize(dtype)


def loss_profile(loss_fn: Any, params: Any, micro_batch: Any) -> LossProfile:
  """The forward pass of ``loss_fn`` on one micro-batch, from its jaxpr.

  Traces ``loss_fn`` on shapes only (``jax.make_jaxpr``: nothing runs) and
  sums the bytes of every equation's outputs, inside nested calls and loops
  too (a ``scan`` body counts ``length`` times): a proxy for the activations
  the backward pass keeps and for the traffic of the forward. A convolution
  (``conv_general_dilated``) anywhere sets ``has_convolutions``.
  """
  shapes = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x), _dtype(x)),
    (params, micro_batch),
  )
  closed = jax.make_jaxpr(loss_fn)(*shapes)
  totals = [0, 0]
  _walk(closed.jaxpr, totals)
  return LossProfile(totals[0], bool(totals[1]))


def _device_memory() -> int | None:
  if jax.default_backend() == "cpu":
    return None
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:
    return None
  limit = stats.get("bytes_limit")
  return int(limit) if limit else None


def workload(
  params: Any,
  micro_batches: Any,
  loss_fn: Any | None = None,
) -> Workload:
  """The :class:`Workload` of averaging over ``micro_batches`` (``[k, m, ...]``).

  ``loss_fn`` (the per-example loss) gives the activation bytes and whether
  there are convolutions (:func:`loss_profile`); without it both are unknown
  (0, False).
  """
  leaves = jax.tree.leaves(micro_batches)
  parameter_leaves = jax.tree.leaves(params)
  profile = LossProfile(0, False)
  if loss_fn is not None:
    # Shapes only: a batch sharded over devices is not sliced.
    first = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], _dtype(x)),
      micro_batches,
    )
    profile = loss_profile(loss_fn, params, first)
  return Workload(
    backend=jax.default_backend(),
    micro_batches=leaves[0].shape[0],
    param_bytes=sum(
      math.prod(jnp.shape(x)) * _itemsize(_dtype(x)) for x in parameter_leaves
    ),
    param_leaves=len(parameter_leaves),
    activation_bytes=profile.activation_bytes,
    has_convolutions=profile.has_convolutions,
    sharded=any(_sharding.explicit_shards(x) > 1 for x in leaves),
    memory_bytes=_device_memory(),
  )


def resolve_implementation(
  implementation: Implementation,
  params: Any,
  micro_batches: Any,
  loss_fn: Any | None = None,
) -> Plan:
  """``implementation`` as a :class:`Plan`; ``"auto"`` by :func:`choose`."""
  if implementation != "auto":
    return Plan(implementation)
  return choose(workload(params, micro_batches, loss_fn))


def micro_batches_per_chunk_or_all(
  micro_batches_per_chunk: int | None, count: int, name: str
) -> int:
  """``c``, the micro-batches per chunk (all ``k`` if None), with a clear
  error if ``c`` does not divide ``k``."""
  per_chunk = micro_batches_per_chunk or count
  _contract.check_divides(
    per_chunk,
    count,
    "micro_batches_per_chunk",
    "the number of micro-batches",
    name,
    why="batch size / micro_batch_size",
  )
  return per_chunk


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


def _explicitly_sharded(micro_batches: Any) -> bool:
  return any(
    _sharding.explicit_shards(x) > 1 for x in jax.tree.leaves(micro_batches)
  )


def _check_unsharded(micro_batches: Any, implementation: str, name: str):
  if _explicitly_sharded(micro_batches):
    raise ValueError(
      f"{name}: implementation={implementation!r} slices the micro-batches"
      " apart and cannot keep a batch sharded over devices (explicit mesh"
      " axes); use implementation='vmap', which computes each device's"
      " micro-batches where they live."
    )


def _mean_of_chunk(
  step: MicroBatchStep,
  params: Any,
  micro_batches: Any,
  implementation: str,
  name: str,
) -> Any:
  """``(1/c) Σ_j step(w, B_j)`` over the leading axis of ``micro_batches``."""
  count = jax.tree.leaves(micro_batches)[0].shape[0]
  if count == 1 and not _explicitly_sharded(micro_batches):
    # The same value as a vmap over one micro-batch, with a third of its
    # temp memory: XLA kept about three weight-sized buffers for the vmap
    # of one (808 against 299 KiB for a 256x256 MLP, chunks of one), which
    # broke the chunked form's memory, linear in the chunk size.
    return step(params, jax.tree.map(lambda x: x[0], micro_batches))
  if implementation == "vmap":
    results = jax.vmap(step, in_axes=(None, 0))(params, micro_batches)
    return jax.tree.map(lambda g: jnp.mean(g, axis=0), results)
  _check_unsharded(micro_batches, implementation, name)
  if implementation == "sequential":
    # One micro-batch per iteration: a single weight copy in flight. The
    # sum starts from the first micro-batch's result (not from zeros), so
    # the carry has the result's type, varying axes under shard_map included.
    first = step(params, jax.tree.map(lambda x: x[0], micro_batches))

    def body(total: Any, micro_batch: Any) -> tuple[Any, None]:
      return optax.tree.add(total, step(params, micro_batch)), None

    rest = jax.tree.map(lambda x: x[1:], micro_batches)
    total, _ = jax.lax.scan(body, first, rest)
    return optax.tree.scale(1.0 / count, total)
  # Unrolled: c independent subgraphs in one program, which XLA schedules
  # freely (on a CPU this beats the grouped convolutions that vmap produces).
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
  loss_fn: Any | None = None,
  name: str,
) -> Any:
  """``(1/k) Σ_j step(w, B_j)`` over the ``k`` contiguous micro-batches ``B_j``.

  ``micro_batches_per_chunk = c`` micro-batches are mapped at once
  (``implementation``); the ``k / c`` chunks run one after another in a loop
  (``optax.microbatching.microbatch``, a ``lax.fori_loop``) that averages in
  float32. None maps all ``k`` at once.

  ``implementation="auto"`` takes the :class:`Plan` of :func:`choose` (both
  the form and, where memory is bounded, the chunk), or with
  ``micro_batches_per_chunk`` given, the form of each chunk; ``loss_fn``
  (the per-example loss ``step`` differentiates) informs it.

  Raises:
    ValueError: if ``m`` does not divide ``B`` or ``c`` does not divide ``k``.
  """
  count = num_micro_batches(batch, micro_batch_size, name)
  micro_batches = split_micro_batches(batch, micro_batch_size, name)
  if implementation == "auto":
    if micro_batches_per_chunk is None:
      plan = resolve_implementation("auto", params, micro_batches, loss_fn)
    else:
      # The form of one chunk: a workload of c micro-batches.
      work = workload(params, micro_batches, loss_fn)
      plan = choose(work._replace(micro_batches=micro_batches_per_chunk))
      plan = Plan(plan.implementation, micro_batches_per_chunk)
    implementation = plan.implementation  # type: ignore[assignment]
    micro_batches_per_chunk = plan.micro_batches_per_chunk
  per_chunk = micro_batches_per_chunk_or_all(
    micro_batches_per_chunk, count, name
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
