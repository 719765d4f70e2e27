"""Small problems shared by the tests: a two-layer MLP and a quadratic; and
the compiled FLOPs of a function."""

import pathlib
import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest


def mlp_params(key, in_dim=5, hidden=7, out_dim=3, dtype=jnp.float32):
  """A nested dict of four leaves, named like Flax's (``kernel``, ``bias``)."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  return {
    "hidden": {
      "kernel": jax.random.normal(k1, (in_dim, hidden), dtype) * 0.5,
      "bias": jax.random.normal(k2, (hidden,), dtype) * 0.1,
    },
    "out": {
      "kernel": jax.random.normal(k3, (hidden, out_dim), dtype) * 0.5,
      "bias": jax.random.normal(k4, (out_dim,), dtype) * 0.1,
    },
  }


def mlp_batch(key, size=8, in_dim=5, out_dim=3):
  kx, ky = jax.random.split(key)
  return {
    "x": jax.random.normal(kx, (size, in_dim)),
    "y": jax.random.randint(ky, (size,), 0, out_dim),
  }


def mlp_loss(params, batch):
  """Per-example softmax cross-entropy, shape [B]."""
  hidden = jnp.tanh(
    batch["x"] @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  )
  logits = hidden @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch["y"]
  )


def mean_loss(loss_fn, params, batch):
  return jnp.mean(loss_fn(params, batch))


def global_norm(tree):
  """``‖tree‖``, written out: the oracle the library's norms are tested against."""
  return jnp.sqrt(
    sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree))
  )


def add(tree, other, scale=1.0):
  """``tree + scale · other``, leaf by leaf."""
  return jax.tree.map(lambda a, b: a + scale * b, tree, other)


def quadratic_problem(seed, dims=(3, 2), size=6):
  """Per-example quadratics ℓ_i(w) = ½ (w−a_i)ᵀ H (w−a_i) over a two-leaf pytree.

  Returns ``(params, batch, loss_fn, hessian)`` with ``hessian`` the dense
  Hessian of ``L_B`` with respect to the flattened parameters.
  """
  rng = np.random.default_rng(seed)
  dim = sum(dims)
  root = rng.normal(size=(dim, dim))
  hessian = root @ root.T / dim + 0.1 * np.eye(dim)
  params = {
    "a": jnp.asarray(rng.normal(size=dims[0]), jnp.float32),
    "b": jnp.asarray(rng.normal(size=dims[1]), jnp.float32),
  }
  batch = {"target": jnp.asarray(rng.normal(size=(size, dim)), jnp.float32)}
  h = jnp.asarray(hessian, jnp.float32)

  def loss_fn(p, b):
    w = jnp.concatenate([p["a"], p["b"]])
    diff = w[None, :] - b["target"]
    return 0.5 * jnp.einsum("bi,ij,bj->b", diff, h, diff)

  return params, batch, loss_fn, hessian


def flatten(tree):
  return jax.flatten_util.ravel_pytree(tree)[0]


def compiled_flops(fn, *args):
  """XLA's FLOP count of ``jax.jit(fn)`` compiled for ``args`` (skips the
  test on a backend that reports none)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  if not cost or "flops" not in cost:
    pytest.skip("this backend reports no FLOP count")
  return cost["flops"]


GUIDE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide"


def guide_snippets(page):
  """The fenced ```python blocks of docs/guide/``page``, in order.

  The guide's pages show the recipes that tests run (with checks against
  their formulas) as plain ```python blocks, so that the documentation's
  doctest builder does not run them a second time; its own examples are
  ``{testcode}`` and ``{doctest}`` blocks.
  """
  text = (GUIDE / page).read_text(encoding="utf-8")
  return re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def guide_snippet(page, marker):
  """The fenced python block right after ``marker`` on docs/guide/``page``."""
  text = (GUIDE / page).read_text(encoding="utf-8")
  assert marker in text, f"docs/guide/{page} lost its snippet {marker}"
  after = text.split(marker, 1)[1]
  return re.match(
    r"\s*```python\n(.*?)^```", after, re.DOTALL | re.MULTILINE
  ).group(1)
