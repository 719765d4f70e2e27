"""Ours against the authors' own code, on one fixed problem.

``tests/data/authors_trajectories.npz`` holds a 20-32-32-10 tanh MLP's
weights (``x @ W + b``), ten batches of 32 examples, and the flattened
parameters ``[w1, b1, w2, b2, w3, b3]`` after each of 10 steps of the
authors' optimizer code with ``torch.optim.SGD(lr=0.1, momentum=0.9)`` as
the base, float32. They were produced by ``tests/data/authors_code.py``
with the authors' files fetched at these commits into ``/work/peer/src``
(outside this repository; torch 2.14.1, CPU)::

  LIONS-EPFL/SAMPa 01093ef6eb35   train.py, utility.py -> src/sampa/
  dydjw9/Efficient_SAM 1e06840c466b   utils/Esam.py -> src/esam/
  chandar-lab/Lookbehind-SAM ac7c5af37b1c   lookbehind.py -> src/lookbehind/
  BingcongLi/VaSSO 3524bad45d63   solver/{vasso,build}.py,
                                  utils/{configurable,register}.py -> src/vasso/
  intelligent-machine-learning/dlrover 05e4f7647677
      atorch/atorch/optimizers/wsam.py -> src/wsam/atorch/optimizers/
      (with a no-op atorch/optimizers/utils.py: the MLP has no BatchNorm)

  python3 -m venv /work/venvs/variants-a-peer
  /work/venvs/variants-a-peer/bin/pip install torch numpy
  /work/venvs/variants-a-peer/bin/python tests/data/authors_code.py
  cp /work/peer/authors_trajectories.npz tests/data/

Each official loop is driven as its repository does (ESAM's ``train.py``
loop body, Lookbehind-SAM's ``example_cifar.py`` with ``k`` steps on each
batch, WSAM's README two-step use with ``max_norm=None``, VaSSO's
``utils/engine.py``, SAMPa's ``train.run`` itself with its two Fabric ranks
as two threads and ``all_reduce`` a sum). Our transforms, jitted, follow the
same trajectories to ~1e-7; each test also shows that the check separates
the choices (the other form differs by far more).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

DATA = "tests/data/authors_trajectories.npz"
NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")
ATOL = 1e-6  # float32 rounding, torch against XLA, after 10 steps


@functools.cache
def _data():
  import pathlib

  path = pathlib.Path(__file__).resolve().parent / "data"
  return dict(np.load(path / "authors_trajectories.npz"))


def _params():
  return {n: jnp.asarray(_data()[f"param_{i}"]) for i, n in enumerate(NAMES)}


def _batches():
  d = _data()
  return [
    {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    for x, y in zip(d["xs"], d["ys"], strict=True)
  ]


def _logits(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  h = jnp.tanh(h @ p["w2"] + p["b2"])
  return h @ p["w3"] + p["b3"]


def cross_entropy(p, batch):
  """``torch.nn.CrossEntropyLoss(reduction="none")``."""
  return optax.softmax_cross_entropy_with_integer_labels(
    _logits(p, batch["x"]), batch["y"]
  )


def smooth_cross_entropy(p, batch, smoothing=0.1):
  """SAMPa's ``utility.smooth_crossentropy``: KL to the smoothed labels."""
  log_p = jax.nn.log_softmax(_logits(p, batch["x"]))
  rows = jnp.arange(log_p.shape[0])
  target = jnp.full_like(log_p, smoothing / (log_p.shape[1] - 1))
  target = target.at[rows, batch["y"]].set(1 - smoothing)
  return jnp.sum(target * (jnp.log(target) - log_p), axis=-1)


def _flat(p):
  return np.concatenate([np.ravel(p[n]) for n in NAMES])


def _sgd():
  return optax.sgd(0.1, momentum=0.9)


def _trajectory(tx, loss_fn, batches, extra=lambda t: {}):
  step = jax.jit(
    lambda p, s, b, e: tx.update(None, s, p, loss_fn=loss_fn, batch=b, **e)
  )
  params = _params()
  state = tx.init(params)
  out = []
  for t, batch in enumerate(batches):
    updates, state = step(params, state, batch, extra(t))
    params = optax.apply_updates(params, updates)
    out.append(_flat(params))
  return np.stack(out)


def _check(name, got, other=None, margin=100):
  expected = _data()[name]
  assert got.shape == expected.shape == (10, 2058)
  np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
  if other is not None:  # the check tells the choices apart
    assert np.abs(other - expected).max() > margin * ATOL


def test_wsam_decoupled():
  """atorch's ``WeightedSAM`` default, ``decouple=True``: ``wsam(...,
  decoupled_base=, learning_rate=)``. (Against the coupled form too, and
  the other variants: ``-m slow``.)"""
  _check(
    "wsam_decoupled",
    _trajectory(
      sam_optax.wsam(0.05, 0.9, decoupled_base=_sgd(), learning_rate=0.1),
      cross_entropy,
      _batches(),
    ),
  )


@pytest.mark.slow
def test_wsam_decoupled_and_coupled():
  """atorch's ``WeightedSAM(decouple=True)`` (its default) and
  ``decouple=False``: ``wsam(decoupled_base=, learning_rate=)`` and
  ``chain(wsam, sgd)``."""
  batches = _batches()
  decoupled = _trajectory(
    sam_optax.wsam(0.05, 0.9, decoupled_base=_sgd(), learning_rate=0.1),
    cross_entropy,
    batches,
  )
  coupled = _trajectory(
    optax.chain(sam_optax.wsam(0.05, 0.9), _sgd()), cross_entropy, batches
  )
  _check("wsam_decoupled", decoupled, other=coupled)
  _check("wsam_coupled", coupled, other=decoupled)


