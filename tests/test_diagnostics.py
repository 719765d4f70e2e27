"""sam_optax.diagnostics against dense linear algebra and direct numpy sums."""

import itertools

from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_optax import diagnostics

from _problems import flatten
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

SPECTRUM = (5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.0, -0.5, -2.0)
LEAF_SHAPES = {"kernel": (2, 3), "bias": (3,), "scale": ()}  # 6 + 3 + 1 = 10


def quadratic_loss(params, batch):
  """ℓ_i(w) = ½ (w−a_i)ᵀ H_i (w−a_i), with ``a_i``, ``H_i`` in the batch."""
  diff = flatten(params)[None, :] - batch["target"]
  return 0.5 * jnp.einsum("bi,bij,bj->b", diff, batch["hessian"], diff)


def known_hessian_problem(spectrum=SPECTRUM, seed=0, size=7, rotate=True):
  """Per-example quadratics sharing ``H_i = H = Q diag(spectrum) Qᵀ``.

  Over a three-leaf pytree (a matrix, a vector and a scalar); ``L``'s Hessian
  is ``H`` everywhere. Returns ``(params, data, quadratic_loss, H)``; ``H``
  travels in the data, so that every problem shares one compiled loss.
  """
  rng = np.random.default_rng(seed)
  dim = len(spectrum)
  assert dim == sum(int(np.prod(s)) for s in LEAF_SHAPES.values())
  rotation = (
    np.linalg.qr(rng.normal(size=(dim, dim)))[0] if rotate else np.eye(dim)
  )
  hessian = (rotation * np.asarray(spectrum)) @ rotation.T
  params = {
    name: jnp.asarray(rng.normal(size=shape), jnp.float32)
    for name, shape in LEAF_SHAPES.items()
  }
  data = {
    "target": jnp.asarray(rng.normal(size=(size, dim)), jnp.float32),
    "hessian": jnp.asarray(
      np.broadcast_to(hessian, (size, dim, dim)), jnp.float32
    ),
  }
  return params, data, quadratic_loss, hessian


@jax.jit
def _example_gradient(params, example):
  return flatten(jax.grad(lambda p: jnp.sum(mlp_loss(p, example)))(params))


def numpy_per_example_gradients(params, data):
  """``[N, d]`` for ``mlp_loss``: one ``jax.grad`` per example, in a loop."""
  size = jax.tree.leaves(data)[0].shape[0]
  return np.stack(
    [
      np.asarray(
        _example_gradient(params, jax.tree.map(lambda x: x[i : i + 1], data)),
        np.float64,
      )
      for i in range(size)
    ]
  )


class HessianTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(None, 3, 7)
  def test_hessian_vector_product_is_dense_product(self, chunk_size):
    params, data, loss_fn, hessian = known_hessian_problem()
    vector = jax.tree.map(lambda w: jnp.ones_like(w) * 0.5, params)
    vector["kernel"] = vector["kernel"].at[0, 1].set(-2.0)
    product = self.variant(
      lambda p, d, v: diagnostics.hessian_vector_product(
        loss_fn, p, d, v, chunk_size=chunk_size
      )
    )(params, data, vector)
    chex.assert_trees_all_equal_structs(product, params)
    np.testing.assert_allclose(
      flatten(product), hessian @ flatten(vector), rtol=1e-5, atol=1e-5
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_trace_within_its_standard_error(self):
    params, data, loss_fn, hessian = known_hessian_problem()
    num_probes = 400
    estimate = self.variant(
      lambda p, d, k: diagnostics.hessian_trace(
        loss_fn,
        p,
        d,
        k,
        num_probes=num_probes,
        chunk_size=3,
        probe_chunk_size=128,
      )
    )(params, data, jax.random.key(0))
    self.assertGreater(float(estimate.standard_error), 0.0)
    self.assertLessEqual(
      abs(float(estimate.mean) - np.trace(hessian)),
      3 * float(estimate.standard_error),
    )
    # The standard error matches Rademacher's variance 2 Σ_{i≠j} H_ij².
    off_diagonal = hessian - np.diag(np.diag(hessian))
    expected = np.sqrt(2 * np.sum(off_diagonal**2) / num_probes)
    self.assertBetween(
      float(estimate.standard_error), 0.8 * expected, 1.25 * expected
    )

  def test_trace_of_a_diagonal_hessian_is_exact(self):
    # Rademacher probes have zero variance on a diagonal matrix.
    params, data, loss_fn, hessian = known_hessian_problem(rotate=False)
    estimate = diagnostics.hessian_trace(
      loss_fn, params, data, jax.random.key(1), num_probes=4
    )
    np.testing.assert_allclose(estimate.mean, np.trace(hessian), atol=1e-5)
    np.testing.assert_allclose(estimate.standard_error, 0.0, atol=1e-5)

  def test_trace_independent_of_probe_chunking(self):
    params, data, loss_fn, _ = known_hessian_problem(seed=2)
    key = jax.random.key(3)
    estimates = [
      diagnostics.hessian_trace(
        loss_fn,
        params,
        data,
        key,
        num_probes=10,
        probe_chunk_size=probe_chunk_size,
        chunk_size=chunk_size,
      )
      for probe_chunk_size, chunk_size in ((None, None), (1, 2), (4, 3))
    ]
    for estimate in estimates[1:]:
      chex.assert_trees_all_close(estimate, estimates[0], rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(None, 4)
  def test_top_eigenpair_exact(self, chunk_size):
    params, data, loss_fn, hessian = known_hessian_problem()
    top = self.variant(
      lambda p, d, k: diagnostics.hessian_top_eigenpair(
        loss_fn, p, d, k, num_iterations=50, chunk_size=chunk_size
      )
    )(params, data, jax.random.key(0))
    # The largest algebraic eigenvalue (5), not the largest magnitude.
    self.assertAlmostEqual(float(top.value), max(SPECTRUM), delta=1e-4)
    vector = np.asarray(flatten(top.vector), np.float64)
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    np.testing.assert_allclose(hessian @ vector, top.value * vector, atol=1e-4)
    self.assertLess(float(top.residual_norm), 1e-4)

  def test_few_iterations_bounded_by_residual(self):
    rng = np.random.default_rng(4)
    dim = 10
    spectrum = np.sort(rng.uniform(-1.0, 2.0, size=dim))
    spectrum[-1] = 4.0
    params, data, loss_fn, _ = known_hessian_problem(tuple(spectrum), seed=4)
    top = diagnostics.hessian_top_eigenpair(
      loss_fn, params, data, jax.random.key(5), num_iterations=4
    )
    # A Ritz value never exceeds λ_max, and the residual bounds its error.
    self.assertLessEqual(float(top.value), 4.0 + 1e-5)
    self.assertLessEqual(
      4.0 - float(top.value), float(top.residual_norm) + 1e-5
    )
    self.assertGreater(float(top.residual_norm), 0.0)

  @hypothesis.given(
    spectrum=st.lists(
      st.sampled_from([-3.0, -1.0, 0.0, 0.5, 1.0, 2.5, 4.0]),
      min_size=10,
      max_size=10,
    ),
    seed=st.integers(0, 1000),
  )
  def test_top_eigenvalue_exact_with_repeated_eigenvalues(self, spectrum, seed):
    # Repeated eigenvalues exhaust the Krylov space early: no NaN, still exact.
    params, data, loss_fn, _ = known_hessian_problem(
      tuple(spectrum), seed=seed, size=3
    )
    top = diagnostics.hessian_top_eigenpair(
      loss_fn, params, data, jax.random.key(seed), num_iterations=10
    )
    self.assertAlmostEqual(float(top.value), max(spectrum), delta=1e-4)
    self.assertTrue(np.all(np.isfinite(flatten(top.vector))))

  def test_zero_hessian_gives_zero_not_nan(self):
    params = {"w": jnp.ones(3)}
    data = {"x": jnp.arange(12.0).reshape(4, 3)}
    loss_fn = lambda p, b: b["x"] @ p["w"]  # linear: H = 0
    top = diagnostics.hessian_top_eigenpair(
      loss_fn, params, data, jax.random.key(0)
    )
    self.assertEqual(float(top.value), 0.0)
    self.assertEqual(float(top.residual_norm), 0.0)
    trace = diagnostics.hessian_trace(
      loss_fn, params, data, jax.random.key(0), num_probes=2
    )
    self.assertEqual(float(trace.mean), 0.0)

  def test_bfloat16_parameters(self):
    params32 = mlp_params(jax.random.key(0))
    params16 = optax.tree.cast(params32, jnp.bfloat16)
    data = mlp_batch(jax.random.key(1), size=16)
    key = jax.random.key(2)
    top16 = diagnostics.hessian_top_eigenpair(
      mlp_loss, params16, data, key, num_iterations=10
    )
    top32 = diagnostics.hessian_top_eigenpair(
      mlp_loss, params32, data, key, num_iterations=10
    )
    self.assertEqual(top16.value.dtype, jnp.float32)
    np.testing.assert_allclose(top16.value, top32.value, rtol=5e-2)


class GradientNoiseTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(None, 5)
  def test_trace_matches_numpy(self, chunk_size):
    params = mlp_params(jax.random.key(0))
    data = mlp_batch(jax.random.key(1), size=12)
    per_example = numpy_per_example_gradients(params, data)
    mean = per_example.mean(axis=0)
    expected = np.mean(np.sum((per_example - mean) ** 2, axis=1))
    noise = self.variant(
      lambda p, d: diagnostics.gradient_noise(
        mlp_loss, p, d, chunk_size=chunk_size
      )
    )(params, data)
    np.testing.assert_allclose(noise.trace, expected, rtol=1e-5)
    np.testing.assert_allclose(
      flatten(noise.mean_gradient), mean, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
      noise.mean_gradient_sq_norm, mean @ mean, rtol=1e-5
    )
    np.testing.assert_allclose(
      flatten(
        diagnostics.mean_gradient(mlp_loss, params, data, chunk_size=chunk_size)
      ),
      mean,
      rtol=1e-5,
      atol=1e-7,
    )

  def test_chunked_equals_unchunked(self):
    params = mlp_params(jax.random.key(2))
    data = mlp_batch(jax.random.key(3), size=30)
    whole = diagnostics.gradient_noise(mlp_loss, params, data)
    for chunk_size in (7, 10):
      chex.assert_trees_all_close(
        diagnostics.gradient_noise(
          mlp_loss, params, data, chunk_size=chunk_size
        ),
        whole,
        rtol=1e-5,
        atol=1e-7,
      )

  def test_identical_examples_have_no_noise(self):
    params = mlp_params(jax.random.key(0))
    one = mlp_batch(jax.random.key(1), size=1)
    data = jax.tree.map(lambda x: jnp.repeat(x, 6, axis=0), one)
    noise = diagnostics.gradient_noise(mlp_loss, params, data, chunk_size=4)
    np.testing.assert_allclose(noise.trace, 0.0, atol=1e-10)
    sampled = diagnostics.sample_micro_batch_gradients(
      mlp_loss, params, data, 2, jax.random.key(2), num_samples=4
    )
    self.assertTrue(np.isfinite(sampled.noise_norm.mean))
    np.testing.assert_allclose(sampled.noise_norm.mean, 0.0, atol=1e-6)

  def test_bfloat16_parameters(self):
    params32 = mlp_params(jax.random.key(0))
    params16 = optax.tree.cast(params32, jnp.bfloat16)
    data = mlp_batch(jax.random.key(1), size=16)
    noise16 = diagnostics.gradient_noise(mlp_loss, params16, data, chunk_size=5)
    noise32 = diagnostics.gradient_noise(mlp_loss, params32, data)
    self.assertEqual(noise16.trace.dtype, jnp.float32)
    np.testing.assert_allclose(noise16.trace, noise32.trace, rtol=5e-2)


class MicroBatchTest(chex.TestCase):
  def setUp(self):
    super().setUp()
    self.params = mlp_params(jax.random.key(4))
    self.data = mlp_batch(jax.random.key(5), size=7)
    self.per_example = numpy_per_example_gradients(self.params, self.data)

  def test_exact_matches_enumeration_without_replacement(self):
    size = 7
    for m in range(1, size + 1):
      expected = np.mean(
        [
          np.sum(self.per_example[list(subset)].mean(axis=0) ** 2)
          for subset in itertools.combinations(range(size), m)
        ]
      )
      exact = diagnostics.micro_batch_gradient_sq_norm(
        mlp_loss, self.params, self.data, m, chunk_size=3
      )
      np.testing.assert_allclose(exact, expected, rtol=1e-5, err_msg=f"m={m}")

  def test_exact_matches_enumeration_with_replacement(self):
    data = jax.tree.map(lambda x: x[:5], self.data)
    per_example = self.per_example[:5]
    for m in (1, 2, 3):
      expected = np.mean(
        [
          np.sum(per_example[list(draw)].mean(axis=0) ** 2)
          for draw in itertools.product(range(5), repeat=m)
        ]
      )
      exact = diagnostics.micro_batch_gradient_sq_norm(
        mlp_loss, self.params, data, m, with_replacement=True
      )
      np.testing.assert_allclose(exact, expected, rtol=1e-5, err_msg=f"m={m}")

  @chex.variants(with_jit=True, without_jit=True)
  # chunk_size 150: 50 micro-batches at a time, 6 groups (a caller's jit
  # unrolls the loop over groups).
  @parameterized.parameters(None, 150)
  def test_sampled_agrees_with_enumeration(self, chunk_size):
    size, m = 7, 3
    subsets = list(itertools.combinations(range(size), m))
    means = np.stack([self.per_example[list(s)].mean(axis=0) for s in subsets])
    full = self.per_example.mean(axis=0)
    expected_sq = np.mean(np.sum(means**2, axis=1))
    expected_noise = np.mean(np.linalg.norm(means - full, axis=1))
    sampled = self.variant(
      lambda p, d, k: diagnostics.sample_micro_batch_gradients(
        mlp_loss, p, d, m, k, num_samples=300, chunk_size=chunk_size
      )
    )(self.params, self.data, jax.random.key(6))
    for estimate, expected in (
      (sampled.sq_norm, expected_sq),
      (sampled.noise_norm, expected_noise),
    ):
      self.assertGreater(float(estimate.standard_error), 0.0)
      self.assertLessEqual(
        abs(float(estimate.mean) - expected), 4 * float(estimate.standard_error)
      )

  def test_coefficient(self):
    self.assertEqual(diagnostics.micro_batch_coefficient(10, 10), 0.0)
    self.assertEqual(diagnostics.micro_batch_coefficient(1, 10), 1.0)
    self.assertAlmostEqual(diagnostics.micro_batch_coefficient(4, 10), 6 / 36)
    self.assertEqual(
      diagnostics.micro_batch_coefficient(4, 10, with_replacement=True), 0.25
    )


class ErrorTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.params = mlp_params(jax.random.key(0))
    self.data = mlp_batch(jax.random.key(1), size=8)
    self.key = jax.random.key(2)

  def test_mean_loss_is_rejected(self):
    mean_loss = lambda p, b: jnp.mean(mlp_loss(p, b))
    with self.assertRaisesRegex(ValueError, "per-example"):
      diagnostics.gradient_noise(mean_loss, self.params, self.data)
    with self.assertRaisesRegex(ValueError, "per-example"):
      diagnostics.hessian_trace(mean_loss, self.params, self.data, self.key)

  @parameterized.parameters(0, -1, 2.5, True)
  def test_bad_chunk_size(self, chunk_size):
    with self.assertRaisesRegex(ValueError, "chunk_size"):
      diagnostics.gradient_noise(
        mlp_loss, self.params, self.data, chunk_size=chunk_size
      )

  def test_bad_counts(self):
    with self.assertRaisesRegex(ValueError, "num_probes"):
      diagnostics.hessian_trace(
        mlp_loss, self.params, self.data, self.key, num_probes=1
      )
    with self.assertRaisesRegex(ValueError, "num_iterations"):
      diagnostics.hessian_top_eigenpair(
        mlp_loss, self.params, self.data, self.key, num_iterations=0
      )
    with self.assertRaisesRegex(ValueError, "num_samples"):
      diagnostics.sample_micro_batch_gradients(
        mlp_loss, self.params, self.data, 2, self.key, num_samples=1
      )

  @parameterized.parameters(0, 9)
  def test_bad_micro_batch_size(self, micro_batch_size):
    with self.assertRaisesRegex(ValueError, "micro_batch_size"):
      diagnostics.micro_batch_gradient_sq_norm(
        mlp_loss, self.params, self.data, micro_batch_size
      )
    with self.assertRaisesRegex(ValueError, "micro_batch_size"):
      diagnostics.sample_micro_batch_gradients(
        mlp_loss, self.params, self.data, micro_batch_size, self.key
      )

  def test_vector_structure(self):
    with self.assertRaisesRegex(ValueError, "structure"):
      diagnostics.hessian_vector_product(
        mlp_loss, self.params, self.data, {"w": jnp.ones(3)}
      )
