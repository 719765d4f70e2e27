"""Every optimizer trains every model family; BatchNorm and the NNX glue."""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import config as config_lib
from experiments import models
from experiments import nnx_glue
from experiments import optimizers
from experiments import steps
import sam_optax

BATCH = 8

# Tiny members of each family: the same code paths, seconds to compile.
FAMILIES = {
  "mlp": (lambda rngs: models.MLP(rngs=rngs), (BATCH, 40)),
  "cnn1d": (lambda rngs: models.CNN1D(rngs=rngs), (BATCH, 40)),
  "resnet": (
    lambda rngs: models.resnet18(rngs=rngs, width=4, stage_sizes=(1, 1)),
    (BATCH, 8, 8, 3),
  ),
  "resnet_bottleneck": (
    lambda rngs: models.resnet50(rngs=rngs, width=2, stage_sizes=(1, 1)),
    (BATCH, 8, 8, 3),
  ),
  "wide_resnet": (
    lambda rngs: models.wide_resnet28_10(rngs=rngs, depth=10, widen=1),
    (BATCH, 8, 8, 3),
  ),
}
BATCH_NORM_FAMILIES = ("resnet", "resnet_bottleneck", "wide_resnet")
# By default: every optimizer on the 1-D CNN, SAM on every family, and the
# optimizers of the BatchNorm test on the ResNet (compiled once for both
# tests); the rest of the cross product (compile time) runs with `-m slow`.
BATCH_NORM_OPTIMIZERS = ("sam", "m_sam", "rw_sam")
# Pinned to their formulas in tests/test_new_variants.py; here, with -m slow.
SLOW_ON_EVERY_FAMILY = ("gsam", "wsam", "vasso", "look_sam", "momentum_sam")
# Pinned in tests/test_sampa_esam_lookbehind.py; here, with -m slow.
SLOW_ON_EVERY_FAMILY += ("sampa", "esam", "lookbehind_sam", "multi_step_sam")
# Pinned in tests/test_functional_sam.py; here, with -m slow.
SLOW_ON_EVERY_FAMILY += ("preconditioned_sam", "gcsam")
OPTIONS = {
  "m_sam": {"micro_batch_size": 4, "implementation": "unrolled"},
  "rw_sam": {"lam": 0.5},
  "rw_asam": {"lam": 0.5},
  "bsam": {"num_data": 50_000},
}


def _batch(shape, seed=0):
  inputs = jax.random.normal(jax.random.key(seed), shape)
  labels = jax.random.randint(jax.random.key(seed + 1), (shape[0],), 0, 10)
  return {"inputs": inputs, "labels": labels}


@functools.cache
def _compiled(family, optimizer):
  """The split model and jitted step, built once per (family, optimizer)."""
  build, shape = FAMILIES[family]
  split = nnx_glue.split(build(nnx.Rngs(0)))
  config = config_lib.OptimizerConfig(
    name=optimizer,
    learning_rate=0.05,
    rho=0.05,
    options=OPTIONS.get(optimizer, {}),
  )
  tx = optimizers.make_optimizer(config, 10)
  step = steps.make_train_step(split.graphdef, tx, lambda x, key: x)
  return split, tx, step, shape


def _setup(family, optimizer):
  split, tx, step, shape = _compiled(family, optimizer)
  # Fresh buffers each time: the step donates its input state.
  params, state = jax.tree.map(jnp.copy, (split.params, split.state))
  train_state = steps.TrainState(
    jnp.zeros([], jnp.int32), params, state, tx.init(params)
  )
  return split, step, train_state, shape


def _leaves_equal(a, b):
  return all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _cross_product():
  for family in FAMILIES:
    for optimizer in optimizers.VARIANTS:
      default = (
        (family == "cnn1d" and optimizer not in SLOW_ON_EVERY_FAMILY)
        or optimizer == "sam"
        or (family == "resnet" and optimizer in BATCH_NORM_OPTIMIZERS)
      )
      marks = () if default else (pytest.mark.slow,)
      yield pytest.param(
        optimizer, family, marks=marks, id=f"{optimizer}-{family}"
      )


