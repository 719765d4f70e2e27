"""The Rademacher probe: its distribution, its reproducibility, its edge cases.

``rademacher_like`` unpacks one draw of random bits into every leaf (32
signs a word, each leaf starting on a new word). These tests pin what a user of the probe relies on: entries
exactly ``±1``, each with probability 1/2, independent across entries,
across leaves and across the bits of a word, the same probe for the same key
(under ``jit`` and ``vmap`` too), and any leaf shapes. The keys are fixed, so
each statistical bound is a deterministic check; the bounds are five
standard deviations of the statistic under the claimed distribution.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_optax
from sam_optax import _per_example

SIGMAS = 5.0
WORD = 32


def _probe(key, tree):
  return _per_example.rademacher_like(key, tree)


def _flat(tree):
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return np.zeros((0,), np.float32)
  return np.concatenate([np.ravel(np.asarray(x)) for x in leaves])


@pytest.fixture(scope="module")
def large():
  """About 2^21 entries over leaves of several shapes, sizes not multiples
  of 32 included. Returns the tree, all its signs flattened, and the first
  leaf's (word-aligned: entry ``32 i + j`` is bit ``j`` of word ``i``)."""
  tree = {
    "a": jnp.zeros((1024, 1024)),
    "b": jnp.zeros((333, 777)),
    "c": jnp.zeros((4097,)),
    "d": jnp.zeros((3, 5, 7, 11)),
  }
  probe = _probe(jax.random.key(0), tree)
  return tree, _flat(probe), np.ravel(np.asarray(probe["a"]))


def _bound(samples):
  """Five standard deviations of the mean of ``samples`` products of
  independent fair signs (each ``±1``, variance 1)."""
  return SIGMAS / np.sqrt(samples)


def test_entries_are_exactly_plus_or_minus_one_in_float32(large):
  tree, flat, _ = large
  probe = _probe(jax.random.key(0), tree)
  for leaf, like in zip(jax.tree.leaves(probe), jax.tree.leaves(tree)):
    assert leaf.dtype == jnp.float32
    assert leaf.shape == like.shape
  assert np.all(np.abs(flat) == 1.0)


def test_each_sign_has_probability_one_half(large):
  _, flat, _ = large
  size = flat.size
  plus = int(np.sum(flat > 0))
  # Binomial(n, 1/2): mean n/2, standard deviation sqrt(n)/2.
  assert abs(plus - size / 2) <= SIGMAS * np.sqrt(size) / 2


def test_every_bit_position_is_fair(large):
  """Entry ``32 i + j`` comes from bit ``j`` of word ``i``: each of the 32
  positions is a fair coin (a chi-square over the positions, and each on its
  own)."""
  _, _, aligned = large
  words = aligned.reshape(-1, WORD)
  plus = np.sum(words > 0, axis=0)
  n = words.shape[0]
  assert np.all(np.abs(plus - n / 2) <= SIGMAS * np.sqrt(n) / 2)
  chi_square = float(np.sum((plus - n / 2) ** 2 / (n / 4)))
  # chi-square with 32 degrees of freedom: mean 32, sd 8.
  assert chi_square <= 32 + SIGMAS * 8


def test_neighbouring_entries_are_uncorrelated(large):
  _, flat, _ = large
  for lag in (1, 2, 31, WORD, 33, 64, 1000):
    correlation = float(np.mean(flat[:-lag] * flat[lag:]))
    assert abs(correlation) <= _bound(flat.size - lag), lag


def test_bits_of_one_word_are_uncorrelated(large):
  """Every pair of bit positions ``(j, k)`` of the same word, and the last
  bit of a word with the first of the next (a word boundary)."""
  _, _, aligned = large
  words = aligned.reshape(-1, WORD)
  n = words.shape[0]
  correlations = words.T @ words / n  # [32, 32]
  off_diagonal = correlations[~np.eye(WORD, dtype=bool)]
  assert np.max(np.abs(off_diagonal)) <= _bound(n)
  boundary = float(np.mean(words[:-1, -1] * words[1:, 0]))
  assert abs(boundary) <= _bound(n - 1)


def test_leaves_are_uncorrelated(large):
  tree, _, _ = large
  probe = _probe(jax.random.key(0), tree)
  a = np.ravel(np.asarray(probe["a"]))
  b = np.ravel(np.asarray(probe["b"]))
  c = np.ravel(np.asarray(probe["c"]))
  # The same positions of two leaves, and a leaf's start against another's.
  for x, y in ((a, b), (a, c), (b, c)):
    n = min(x.size, y.size)
    assert abs(float(np.mean(x[:n] * y[:n]))) <= _bound(n)


