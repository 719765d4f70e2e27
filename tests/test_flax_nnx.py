"""sam_optax.flax.nnx_loss_fn: BatchNorm + Dropout through every variant.

The NNX recipe of docs/guide/flax.md (Conv + BatchNorm + Dropout + Linear, the issue's
train step as it stands) trains on a small image task and must learn; eval
mode afterwards normalizes with the running statistics. For every variant,
one step from a fresh model must leave the running statistics exactly where
one plain SGD step leaves them (only the clean pass moves them); m-SAM
normalizes each micro-batch with its own statistics; RW-SAM's probe pass
leaves the model alone; the passes of a step share their dropout masks.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import sam_optax
import sam_optax.flax

from _flax_problem import BATCH
from _flax_problem import BATCHES
from _flax_problem import DenseNet
from _flax_problem import TEST_BATCH
from _flax_problem import trained_snippet

MARKER = "<!-- nnx snippet: run by tests/test_flax_nnx.py -->"


def recipe_scope() -> dict:
  return trained_snippet(MARKER)


def _accuracy(model, batch) -> float:
  return float(
    jnp.mean(jnp.argmax(model(batch["image"]), -1) == batch["label"])
  )


def _fresh_model():
  return DenseNet(rngs=nnx.Rngs(1))


def _values(leaf):
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return np.array(jax.random.key_data(leaf))
  return np.array(leaf)


def _snapshot(model, *filters):
  """The values of ``nnx.state(model, *filters)`` now (the state is live)."""
  return jax.tree.map(_values, nnx.state(model, *filters))


def _per_example_loss(model, batch):
  return recipe_scope()["per_example_loss"](model, batch)


def test_recipe_learns():
  scope = recipe_scope()
  model = scope["model"]
  untrained = scope["Net"](rngs=nnx.Rngs(0))
  untrained.eval()
  assert _accuracy(model, TEST_BATCH) > 0.9
  assert _accuracy(model, TEST_BATCH) > _accuracy(untrained, TEST_BATCH) + 0.3


def test_eval_mode_uses_the_running_statistics():
  model = recipe_scope()["model"]  # model.eval() was the snippet's last line
  norm = model.norm
  assert norm.use_running_average and model.dropout.deterministic
  # Training moved the running statistics away from their initial values.
  assert float(jnp.max(jnp.abs(norm.mean[...]))) > 1e-2
  assert float(jnp.max(jnp.abs(norm.var[...] - 1))) > 1e-2
  hidden = model.conv(TEST_BATCH["image"])
  expected = (hidden - norm.mean[...]) / jnp.sqrt(
    norm.var[...] + norm.epsilon
  ) * norm.scale[...] + norm.bias[...]
  np.testing.assert_allclose(norm(hidden), expected, rtol=1e-5, atol=1e-5)
  # So an example's output does not depend on the rest of the batch, and
  # dropout is off.
  logits = model(TEST_BATCH["image"])
  np.testing.assert_allclose(
    model(TEST_BATCH["image"][:1]), logits[:1], rtol=1e-5, atol=1e-5
  )
  np.testing.assert_array_equal(model(TEST_BATCH["image"]), logits)


VARIANTS = {
  "sam": lambda: sam_optax.sam(0.05),
  "usam": lambda: sam_optax.usam(0.05),
  "n_sam": lambda: sam_optax.n_sam(0.05),
  "m_sam": lambda: sam_optax.m_sam(0.05, micro_batch_size=4),
  "rw_sam": lambda: sam_optax.rw_sam(0.05, lam=0.5),
  "rw_sam_exact": lambda: sam_optax.rw_sam(0.05, gradient_norms="exact"),
  "asam": lambda: sam_optax.asam(0.5),
  "rw_asam": lambda: sam_optax.rw_asam(0.5),
  "f_sam": lambda: sam_optax.f_sam(0.05),
}
# Each variant compiles a step of its own (1-3 s on 2 CPU cores); the others
# share their passes with these three.
DEFAULT_SUITE = ("sam", "m_sam", "rw_sam")


@nnx.jit
def _train_step(model, optimizer, batch, key, extra):
  """The recipe's (and the issue's) train step, with extra arguments."""
  grads = nnx.grad(lambda m: _per_example_loss(m, batch).mean())(model)
  loss_fn = sam_optax.flax.nnx_loss_fn(model, _per_example_loss)
  optimizer.update(model, grads, loss_fn=loss_fn, batch=batch, key=key, **extra)


def _one_step(tx, extra=None):
  """``(state, params)`` of a fresh model after one step of ``tx``."""
  model = _fresh_model()
  optimizer = nnx.Optimizer(
    model, optax.chain(tx, optax.sgd(0.1, momentum=0.9)), wrt=nnx.Param
  )
  _train_step(model, optimizer, BATCHES[0], jax.random.key(5), extra or {})
  return _snapshot(model, nnx.BatchStat), _snapshot(model, nnx.Param)


@functools.cache
def _plain_sgd_step():
  model = _fresh_model()
  initial = _snapshot(model, nnx.BatchStat)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    grads = nnx.grad(lambda m: _per_example_loss(m, batch).mean())(model)
    optimizer.update(model, grads)

  step(model, optimizer, BATCHES[0])
  return initial, _snapshot(model, nnx.BatchStat), _snapshot(model, nnx.Param)


@pytest.mark.parametrize(
  "variant",
  [
    v if v in DEFAULT_SUITE else pytest.param(v, marks=pytest.mark.slow)
    for v in sorted(VARIANTS)
  ],
)
def test_only_the_clean_pass_moves_the_running_statistics(variant):
  extra = {"ascent_batch": BATCHES[1]} if variant == "n_sam" else {}
  stats, params = _one_step(VARIANTS[variant](), extra)
  initial, sgd_stats, sgd_params = _plain_sgd_step()
  # The clean pass moved them ...
  assert not jax.tree.all(jax.tree.map(np.allclose, stats, initial))
  # ... and nothing else did: the statistics of one plain SGD step.
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
    stats,
    sgd_stats,
  )
  # The step itself is a SAM step, not SGD's, and finite.
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))
  assert not jax.tree.all(jax.tree.map(np.allclose, params, sgd_params))


@pytest.mark.slow
def test_data_parallel_m_sam_leaves_the_running_statistics():
  # One device holding the whole batch: data_parallel_m_sam is sam on it.
  model = _fresh_model()
  loss_fn = sam_optax.flax.nnx_loss_fn(model, _per_example_loss)
  before = _snapshot(model)
  params = nnx.state(model, nnx.Param)
  mesh = jax.make_mesh((1,), ("data",))
  tx = sam_optax.data_parallel_m_sam(0.05, axis_name="data")
  grads = jax.grad(lambda p: loss_fn(p, BATCHES[0]).mean())(params)

  @jax.jit
  @functools.partial(
    jax.shard_map, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()
  )
  def update(params, batch):
    return tx.update(
      None, tx.init(params), params, loss_fn=loss_fn, batch=batch
    )[0]

  sam = sam_optax.sam(0.05)
  expected, _ = sam.update(
    grads, sam.init(params), params, loss_fn=loss_fn, batch=BATCHES[0]
  )
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
    update(params, jax.device_put(BATCHES[0], NamedSharding(mesh, P("data")))),
    expected,
  )
  jax.tree.map(np.testing.assert_array_equal, _snapshot(model), before)


def _micro_batch_means(loss_fn, params, batch, size):
  grad = jax.grad(lambda p, b: loss_fn(p, b).mean())
  count = BATCH // size
  grads = [
    grad(
      params, jax.tree.map(lambda x, j=j: x[j * size : (j + 1) * size], batch)
    )
    for j in range(count)
  ]
  return jax.tree.map(lambda *g: sum(g) / count, *grads)


@pytest.mark.filterwarnings("ignore:sam_optax.flax.nnx_loss_fn")  # one jit
# "unrolled" (the CPU default) also runs in the m_sam step above.
@pytest.mark.parametrize(
  "implementation", ["vmap", pytest.param("unrolled", marks=pytest.mark.slow)]
)
def test_m_sam_normalizes_each_micro_batch_with_its_own_statistics(
  implementation,
):
  model = _fresh_model()
  loss_fn = sam_optax.flax.nnx_loss_fn(model, _per_example_loss)
  batch = BATCHES[2]
  tx = sam_optax.m_sam(0.0, micro_batch_size=4, implementation=implementation)

  @jax.jit
  def gradients(params):
    actual, _ = tx.update(
      None, tx.init(params), params, loss_fn=loss_fn, batch=batch
    )
    full = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    return actual, _micro_batch_means(loss_fn, params, batch, 4), full

  actual, micro, full = gradients(nnx.state(model, nnx.Param))
  # With ρ = 0, m-SAM's gradient is the mean of the micro-batch gradients,
  # each with its micro-batch's BatchNorm statistics ...
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
    actual,
    micro,
  )
  # ... which is not the full batch's gradient (with the full batch's
  # statistics the two would be equal).
  difference = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), actual, full
  )
  assert max(jax.tree.leaves(difference)) > 1e-3


@pytest.mark.filterwarnings("ignore:sam_optax.flax.nnx_loss_fn")  # one jit
def test_probe_pass_leaves_the_model_alone():
  model = _fresh_model()
  loss_fn = sam_optax.flax.nnx_loss_fn(model, _per_example_loss)
  before = _snapshot(model)
  norms = jax.jit(
    lambda p: sam_optax.finite_difference_gradient_norms(
      loss_fn, p, BATCHES[0], jax.random.key(0)
    )
  )(nnx.state(model, nnx.Param))
  assert norms.shape == (BATCH,) and bool(jnp.all(jnp.isfinite(norms)))
  jax.tree.map(np.testing.assert_array_equal, _snapshot(model), before)


def test_passes_share_dropout_masks_drawn_apart_from_the_clean_pass():
  model = _fresh_model()
  params = nnx.state(model, nnx.Param)
  count = lambda: int(model.dropout.rngs.count[...])
  start = count()
  clean = _per_example_loss(model, BATCHES[0])  # the clean pass
  loss_fn = sam_optax.flax.nnx_loss_fn(model, _per_example_loss)
  assert count() == start + 2  # one draw each: nothing else advances it
  losses = loss_fn(params, BATCHES[0])
  # Every pass of the step: the same masks (so the same losses at w) ...
  np.testing.assert_array_equal(loss_fn(params, BATCHES[0]), losses)
  # ... not the clean pass's, nor the next step's.
  assert not np.allclose(losses, clean)
  next_step = sam_optax.flax.nnx_loss_fn(model, _per_example_loss)
  assert not np.allclose(next_step(params, BATCHES[0]), losses)
  assert count() == start + 3


def test_couples_examples_only_with_batch_statistics_or_dropout():
  loss = lambda m, b: jnp.sum(m(b["x"]) ** 2, -1)
  couples = lambda model: (
    sam_optax.flax.nnx_loss_fn(model, loss).couples_examples
  )
  assert not couples(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
  assert couples(nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
  assert couples(nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
  model = _fresh_model()
  assert couples(model)
  model.eval()  # running statistics, no dropout: examples are independent
  assert not couples(model)


def test_import_sam_optax_does_not_import_flax():
  import subprocess
  import sys

  code = "import sys, sam_optax; assert 'flax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)
