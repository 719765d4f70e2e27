r"""Per-example gradients and Rademacher probes, shared by RW-SAM and diagnostics.

Per-example gradients ``∇ℓ_i(w)`` are never summed here: each is mapped to a
small result (its norm, its squared distance to a mean, its products with
probes) as soon as it is computed. There are two ways to take them, chosen by
``per_example_gradients``:

* ``"batch_of_one"``: ``loss_fn`` sees each example alone, as a batch of one
  (``optax.microbatching.micro_grad``, a ``vmap`` of ``grad``). Cheap: ``B``
  backward passes of one example each.
* ``"jacobian"``: ``∇ℓ_i`` is row ``i`` of the Jacobian of the loss vector
  ``loss_fn(params, batch)`` (shape ``[B]``): example ``i``'s term of the
  batch's loss, with everything the batch shares (BatchNorm's statistics in
  training mode, dropout masks drawn for the whole batch) computed from the
  whole batch at ``w`` and differentiated through, not held fixed: the probe
  pass recomputes them at ``w + σv``, so that is what it measures.

  .. math::
    J_{i\cdot} = \nabla_w\, \ell_i(w;\ x_1, \dots, x_B) = e_i^\top J,
    \qquad J = \partial\, \mathrm{loss\_fn}(w, \mathrm{batch}) / \partial w,

  one forward pass and a VJP per example (``vmap`` over the one-hot
  cotangents ``e_i``): ``B`` backward passes of the *whole* batch, ``B`` times
  the cost of ``"batch_of_one"``.

When no example's loss depends on the others (``ℓ_i(w; batch) =
ℓ(w; x_i)``), the two are equal. When it does (a *coupled* loss: BatchNorm in
training mode), only ``"jacobian"`` is what RW-SAM's finite-difference probe
``(ℓ_i(w + σv; batch) − ℓ_i(w; batch))/σ ≈ v·∇ℓ_i`` estimates, since the probe
pass runs the whole batch too. ``"auto"`` (the default everywhere) takes
``"jacobian"`` for a ``loss_fn`` whose attribute ``couples_examples`` is true
(the loss functions of :mod:`sam_optax.flax` set it for models with BatchNorm
or dropout in training mode) and ``"batch_of_one"`` otherwise, so a plain
``loss_fn`` keeps the cheap route.
"""

from collections.abc import Callable, Sequence
import functools
import itertools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from sam_optax import _contract

PerExampleGradients = Literal["auto", "batch_of_one", "jacobian"]
PER_EXAMPLE_GRADIENTS = ("auto", "batch_of_one", "jacobian")
COUPLES_EXAMPLES = "couples_examples"
"""The attribute of a ``loss_fn`` that declares it coupled (``"auto"``)."""
_BITS = 32
"""Random signs per word of :func:`rademacher_like`'s draw."""
_ONE_FLOAT32_BITS = 0x3F800000
"""The bits of float32's 1.0 (its sign bit 0)."""


def rademacher_like(key: jax.Array, tree: Any) -> Any:
  """A Rademacher probe: independent ``±1`` entries shaped like ``tree``.

  One draw of packed random bits serves the whole tree:
  ``jax.random.bits(key)`` gives ``Σ_l ⌈n_l/32⌉`` uint32 words for leaves of
  ``n_l`` entries, each leaf taking the next ``⌈n_l/32⌉`` words (in
  ``jax.tree.leaves`` order), and entry ``32 i + j`` of a leaf (row-major) is
  ``+1`` if bit ``j`` of its word ``i`` is 0, ``-1`` if it is 1. Every bit of
  the counter-based generator is an independent fair coin, so the entries
  are independent and each is ``±1`` with probability 1/2. That is one
  generator call of about ``N/32`` words for ``N`` entries and an
  elementwise unpacking (fused by XLA into the probe's users), where a
  ``jax.random.rademacher`` per leaf costs a key split, a generator call of
  ``N`` words and a compilation of the generator per leaf. Each leaf reads
  its words through a gather at constant indices, so that leaves of one
  shape share their compiled kernels (a slice per leaf gave each leaf a
  kernel of its own: compile time growing with the number of leaves), and a
  leaf of at most :data:`WORDS_PER_KERNEL` words hashes only its own (see
  there: XLA:CPU then keeps a small model's probe on one thread). The same
  key and leaf shapes give the same probe.

  Args:
    key: a PRNG key.
    tree: a pytree of arrays (the parameters); only the leaves' shapes are
      used.

  Returns:
    A pytree like ``tree`` with float32 leaves, each entry ``+1`` or ``-1``
    with probability 1/2.
  """
  leaves, treedef = jax.tree.flatten(tree)
  shapes = tuple(tuple(jnp.shape(leaf)) for leaf in leaves)
  return jax.tree.unflatten(treedef, _packed_signs(key, shapes))


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return jnp.left_shift(x, np.uint32(bits)) | jnp.right_shift(
    x, np.uint32(_BITS - bits)
  )