def test_three_entries_are_jointly_fair(large):
  """Triples of consecutive entries take each of their 8 sign patterns with
  probability 1/8 (pairwise correlations alone miss e.g. ``x_3 = x_1 x_2``)."""
  _, flat, _ = large
  n = flat.size // 3
  triples = (flat[: 3 * n].reshape(n, 3) > 0).astype(np.int64)
  pattern = triples @ np.asarray([4, 2, 1])
  counts = np.bincount(pattern, minlength=8)
  chi_square = float(np.sum((counts - n / 8) ** 2 / (n / 8)))
  assert chi_square <= 7 + SIGMAS * np.sqrt(14)  # 7 degrees of freedom


def test_the_same_key_gives_the_same_probe_under_jit_and_vmap():
  tree = {"w": jnp.zeros((5, 7)), "b": jnp.zeros(3)}
  key = jax.random.key(42)
  eager = _flat(_probe(key, tree))
  np.testing.assert_array_equal(_flat(_probe(key, tree)), eager)
  np.testing.assert_array_equal(_flat(jax.jit(_probe)(key, tree)), eager)
  keys = jax.random.split(key, 3)
  batched = jax.vmap(lambda k: _probe(k, tree))(keys)
  for i in range(3):
    one = jax.tree.map(lambda x, i=i: x[i], batched)
    np.testing.assert_array_equal(_flat(one), _flat(_probe(keys[i], tree)))


def test_the_probe_depends_on_the_leaves_shapes_only():
  """Not on their values or dtypes: the parameters and their gradient (as
  RW-SAM's calibration uses both) get the same probe."""
  key = jax.random.key(3)
  tree = {"w": jnp.ones((4, 9)), "b": jnp.arange(3.0)}
  other = {"w": jnp.zeros((4, 9), jnp.bfloat16), "b": jnp.zeros(3)}
  np.testing.assert_array_equal(
    _flat(_probe(key, tree)), _flat(_probe(key, other))
  )
  assert all(
    x.dtype == jnp.float32 for x in jax.tree.leaves(_probe(key, other))
  )


def test_different_keys_give_different_probes():
  tree = {"w": jnp.zeros((64, 64))}
  a = _flat(_probe(jax.random.key(0), tree))
  b = _flat(_probe(jax.random.key(1), tree))
  assert abs(float(np.mean(a * b))) <= _bound(a.size)
  # A key folded with the step, as RW-SAM's docs advise.
  c = _flat(_probe(jax.random.fold_in(jax.random.key(0), 1), tree))
  assert abs(float(np.mean(a * c))) <= _bound(a.size)


@pytest.mark.parametrize(
  "shapes",
  [
    [()],
    [(0,)],
    [(1,)],
    [(0, 5), (3,)],
    [(31,), (1,), (33,)],
    [(7,), (), (2, 3, 5)],
  ],
  ids=["scalar", "empty", "one", "empty_and_odd", "around_a_word", "mixed"],
)
def test_any_leaf_shapes(shapes):
  tree = [jnp.zeros(shape) for shape in shapes]
  probe = _probe(jax.random.key(0), tree)
  assert jax.tree.structure(probe) == jax.tree.structure(tree)
  for leaf, shape in zip(probe, shapes):
    assert leaf.shape == shape and leaf.dtype == jnp.float32
    assert np.all(np.abs(np.asarray(leaf)) == 1.0)
  np.testing.assert_array_equal(
    _flat(jax.jit(_probe)(jax.random.key(0), tree)), _flat(probe)
  )


def test_many_leaves():
  """128 leaves of one entry each (and one of 1000): each leaf its own word,
  the signs fair and not all equal."""
  tree = [jnp.zeros(()) for _ in range(128)] + [jnp.zeros(1000)]
  probe = _probe(jax.random.key(0), tree)
  assert jax.tree.structure(probe) == jax.tree.structure(tree)
  assert [x.shape for x in probe] == [x.shape for x in tree]
  signs = _flat(probe[:-1])
  assert np.all(np.abs(signs) == 1.0)
  assert abs(float(np.mean(signs))) <= _bound(signs.size)


