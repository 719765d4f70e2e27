"""The problem the docstring examples (``>>>``) run on.

A linear softmax classifier (4 features, 3 classes) on 8 random examples:
``params`` (``w`` and ``b``), the per-example ``loss_fn`` and a ``batch`` of
``x`` and ``y``. The doctest setup (``doctest_global_setup`` in conf.py) is
``from docstring_problem import *`` after importing ``jax``, ``jax.numpy as
jnp``, ``numpy as np``, ``optax`` and ``sam_optax``, so an example in a
docstring may use these names without defining them. The data are drawn with
NumPy, which compiles nothing.
"""

import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["batch", "loss_fn", "params"]

_rng = np.random.default_rng(0)

params = {
  "w": jnp.asarray(_rng.normal(size=(4, 3)) * 0.5, jnp.float32),
  "b": jnp.asarray(np.zeros(3), jnp.float32),
}
batch = {
  "x": jnp.asarray(_rng.normal(size=(8, 4)), jnp.float32),
  "y": jnp.asarray(np.arange(8) % 3, jnp.int32),
}


def loss_fn(params, batch):
  """Per-example cross-entropy, shape ``[B]``."""
  logits = batch["x"] @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