@pytest.mark.parametrize("optimizer,family", list(_cross_product()))
def test_every_optimizer_trains_every_model_family(optimizer, family):
  split, step, state, shape = _setup(family, optimizer)
  params0 = jax.tree.map(np.asarray, split.params)
  stats0 = jax.tree.map(np.asarray, split.state)
  run_key = jax.random.key(0)
  losses = []
  for _ in range(3):
    state, metrics = step(state, _batch(shape, seed=0), run_key)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 3
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0]  # the same batch three times: loss falls
  assert not _leaves_equal(params0, state.params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  has_batch_norm = bool(jax.tree.leaves(stats0))
  assert has_batch_norm == (family in BATCH_NORM_FAMILIES)
  if has_batch_norm:
    assert not _leaves_equal(stats0, state.state)  # the clean pass moved them


def _expected_running_stats(family, batch):
  """Running statistics after ONE training-mode forward at the initial w."""
  build, _ = FAMILIES[family]
  model = build(nnx.Rngs(0))
  model(batch["inputs"])
  return nnx.state(model, nnx.BatchStat)


@pytest.mark.parametrize("optimizer", BATCH_NORM_OPTIMIZERS)
def test_perturbed_passes_leave_batch_norm_running_stats_alone(optimizer):
  """After a step, the running statistics are those of the clean pass alone.

  Each perturbed pass runs BatchNorm in training mode too; had one of them
  updated the statistics, the EMA would have moved two or more times.
  """
  _, step, state, shape = _setup("resnet", optimizer)  # compiled above
  batch = _batch(shape)
  new_state, _ = step(state, batch, jax.random.key(0))
  expected = _expected_running_stats("resnet", batch)
  want, have = jax.tree.leaves(expected), jax.tree.leaves(new_state.state)
  assert len(want) == len(have) > 0
  for a, b in zip(want, have):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # And not the initial statistics: the clean pass did update them.
  initial = jax.tree.leaves(
    nnx_glue.split(FAMILIES["resnet"][0](nnx.Rngs(0))).state
  )
  assert not _leaves_equal(want, initial)


def test_passes_loss_fn_uses_batch_statistics_and_discards_their_update():
  build, shape = FAMILIES["resnet"]
  model = build(nnx.Rngs(0))
  split = nnx_glue.split(model)
  batch = _batch(shape)
  before = jax.tree.map(np.array, split.state)

  def per_example(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
      model(batch["inputs"]), batch["labels"]
    )

  passes_loss_fn = steps.passes_loss_fn(
    split.graphdef, split.params, split.state
  )
  # BatchNorm in training mode couples the examples (exact per-example
  # norms then take Jacobian rows).
  assert passes_loss_fn.couples_examples
  # Split (logits, then their cross-entropy), so functional_sam takes it.
  assert isinstance(passes_loss_fn, sam_optax.SplitLoss)
  loss_fn = jax.jit(passes_loss_fn)
  losses = loss_fn(split.params, batch)
  assert losses.shape == (BATCH,)
  assert _leaves_equal(before, split.state)
  # Training mode: the same as the stateful model's training forward.
  np.testing.assert_allclose(losses, per_example(model, batch), rtol=1e-5)
  # The clean pass returns the gradient of the mean and the moved statistics.
  clean_losses, grads, new_state, _ = nnx_glue.loss_grad_and_state(
    split.graphdef, split.state, per_example, split.params, batch
  )
  np.testing.assert_allclose(clean_losses, losses, rtol=1e-6)
  expected_grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(split.params)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not _leaves_equal(before, new_state)


def test_bsam_is_the_whole_optimizer():
  """bSAM ends the chain: make_optimizer returns it alone (no SGD after
  it), with the cosine schedule, momentum and weight decay as its own."""
  config = config_lib.OptimizerConfig(
    name="bsam", learning_rate=0.05, rho=0.01, options={"num_data": 100}
  )
  tx = optimizers.make_optimizer(config, 10)
  params = {"w": jnp.ones((3,))}
  assert isinstance(tx.init(params), sam_optax.BsamState)
  batch = {"x": jnp.arange(4.0)}
  loss_fn = lambda p, b: (b["x"] * jnp.sum(p["w"])) ** 2
  zero = jax.tree.map(jnp.zeros_like, params)
  got, _ = tx.update(
    None, tx.init(params), params, loss_fn=loss_fn, batch=batch, noise=zero
  )
  want, _ = sam_optax.bsam(
    optimizers.learning_rate_schedule(config, 10),
    100,
    0.01,
    b1=config.momentum,
    weight_decay=config.weight_decay,
  ).update(None, tx.init(params), params, loss_fn=loss_fn, batch=batch,
           noise=zero)  # fmt: skip
  np.testing.assert_array_equal(got["w"], want["w"])
  with pytest.raises(ValueError, match="num_data"):
    optimizers.make_optimizer(dataclasses.replace(config, options={}), 10)
  with pytest.raises(ValueError, match="whole optimizer"):
    optimizers.variant(config)


def test_eval_graphdef_uses_running_statistics():
  build, shape = FAMILIES["resnet"]
  model = build(nnx.Rngs(0))
  split = nnx_glue.split(model)
  inputs = _batch(shape)["inputs"]
  evaluated = nnx.merge(split.eval_graphdef, split.params, split.state)
  reference = nnx.view(model, use_running_average=True)
  np.testing.assert_allclose(evaluated(inputs), reference(inputs), rtol=1e-5)
  trained = nnx.merge(split.graphdef, split.params, split.state)
  assert not np.allclose(evaluated(inputs), trained(inputs), atol=1e-3)
  # A model without BatchNorm splits too (nothing to switch).
  mlp_split = nnx_glue.split(models.MLP(rngs=nnx.Rngs(0)))
  assert not jax.tree.leaves(mlp_split.state)


def test_asam_leaves_nnx_biases_unscaled():
  split = nnx_glue.split(models.MLP(rngs=nnx.Rngs(0)))
  mask = sam_optax.not_bias_mask(split.params)
  leaves = jax.tree_util.tree_leaves_with_path(mask)
  assert len(leaves) == 6  # three kernels, three biases
  for path, value in leaves:
    assert value == ("bias" not in jax.tree_util.keystr(path))


def test_model_sizes_match_the_papers_architectures():
  counts = {}
  for name in ("resnet18", "resnet50", "wrn28_10"):
    model = nnx.eval_shape(lambda n=name: models.create_model(n, 10))
    counts[name] = sum(
      x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))
    )
  # The CIFAR variants' usual sizes: 11.17M, 23.52M, 36.48M parameters.
  assert counts == {
    "resnet18": 11_173_962,
    "resnet50": 23_520_842,
    "wrn28_10": 36_479_194,
  }
  small = models.SmallCNN(rngs=nnx.Rngs(0))
  assert small(jnp.ones((2, 32, 32, 3))).shape == (2, 10)
  with pytest.raises(ValueError, match="unknown model"):
    models.create_model("vgg")
  with pytest.raises(ValueError, match="6n"):
    models.WideResNet(depth=27, rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "wrn28_10"])
