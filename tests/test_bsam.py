"""bSAM against the authors' code, its formula and its SAM limit.

``tests/data/bsam_authors.npz`` is the trajectory of the authors' own
``build_bsam_optimizer`` (team-approx-bayes/bayesian-sam at 936eec1,
``optim.py``, run unmodified under jax 0.4.30 in its own venv, outside this
repository) on a 20-32-32-10 tanh MLP with fixed weights and batches, 10
jitted steps in float32, ``batchsplit`` 1 and 2, with the noise each step drew
(``util.normal_like_tree`` on the step's keys). It was written by::

  git --git-dir=<fetch of github:team-approx-bayes/bayesian-sam> archive \
    HEAD | tar x -C /work/peer/bsam
  python3 -m venv /work/peer/bsam/venv
  /work/peer/bsam/venv/bin/pip install jax==0.4.30 numpy tqdm
  cp tests/data/bsam_authors_record.py /work/peer/bsam/record.py
  cd /work/peer/bsam && venv/bin/python record.py \
    <this repository>/tests/data/bsam_authors.npz

(``bsam_authors_record.py`` imports their ``optim.build_bsam_optimizer`` and
``util.normal_like_tree``; it is ours, their code is not copied here.) Their
noise comes from their own key-splitting scheme, which ``bsam`` does not
copy: the test passes the recorded draws to ``update`` as ``noise=``
(``bsam``'s explicit noise argument), so both runs see the same ``z`` and
everything else is computed independently.
"""

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

from _problems import add
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

DATA = pathlib.Path(__file__).parent / "data" / "bsam_authors.npz"
# record.py's hyperparameters (the authors' names in the comments).
AUTHORS = dict(
  learning_rate=0.1,  # learningrate (lrfactor = 1)
  num_data=1000,  # Ndata
  rho=0.05,  # rho
  b1=0.9,  # beta1
  b2=0.9,  # beta2
  weight_decay=25.0 / 1000,  # wdecay = priorprec / Ndata
  damping=0.1,  # damping
  init_precision=1.0,  # s_init
)
STEPS = 10
TOL = dict(rtol=2e-5, atol=1e-6)


@functools.cache
def _authors():
  return dict(np.load(DATA))


def _tree(prefix):
  data = _authors()
  return {
    f"layer{i}": {
      leaf: jnp.asarray(data[f"{prefix}['layer{i}']['{leaf}']"])
      for leaf in ("b", "w")
    }
    for i in range(3)
  }


def _authors_loss(params, batch):
  """Their network and loss: tanh MLP, mean softmax cross-entropy."""
  h = batch["x"]
  for i in range(3):
    h = h @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
    if i < 2:
      h = jnp.tanh(h)
  return optax.softmax_cross_entropy(h, batch["y"])


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@pytest.mark.parametrize(
  "split, use_jit",
  [
    pytest.param(1, True, id="split_1-jit"),
    pytest.param(2, True, id="split_2-jit"),
    pytest.param(1, False, id="split_1-no_jit", marks=pytest.mark.slow),
    pytest.param(2, False, id="split_2-no_jit", marks=pytest.mark.slow),
  ],
)
def test_authors_code(split, use_jit):
  """10 steps of ``bsam`` equal the authors' weights, momentum and precision
  to float32 rounding (observed: 6e-8), with the same noise draws; the clean
  gradient is given on even steps, None on odd ones (it is not used)."""
  data = _authors()
  tx = sam_optax.bsam(
    **AUTHORS, micro_batch_size=None if split == 1 else 32 // split
  )

  def step(grads, state, params, batch, noise):
    return tx.update(
      grads, state, params, loss_fn=_authors_loss, batch=batch, noise=noise
    )

  step = jax.jit(step) if use_jit else step
  params = _tree("init")
  state = tx.init(params)
  for t in range(STEPS if use_jit else 3):
    batch = {
      "x": jnp.asarray(data["x"][t]),
      "y": jnp.asarray(data["y_onehot"][t]),
    }
    draws = [_tree(f"m{split}/step{t}/noise{j}") for j in range(split)]
    noise = draws[0] if split == 1 else _stack(draws)
    grads = (
      jax.grad(lambda p, b=batch: _authors_loss(p, b).mean())(params)
      if t % 2 == 0
      else None
    )
    updates, state = step(grads, state, params, batch, noise)
    params = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(params, _tree(f"m{split}/step{t}/w"), **TOL)
    chex.assert_trees_all_close(
      state.momentum, _tree(f"m{split}/step{t}/gm"), **TOL
    )
    chex.assert_trees_all_close(
      state.precision, _tree(f"m{split}/step{t}/s"), **TOL
    )
  assert int(state.count) == (STEPS if use_jit else 3)


