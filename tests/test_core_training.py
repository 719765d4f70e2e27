"""Training sanity: SAM in an optax chain learns MNIST-1D about as well as SGD."""

import functools
import itertools

import jax
import jax.numpy as jnp
from mnist1d.data import get_dataset_args
from mnist1d.data import make_dataset
import numpy as np
import optax
import pytest

import sam_optax

EPOCHS = 20
BATCH_SIZE = 128


@pytest.fixture(scope="module")
def mnist1d():
  data = make_dataset(get_dataset_args())  # generated locally, no download
  return {
    name: np.asarray(data[name]) for name in ("x", "y", "x_test", "y_test")
  }


def init_mlp(key, sizes=(40, 128, 128, 10)):
  params = {}
  for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
    key, sub = jax.random.split(key)
    params[f"dense{index}"] = {
      "kernel": jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
      "bias": jnp.zeros(fan_out),
    }
  return params


def logits_fn(params, x):
  layers = list(params.values())
  for layer in layers[:-1]:
    x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
  return x @ layers[-1]["kernel"] + layers[-1]["bias"]


def loss_fn(params, batch):
  return optax.softmax_cross_entropy_with_integer_labels(
    logits_fn(params, batch["x"]), batch["y"]
  )


@functools.partial(jax.jit, static_argnums=0)
def train_epoch(tx, params, opt_state, batches):

  def train_step(carry, batch):
    params, opt_state = carry
    grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
    updates, opt_state = tx.update(
      grads, opt_state, params, loss_fn=loss_fn, batch=batch
    )
    return (optax.apply_updates(params, updates), opt_state), None

  (params, opt_state), _ = jax.lax.scan(
    train_step, (params, opt_state), batches
  )
  return params, opt_state


def train_and_test(data, tx, seed=0):
  params = init_mlp(jax.random.key(seed))
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  steps = len(data["x"]) // BATCH_SIZE
  for _ in range(EPOCHS):
    order = rng.permutation(len(data["x"]))[: steps * BATCH_SIZE]
    batches = {
      "x": jnp.asarray(data["x"][order].reshape(steps, BATCH_SIZE, -1)),
      "y": jnp.asarray(data["y"][order].reshape(steps, BATCH_SIZE)),
    }
    params, opt_state = train_epoch(tx, params, opt_state, batches)
  predictions = jnp.argmax(logits_fn(params, data["x_test"]), axis=-1)
  return float(jnp.mean(predictions == data["y_test"]))


def test_sam_learns_mnist1d_about_as_well_as_sgd(mnist1d):
  sgd = optax.sgd(0.05, momentum=0.9)
  sam = optax.chain(sam_optax.sam(0.05), optax.sgd(0.05, momentum=0.9))
  sgd_accuracy = train_and_test(mnist1d, sgd)
  sam_accuracy = train_and_test(mnist1d, sam)
  print(
    f"MNIST-1D MLP, {EPOCHS} epochs: SGD {sgd_accuracy:.3f},"
    f" SAM {sam_accuracy:.3f}"
  )
  assert sgd_accuracy > 0.5, "the baseline itself must learn (chance is 0.1)"
  assert sam_accuracy > 0.5
  assert sam_accuracy > sgd_accuracy - 0.05