def test_full_size_models_take_a_sam_step(name):
  split = nnx_glue.split(models.create_model(name, 10))
  tx = optimizers.make_optimizer(
    config_lib.OptimizerConfig(name="sam", rho=0.05), 10
  )
  step = steps.make_train_step(split.graphdef, tx, lambda x, key: x)
  state = steps.TrainState(
    jnp.zeros([], jnp.int32), split.params, split.state, tx.init(split.params)
  )
  state, metrics = step(state, _batch((2, 8, 8, 3)), jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1


def test_the_readmes_linen_pattern_updates_statistics_once():
  """experiments/README.md's Linen recipe: only the clean pass moves them."""
  from flax import linen  # pylint: disable=g-import-not-at-top

  class Net(linen.Module):
    @linen.compact
    def __call__(self, x, train):
      x = linen.Dense(16)(x)
      x = linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      return linen.Dense(10)(linen.relu(x))

  model = Net()
  batch = _batch((BATCH, 40))
  variables = model.init(jax.random.key(0), batch["inputs"], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = optax.chain(sam_optax.sam(0.05), optax.sgd(0.1, momentum=0.9))
  opt_state = tx.init(params)

  def per_example_losses(params, batch_stats, batch):
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats},
      batch["inputs"],
      train=True,
      mutable=["batch_stats"],
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["labels"]
    )
    return losses, updates["batch_stats"]

  @jax.jit
  def train_step(params, batch_stats, opt_state, batch, key):
    def mean_loss(params):
      losses, new_stats = per_example_losses(params, batch_stats, batch)
      return losses.mean(), new_stats

    (_, new_stats), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    loss_fn = lambda p, b: per_example_losses(p, batch_stats, b)[0]
    updates, opt_state = tx.update(
      grads, opt_state, params, loss_fn=loss_fn, batch=batch, key=key
    )
    return optax.apply_updates(params, updates), new_stats, opt_state

  new_params, new_stats, _ = train_step(
    params, batch_stats, opt_state, batch, jax.random.key(1)
  )
  _, once = per_example_losses(params, batch_stats, batch)
  for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(once)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert not _leaves_equal(new_stats, batch_stats)
  assert not _leaves_equal(new_params, params)