# --- The formula, written out -----------------------------------------------

HP = dict(
  learning_rate=0.3,
  num_data=50,
  rho=0.2,
  b1=0.8,
  b2=0.7,
  weight_decay=0.01,
  damping=0.05,
  init_precision=2.0,
)
MASK = {
  "hidden": {"kernel": True, "bias": False},
  "out": {"kernel": False, "bias": True},
}


@jax.jit
def _grad(params, batch):
  return jax.grad(lambda p: mlp_loss(p, batch).mean())(params)


def bsam_reference(params, batch, memory, noise, hp, mask=None, micro=None):
  """One step of the formula, on ``micro``-sized contiguous micro-batches,
  ``noise`` a list (one draw per micro-batch)."""
  s = memory.get(
    "s", jax.tree.map(lambda w: hp["init_precision"] + 0 * w, params)
  )
  m = memory.get("m", jax.tree.map(jnp.zeros_like, params))
  t = memory.get("t", 0)
  size = len(batch["y"])
  micro = micro or size
  advs, curvatures = [], []
  for j, z in zip(range(0, size, micro), noise):
    part = jax.tree.map(lambda x, j=j: x[j : j + micro], batch)
    noisy = jax.tree.map(
      lambda w, zz, ss: w + zz / jnp.sqrt(hp["num_data"] * ss), params, z, s
    )
    g = _grad(noisy, part)
    eps = jax.tree.map(lambda gg, ss: hp["rho"] * gg / ss, g, s)
    if mask is not None:
      eps = jax.tree.map(lambda e, keep: e if keep else 0 * e, eps, mask)
    advs.append(_grad(add(params, eps), part))
    curvatures.append(
      jax.tree.map(lambda gg, ss: jnp.sqrt(ss) * jnp.abs(gg), g, s)
    )
  mean = lambda trees: jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
  g_bar, h_bar = mean(advs), mean(curvatures)
  b1, b2, delta = hp["b1"], hp["b2"], hp["weight_decay"]
  m = jax.tree.map(
    lambda mm, g, w: b1 * mm + (1 - b1) * (g + delta * w), m, g_bar, params
  )
  lr = hp["learning_rate"]
  lr = lr(t) if callable(lr) else lr
  out = jax.tree.map(lambda mm, ss: -lr * mm / ss, m, s)
  s = jax.tree.map(
    lambda ss, h: b2 * ss + (1 - b2) * (h + hp["damping"] + delta), s, h_bar
  )
  return out, {"s": s, "m": m, "t": t + 1}


def _noise(params, count, seed):
  keys = jax.random.split(jax.random.key(seed), count)
  return [
    jax.tree.map(
      lambda w, k=k: jax.random.normal(jax.random.fold_in(k, w.size), w.shape),
      params,
    )
    for k in keys
  ]


def _run(tx, batches, noises, use_jit=False, micro=None):
  params = mlp_params(jax.random.key(0))
  state = tx.init(params)

  def step(grads, state, params, batch, noise):
    return tx.update(
      grads, state, params, loss_fn=mlp_loss, batch=batch, noise=noise
    )

  step = jax.jit(step) if use_jit else step
  outs, states = [], []
  for t, (batch, noise) in enumerate(zip(batches, noises)):
    z = noise[0] if micro is None else _stack(noise)
    grads = _grad(params, batch) if t < 2 else None
    out, state = step(grads, state, params, batch, z)
    outs.append(out)
    states.append(state)
    params = optax.apply_updates(params, out)
  return outs, states


def _reference_run(batches, noises, hp, mask=None, micro=None):
  params, memory, outs, memories = mlp_params(jax.random.key(0)), {}, [], []
  step = jax.jit(lambda p, b, m, z: bsam_reference(p, b, m, z, hp, mask, micro))
  for batch, noise in zip(batches, noises, strict=True):
    out, memory = step(params, batch, memory, noise)
    outs.append(out)
    memories.append(memory)
    params = optax.apply_updates(params, out)
  return outs, memories


def _batches(count=4):
  return [mlp_batch(jax.random.key(10 + t), size=8) for t in range(count)]


