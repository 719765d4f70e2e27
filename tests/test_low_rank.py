"""m-SAM's low-rank form against the vmap form, leaf by leaf.

Every check compares ``implementation="low_rank"`` with ``"vmap"`` (itself
pinned to the written-out formula in test_m_sam) on the same step: an MLP, a
transformer block (attention and MLP projections as dense layers, LayerNorm,
biases, an embedding table tied to the output head), a CNN (convolutions
fall back to copies), a weight used twice, ``perturb_mask`` and an NNX model
through ``sam_optax.flax.nnx_loss_fn``. Which leaves are factored is checked
on the plan, so that each case exercises the path it names. The sharded
check runs in a child process on 4 simulated devices (see
test_data_parallel for why).
"""

from flax import nnx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
from sam_optax import _low_rank
import sam_optax.flax

from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params
from _problems import print_results
from _problems import run_child

RHO = 0.1


def _step(implementation, micro_batch_size, loss_fn, jit=True, **kwargs):
  tx = sam_optax.m_sam(
    RHO, micro_batch_size, implementation=implementation, **kwargs
  )

  def update(params, batch):
    return tx.update(
      None, tx.init(params), params, loss_fn=loss_fn, batch=batch
    )[0]

  return jax.jit(update) if jit else update


def _max_error(actual, expected):
  """Largest absolute difference, relative to the largest entry."""
  a = jax.flatten_util.ravel_pytree(actual)[0]
  e = jax.flatten_util.ravel_pytree(expected)[0]
  return float(jnp.max(jnp.abs(a - e)) / jnp.max(jnp.abs(e)))


def _assert_matches_vmap(
  loss_fn, params, batch, micro_batch_size, jit=True, **kwargs
):
  actual = _step("low_rank", micro_batch_size, loss_fn, jit, **kwargs)(
    params, batch
  )
  expected = _step("vmap", micro_batch_size, loss_fn, jit, **kwargs)(
    params, batch
  )
  assert jax.tree.structure(actual) == jax.tree.structure(params)
  for a, p in zip(jax.tree.leaves(actual), jax.tree.leaves(params)):
    assert a.dtype == p.dtype and a.shape == p.shape
  assert _max_error(actual, expected) < 2e-6, _max_error(actual, expected)
  return actual


def _factored(loss_fn, params, batch, micro_batch_size, mask=None):
  """Paths of the leaves the low-rank step factors."""
  one = jax.tree.map(lambda x: x[:micro_batch_size], batch)
  plan = _low_rank.make_plan(loss_fn, params, one, mask)
  paths = [
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_leaves_with_path(params)
  ]
  return {paths[layer.leaf] for layer in plan.factored.values()}


# --- Models -------------------------------------------------------------------


def _wide_mlp(seed=0, size=8):
  params = mlp_params(jax.random.key(seed), in_dim=12, hidden=24, out_dim=10)
  return params, mlp_batch(jax.random.key(seed + 1), size, 12, 10)


D, T, V, HEADS = 16, 3, 11, 2


def _layer_norm(x, scale, bias):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.var(x, -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _transformer_params(seed=0):
  keys = iter(jax.random.split(jax.random.key(seed), 16))
  dense = lambda i, o: jax.random.normal(next(keys), (i, o)) / np.sqrt(i)
  vector = lambda n: 0.1 * jax.random.normal(next(keys), (n,))
  return {
    "embed": jax.random.normal(next(keys), (V, D)),  # gather + tied head
    "position": 0.1 * jax.random.normal(next(keys), (T, D)),
    "ln1": {"scale": 1 + vector(D), "bias": vector(D)},
    "query": {"kernel": dense(D, D), "bias": vector(D)},
    "key": {"kernel": dense(D, D)},
    "value": {"kernel": dense(D, D)},
    "out": {"kernel": dense(D, D), "bias": vector(D)},
    "ln2": {"scale": 1 + vector(D), "bias": vector(D)},
    "up": {"kernel": dense(D, 4 * D), "bias": vector(4 * D)},
    "down": {"kernel": dense(4 * D, D), "bias": vector(D)},
  }


def _transformer_loss(params, batch):
  """A pre-LN decoder block; per-example mean next-token cross-entropy."""
  tokens = batch["tokens"]  # [B, T]
  x = params["embed"][tokens] + params["position"]
  h = _layer_norm(x, **params["ln1"])
  q = h @ params["query"]["kernel"] + params["query"]["bias"]
  k = jnp.einsum("btd,de->bte", h, params["key"]["kernel"])
  v = jnp.dot(h, params["value"]["kernel"])
  split = lambda z: z.reshape(*z.shape[:2], HEADS, D // HEADS)
  scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k))
  causal = jnp.tril(jnp.ones((T, T), bool))
  scores = jnp.where(causal, scores / np.sqrt(D // HEADS), -1e9)
  mixed = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), split(v))
  x = x + mixed.reshape(x.shape) @ params["out"]["kernel"]
  x = x + params["out"]["bias"]
  h = _layer_norm(x, **params["ln2"])
  h = jax.nn.gelu(h @ params["up"]["kernel"] + params["up"]["bias"])
  x = x + h @ params["down"]["kernel"] + params["down"]["bias"]
  logits = x @ params["embed"].T  # the embedding, used a second time
  losses = optax.softmax_cross_entropy_with_integer_labels(
    logits, batch["targets"]
  )
  return jnp.mean(losses, axis=-1)


