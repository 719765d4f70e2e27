"""m-SAM's forms and the cost model behind implementation="auto"."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import _m_sam as m_sam_module
from sam_optax import _micro_batches

from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

RHO = 0.1
MIB = 2**20


def _work(**overrides):
  """A CPU workload of 8 micro-batches of a 16-leaf dense model whose
  activations outweigh its weights (weight fraction 0.16)."""
  fields = dict(
    backend="cpu",
    micro_batches=8,
    param_bytes=4 * MIB,
    param_leaves=16,
    activation_bytes=32 * MIB,
    has_convolutions=False,
  )
  fields.update(overrides)
  return _micro_batches.Workload(**fields)


def _plan(**overrides):
  return _micro_batches.choose(_work(**overrides))


class ChoiceTest(parameterized.TestCase):
  """The decision function on synthetic workloads."""

  def test_cpu_few_leaves_unrolls(self):
    # The small CNN (10 leaves, 8 micro-batches): unrolled, 0.72x SAM.
    self.assertEqual(_plan(), ("unrolled", None))
    self.assertEqual(_plan(has_convolutions=True, param_leaves=10).implementation,
                     "unrolled")  # fmt: skip

  def test_cpu_weights_outweighing_activations_loop_in_graph(self):
    # Deep MLPs (weight fraction 0.9): the unrolled form's k live weight
    # copies cost more than a lax.scan reusing one copy's buffers.
    weighty = dict(param_bytes=4 * MIB, activation_bytes=MIB // 2)
    self.assertGreater(_work(**weighty).weight_fraction, 0.9)
    self.assertEqual(_plan(**weighty).implementation, "sequential")
    # ... but not with convolutions in the loop body (XLA:CPU's slow path).
    self.assertEqual(
      _plan(has_convolutions=True, param_leaves=10, **weighty).implementation,
      "unrolled",
    )
    # Transformer LMs (weight fraction 0.05): unrolled.
    self.assertEqual(
      _plan(activation_bytes=100 * MIB).implementation, "unrolled"
    )

  def test_cpu_many_leaves_without_convolutions_loops_in_graph(self):
    # 64-layer MLP: 128 leaves x 8 micro-batches exceeds the unrolled
    # compile budget; a lax.scan costs one subgraph and no vmap penalty.
    limit = _micro_batches.MAX_UNROLLED_LEAVES
    self.assertEqual(_plan(param_leaves=limit // 8).implementation, "unrolled")
    self.assertEqual(
      _plan(param_leaves=limit // 8 + 1).implementation, "sequential"
    )
    self.assertEqual(_plan(micro_batches=64).implementation, "sequential")

  def test_cpu_many_leaves_with_convolutions_vmaps(self):
    # Convolutions in a lax loop body are XLA:CPU's slow path (11x SAM).
    for overrides in (dict(param_leaves=128), dict(micro_batches=64)):
      self.assertEqual(
        _plan(has_convolutions=True, **overrides).implementation, "vmap"
      )

  def test_sharded_batch_takes_vmap(self):
    self.assertEqual(_plan(sharded=True), ("vmap", None))
    self.assertEqual(
      _plan(sharded=True, param_leaves=1000, backend="gpu"), ("vmap", None)
    )

  @parameterized.parameters("gpu", "tpu")
  def test_accelerator_vmaps_while_it_fits(self, backend):
    self.assertEqual(_plan(backend=backend), ("vmap", None))
    self.assertEqual(_plan(backend=backend, memory_bytes=2**40), ("vmap", None))

  def test_accelerator_chunks_when_vmap_does_not_fit(self):
    work = _work(backend="gpu")
    per_micro_batch = work.micro_batch_bytes
    # Room for 4 of the 8 micro-batches (in MEMORY_FRACTION of the device).
    memory = int(4.5 * per_micro_batch / _micro_batches.MEMORY_FRACTION)
    self.assertEqual(_plan(backend="gpu", memory_bytes=memory), ("vmap", 4))
    # Room for 2: chunks of 2.
    memory = int(2.5 * per_micro_batch / _micro_batches.MEMORY_FRACTION)
    self.assertEqual(_plan(backend="gpu", memory_bytes=memory), ("vmap", 2))
    # Room for one at a time only: the sequential form.
    memory = int(1.5 * per_micro_batch / _micro_batches.MEMORY_FRACTION)
    self.assertEqual(
      _plan(backend="gpu", memory_bytes=memory), ("sequential", None)
    )

  def test_estimates_cover_the_applicable_forms(self):
    names = set(_micro_batches.estimates(_work()))
    self.assertEqual(names, {"vmap", "unrolled", "sequential"})
    names = set(_micro_batches.estimates(_work(sharded=True)))
    self.assertEqual(names, {"vmap"})

  def test_a_new_form_is_one_entry(self):
    cheap = _micro_batches.Form(
      "free", lambda w: _micro_batches.Estimate(_micro_batches.Plan("vmap", 1), 0.0)
    )  # fmt: skip
    saved = list(_micro_batches.FORMS)
    try:
      _micro_batches.FORMS.append(cheap)
      self.assertEqual(_plan(), ("vmap", 1))
      self.assertIn("free", _micro_batches.estimates(_work()))
    finally:
      _micro_batches.FORMS[:] = saved
    self.assertEqual(_plan(), ("unrolled", None))


class WorkloadTest(chex.TestCase):
  """What the cost model reads off the loss, the parameters and the batch."""

  def test_dense_loss_profile(self):
    params = mlp_params(jax.random.key(0))
    micro = mlp_batch(jax.random.key(1), size=2)
    profile = _micro_batches.loss_profile(mlp_loss, params, micro)
    self.assertFalse(profile.has_convolutions)
    # At least the two matmul outputs, the bias adds and tanh: [2, 7] and
    # [2, 3] floats each; the cross-entropy adds a few [2, 3] and [2] arrays.
    self.assertGreaterEqual(profile.activation_bytes, 4 * (3 * 14 + 2 * 6))
    self.assertLess(profile.activation_bytes, 4 * 400)

  def test_convolution_found_inside_nested_calls(self):
    kernel = {"w": jnp.ones((3, 3, 1, 2))}
    batch = {"x": jnp.ones((2, 8, 8, 1))}

    @jax.jit  # nested: a pjit equation around the convolution
    def features(w, x):
      return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )

    def loss(p, b):
      return jnp.mean(features(p["w"], b["x"]) ** 2, axis=(1, 2, 3))

    profile = _micro_batches.loss_profile(loss, kernel, batch)
    self.assertTrue(profile.has_convolutions)
    self.assertGreaterEqual(profile.activation_bytes, 4 * 2 * 8 * 8 * 2)

  def test_scan_body_counts_its_length(self):
    params = {"w": jnp.ones((4, 4))}
    batch = {"x": jnp.ones((2, 4))}

    def loss(p, b, length):
      def body(x, _):
        return jnp.tanh(x @ p["w"]), None

      return jnp.sum(jax.lax.scan(body, b["x"], length=length)[0], axis=1)

    one = _micro_batches.loss_profile(lambda p, b: loss(p, b, 1), params, batch)
    ten = _micro_batches.loss_profile(
      lambda p, b: loss(p, b, 10), params, batch
    )
    self.assertGreater(ten.activation_bytes, 5 * one.activation_bytes)

  def test_profile_with_prng_keys(self):
    # Flax losses carry PRNG keys (dropout): extended dtypes are counted
    # by their size, not rejected.
    params = {"w": jnp.ones((3, 3))}
    batch = {"x": jnp.ones((2, 3)), "key": jax.random.split(jax.random.key(0))}

    def loss(p, b):
      noise = jax.random.uniform(b["key"][0], (3,))
      return jnp.tanh(b["x"] @ p["w"] + noise).sum(-1)

    profile = _micro_batches.loss_profile(loss, params, batch)
    self.assertGreater(profile.activation_bytes, 0)

  def test_workload_counts_parameters_and_micro_batches(self):
    params = mlp_params(jax.random.key(0))
    batch = mlp_batch(jax.random.key(1), size=8)
    micro_batches = _micro_batches.split_micro_batches(batch, 2, "test")
    work = _micro_batches.workload(params, micro_batches, mlp_loss)
    self.assertEqual(work.micro_batches, 4)
    self.assertEqual(work.param_leaves, 4)
    self.assertEqual(work.param_bytes, 4 * (5 * 7 + 7 + 7 * 3 + 3))
    self.assertEqual(work.backend, jax.default_backend())
    self.assertFalse(work.sharded)
    self.assertGreater(work.activation_bytes, 0)
    # Without a loss the activations are unknown, the rest is the same.
    bare = _micro_batches.workload(params, micro_batches)
    self.assertEqual(bare.activation_bytes, 0)
    self.assertEqual(bare.param_bytes, work.param_bytes)

  def test_resolve_keeps_an_explicit_form(self):
    params = mlp_params(jax.random.key(0))
    many = {"x": jnp.zeros((64, 2, 5)), "y": jnp.zeros((64, 2), jnp.int32)}
    for form in ("vmap", "unrolled", "sequential"):
      self.assertEqual(
        _micro_batches.resolve_implementation(form, params, many, mlp_loss),
        (form, None),
      )


# (implementation, micro_batches_per_chunk)
FORMS = [
  ("vmap", None),
  ("unrolled", None),
  ("sequential", None),
  ("auto", None),
  ("vmap", 2),
  ("unrolled", 2),
  ("sequential", 2),
  ("auto", 2),
]
MASK = {
  "hidden": {"kernel": True, "bias": False},
  "out": {"kernel": True, "bias": False},
}


def _check(test, form, normalize, masked):
  """m-SAM in ``form`` against the reference, under ``test.variant``."""
  implementation, per_chunk = form
  params = mlp_params(jax.random.key(3))
  batch = mlp_batch(jax.random.key(4), size=8)
  mask = MASK if masked else None
  reference = sam_optax.reference.m_sam(
    RHO, 2, normalize=normalize, perturb_mask=mask
  )
  tx = sam_optax.m_sam(
    RHO,
    2,
    normalize=normalize,
    implementation=implementation,
    micro_batches_per_chunk=per_chunk,
    perturb_mask=mask,
  )

  def update(tx, p, b):
    return tx.update(None, tx.init(p), p, loss_fn=mlp_loss, batch=b)[0]

  expected = update(reference, params, batch)
  actual = test.variant(lambda p, b: update(tx, p, b))(params, batch)
  chex.assert_trees_all_close(actual, expected, rtol=2e-6, atol=1e-7)


class FormsMatchTheReferenceTest(chex.TestCase):
  """Every form is the definition (a loop of SAM steps) in float32."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
    (("sequential", None), True, False),
    (("sequential", 2), False, True),
    (("auto", None), False, True),
  )
  def test_matches_reference(self, form, normalize, masked):
    _check(self, form, normalize, masked)

  def test_sequential_compiles_one_micro_batch(self):
    # The scan body holds one micro-batch's step: the program does not grow
    # with the number of micro-batches, where the unrolled one does.
    params = mlp_params(jax.random.key(5))

    def size(implementation, count):
      tx = sam_optax.m_sam(RHO, 2, implementation=implementation)
      batch = mlp_batch(jax.random.key(6), size=2 * count)
      text = (
        jax.jit(
          lambda p, b: tx.update(None, (), p, loss_fn=mlp_loss, batch=b)[0]
        )
        .lower(params, batch)
        .as_text()
      )
      return len(text.splitlines())

    self.assertEqual(size("sequential", 4), size("sequential", 16))
    self.assertGreater(size("unrolled", 16), 2 * size("unrolled", 4))