@pytest.mark.parametrize(
  "micro, mask, use_jit",
  [
    pytest.param(
      None, None, True, id="whole_batch-jit", marks=pytest.mark.slow
    ),
    pytest.param(
      None, None, False, id="whole_batch-no_jit", marks=pytest.mark.slow
    ),
    pytest.param(4, None, True, id="micro_4-jit", marks=pytest.mark.slow),
    pytest.param(None, MASK, True, id="perturb_mask-jit"),
  ],
)
def test_formula(micro, mask, use_jit):
  """Four steps against the formula: the update and the state (steps 0-1
  with the clean gradient, 2-3 with ``updates=None``)."""
  batches = _batches()
  params = mlp_params(jax.random.key(0))
  count = 1 if micro is None else 8 // micro
  noises = [_noise(params, count, seed=t) for t in range(4)]
  tx = sam_optax.bsam(**HP, micro_batch_size=micro, perturb_mask=mask)
  outs, states = _run(tx, batches, noises, use_jit, micro)
  ref_outs, memories = _reference_run(batches, noises, HP, mask, micro)
  for out, state, ref, memory in zip(outs, states, ref_outs, memories):
    chex.assert_trees_all_close(out, ref, **TOL)
    chex.assert_trees_all_close(state.precision, memory["s"], **TOL)
    chex.assert_trees_all_close(state.momentum, memory["m"], **TOL)


@pytest.mark.slow
def test_key_draws_the_noise():
  """With ``key``, the noise is ``z = N(0, 1)`` drawn per leaf and per
  micro-batch: the same as passing those draws as ``noise``; different keys
  give different steps."""
  params = mlp_params(jax.random.key(0))
  batch = _batches(1)[0]
  tx = sam_optax.bsam(**HP, micro_batch_size=4)
  state = tx.init(params)
  key = jax.random.key(7)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  draws = jax.tree.unflatten(
    treedef,
    [jax.random.normal(k, (2, *x.shape)) for k, x in zip(keys, leaves)],
  )
  update = jax.jit(
    functools.partial(
      tx.update, None, state, params, loss_fn=mlp_loss, batch=batch
    )
  )
  by_key, _ = update(key=key)
  by_noise, _ = update(noise=draws)
  chex.assert_trees_all_equal(by_key, by_noise)
  other, _ = update(key=jax.random.key(8))
  assert not np.allclose(
    np.asarray(other["hidden"]["kernel"]),
    np.asarray(by_key["hidden"]["kernel"]),
  )
  # The two micro-batches' draws differ.
  assert not np.allclose(
    draws["hidden"]["kernel"][0], draws["hidden"]["kernel"][1]
  )


def test_sam_limit():
  """``b2 = 1`` (the precision fixed at ``s_0``) and zero noise: USAM with
  radius ``ρ/s_0``, weight decay ``δ``, an EMA of decay ``β_1``, the step
  ``−α/s_0`` — SAM's view as bSAM with the variance held fixed."""
  hp = dict(HP, b2=1.0)
  s0 = hp["init_precision"]
  tx = sam_optax.bsam(**hp)
  sam_like = optax.chain(
    sam_optax.usam(hp["rho"] / s0),
    optax.add_decayed_weights(hp["weight_decay"]),
    optax.ema(hp["b1"], debias=False),
    optax.scale(-hp["learning_rate"] / s0),
  )
  params = mlp_params(jax.random.key(0))
  zero = jax.tree.map(jnp.zeros_like, params)
  state, sam_state = tx.init(params), sam_like.init(params)
  for batch in _batches(3):
    got, state = tx.update(
      None, state, params, loss_fn=mlp_loss, batch=batch, noise=zero
    )
    expected, sam_state = sam_like.update(
      _grad(params, batch), sam_state, params, loss_fn=mlp_loss, batch=batch
    )
    chex.assert_trees_all_close(got, expected, **TOL)
    params = optax.apply_updates(params, got)
  chex.assert_trees_all_close(
    state.precision, jax.tree.map(lambda w: s0 + 0 * w, params)
  )


