"""Record bSAM trajectories of the authors' optim.py on a fixed small problem.

Run from /work/peer/bsam (the authors' repository, team-approx-bayes/bayesian-sam
at 936eec1) with its own venv:

  venv/bin/python record.py OUT.npz

A 20-32-32-10 tanh MLP, fixed weights and batches (numpy seed 0), 10 steps of
build_bsam_optimizer (jitted, as train.py does), float32, for batchsplit 1 and
2. Saved: the weights, momentum and precision after every step, the batches,
and the noise each step drew (util.normal_like_tree with the step's keys, as
optim.py draws it).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from optim import build_bsam_optimizer
from util import nll_categorical
from util import normal_like_tree

SIZES = (20, 32, 32, 10)
STEPS = 10
BATCH = 32
HP = dict(
  learningrate=0.1,
  beta1=0.9,
  beta2=0.9,
  wdecay=25.0 / 1000.0,
  rho=0.05,
  Ndata=1000,
  s_init=1.0,
  damping=0.1,
)


def init_weights(rng):
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):  # noqa: RUF007
    params[f"layer{i}"] = {
      "w": (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(
        np.float32
      ),
      "b": (0.1 * rng.normal(size=(fan_out,))).astype(np.float32),
    }
  return params


def apply(params, x):
  h = x
  for i in range(len(SIZES) - 1):
    layer = params[f"layer{i}"]
    h = h @ layer["w"] + layer["b"]
    if i < len(SIZES) - 2:
      h = jnp.tanh(h)
  return h


def nllloss(param, netstate, minibatch, is_training):
  del is_training
  return nll_categorical(apply(param, minibatch[0]), minibatch[1]), netstate


def flat(prefix, tree, out):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)


def main(path):
  rng = np.random.default_rng(0)
  params = init_weights(rng)
  xs = rng.normal(size=(STEPS, BATCH, SIZES[0])).astype(np.float32)
  labels = rng.integers(0, SIZES[-1], size=(STEPS, BATCH))
  ys = np.eye(SIZES[-1], dtype=np.float32)[labels]
  out = {"x": xs, "labels": labels, "y_onehot": ys}
  flat("init", params, out)
  for split in (1, 2):
    init, step = build_bsam_optimizer(
      jax.value_and_grad(nllloss, has_aux=True), msharpness=split, **HP
    )
    step = jax.jit(step)
    state = init(
      jax.tree_util.tree_map(jnp.asarray, params), None, jax.random.PRNGKey(42)
    )
    for t in range(STEPS):
      keys = jax.random.split(state.rngkey, split + 1)
      for j in range(split):
        noise, _ = normal_like_tree(state.optstate["w"], keys[j])
        flat(f"m{split}/step{t}/noise{j}", noise, out)
      state, loss = step(state, (jnp.asarray(xs[t]), jnp.asarray(ys[t])), 1.0)
      flat(f"m{split}/step{t}/w", state.optstate["w"], out)
      flat(f"m{split}/step{t}/gm", state.optstate["gm"], out)
      flat(f"m{split}/step{t}/s", state.optstate["s"], out)
      out[f"m{split}/step{t}/loss"] = np.asarray(loss)
  np.savez_compressed(path, **out)
  print("jax", jax.__version__, "wrote", len(out), "arrays to", path)


if __name__ == "__main__":
  main(sys.argv[1])