def _threefry2x32(
  key: jax.Array, high: jax.Array, low: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as ``jax.random``'s.

  The rounds written out as elementwise operations, so that XLA fuses them
  into one loop over the counters: on a CPU, ``jax.random.bits`` runs them
  as a ``while`` loop of five iterations over the whole array, about twice
  the time (measured: 7.1 ms against 3.4 ms for 130k words, loaded
  machine).
  """
  k1, k2 = key[..., 0], key[..., 1]
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(_THREEFRY_PARITY))
  x = [high + ks[0], low + ks[1]]
  for block in range(5):
    for rotation in _THREEFRY_ROTATIONS[block % 2]:
      x[0] = x[0] + x[1]
      x[1] = x[0] ^ _rotate_left(x[1], rotation)
    x = [
      x[0] + ks[(block + 1) % 3],
      x[1] + ks[(block + 2) % 3] + np.uint32(block + 1),
    ]
  return x[0], x[1]


def _threefry_key_data(key: jax.Array, count: int) -> jax.Array | None:
  """The ``[2]`` words of a Threefry key whose draws of ``count`` words the
  fused :func:`_threefry2x32` reproduces, else None (another generator, a
  legacy setting, or a draw too long for 32-bit counters)."""
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a legacy uint32 key
  if (
    str(jax.random.key_impl(key)) != "threefry2x32"
    or not getattr(jax.config, "jax_threefry_partitionable", True)
    or count >= 2**32
  ):
    return None
  return jax.random.key_data(key)


def _words_at(key_data: jax.Array, counters: ArrayLike) -> jax.Array:
  """Words ``counters`` of the draw: ``a ^ b`` for ``(a, b)`` the Threefry
  hash of the counter ``(0, i)`` (JAX's definition of ``jax.random.bits``
  for a Threefry key with ``jax_threefry_partitionable``)."""
  low = jnp.asarray(counters, jnp.uint32)
  first, second = _threefry2x32(key_data, jnp.zeros_like(low), low)
  return first ^ second


def _random_words(key: jax.Array, count: int) -> jax.Array:
  """``jax.random.bits(key, (count,), jnp.uint32)``, the same values.

  For a Threefry key with ``jax_threefry_partitionable`` (JAX's default),
  word ``i`` is computed by :func:`_words_at`; any other key goes to
  ``jax.random.bits``. The whole draw at once: the probe hashes each leaf's
  words apart (:func:`_leaf_words`), and ``tests/test_probes.py`` pins
  this against ``jax.random.bits`` for every kind of key.
  """
  key_data = _threefry_key_data(key, count)
  if key_data is None:
    return jax.random.bits(key, (count,), jnp.uint32)
  return _words_at(key_data, jax.lax.iota(jnp.uint32, count))


def split_key(key: jax.Array, num: int) -> jax.Array:
  """``jax.random.split(key, num)``, the same keys, in one fused kernel.

  For a Threefry key with ``jax_threefry_partitionable``, key ``i`` is the
  hash of the counter ``(0, i)`` (JAX's definition), computed by
  :func:`_threefry2x32`: XLA:CPU runs ``jax.random.split`` as a ``while``
  loop and about ten small kernels, all ready at the step's start, which
  made RW-SAM's step hand work to XLA's thread pool where SAM's does not.
  Any other key goes to ``jax.random.split``.
  """
  key_data = None
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and not jnp.ndim(
    key
  ):
    key_data = _threefry_key_data(key, num)
  if key_data is None:
    return jax.random.split(key, num)
  low = jax.lax.iota(jnp.uint32, num)
  first, second = _threefry2x32(key_data, jnp.zeros_like(low), low)
  # In a kernel of their own, so that XLA computes the keys once: otherwise
  # it fuses their rounds into every kernel that reads them (each leaf's
  # probe kernel), which the cost model then rates at twice the work.
  data = _in_own_kernel(jnp.stack([first, second], axis=-1).reshape(-1))
  return jax.random.wrap_key_data(
    data.reshape(num, 2), impl=jax.random.key_impl(key)
  )


WORDS_PER_KERNEL = 512
"""The most words a Threefry expression of :func:`rademacher_like` hashes
for leaves of at most that many words (for larger ones see
:data:`LARGE_WORDS_PER_KERNEL`).

XLA:CPU's cost model rates a fused kernel by every operation inside it, and
splits one rated above about two 100 µs shares across its thread pool
(measured: a Threefry kernel of 800 words ran on one thread, one of 960
words on two). A leaf's kernel computes only its own words, but carries
the whole expression its words were gathered from: hashing a small leaf's
words from one expression over the whole tree made every leaf's kernel look
large, and RW-SAM's step ran on the pool, where SAM's stays on the calling
thread (``mlp d8w128``: 1.29× SAM's step on 2 CPU cores, 1.20–1.24× with
these bounds; ``experiments/kernel_profile.py`` shows where kernels run).
"""


def _gather(words: jax.Array, indices: np.ndarray) -> jax.Array:
  """``words[indices]`` at constant, sorted, unique indices.

  A gather, not a slice: XLA compiles one kernel per distinct fusion, and a
  slice's offset is part of its kernel, so slices give every leaf a kernel
  of its own (about 20 ms of LLVM each on a CPU, 2.6 s at 128 leaves). The
  indices are an operand instead, so leaves of one shape share kernels. The
  gather is also where XLA stops fusing: the generator is fused into the
  gather, which computes only the words it reads, and not into the
  unpacking, which reads each word 32 times.
  """
  return words.at[indices].get(
    mode="promise_in_bounds", indices_are_sorted=True, unique_indices=True
  )


def _word_range(start: int, count: int, dtype: Any = np.int32) -> np.ndarray:
  return np.arange(start, start + count, dtype=dtype)


def _in_own_kernel(words: jax.Array) -> jax.Array:
  """``words`` (a vector), computed in a kernel of their own: a gather at the
  identity stops XLA from fusing their computation into every consumer."""
  return _gather(words, _word_range(0, words.shape[0]))


LARGE_WORDS_PER_KERNEL = 16384
"""The most words one kernel hashes for leaves of over :data:`WORDS_PER_KERNEL`
words: groups of such leaves are hashed once each, then gathered per leaf.

Measured on the 256-leaf MLP (``experiments.probe_cost --depth 128``, 2048
words a leaf, 2 CPU cores): RW-SAM compiled in 5.2 s against SAM's 2.8 s
(1.9×), where one expression over the whole draw gathered into every leaf's
kernel took 6.0 s (2.1×), for the same step time (1.05–1.06× SAM's on
``mlp d64w256``). One hashed kernel for the whole draw compiled fastest (5.0 s)
but its step was 1.07×: every leaf's probe waited for all of it."""


def _leaf_words(
  key: jax.Array, counts: Sequence[int], starts: Sequence[int]
) -> list[jax.Array]:
  """Each leaf's ``counts[i]`` words, from word ``starts[i]`` of the draw.

  Leaves of as many words are hashed together, from their own counters, in
  near-equal groups (at most two kernels a word count, so compile time grows
  with the groups, not the leaves). A group of leaves of at most
  :data:`WORDS_PER_KERNEL` words has at most that many: each leaf's kernel
  computes its own words from the group's expression and stays on one
  thread. Larger leaves are hashed in groups of at most
  :data:`LARGE_WORDS_PER_KERNEL` words, each hashed once, then gathered.
  """
  total = starts[-1]
  key_data = _threefry_key_data(key, total)
  if key_data is None:  # another generator: one draw, gathered per leaf
    draw = jax.random.bits(key, (total,), jnp.uint32)
    return [
      _gather(draw, _word_range(start, count))
      for start, count in zip(starts, counts, strict=False)
    ]
  by_count: dict[int, list[int]] = {}
  for index, count in enumerate(counts):
    by_count.setdefault(count, []).append(index)
  words: list[Any] = [None] * len(counts)
  for count, members in by_count.items():
    large = count > WORDS_PER_KERNEL
    budget = LARGE_WORDS_PER_KERNEL if large else WORDS_PER_KERNEL
    groups = min(len(members), max(1, -(-len(members) * count // budget)))
    for group in np.array_split(np.asarray(members), groups):
      counters = np.concatenate(
        [_word_range(starts[index], count, np.uint32) for index in group]
      )
      hashed = _words_at(key_data, counters)
      if large:
        hashed = _in_own_kernel(hashed)
      for row, index in enumerate(group):
        words[index] = _gather(hashed, _word_range(row * count, count))
  return words


@functools.partial(jax.jit, static_argnums=1)
def _packed_signs(key: jax.Array, shapes: tuple[tuple[int, ...], ...]) -> Any:
  """:func:`rademacher_like`'s leaves, for leaves of these ``shapes``.

  Jitted (one compilation per tuple of shapes), so that outside ``jit`` a
  tree of many leaves is not sliced and unpacked op by op.
  """
  sizes = [math.prod(shape) for shape in shapes]
  counts = [-(-size // _BITS) for size in sizes]  # words per leaf
  starts = list(itertools.accumulate(counts, initial=0))
  shifts = jnp.arange(_BITS, dtype=jnp.uint32)
  probe = []
  for words, size, shape in zip(
    _leaf_words(key, counts, starts), sizes, shapes, strict=False
  ):
    # Bit j of the word, moved to the sign bit of float32's 1.0: ±1.
    signs = jnp.left_shift(jnp.right_shift(words[:, None], shifts), _BITS - 1)
    ones = jax.lax.bitcast_convert_type(
      jnp.bitwise_or(signs, _ONE_FLOAT32_BITS), jnp.float32
    )
    probe.append(ones.reshape(-1)[:size].reshape(shape))
  return probe


def couples_examples(loss_fn: _contract.LossFn) -> bool:
  """Whether ``loss_fn`` declares that an example's loss depends on the others.

  It does through a true attribute ``couples_examples``, as the loss
  functions of :mod:`sam_optax.flax` have for models with BatchNorm or
  dropout in training mode; any function may set it
  (``loss_fn.couples_examples = True``).
  """
  return bool(getattr(loss_fn, COUPLES_EXAMPLES, False))


def resolve_per_example_gradients(
  per_example_gradients: Any, loss_fn: _contract.LossFn, name: str
) -> Literal["batch_of_one", "jacobian"]:
  """``"batch_of_one"`` or ``"jacobian"``: ``"auto"`` resolved for ``loss_fn``.

  Raises:
    ValueError: if ``per_example_gradients`` is not one of
      ``"auto"``, ``"batch_of_one"``, ``"jacobian"``.
  """
  _contract.check_choice(
    per_example_gradients, PER_EXAMPLE_GRADIENTS, "per_example_gradients", name
  )
  if per_example_gradients != "auto":
    return per_example_gradients
  return "jacobian" if couples_examples(loss_fn) else "batch_of_one"


def _map_jacobian_rows(
  fn: Callable[[Any], Any],
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  chunk_size: int | None,
) -> Any:
  """``fn(e_iᵀ J)`` for every row of the Jacobian of the loss vector."""
  losses, pullback = jax.vjp(
    lambda p: loss_fn(p, batch).astype(jnp.float32), params
  )
  size = losses.shape[0]

  def row(i: jax.Array) -> Any:
    (gradient,) = pullback(jax.nn.one_hot(i, size, dtype=jnp.float32))
    return fn(optax.tree.cast(gradient, jnp.float32))

  examples = jnp.arange(size)
  if chunk_size is None:
    return jax.vmap(row)(examples)
  return jax.lax.map(row, examples, batch_size=chunk_size)


def map_per_example_gradients(
  fn: Callable[[Any], Any],
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  *,
  chunk_size: int | None = None,
  per_example_gradients: PerExampleGradients = "auto",
) -> Any:
  """``fn(∇ℓ_i(w))`` for every example ``i``, stacked along a leading axis.

  ``fn`` receives one example's gradient with float32 leaves shaped like
  ``params``. ``chunk_size`` examples are vectorized at once (it must divide
  ``B``; None: all ``B``), so at most ``chunk_size`` gradients are held (and,
  for ``"jacobian"``, ``chunk_size`` backward passes of the whole batch).
  ``per_example_gradients`` chooses how ``∇ℓ_i`` is taken (see the module
  docstring): ``"batch_of_one"``, ``"jacobian"``, or ``"auto"`` (the latter
  for a ``loss_fn`` that declares :func:`couples_examples`).

  Returns:
    ``fn``'s outputs, each leaf with a leading axis of size ``B``.
  """
  method = resolve_per_example_gradients(
    per_example_gradients, loss_fn, "map_per_example_gradients"
  )
  if method == "jacobian":
    return _map_jacobian_rows(fn, loss_fn, params, batch, chunk_size)

  def example_loss(p: Any, example: Any) -> jax.Array:
    # micro_grad hands each example over with a leading axis of size 1.
    return loss_fn(p, example)[0].astype(jnp.float32)

  gradient_fn = optax.microbatching.micro_grad(
    example_loss,
    transform_fn=lambda gradient: (),
    metrics_fn=lambda gradient: fn(optax.tree.cast(gradient, jnp.float32)),
    microbatch_size=chunk_size,
  )
  _, outputs = gradient_fn(params, batch)
  return outputs.metrics


def check_chunk_size(chunk_size: Any, size: int, name: str) -> int | None:
  """``chunk_size`` as an int dividing the batch size ``size``, or None."""
  chunk_size = _contract.check_integer(
    chunk_size, "chunk_size", name, optional=True
  )
  if chunk_size is not None:
    _contract.check_divides(
      chunk_size, size, "chunk_size", "the batch size", name
    )
  return chunk_size