def _transformer_batch(seed=1, size=4):
  tokens = jax.random.randint(jax.random.key(seed), (size, T + 1), 0, V)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


# --- Tests --------------------------------------------------------------------


def test_mlp_matches_vmap():
  params, batch = _wide_mlp()
  _assert_matches_vmap(mlp_loss, params, batch, 2)


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_size", [1, 2, 8])
@pytest.mark.parametrize("normalize", [True, False])
def test_mlp_matches_vmap_at_every_m(micro_batch_size, normalize):
  params, batch = _wide_mlp()
  _assert_matches_vmap(
    mlp_loss, params, batch, micro_batch_size, normalize=normalize
  )


def test_mlp_factors_the_kernels_where_cheaper():
  params, batch = _wide_mlp()
  kernels = {"['hidden']['kernel']", "['out']['kernel']"}
  # n (d_in + d_out) < d_in d_out: at m = 2, 2·36 < 12·24 (hidden) and
  # 2·34 < 24·10 (out); at m = 8, 8·36 = 288 is not < 288, 8·34 > 240.
  assert _factored(mlp_loss, params, batch, 2) == kernels
  assert _factored(mlp_loss, params, batch, 8) == set()


@pytest.mark.slow
def test_mlp_without_jit():
  params, batch = _wide_mlp(seed=3)
  _assert_matches_vmap(mlp_loss, params, batch, 2, jit=False)


@pytest.mark.slow
def test_transformer_block_matches_vmap():
  params, batch = _transformer_params(), _transformer_batch()
  for micro_batch_size in (1, 2):
    _assert_matches_vmap(_transformer_loss, params, batch, micro_batch_size)


def test_transformer_block_factors_projections_only():
  params, batch = _transformer_params(), _transformer_batch()
  factored = _factored(_transformer_loss, params, batch, 1)
  # rows n = m·T = 3: every projection; not the embedding (a gather and the
  # tied head: two uses), the position table, LayerNorm or biases.
  assert factored == {
    f"['{name}']['kernel']"
    for name in ("query", "key", "value", "out", "up", "down")
  }


@pytest.mark.slow
def test_chunked_matches_vmap():
  params, batch = _wide_mlp(seed=5)
  _assert_matches_vmap(mlp_loss, params, batch, 1, micro_batches_per_chunk=2)


def _cnn_params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {
    "conv": jax.random.normal(k1, (3, 3, 2, 4)) * 0.3,
    "dense": jax.random.normal(k2, (4 * 4 * 4, 10)) * 0.2,
    "bias": jax.random.normal(k3, (10,)) * 0.1,
  }


