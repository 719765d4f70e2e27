"""What a benchmark cannot pin: compiled FLOPs and the number of compilations.

FLOPs are XLA's cost analysis of the compiled step (``compiled_flops``) on
an MLP where ``B·d ≫ d`` (a forward pass is about 250 ``d``), so a bound of
a few ``d`` cannot hide a pass. LookSAM, Momentum-SAM, GSAM, WSAM and VaSSO
are pinned in ``test_new_variants.py``, RW-SAM (SAM plus one forward and the
probe) in ``test_rw_sam.py``; this file pins SAM itself against the step
written by hand, USAM, ASAM, F-SAM, m-SAM and the probe.

XLA counts a ``lax.cond`` at its costlier branch: SAM's step is charged for
the scaled norm it only runs when the plain one overflows or underflows
(about ``6 d``: the largest entry, two multiplications, the squares), so
the bound on SAM over the hand-written step is ``10 d``; what runs is the
plain branch (``experiments/probe_cost.py --plain`` times it).

Compilations: a jitted train step called on several steps (new batches, new
keys, new states) traces once, and ``optax.inject_hyperparams`` with a
changing ``rho`` (or RW-SAM's ``lam``) does not retrace.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import sam_optax
from sam_optax import _per_example

from _problems import compiled_flops
from _problems import mean_loss
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

RHO = 0.05
DELTA = 1e-12


@functools.cache
def _problem():
  params = mlp_params(jax.random.key(0), in_dim=64, hidden=128, out_dim=10)
  batch = mlp_batch(jax.random.key(1), size=128, in_dim=64, out_dim=10)
  size = sum(x.size for x in jax.tree.leaves(params))
  return params, batch, size


def _grad(params, batch):
  return jax.grad(mean_loss, argnums=1)(mlp_loss, params, batch)


def _step_flops(tx, pass_gradient=True):
  params, batch, _ = _problem()

  def step(params, state):
    grads = _grad(params, batch) if pass_gradient else None
    return tx.update(
      grads, state, params, loss_fn=mlp_loss, batch=batch, key=jax.random.key(0)
    )[0]

  return compiled_flops(step, params, tx.init(params))


@functools.cache
def _by_hand_flops():
  """SAM written by hand: ``∇L(w + ρ g/(‖g‖ + δ))``, one norm, one scale."""
  params, batch, _ = _problem()

  def step(params):
    g = _grad(params, batch)
    epsilon = optax.tree.scale(RHO / (optax.tree.norm(g) + DELTA), g)
    return _grad(optax.tree.add(params, epsilon), batch)

  return compiled_flops(step, params)


def test_sam_costs_the_step_written_by_hand():
  _, _, d = _problem()
  sam = _step_flops(sam_optax.sam(RHO))
  assert 0 <= sam - _by_hand_flops() <= 10 * d, (sam, _by_hand_flops(), d)


@pytest.mark.slow
def test_usam_asam_and_f_sam_cost_two_passes_and_elementwise_work():
  """USAM has no norm; ASAM adds its scale ``|w| + η`` (twice), F-SAM its
  momentum of the gradient: O(d) each."""
  _, _, d = _problem()
  hand = _by_hand_flops()
  assert 0 <= hand - _step_flops(sam_optax.usam(RHO)) <= 4 * d
  for tx in (sam_optax.asam(0.5), sam_optax.f_sam(RHO)):
    assert 0 <= _step_flops(tx) - hand <= 16 * d


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_size", [16, 32])
def test_m_sam_costs_sam_plus_elementwise_work_per_micro_batch(
  micro_batch_size,
):
  """m-SAM's FLOPs are SAM's (the same examples through the same passes)
  plus each micro-batch's perturbation: O(d) per micro-batch."""
  _, batch, d = _problem()
  micro_batches = batch["y"].shape[0] // micro_batch_size
  m_sam = _step_flops(sam_optax.m_sam(RHO, micro_batch_size), False)
  assert 0 <= m_sam - _by_hand_flops() <= 16 * d * micro_batches