@pytest.mark.slow
class EveryFormMatchesTheReferenceTest(chex.TestCase):
  """Every form, both normalizations, with and without a mask (-m slow)."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(
    form=FORMS, normalize=(True, False), masked=(False, True)
  )
  def test_every_form_matches_reference(self, form, normalize, masked):
    _check(self, form, normalize, masked)


def _temp_bytes(per_chunk, width=256, size=32):
  """XLA's temp memory of chunked vmap m-SAM on an MLP, m = 2."""
  params = mlp_params(jax.random.key(7), in_dim=width, hidden=width)
  batch = mlp_batch(jax.random.key(8), size=size, in_dim=width)
  tx = sam_optax.m_sam(
    RHO, 2, implementation="vmap", micro_batches_per_chunk=per_chunk
  )
  compiled = (
    jax.jit(lambda p, b: tx.update(None, (), p, loss_fn=mlp_loss, batch=b)[0])
    .lower(params, batch)
    .compile()
  )
  return compiled.memory_analysis().temp_size_in_bytes


class ChunkMemoryTest(chex.TestCase):
  def test_temp_memory_linear_in_chunk_size(self):
    # 16 micro-batches of a 256x256 weight (256 KiB): each micro-batch in
    # flight holds a few weight-sized copies, so temp ≈ a + b·c.
    temps = {c: _temp_bytes(c) for c in (1, 2, 4, 8)}
    steps = np.diff([temps[c] for c in (1, 2, 4, 8)]) / np.diff([1, 2, 4, 8])
    weight = 256 * 256 * 4
    # b: at least one weight copy per micro-batch in flight, at most 8.
    self.assertTrue(np.all(steps >= weight), (temps, steps))
    self.assertTrue(np.all(steps <= 8 * weight), (temps, steps))
    # Linear: the slope between 4 and 8 is that between 1 and 2 within 25%.
    np.testing.assert_allclose(
      steps[-1], steps[0], rtol=0.25, err_msg=str(temps)
    )


