"""sam_optax.flax's Linen helpers: the guide's TrainState recipe, run.

The Linen recipe of docs/guide/flax.md (Conv + BatchNorm + Dropout + Dense, a TrainState
with ``batch_stats`` whose step calls ``tx.update`` itself) trains on a small
image task and must learn; eval mode then normalizes with the running
statistics. One step of a variant leaves ``batch_stats`` where one plain SGD
step of the same recipe leaves them; ``linen_loss_fn`` drops the updates and
reuses its dropout masks.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax
import sam_optax.flax

from _flax_problem import BATCH
from _flax_problem import BATCHES
from _flax_problem import TEST_BATCH
from _flax_problem import trained_snippet

MARKER = "<!-- linen snippet: run by tests/test_flax_linen.py -->"


def recipe_scope() -> dict:
  return trained_snippet(MARKER)


def _eval_logits(state, images):
  return state.apply_fn(
    {"params": state.params, "batch_stats": state.batch_stats},
    images,
    train=False,
  )


def test_recipe_learns_and_evaluates_on_running_statistics():
  scope = recipe_scope()
  state = scope["state"]
  np.testing.assert_array_equal(
    scope["logits"], _eval_logits(state, BATCHES[0]["image"])
  )
  accuracy = lambda s: float(
    jnp.mean(
      jnp.argmax(_eval_logits(s, TEST_BATCH["image"]), -1)
      == TEST_BATCH["label"]
    )
  )
  untrained = state.replace(
    params=scope["variables"]["params"],
    batch_stats=scope["variables"]["batch_stats"],
  )
  assert accuracy(state) > 0.9
  assert accuracy(state) > accuracy(untrained) + 0.3
  # The running statistics moved, and eval mode uses them: an example's
  # output does not depend on the rest of the batch.
  mean = state.batch_stats["BatchNorm_0"]["mean"]
  assert float(jnp.max(jnp.abs(mean))) > 1e-2
  logits = _eval_logits(state, TEST_BATCH["image"])
  np.testing.assert_allclose(
    _eval_logits(state, TEST_BATCH["image"][:1]),
    logits[:1],
    rtol=1e-5,
    atol=1e-5,
  )


class _DenseNet(nn.Module):
  """Dense + BatchNorm + Dropout + Dense: the recipe's Net, cheaper to compile."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(16)(x.reshape(x.shape[0], -1))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))


@functools.cache
def _initial_variables():
  return _DenseNet().init(jax.random.key(0), BATCHES[0]["image"], train=False)


def _one_step(tx):
  """The recipe's step, once, from the same variables, with ``tx``."""
  scope = recipe_scope()
  variables = _initial_variables()
  state = scope["TrainState"].create(
    apply_fn=_DenseNet().apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=tx,
  )
  return scope["train_step"](state, BATCHES[0], jax.random.key(3))


VARIANTS = {
  "sam": lambda: sam_optax.sam(0.05),
  "m_sam": lambda: sam_optax.m_sam(0.05, micro_batch_size=4),
  "rw_sam": lambda: sam_optax.rw_sam(0.05, lam=0.5),
}


@pytest.mark.parametrize(
  "variant",
  [
    v if v == "sam" else pytest.param(v, marks=pytest.mark.slow)
    for v in sorted(VARIANTS)
  ],
)
def test_only_the_clean_pass_moves_batch_stats(variant):
  initial = _initial_variables()["batch_stats"]
  sgd = _one_step(optax.sgd(0.1, momentum=0.9))
  state = _one_step(
    optax.chain(VARIANTS[variant](), optax.sgd(0.1, momentum=0.9))
  )
  assert not jax.tree.all(jax.tree.map(np.allclose, state.batch_stats, initial))
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
    state.batch_stats,
    sgd.batch_stats,
  )
  assert not jax.tree.all(jax.tree.map(np.allclose, state.params, sgd.params))


def test_loss_fn_drops_updates_and_reuses_its_masks():
  per_example_loss = recipe_scope()["per_example_loss"]
  batch = BATCHES[0]
  variables = _initial_variables()
  params, stats = variables["params"], variables["batch_stats"]
  rngs = {"dropout": jax.random.key(1)}
  loss_fn = sam_optax.flax.linen_loss_fn(
    _DenseNet().apply, per_example_loss, batch_stats=stats, rngs=rngs
  )
  assert loss_fn.couples_examples

  @jax.jit
  def passes(params):
    clean = sam_optax.flax.linen_clean_pass(
      _DenseNet().apply,
      per_example_loss,
      params,
      batch,
      batch_stats=stats,
      rngs=rngs,
    )
    grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    return clean, loss_fn(params, batch), loss_fn(params, batch), grads

  clean, losses, again, grads = passes(params)
  # The same rngs: the clean pass's masks; every call the same masks.
  np.testing.assert_allclose(losses, clean.losses, rtol=1e-6)
  np.testing.assert_array_equal(again, losses)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
    clean.grads,
    grads,
  )
  # The clean pass returns the moved statistics; loss_fn keeps none.
  assert not np.allclose(
    clean.batch_stats["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"]
  )


def test_without_batch_stats_or_rngs():
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.ones((1, 64)))["params"]
  loss = lambda m, b: jnp.sum(m(b["image"].reshape(BATCH, -1)) ** 2, -1)
  loss_fn = sam_optax.flax.linen_loss_fn(model.apply, loss)
  assert not loss_fn.couples_examples
  clean = sam_optax.flax.linen_clean_pass(model.apply, loss, params, BATCHES[0])
  assert clean.batch_stats is None
  np.testing.assert_allclose(
    loss_fn(params, BATCHES[0]), clean.losses, rtol=1e-6
  )