def test_the_probe_is_the_documented_unpacking_of_one_draw():
  """Entry ``32 i + j`` of a leaf is bit ``j`` of its word ``i``, the leaves
  taking consecutive words of ``jax.random.bits(key)`` in leaf order: the
  values of 0.2.0, whatever the unpacking compiles to."""
  tree = {"a": jnp.zeros((5, 7)), "b": jnp.zeros(()), "c": jnp.zeros(65)}
  key = jax.random.key(3)
  sizes = [x.size for x in jax.tree.leaves(tree)]
  counts = [-(-n // WORD) for n in sizes]
  words = np.asarray(jax.random.bits(key, (sum(counts),), jnp.uint32))
  bits = (words[:, None] >> np.arange(WORD, dtype=np.uint32)) & 1
  starts = np.cumsum([0, *counts])
  expected = [
    1.0 - 2.0 * bits[start : start + count].reshape(-1)[:size]
    for start, count, size in zip(starts, counts, sizes)
  ]
  probe = jax.tree.leaves(_probe(key, tree))
  for leaf, want, like in zip(probe, expected, jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.ravel(np.asarray(leaf)), want)
    assert leaf.shape == like.shape


def _shifted(tree, key):
  """``w + σv``: the probe as RW-SAM's probe pass uses it."""
  probe = _probe(key, tree)
  return jax.tree.map(lambda w, v: w + 1e-4 * v, tree, probe)


def _distinct_fusions(hlo_text):
  """The fused computations of an optimized HLO module, as many as differ
  once names and metadata are dropped: XLA:CPU compiles one kernel for each
  (identical fusions share one)."""
  bodies = set()
  for body in re.findall(
    r"^%?fused_computation\S* \([^\n]*\{\n(.*?)^\}", hlo_text, re.S | re.M
  ):
    body = re.sub(r", metadata=\{[^}]*\}", "", body)
    bodies.add(re.sub(r"%[\w.\-]+", "%", body))
  return len(bodies)


@pytest.mark.parametrize(
  "large", [False, True], ids=["small_leaves", "large_leaves"]
)
def test_leaves_of_one_shape_share_their_compiled_kernels(large):
  """``w + σv`` over ``2n`` leaves of two shapes compiles to a number of
  distinct kernels that does not grow with ``n``: no leaf's probe has a
  kernel of its own (with a slice of the draw per leaf, each had one, about
  20 ms of compile time each on a CPU: RW-SAM's compile time grew with the
  number of leaves, where SAM's does not). Small leaves are hashed in
  groups of near-equal sizes (at most two a shape), and so are leaves over
  ``WORDS_PER_KERNEL`` words (in larger groups, each hashed once)."""

  def kernels(n):
    tree = [jnp.zeros((64, 48))] * n + [jnp.zeros(48)] * n
    if large:  # n leaves of one word over the bound
      tree += [jnp.zeros((_per_example.WORDS_PER_KERNEL + 1) * WORD)] * n
    compiled = jax.jit(_shifted).lower(tree, jax.random.key(0)).compile()
    return _distinct_fusions(compiled.as_text())

  counts = [kernels(n) for n in (8, 16, 32)]
  assert max(counts) <= min(counts) + 2, counts


_EVERY_KIND_OF_KEY = pytest.mark.parametrize(
  "make_key",
  [
    lambda: jax.random.key(11),
    lambda: jax.random.PRNGKey(11),
    lambda: jax.random.key(11, impl="rbg"),
  ],
  ids=["threefry", "legacy_uint32", "rbg"],
)


@_EVERY_KIND_OF_KEY
def test_the_draw_is_jax_random_bits(make_key):
  """The probe's words are ``jax.random.bits``' (the fused Threefry for
  Threefry keys, ``jax.random.bits`` itself for other generators), under
  ``jit`` and ``vmap`` too."""
  key = make_key()
  for count in (1, 33, 4099):
    want = np.asarray(jax.random.bits(key, (count,), jnp.uint32))
    draw = jax.jit(_per_example._random_words, static_argnums=1)
    np.testing.assert_array_equal(np.asarray(draw(key, count)), want)
  keys = jax.random.split(key, 3)
  batched = jax.vmap(lambda k: _per_example._random_words(k, 65))(keys)
  # (rbg's batched draw is not its per-key draw: compared batched to batched.)
  want = jax.vmap(lambda k: jax.random.bits(k, (65,), jnp.uint32))(keys)
  np.testing.assert_array_equal(np.asarray(batched), np.asarray(want))


@_EVERY_KIND_OF_KEY
@pytest.mark.parametrize("num", [1, 3])
def test_split_key_is_jax_random_split(make_key, num):
  """RW-SAM's probe keys are ``jax.random.split``'s (the fused Threefry for
  Threefry keys), with and without ``jit``, of the same key type."""
  key = make_key()
  want = jax.random.split(key, num)
  for split in (
    _per_example.split_key,
    jax.jit(_per_example.split_key, static_argnums=1),
  ):
    got = split(key, num)
    assert got.dtype == want.dtype and got.shape == want.shape
    unwrap = (
      jax.random.key_data
      if jnp.issubdtype(want.dtype, jax.dtypes.prng_key)
      else np.asarray
    )
    np.testing.assert_array_equal(
      np.asarray(unwrap(got)), np.asarray(unwrap(want))
    )


def test_the_compiled_probe_has_no_loop():
  """The Threefry rounds are elementwise operations XLA fuses into one pass
  over the counters, not the ``while`` loop of ``jax.random.bits`` on a
  CPU (about twice the time)."""
  tree = {"w": jnp.zeros((64, 48)), "b": jnp.zeros(48)}
  text = jax.jit(_probe).lower(jax.random.key(0), tree).compile().as_text()
  assert " while(" not in text


def test_the_compiled_norm_estimates_have_no_loop():
  """Nor do RW-SAM's norm estimates: their probe keys come from
  :func:`split_key`, where ``jax.random.split`` compiles to a ``while``
  loop and ten small kernels, ready at the step's start, that sent RW-SAM's
  step to XLA's thread pool."""
  tree = {"w": jnp.ones((8, 3)), "b": jnp.zeros(3)}
  batch = jnp.ones((4, 8))

  def loss_fn(params, x):
    return jnp.sum(jnp.tanh(x @ params["w"] + params["b"]), axis=-1)

  def estimate(key):
    return sam_optax.finite_difference_gradient_norms(loss_fn, tree, batch, key)

  text = jax.jit(estimate).lower(jax.random.key(0)).compile().as_text()
  assert " while(" not in text


def test_an_empty_tree_and_python_scalars():
  assert _probe(jax.random.key(0), {}) == {}
  probe = _probe(jax.random.key(0), {"x": 1.0, "y": None})
  assert probe["y"] is None
  assert probe["x"].shape == () and abs(float(probe["x"])) == 1.0


def test_legacy_uint32_keys():
  tree = {"w": jnp.zeros((3, 3))}
  probe = _probe(jax.random.PRNGKey(0), tree)
  assert np.all(np.abs(np.asarray(probe["w"])) == 1.0)


def _threads_per_loop(hlo_text):
  """How many parts XLA:CPU splits each of a module's loop fusions into
  (its thread pool runs the parts), from the ``outer_dimension_partitions``
  of their backend configs; a fusion without one runs on one thread."""
  parts = []
  for line in hlo_text.splitlines():
    if " fusion(" in line and "kind=kLoop" in line:
      found = re.search(r'"outer_dimension_partitions":\["(\d+)"', line)
      parts.append(int(found.group(1)) if found else 1)
  return parts


def test_small_leaves_probe_kernels_stay_on_one_thread():
  """XLA:CPU's cost model rates a kernel by everything fused into it; a
  leaf's probe kernel hashes only its own words (at most
  ``WORDS_PER_KERNEL`` for a small leaf), so none is split across the
  thread pool, as none of SAM's elementwise passes is on such a model.
  When each leaf's kernel carried the whole draw's rounds, every one was
  split, and RW-SAM's step on a 2 ms MLP ran on the pool (1.29× SAM's step
  on 2 CPU cores, against 1.20–1.24×; BENCHMARKS.md). The control: a leaf
  of 64 k entries (2048 words) is split, so the check reads the
  partitions."""

  def parts(tree):
    compiled = jax.jit(_shifted).lower(tree, jax.random.key(0)).compile()
    return _threads_per_loop(compiled.as_text())

  small = [jnp.zeros((128, 128)), jnp.zeros(128)] * 8 + [jnp.zeros((128, 10))]
  assert max(parts(small)) == 1, parts(small)
  assert max(parts([jnp.zeros((256, 256))])) > 1