if __name__ == "__main__":
  import absl.testing.absltest

  absl.testing.absltest.main()


# --- auto and the low-rank form (sam_optax._m_sam.takes_low_rank) -----------


def _deep_mlp(depth=4, width=64, size=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), depth + 1)
  params = [
    {
      "kernel": jax.random.normal(k, (width, width)) / np.sqrt(width),
      "bias": jnp.zeros(width),
    }
    for k in keys[:-1]
  ]
  batch = {
    "x": jax.random.normal(keys[-1], (size, width)),
    "y": jnp.arange(size) % width,
  }
  return params, batch


def _deep_mlp_loss(params, batch):
  x = batch["x"]
  for layer in params:
    x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
  return optax.softmax_cross_entropy_with_integer_labels(x, batch["y"])


def _conv_loss(params, batch):
  x = jax.lax.conv_general_dilated(
    batch["x"], params["conv"], (1, 1), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )  # fmt: skip
  x = jnp.tanh(x).reshape(x.shape[0], -1)
  return optax.softmax_cross_entropy_with_integer_labels(
    x @ params["dense"], batch["y"]
  )


class AutoLowRankTest(chex.TestCase):
  """Where "auto" takes the low-rank form, and that it is then exact."""

  def test_deep_mlp_takes_low_rank_at_every_m(self):
    params, batch = _deep_mlp()
    for m in (1, 4):
      self.assertTrue(
        m_sam_module.takes_low_rank(_deep_mlp_loss, params, batch, m)
      )

  def test_wide_rows_keep_the_copy_forms(self):
    # n (d_in + d_out) >= d_in d_out: nothing is cheaper to factor.
    params, batch = _deep_mlp(width=8, size=16)
    self.assertFalse(
      m_sam_module.takes_low_rank(_deep_mlp_loss, params, batch, 8)
    )

  def test_activation_heavy_models_keep_the_copy_forms(self):
    # The tests' small MLP: its activations outweigh its 4 leaves.
    params = mlp_params(jax.random.key(0))
    batch = mlp_batch(jax.random.key(1), 64)
    self.assertFalse(m_sam_module.takes_low_rank(mlp_loss, params, batch, 8))

  def test_convolutions_on_a_cpu_keep_the_copy_forms(self):
    keys = jax.random.split(jax.random.key(0), 3)
    params = {
      "conv": jax.random.normal(keys[0], (3, 3, 2, 64)) * 0.3,
      "dense": jax.random.normal(keys[1], (4 * 4 * 64, 512)) * 0.1,
    }
    batch = {
      "x": jax.random.normal(keys[2], (8, 4, 4, 2)),
      "y": jnp.arange(8) % 512,
    }
    self.assertFalse(m_sam_module.takes_low_rank(_conv_loss, params, batch, 1))

  @chex.variants(with_jit=True, without_jit=True)
  def test_auto_equals_vmap_where_it_takes_low_rank(self):
    params, batch = _deep_mlp()

    def gradient(implementation):
      tx = sam_optax.m_sam(RHO, 2, implementation=implementation)
      update = self.variant(
        lambda p, b: tx.update(
          None, tx.init(p), p, loss_fn=_deep_mlp_loss, batch=b
        )[0]
      )
      return update(params, batch)

    chex.assert_trees_all_close(
      gradient("auto"), gradient("vmap"), rtol=2e-5, atol=1e-6
    )