def _cnn_loss(params, batch):
  x = jax.lax.conv_general_dilated(
    batch["x"],
    params["conv"],
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  x = jnp.tanh(x).reshape(x.shape[0], -1)
  logits = x @ params["dense"] + params["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


def test_convolution_gets_copies_and_the_same_result():
  params = _cnn_params()
  kx, ky = jax.random.split(jax.random.key(7))
  batch = {
    "x": jax.random.normal(kx, (4, 4, 4, 2)),
    "y": jax.random.randint(ky, (4,), 0, 10),
  }
  assert _factored(_cnn_loss, params, batch, 1) == {"['dense']"}
  _assert_matches_vmap(_cnn_loss, params, batch, 1)


def _shared_loss(params, batch):
  """One weight in two layers, another inside a jitted helper and a scan."""
  inner = jax.jit(lambda x, w: jnp.tanh(x @ w))
  h = inner(batch["x"], params["first"])
  h = jnp.tanh(h @ params["shared"])
  h = jnp.tanh(h @ params["shared"])

  def body(carry, _):
    return jnp.tanh(carry @ params["scanned"]), None

  h, _ = jax.lax.scan(body, h, None, length=2)
  logits = h @ params["head"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


@pytest.mark.parametrize(
  "values", [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_a_weight_used_twice_or_in_a_scan_gets_copies(values):
  """The plan always; the values (exact copies) in the slow suite."""
  keys = jax.random.split(jax.random.key(2), 4)
  params = {
    name: jax.random.normal(k, shape) * 0.3
    for name, k, shape in zip(
      ("first", "shared", "scanned", "head"),
      keys,
      ((12, 16), (16, 16), (16, 16), (16, 10)),
    )
  }
  batch = mlp_batch(jax.random.key(3), 4, 12, 10)
  # The nested jit is inlined; the shared and scanned weights are not
  # factored, the head is.
  assert _factored(_shared_loss, params, batch, 1) == {"['first']", "['head']"}
  if values:
    _assert_matches_vmap(_shared_loss, params, batch, 1)


@pytest.mark.parametrize(
  "values", [False, pytest.param(True, marks=pytest.mark.slow)]
)
def test_perturb_mask(values):
  params, batch = _wide_mlp(seed=9)
  kernels_only = {
    "hidden": {"kernel": True, "bias": False},
    "out": {"kernel": False, "bias": False},
  }
  assert _factored(mlp_loss, params, batch, 2, kernels_only) == {
    "['hidden']['kernel']"
  }
  if values:
    _assert_matches_vmap(mlp_loss, params, batch, 2, perturb_mask=kernels_only)
  # A callable, and array-valued entries (copied, masked like any leaf).
  array_mask = lambda p: jax.tree.map(lambda x: jnp.asarray(x.ndim > 1), p)
  assert _factored(mlp_loss, params, batch, 2, array_mask(params)) == set()
  if values:
    _assert_matches_vmap(mlp_loss, params, batch, 2, perturb_mask=array_mask)


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(12, rngs=rngs)
    self.hidden = nnx.Linear(12, 24, rngs=rngs)
    self.out = nnx.Linear(24, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(self.norm(x))))


@pytest.mark.slow
def test_nnx_loss_fn():
  model = _Block(nnx.Rngs(0))
  _, batch = _wide_mlp(seed=11)

  def per_example_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
      model(batch["x"]), batch["y"]
    )

  loss_fn = sam_optax.flax.nnx_loss_fn(model, per_example_loss)
  params = nnx.state(model, nnx.Param)
  factored = _factored(loss_fn, params, batch, 1)
  assert len(factored) == 2 and all("kernel" in p for p in factored), factored
  _assert_matches_vmap(loss_fn, params, batch, 1)


@pytest.mark.slow
def test_zero_and_huge_gradients_stay_finite():
  params, batch = _wide_mlp(seed=13)
  zero = jax.tree.map(jnp.zeros_like, params)
  update = _step("low_rank", 2, mlp_loss)(zero, batch)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(update))
  huge = lambda p, b: 1e30 * mlp_loss(p, b)
  _assert_matches_vmap(huge, params, batch, 2)
  update = _step("low_rank", 2, huge)(params, batch)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(update))


@pytest.mark.slow
def test_in_chain_and_bfloat16():
  params, batch = _wide_mlp(seed=15)
  tx = optax.chain(
    sam_optax.m_sam(RHO, 2, implementation="low_rank"), optax.sgd(0.1)
  )
  updates, _ = jax.jit(
    lambda p, b: tx.update(None, tx.init(p), p, loss_fn=mlp_loss, batch=b)
  )(params, batch)
  expected = _step("vmap", 2, mlp_loss)(params, batch)
  assert _max_error(updates, jax.tree.map(lambda g: -0.1 * g, expected)) < 2e-6
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  actual = _step("low_rank", 2, mlp_loss)(half, batch)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(actual))
  assert _max_error(actual, _step("vmap", 2, mlp_loss)(half, batch)) < 0.05


def test_estimated_bytes():
  params, batch = _wide_mlp()
  at_two = _low_rank.estimated_bytes(mlp_loss, params, batch, 2)
  assert at_two.factored == (1, 3)  # both kernels (leaves sorted by key)
  # Copies: 3 k P float32 entries, k = 4 micro-batches, P = 562.
  assert at_two.copies == 3 * 4 * 562 * 4
  assert at_two.low_rank < at_two.copies
  at_eight = _low_rank.estimated_bytes(mlp_loss, params, batch, 8)
  assert at_eight.factored == () and at_eight.low_rank == at_eight.copies
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  assert _low_rank.estimated_bytes(mlp_loss, params, shapes, 2) == at_two


def test_errors():
  params, batch = _wide_mlp()
  with pytest.raises(ValueError, match="micro_batch_size"):
    _step("low_rank", 3, mlp_loss)(params, batch)
  with pytest.raises(ValueError, match="micro_batches_per_chunk"):
    _step("low_rank", 2, mlp_loss, micro_batches_per_chunk=3)(params, batch)
  with pytest.raises(ValueError, match="implementation"):
    sam_optax.m_sam(RHO, 2, implementation="low-rank")


# --- A batch sharded over devices (a child process) ---------------------------

DEVICES = 4


def _sharded_check():
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  params, batch = _wide_mlp(seed=17, size=8)
  mesh = jax.make_mesh((DEVICES,), ("data",))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  results = {}
  for m in (1, 2):
    with jax.set_mesh(mesh):
      actual = _step("low_rank", m, mlp_loss)(params, sharded)
    expected = _step("vmap", m, mlp_loss)(params, batch)
    results[m] = _max_error(actual, expected)
  print_results(results)


@pytest.mark.slow
def test_sharded_batch():
  errors = run_child([__file__], DEVICES)
  assert all(error < 2e-6 for error in errors.values()), errors


if __name__ == "__main__":
  assert jax.device_count() == DEVICES, jax.devices()
  _sharded_check()
