"""Small problems shared by the tests: a two-layer MLP and a quadratic; the
compiled FLOPs of a function; and a child process with several CPU devices."""

import json
import os
import pathlib
import re
import subprocess
import sys

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


# --- A child process with several CPU devices ---------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = "RESULTS "
"""The prefix of the line in which a child prints its results."""


def child_environment(devices):
  """``os.environ`` for a child process that sees ``devices`` CPU devices.

  The device count is fixed when jax is imported, so a test that needs
  several devices runs them in a child. The parent's ``XLA_FLAGS`` are kept
  (e.g. the suite's optimization level) with
  ``--xla_force_host_platform_device_count`` appended (the last one counts);
  ``JAX_PLATFORMS=cpu``; the repository root and ``tests/`` come first on
  ``PYTHONPATH``, so the child imports this checkout and ``_problems``.
  Nothing is shared between children but the environment (no fixed ports),
  so tests under pytest-xdist may run theirs at once.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={devices}"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
  )
  return env


def print_results(results):
  """In a child: prints ``results`` (JSON) for :func:`run_child`."""
  print(RESULTS + json.dumps(results), flush=True)


def run_child(args, devices, timeout=300):
  """Runs ``python *args`` with ``devices`` CPU devices; returns its results.

  The child runs from the repository root in :func:`child_environment` and
  reports with :func:`print_results`; it must exit 0. Returns the JSON of
  its ``RESULTS`` line.
  """
  done = subprocess.run(
    [sys.executable, *map(str, args)],
    env=child_environment(devices),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert done.returncode == 0, done.stderr[-5000:]
  lines = [r for r in done.stdout.splitlines() if r.startswith(RESULTS)]
  assert lines, (
    f"no {RESULTS!r} line in the child's output:" + (done.stdout[-3000:])
  )
  return json.loads(lines[-1][len(RESULTS) :])