def test_probe_costs_a_few_operations_per_entry():
  """One draw of ``d/32`` words and an unpacking: about 8 operations per
  entry as XLA counts them (7.7 here), the Threefry rounds of the words
  and the unpacking. Each leaf's kernel hashes its own words (it was 18.7
  when every leaf's kernel carried the whole draw's rounds, and XLA counted
  them all in each). A Threefry draw per entry, as
  ``jax.random.rademacher`` is, costs 55 with its loop counted once, and
  the rounds fused into the unpacking (32 entries a word) would cost over
  100."""
  params, _, d = _problem()
  probe = compiled_flops(
    lambda key: _per_example.rademacher_like(key, params), jax.random.key(0)
  )
  assert probe <= 10 * d, probe / d


# --- Compilations -------------------------------------------------------------

NUM_STEPS = 3


def _train(tx, *, pass_gradient=True, hyperparams=None):
  """Runs ``NUM_STEPS`` jitted steps of ``tx`` then SGD on new batches and
  keys (and, if given, new hyperparameter values each step). Returns how
  often the step was traced and the jitted step's cache size."""
  params, _, _ = _problem()
  chain = optax.chain(tx, optax.sgd(0.1))
  traces = []

  @jax.jit
  def step(params, state, batch, key):
    traces.append(1)  # runs once per trace, never at run time
    grads = _grad(params, batch) if pass_gradient else None
    updates, state = chain.update(
      grads, state, params, loss_fn=mlp_loss, batch=batch, key=key
    )
    return optax.apply_updates(params, updates), state

  state = chain.init(params)
  for i in range(NUM_STEPS):
    if hyperparams is not None:
      for name, values in hyperparams.items():
        state[0].hyperparams[name] = jnp.asarray(values[i], jnp.float32)
    batch = mlp_batch(jax.random.key(10 + i), size=32, in_dim=64, out_dim=10)
    params, state = step(params, state, batch, jax.random.key(i))
  return len(traces), step._cache_size()


@pytest.mark.parametrize(
  "name",
  [
    "sam",
    "rw_sam",
    "look_sam",
    pytest.param("momentum_sam", marks=pytest.mark.slow),
    pytest.param("gsam", marks=pytest.mark.slow),
    pytest.param("m_sam", marks=pytest.mark.slow),
  ],
)
def test_a_jitted_train_step_compiles_once(name):
  """New batches, keys and states (LookSAM's counter, Momentum-SAM's
  momentum) reuse the one compiled step."""
  tx, pass_gradient = {
    "sam": (sam_optax.sam(RHO), True),
    "rw_sam": (sam_optax.rw_sam(RHO), False),
    "look_sam": (sam_optax.look_sam(RHO, 2, 0.7), True),
    "momentum_sam": (sam_optax.momentum_sam(RHO, 0.9), False),
    "gsam": (sam_optax.gsam(RHO, 0.3), True),
    "m_sam": (sam_optax.m_sam(RHO, 8), False),
  }[name]
  assert _train(tx, pass_gradient=pass_gradient) == (1, 1)


RHOS = (0.05, 0.1, 0.02)


def test_a_changing_rho_in_inject_hyperparams_does_not_recompile():
  tx = optax.inject_hyperparams(sam_optax.sam)(rho=RHO)
  assert _train(tx, hyperparams={"rho": RHOS}) == (1, 1)


@pytest.mark.slow
def test_changing_rho_and_lam_do_not_recompile_rw_sam():
  rw = optax.inject_hyperparams(sam_optax.rw_sam)(rho=RHO, lam=0.5)
  lams = (0.5, 2.0, 0.1)
  assert _train(
    rw, pass_gradient=False, hyperparams={"rho": RHOS, "lam": lams}
  ) == (1, 1)
