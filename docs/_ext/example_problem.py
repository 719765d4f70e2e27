"""The small problem every example in the documentation runs on.

A two-layer MLP classifier on random data (drawn with NumPy, which compiles
nothing): a step takes milliseconds on a CPU, so the examples run as doctests
in every docs build. ``model`` mimics a Flax model (``init``, ``apply``), and
its parameters are named like Flax's (``kernel``, ``bias``) under a
``backbone`` and a ``head``, which the examples that freeze or mask leaves
use.

Every page of the guide starts with ``from example_problem import *`` (a
hidden ``{testsetup}``): the names in ``__all__`` below, computed once (JAX
arrays are immutable, so an example that rebinds ``params`` changes nothing
for the next page).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  "allclose",
  "batch",
  "grads",
  "key",
  "loss_fn",
  "make_batch",
  "model",
  "params",
]

FEATURES = 8
HIDDEN = 16
CLASSES = 4
BATCH_SIZE = 32


class MLP:
  """``x -> head(tanh(backbone(x)))``, two dense layers."""

  def init(self, seed: int) -> dict[str, dict[str, jax.Array]]:
    rng = np.random.default_rng(seed)

    def dense(fan_in: int, fan_out: int) -> dict[str, jax.Array]:
      kernel = rng.normal(size=(fan_in, fan_out)) / fan_in**0.5
      return {
        "kernel": jnp.asarray(kernel, jnp.float32),
        "bias": jnp.asarray(np.zeros(fan_out), jnp.float32),
      }

    return {"backbone": dense(FEATURES, HIDDEN), "head": dense(HIDDEN, CLASSES)}

  def apply(
    self, params: dict[str, dict[str, jax.Array]], x: jax.Array
  ) -> jax.Array:
    backbone, head = params["backbone"], params["head"]
    hidden = jnp.tanh(x @ backbone["kernel"] + backbone["bias"])
    return hidden @ head["kernel"] + head["bias"]


model = MLP()


def make_batch(seed: int, size: int = BATCH_SIZE) -> dict[str, jax.Array]:
  """``size`` random examples: ``image`` ``[size, 8]``, ``label`` ``[size]``."""
  rng = np.random.default_rng(seed)
  return {
    "image": jnp.asarray(rng.normal(size=(size, FEATURES)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, CLASSES, size=size), jnp.int32),
  }


def loss_fn(params, batch):
  """Per-example cross-entropy, shape ``[B]``: the guide's ``loss_fn``."""
  logits = model.apply(params, batch["image"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])


def allclose(a, b, atol: float = 1e-6) -> bool:
  """Whether two pytrees of arrays agree, leaf by leaf, to ``atol``."""
  return jax.tree.all(
    jax.tree.map(lambda x, y: bool(np.allclose(x, y, atol=atol)), a, b)
  )


params = model.init(seed=0)
batch = make_batch(seed=1)
key = jax.random.key(2)
grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch).mean()))(params)
