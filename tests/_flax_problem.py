"""What the Flax tests share: the guide's recipes and a learnable image task.

The task: 8×8 one-channel images, ``label`` in {0, 1, 2}, each class a fixed
random pattern under noise, in batches of 8 (the recipes' nets take
``batch["image"]`` of shape ``[B, 8, 8, 1]`` and ``batch["label"]``).
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from _problems import guide_snippet

BATCH = 8
CLASSES = 3
STEPS = 40  # of the recipes' training loops
PAGE = "flax.md"


def run_snippet(marker: str, **names) -> dict:
  """Executes the recipe after ``marker`` on docs/guide/flax.md (the one place
  it runs: the page shows it as plain code) with ``names`` defined; its scope."""
  scope = dict(names)
  code = compile(guide_snippet(PAGE, marker), f"docs/guide/{PAGE}", "exec")
  exec(code, scope)  # pylint: disable=exec-used
  return scope


def image_batches(count: int, seed: int = 0, size: int = BATCH) -> list[dict]:
  """``count`` batches of the task (the class patterns do not depend on seed)."""
  patterns = np.random.default_rng(1234).normal(size=(CLASSES, 8, 8, 1))
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    label = rng.integers(0, CLASSES, size)
    image = patterns[label] + 0.7 * rng.normal(size=(size, 8, 8, 1))
    batches.append(
      {
        "image": jnp.asarray(image, jnp.float32),
        "label": jnp.asarray(label, jnp.int32),
      }
    )
  return batches


BATCHES = image_batches(STEPS, seed=0)
TEST_BATCH = image_batches(1, seed=99, size=64)[0]


@functools.cache
def trained_snippet(marker: str) -> dict:
  """The scope of the guide's recipe after training on ``BATCHES`` (once)."""
  return run_snippet(marker, batches=BATCHES, key=jax.random.key(0))


class DenseNet(nnx.Module):
  """Linear + BatchNorm + Dropout + Linear: like the recipe's Net, cheaper."""

  def __init__(self, rngs, features=64):
    self.hidden = nnx.Linear(features, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.head = nnx.Linear(16, CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.hidden(x.reshape(x.shape[0], -1))))
    return self.head(self.dropout(x))