@pytest.mark.slow
def test_vasso_defaults_are_the_official_codes():
  """VaSSO's ``solver/vasso.py`` with ``theta=0.9`` (its training script's):
  ``vasso(ρ)``'s defaults, ``θ = 0.9`` and ``d_1 = g_1``. With ``θ = 0.9``
  the start matters little (the first gradient's weight decays as
  ``0.1^t``): ``d_0 = 0`` is off by ~9e-6 here, the old default ``θ = 0.4``
  by ~2e-3."""
  batches = _batches()
  ours = _trajectory(
    optax.chain(sam_optax.vasso(0.05), _sgd()), cross_entropy, batches
  )
  zero_start = _trajectory(
    optax.chain(sam_optax.vasso(0.05, 0.9, start="zero"), _sgd()),
    cross_entropy,
    batches,
  )
  old_theta = _trajectory(
    optax.chain(sam_optax.vasso(0.05, 0.4, start="zero"), _sgd()),
    cross_entropy,
    batches,
  )
  _check("vasso_theta_0.9", ours, other=zero_start, margin=5)
  _check("vasso_theta_0.9", ours, other=old_theta)


def test_sampa():
  """SAMPa's ``train.run`` with ``og = λ = 0.2``, ``ρ = 0.1``, no weight
  decay: the auxiliary step is the base SGD's (with its momentum), and the
  official loop takes ``∇f(x̃_t)`` on the previous batch (``batch``) and
  ``∇f(y_{t+1})`` on the current one (``next_batch``); the first step's
  previous batch is its own."""
  batches = _batches()
  tx = optax.chain(sam_optax.sampa(0.1, lam=0.2, auxiliary_step=_sgd()), _sgd())
  ours = _trajectory(
    tx,
    smooth_cross_entropy,
    [batches[max(t - 1, 0)] for t in range(10)],
    lambda t: {"next_batch": batches[t]},
  )
  _check("sampa_og_0.2", ours)


@pytest.mark.slow
def test_sampa_needs_the_momentum_in_its_auxiliary_step():
  """With ``learning_rate`` alone (the paper's ``y = x − η ∇f(y)``) the
  trajectory leaves the official code's (which steps ``y`` with SGD's
  momentum too)."""
  batches = _batches()
  plain_lr = _trajectory(
    optax.chain(sam_optax.sampa(0.1, 0.1, lam=0.2), _sgd()),
    smooth_cross_entropy,
    [batches[max(t - 1, 0)] for t in range(10)],
    lambda t: {"next_batch": batches[t]},
  )
  assert np.abs(plain_lr - _data()["sampa_og_0.2"]).max() > 100 * ATOL


@pytest.mark.slow
def test_esam():
  """ESAM's ``utils/Esam.py`` with ``β = 1``: ``gamma=0.5`` there selects
  the examples strictly above the 16th largest rise, 15 of 32, which is
  ``esam(gamma=15/32)`` here; ``gamma=1`` is SAM in both."""
  batches = _batches()
  selected = _trajectory(
    optax.chain(sam_optax.esam(0.05, 1.0, 15 / 32), _sgd()),
    cross_entropy,
    batches,
  )
  every = _trajectory(
    optax.chain(sam_optax.esam(0.05, 1.0, 1.0), _sgd()),
    cross_entropy,
    batches,
  )
  _check("esam_gamma_0.5", selected, other=every)
  _check("esam_gamma_1", every, other=selected)


@pytest.mark.slow
def test_lookbehind_sam():
  """Lookbehind-SAM's ``LookbehindSAM(k_steps=2, alpha=0.5)`` as in
  ``example_cifar.py`` (``k`` steps on each batch); its fast weights
  (``cached_params``) against our parameters."""
  batches = [b for b in _batches()[:5] for _ in range(2)]
  ours = _trajectory(
    sam_optax.lookbehind_sam(0.05, 2, 0.5, optimizer=_sgd()),
    cross_entropy,
    batches,
  )
  no_lookbehind = _trajectory(
    optax.chain(sam_optax.sam(0.05), _sgd()), cross_entropy, batches
  )
  _check("lookbehind_k2_alpha_0.5", ours, other=no_lookbehind)


def test_gcsam_authors_code():
  """GCSAM's official script (Mohamed-Hassan22/GCSAM 835c2b49ca3b,
  ``cifar10_gcsam_resnet50.py``: its ``GCSAM`` class, run by
  ``tests/data/gcsam_authors_record.py``, whose docstring has the commands;
  torch 2.14.1, CPU, the weights in ``nn.Linear``'s ``[out, in]`` layout).
  Its ascent divides by the raw gradient's norm and its descent is not
  centralized: ``gcsam(norm="gradient", centralize_descent=False)``. The
  paper's formula (the default) differs by far more."""
  import pathlib

  path = pathlib.Path(__file__).resolve().parent / "data" / "gcsam_authors.npz"
  expected = np.load(path)["gcsam"]
  batches = _batches()
  ours = _trajectory(
    optax.chain(
      sam_optax.gcsam(0.05, norm="gradient", centralize_descent=False), _sgd()
    ),
    cross_entropy,
    batches,
  )
  paper = _trajectory(
    optax.chain(sam_optax.gcsam(0.05), _sgd()), cross_entropy, batches
  )
  assert ours.shape == expected.shape == (10, 2058)
  np.testing.assert_allclose(ours, expected, rtol=0, atol=ATOL)
  assert np.abs(paper - expected).max() > 100 * ATOL
