"""m-SAM: every formulation against the sequential reference and the theory."""

from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax

from _problems import flatten
from _problems import mean_loss
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

RHO = 0.1
BATCH = 8
DELTA = 1e-12


def _setup(seed=0, size=BATCH):
  return (
    mlp_params(jax.random.key(seed)),
    mlp_batch(jax.random.key(seed + 1), size=size),
  )


def _update(tx, params, batch, loss_fn=mlp_loss, updates=None):
  return tx.update(
    updates, tx.init(params), params, loss_fn=loss_fn, batch=batch
  )[0]


def _written_out(params, batch, micro_batch_size, normalize=True):
  """m-SAM from the formula, with jax.grad and contiguous slices."""
  grad = lambda p, b: jax.grad(mean_loss, argnums=1)(mlp_loss, p, b)
  count = batch["y"].shape[0] // micro_batch_size
  total = jax.tree.map(jnp.zeros_like, params)
  for j in range(count):
    micro = jax.tree.map(
      lambda x: x[j * micro_batch_size : (j + 1) * micro_batch_size], batch
    )
    g = grad(params, micro)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    scale = RHO / (norm + DELTA) if normalize else RHO
    perturbed = jax.tree.map(lambda w, x: w + scale * x, params, g)
    total = jax.tree.map(jnp.add, total, grad(perturbed, micro))
  return jax.tree.map(lambda x: x / count, total)


# (implementation, micro_batches_per_chunk); None = all micro-batches at once.
FORMULATIONS = [
  ("vmap", None),
  ("unrolled", None),
  ("auto", None),
  ("vmap", 1),
  ("vmap", 2),
  ("unrolled", 2),
]


class MSamTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(1, 4)
  def test_reference_is_the_formula(self, micro_batch_size):
    params, batch = _setup(seed=micro_batch_size)
    for normalize in (True, False):
      tx = sam_optax.reference.m_sam(RHO, micro_batch_size, normalize=normalize)
      actual = self.variant(lambda p, b: _update(tx, p, b))(params, batch)
      chex.assert_trees_all_close(
        actual,
        _written_out(params, batch, micro_batch_size, normalize),
        rtol=1e-5,
        atol=1e-6,
      )

  def _check_formulations(self, micro_batch_size, jit, formulations):
    params, batch = _setup(seed=10 + micro_batch_size)
    expected = _update(
      sam_optax.reference.m_sam(RHO, micro_batch_size), params, batch
    )
    count = BATCH // micro_batch_size
    for implementation, per_chunk in formulations:
      if per_chunk is not None and count % per_chunk:
        continue
      tx = sam_optax.m_sam(
        RHO,
        micro_batch_size,
        implementation=implementation,
        micro_batches_per_chunk=per_chunk,
      )
      step = lambda p, b, tx=tx: _update(tx, p, b)
      actual = (jax.jit(step) if jit else step)(params, batch)
      chex.assert_trees_all_close(actual, expected, rtol=1e-5, atol=1e-6)
      chex.assert_trees_all_equal_structs(actual, params)

  @parameterized.parameters(1, 2, 8)
  def test_every_formulation_matches_the_reference_under_jit(
    self, micro_batch_size
  ):
    self._check_formulations(
      micro_batch_size, jit=True, formulations=FORMULATIONS
    )

  def test_every_formulation_matches_the_reference_without_jit(self):
    self._check_formulations(
      2,
      jit=False,
      formulations=[("vmap", None), ("unrolled", None), ("vmap", 2)],
    )

  @chex.variants(with_jit=True, without_jit=True)
  def test_whole_batch_is_sam_and_usam(self):
    params, batch = _setup(seed=20)
    for normalize, same in ((True, sam_optax.sam), (False, sam_optax.usam)):
      for implementation in ("vmap", "unrolled"):
        tx = sam_optax.m_sam(
          RHO, BATCH, normalize=normalize, implementation=implementation
        )
        actual = self.variant(lambda p, b, tx=tx: _update(tx, p, b))(
          params, batch
        )
        chex.assert_trees_all_close(
          actual, _update(same(RHO), params, batch), rtol=1e-5, atol=1e-6
        )

  @chex.variants(with_jit=True, without_jit=True)
  def test_chunked_equals_unchunked(self):
    params, batch = _setup(seed=30, size=16)
    whole = _update(sam_optax.m_sam(RHO, 2), params, batch)  # 8 micro-batches
    for per_chunk in (1, 2, 4, 8):
      tx = sam_optax.m_sam(RHO, 2, micro_batches_per_chunk=per_chunk)
      actual = self.variant(lambda p, b, tx=tx: _update(tx, p, b))(
        params, batch
      )
      chex.assert_trees_all_close(actual, whole, rtol=1e-5, atol=1e-6)

  def test_micro_batches_are_contiguous(self):
    # Swapping two examples within a micro-batch changes nothing; swapping
    # two examples of different micro-batches changes the result.
    params, batch = _setup(seed=40)
    tx = sam_optax.m_sam(RHO, 4, micro_batches_per_chunk=1)
    step = jax.jit(lambda b: _update(tx, params, b))
    original = flatten(step(batch))
    within = jax.tree.map(
      lambda x: x[jnp.array([1, 0, 2, 3, 4, 5, 6, 7])], batch
    )
    across = jax.tree.map(
      lambda x: x[jnp.array([4, 1, 2, 3, 0, 5, 6, 7])], batch
    )
    np.testing.assert_allclose(
      flatten(step(within)), original, rtol=1e-5, atol=1e-6
    )
    self.assertGreater(
      float(jnp.abs(flatten(step(across)) - original).max()), 1e-4
    )

  def test_m_usam_on_quadratics_is_g_plus_rho_h_g(self):
    # ℓ_i = ½ (w−a_i)ᵀ H_i (w−a_i): one USAM step on B_j returns
    # g_j + ρ H_j g_j (H_j, g_j: micro-batch j's mean Hessian and gradient),
    # so m-USAM returns the average of g_j + ρ H_j g_j over micro-batches.
    size, micro_batch_size, dim = 12, 3, 4
    rng = np.random.default_rng(3)
    roots = rng.normal(size=(size, dim, dim))
    hessians = roots @ roots.transpose(0, 2, 1) / dim + 0.1 * np.eye(dim)
    targets = rng.normal(size=(size, dim))
    w = rng.normal(size=dim)
    batch = {
      "hessian": jnp.asarray(hessians, jnp.float32),
      "target": jnp.asarray(targets, jnp.float32),
    }
    params = {"w": jnp.asarray(w, jnp.float32)}

    def loss_fn(p, b):
      diff = p["w"][None, :] - b["target"]
      return 0.5 * jnp.einsum("bi,bij,bj->b", diff, b["hessian"], diff)

    def usam_step(indices):
      h = hessians[indices].mean(axis=0)
      g = np.einsum("bij,bj->i", hessians[indices], w - targets[indices])
      g /= len(indices)
      return g + RHO * h @ g

    count = size // micro_batch_size
    expected = (
      sum(
        usam_step(np.arange(j * micro_batch_size, (j + 1) * micro_batch_size))
        for j in range(count)
      )
      / count
    )
    for implementation in ("vmap", "unrolled"):
      tx = sam_optax.m_sam(
        RHO, micro_batch_size, normalize=False, implementation=implementation
      )
      actual = jax.jit(lambda p, b, tx=tx: _update(tx, p, b, loss_fn))(
        params, batch
      )
      np.testing.assert_allclose(actual["w"], expected, rtol=1e-5, atol=1e-5)
    # It differs from mini-batch USAM, g + ρ H g on the whole batch.
    usam = _update(sam_optax.usam(RHO), params, batch, loss_fn)["w"]
    np.testing.assert_allclose(
      usam, usam_step(np.arange(size)), rtol=1e-5, atol=1e-5
    )
    self.assertGreater(float(np.abs(usam - expected).max()), 1e-3)

  def test_in_chain_and_updates_ignored(self):
    params, batch = _setup(seed=50)
    learning_rate = 0.3
    tx = optax.chain(sam_optax.m_sam(RHO, 2), optax.sgd(learning_rate))
    clean = jax.grad(mean_loss, argnums=1)(mlp_loss, params, batch)
    with_clean = _update(tx, params, batch, updates=clean)
    without = _update(tx, params, batch, updates=None)
    chex.assert_trees_all_close(with_clean, without, rtol=1e-6, atol=1e-7)
    expected = jax.tree.map(
      lambda g: -learning_rate * g, _written_out(params, batch, 2)
    )
    chex.assert_trees_all_close(with_clean, expected, rtol=1e-5, atol=1e-6)

  def test_bfloat16_params(self):
    params, batch = _setup(seed=60)
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    expected = flatten(_written_out(params, batch, 2))
    for implementation in ("vmap", "unrolled"):
      tx = sam_optax.m_sam(RHO, 2, implementation=implementation)
      updates = jax.jit(lambda p, tx=tx: _update(tx, p, batch))(low)
      for leaf in jax.tree.leaves(updates):
        self.assertEqual(leaf.dtype, jnp.bfloat16)
      # bfloat16 keeps about 3 significant digits.
      np.testing.assert_allclose(
        np.asarray(flatten(updates), np.float32), expected, rtol=0.05, atol=0.05
      )

  def test_zero_gradient_gives_no_nan(self):
    params, batch = _setup(seed=70)
    zero_loss = lambda p, b: 0.0 * mlp_loss(p, b)
    for implementation in ("vmap", "unrolled"):
      tx = sam_optax.m_sam(RHO, 2, implementation=implementation)
      # Jitted: one compile, not one per primitive (the eager path's zero
      # gradient is tests/test_input_checks.py's, for every variant).
      updates = jax.jit(lambda p, b, tx=tx: _update(tx, p, b, zero_loss))(
        params, batch
      )
      np.testing.assert_array_equal(flatten(updates), 0.0)

  def test_rho_schedule_with_inject_hyperparams(self):
    params, batch = _setup(seed=85)
    make = optax.inject_hyperparams(
      sam_optax.m_sam, static_args=("micro_batch_size",)
    )
    tx = make(rho=optax.linear_schedule(RHO, 0.0, 1), micro_batch_size=2)
    step = jax.jit(
      lambda s: tx.update(None, s, params, loss_fn=mlp_loss, batch=batch)
    )
    first, state = step(tx.init(params))  # ρ = RHO
    second, _ = step(state)  # ρ = 0: the plain gradient
    chex.assert_trees_all_close(
      first, _written_out(params, batch, 2), rtol=1e-5, atol=1e-6
    )
    chex.assert_trees_all_close(
      second,
      jax.grad(mean_loss, argnums=1)(mlp_loss, params, batch),
      rtol=1e-5,
      atol=1e-6,
    )
    with self.assertRaisesRegex(ValueError, "static_args"):
      optax.inject_hyperparams(sam_optax.m_sam)(
        rho=RHO, micro_batch_size=2
      ).init(params)

  def test_errors(self):
    params, batch = _setup(seed=80)
    with self.assertRaisesRegex(ValueError, "must divide the batch size 8"):
      _update(sam_optax.m_sam(RHO, 3), params, batch)
    with self.assertRaisesRegex(ValueError, "must divide the number of micro"):
      _update(sam_optax.m_sam(RHO, 2, micro_batches_per_chunk=3), params, batch)
    with self.assertRaisesRegex(ValueError, "positive int"):
      sam_optax.m_sam(RHO, 0)
    with self.assertRaisesRegex(ValueError, "positive int"):
      sam_optax.m_sam(RHO, 2.0)
    with self.assertRaisesRegex(ValueError, "implementation"):
      sam_optax.m_sam(RHO, 2, implementation="pmap")
    with self.assertRaisesRegex(ValueError, "rho"):
      sam_optax.m_sam(-1.0, 2)
    with self.assertRaisesRegex(ValueError, "per-example"):
      _update(
        sam_optax.m_sam(RHO, 2),
        params,
        batch,
        lambda p, b: jnp.mean(mlp_loss(p, b)),
      )
    with self.assertRaisesRegex(TypeError, "loss_fn"):
      sam_optax.m_sam(RHO, 2).update(
        None, optax.EmptyState(), params, batch=batch
      )


@hypothesis.given(
  log_size=st.integers(0, 3),
  log_m=st.integers(0, 3),
  implementation=st.sampled_from(["vmap", "unrolled"]),
  normalize=st.booleans(),
  seed=st.integers(0, 1000),
)
@hypothesis.settings(max_examples=5)
def test_random_shapes_match_the_reference(
  log_size, log_m, implementation, normalize, seed
):
  size, micro_batch_size = 2**log_size, 2 ** min(log_m, log_size)
  params = mlp_params(jax.random.key(seed), in_dim=3, hidden=4, out_dim=2)
  batch = mlp_batch(jax.random.key(seed + 1), size=size, in_dim=3, out_dim=2)
  tx = sam_optax.m_sam(
    RHO, micro_batch_size, normalize=normalize, implementation=implementation
  )
  reference = sam_optax.reference.m_sam(
    RHO, micro_batch_size, normalize=normalize
  )
  np.testing.assert_allclose(
    flatten(jax.jit(lambda p, b: _update(tx, p, b))(params, batch)),
    flatten(_update(reference, params, batch)),
    rtol=1e-5,
    atol=1e-6,
  )