@pytest.mark.slow
def test_schedule_and_inject_hyperparams():
  """A learning-rate schedule is read at the step count; under
  ``inject_hyperparams`` (``rho`` and ``learning_rate`` injected) the steps
  are the fixed transform's."""
  schedule = optax.linear_schedule(0.3, 0.0, 3)
  batches = _batches(3)
  params = mlp_params(jax.random.key(0))
  noises = [_noise(params, 1, seed=t) for t in range(3)]
  hp = dict(HP, learning_rate=schedule)
  outs, _ = _run(sam_optax.bsam(**hp), batches, noises)
  ref, _ = _reference_run(batches, noises, hp)
  chex.assert_trees_all_close(outs, ref, **TOL)
  injected = optax.inject_hyperparams(sam_optax.bsam)(**HP)
  outs, _ = _run(injected, batches, noises, use_jit=True)
  fixed, _ = _run(sam_optax.bsam(**HP), batches, noises, use_jit=True)
  chex.assert_trees_all_close(outs, fixed, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_ends_a_chain():
  """``chain(clip, bsam)`` is bSAM: the clean gradient (what ``clip``
  clips) is not used, so transforms of it before bSAM change nothing."""
  batch = _batches(1)[0]
  params = mlp_params(jax.random.key(0))
  noise = _noise(params, 1, seed=0)[0]
  alone = sam_optax.bsam(**HP)
  chained = optax.chain(optax.clip_by_global_norm(1e-3), sam_optax.bsam(**HP))
  a, _ = jax.jit(alone.update, static_argnames="loss_fn")(
    _grad(params, batch),
    alone.init(params),
    params,
    loss_fn=mlp_loss,
    batch=batch,
    noise=noise,
  )
  b, _ = jax.jit(chained.update, static_argnames="loss_fn")(
    _grad(params, batch),
    chained.init(params),
    params,
    loss_fn=mlp_loss,
    batch=batch,
    noise=noise,
  )
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"num_data": 0}, "num_data must be > 0"),
    ({"b1": 1.0}, "b1 must be < 1"),
    ({"b2": 1.5}, "b2 must be <= 1"),
    ({"init_precision": 0.0}, "init_precision must be > 0"),
    ({"damping": -1.0}, "damping must be >= 0"),
    ({"rho": float("nan")}, "rho must be a real number, not NaN"),
    ({"micro_batch_size": 0}, "micro_batch_size must be a positive int"),
  ],
)
def test_bad_hyperparameters(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sam_optax.bsam(**dict(HP, **kwargs))


def test_bad_calls():
  params = mlp_params(jax.random.key(0))
  batch = _batches(1)[0]
  tx = sam_optax.bsam(**HP, micro_batch_size=4)
  state = tx.init(params)
  with pytest.raises(TypeError, match="needs the keyword argument `key`"):
    tx.update(None, state, params, loss_fn=mlp_loss, batch=batch)
  with pytest.raises(
    ValueError, match=r"`noise` leaf .* must have shape \(2, 7\)"
  ):
    tx.update(
      None,
      state,
      params,
      loss_fn=mlp_loss,
      batch=batch,
      noise=jax.tree.map(jnp.zeros_like, params),
    )
  with pytest.raises(ValueError, match="micro_batch_size=3 must divide"):
    sam_optax.bsam(**HP, micro_batch_size=3).update(
      None, state, params, loss_fn=mlp_loss, batch=batch, key=jax.random.key(0)
    )


@pytest.mark.slow
def test_apply_if_finite_around_bsam_sees_only_the_clean_gradient():
  """Pins the documented limit: ``apply_if_finite(bsam)`` tests the clean
  gradient it is given, which bSAM does not use, so a NaN at the noisy or
  perturbed point (the loss NaN outside a box that ``w`` is inside) passes
  into the update and the state."""
  params = mlp_params(jax.random.key(0))
  batch = _batches(1)[0]

  def walled(p, b):
    distance = jnp.max(
      jnp.stack(
        [
          jnp.max(jnp.abs(x - c))
          for x, c in zip(
            jax.tree.leaves(p), jax.tree.leaves(params), strict=True
          )
        ]
      )
    )
    return mlp_loss(p, b) * jnp.where(distance < 1e-6, 1.0, jnp.nan)

  tx = optax.apply_if_finite(sam_optax.bsam(**HP), 3)
  grads = _grad(params, batch)  # finite: w is inside the box
  updates, state = jax.jit(tx.update, static_argnames="loss_fn")(
    grads,
    tx.init(params),
    params,
    loss_fn=walled,
    batch=batch,
    key=jax.random.key(0),
  )
  assert bool(state.last_finite)
  assert not np.all(np.isfinite(np.asarray(updates["hidden"]["kernel"])))
  assert not np.all(
    np.isfinite(np.asarray(state.inner_state.momentum["hidden"]["kernel"]))
  )
