"""GSAM, WSAM, VaSSO, LookSAM and Momentum-SAM against their formulas.

Each formula is written out below with ``jax.grad`` on the tiny MLP, from the
issue's definitions (``δ = 1e-12`` where a norm divides), and each transform
is run over several steps on different batches (the parameters move between
steps, the stateful ones carry their state), with and without ``jit``, alone
and in ``optax.chain``, with the clean gradient given and with
``updates=None``. Then: the limits that are SAM, schedules of the new
hyperparameters, Momentum-SAM's mask, and the cost in passes pinned on
compiled FLOPs (with LookSAM's in-between steps shown to skip the perturbed
pass at run time).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

from _problems import add
from _problems import compiled_flops
from _problems import global_norm
from _problems import mean_loss
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

DELTA = 1e-12
RHO = 0.1
ALPHA = 0.3  # GSAM
GAMMA = 0.8  # WSAM
THETA = 0.4  # VaSSO
EVERY_K = 2  # LookSAM: steps 0 and 2 are SAM steps, 1 and 3 reuse g_v
LOOK_ALPHA = 0.7  # LookSAM
MU = 0.9  # Momentum-SAM
NUM_STEPS = 4
TOL = dict(rtol=2e-5, atol=1e-6)


# --- The formulas, written out ---------------------------------------------


@jax.jit
def grad_mean(params, batch):
  return jax.grad(mean_loss, argnums=1)(mlp_loss, params, batch)


def dot(tree, other):
  return sum(
    jnp.vdot(a, b)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(other))
  )


def scale(tree, factor):
  return jax.tree.map(lambda x: factor * x, tree)


@jax.jit
def perturbed(params, batch, direction, rho=RHO):
  """``∇L_B(w + ρ d / (‖d‖ + δ))``."""
  eps = scale(direction, rho / (global_norm(direction) + DELTA))
  return grad_mean(add(params, eps), batch)


# Each reference: (params, batch, memory) -> (gradient handed on, memory),
# memory a dict of what the method carries between steps ("t": the step).


def sam_reference(params, batch, memory):
  return perturbed(params, batch, grad_mean(params, batch)), memory


def gsam_reference(params, batch, memory, alpha=ALPHA):
  g = grad_mean(params, batch)
  g_adv = perturbed(params, batch, g)
  g_perp = add(g, g_adv, -dot(g, g_adv) / dot(g_adv, g_adv))
  return add(g_adv, g_perp, -alpha), memory


def wsam_reference(params, batch, memory, gamma=GAMMA):
  g = grad_mean(params, batch)
  g_adv = perturbed(params, batch, g)
  return add(g, add(g_adv, g, -1.0), gamma / (1 - gamma)), memory


def vasso_reference(params, batch, memory, theta=THETA):
  g = grad_mean(params, batch)
  d = memory.get("d", scale(g, 0.0))  # d_0 = 0
  d = add(scale(d, 1 - theta), g, theta)
  return perturbed(params, batch, d), {**memory, "d": d}


def look_sam_reference(
  params, batch, memory, every_k=EVERY_K, alpha=LOOK_ALPHA
):
  t = memory.get("t", 0)
  g = grad_mean(params, batch)
  if t % every_k == 0:
    g_adv = perturbed(params, batch, g)
    g_v = add(g_adv, g, -dot(g_adv, g) / dot(g, g))
    return g_adv, {"t": t + 1, "g_v": g_v}
  g_v = memory["g_v"]
  out = add(g, g_v, alpha * global_norm(g) / global_norm(g_v))
  return out, {**memory, "t": t + 1}


def momentum_sam_reference(params, batch, memory, mu=MU):
  v = memory.get("v")
  if v is None:  # v_0 = 0: ε = 0
    out = grad_mean(params, batch)
    v = out
  else:
    out = perturbed(params, batch, scale(v, -1.0))
    v = add(out, v, mu)
  return out, {"v": v}


# name -> (make the transform, its reference, what of its state to compare)
VARIANTS = {
  "gsam": (lambda: sam_optax.gsam(RHO, ALPHA), gsam_reference, None),
  "wsam": (lambda: sam_optax.wsam(RHO, GAMMA), wsam_reference, None),
  "vasso": (
    lambda: sam_optax.vasso(RHO, THETA, start="zero"),
    vasso_reference,
    lambda s, m: (s.direction, m["d"]),
  ),
  "look_sam": (
    lambda: sam_optax.look_sam(RHO, EVERY_K, LOOK_ALPHA),
    look_sam_reference,
    lambda s, m: (s.orthogonal, m["g_v"]),
  ),
  "momentum_sam": (
    lambda: sam_optax.momentum_sam(RHO, MU),
    momentum_sam_reference,
    lambda s, m: (s.momentum, m["v"]),
  ),
}


def _params(seed=0):
  return mlp_params(jax.random.key(seed))


def _batches(count=NUM_STEPS, seed=10):
  return [mlp_batch(jax.random.key(seed + t), size=8) for t in range(count)]


def _references(reference, params, batches, step_size=0.5):
  """The reference's outputs and memories over ``batches``; the parameters
  move by ``−step_size`` times each output."""
  memory, outputs, memories, points = {}, [], [], []
  for batch in batches:
    points.append(params)
    out, memory = reference(params, batch, memory)
    outputs.append(out)
    memories.append(memory)
    params = add(params, out, -step_size)
  return outputs, memories, points


@functools.cache
def _expected(name):
  """The reference run of ``name`` on the shared parameters and batches."""
  return _references(VARIANTS[name][1], _params(), _batches())


def _close(got, expected, tol=None):
  chex.assert_trees_all_close(got, expected, **(tol or TOL))
  assert jax.tree.structure(got) == jax.tree.structure(expected)


def _step(tx, use_jit):
  step = lambda g, s, p, b: tx.update(g, s, p, loss_fn=mlp_loss, batch=b)
  return jax.jit(step) if use_jit else step


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "no_jit"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_steps_alone(name, use_jit):
  """Steps 0-1 with the clean gradient, 2-3 with ``updates=None``."""
  make, _, state_of = VARIANTS[name]
  outputs, memories, points = _expected(name)
  tx = make()
  step = _step(tx, use_jit)
  state = tx.init(points[0])
  for t, batch in enumerate(_batches()):
    params = points[t]
    grads = grad_mean(params, batch) if t < 2 else None
    updates, state = step(grads, state, params, batch)
    _close(updates, outputs[t])
    if state_of is not None:
      _close(*state_of(state, memories[t]))
  if name == "look_sam":
    assert int(state.count) == NUM_STEPS


@pytest.mark.parametrize(
  "name, use_jit",
  [
    *[pytest.param(name, False, id=f"{name}-no_jit") for name in VARIANTS],
    *[
      pytest.param(name, True, id=f"{name}-jit", marks=pytest.mark.slow)
      for name in VARIANTS
    ],
  ],
)
def test_in_chain(name, use_jit):
  """``chain(variant, add_decayed_weights, sgd(lr))``: two steps (under
  ``jit`` too with ``-m slow``; :func:`test_steps_alone` runs both)."""
  make, _, _ = VARIANTS[name]
  outputs, _, points = _expected(name)
  learning_rate, decay = 0.5, 1e-3
  tx = optax.chain(
    make(), optax.add_decayed_weights(decay), optax.sgd(learning_rate)
  )
  step = _step(tx, use_jit)
  state = tx.init(points[0])
  for t, batch in enumerate(_batches(2)):
    updates, state = step(grad_mean(points[t], batch), state, points[t], batch)
    # Weight decay is the base optimizer's, added after the variant.
    expected = jax.tree.map(
      lambda g, w: -learning_rate * (g + decay * w), outputs[t], points[t]
    )
    _close(updates, expected)


@pytest.mark.parametrize(
  "make",
  [
    pytest.param(lambda: sam_optax.gsam(RHO, alpha=0.0), id="gsam_alpha_0"),
    pytest.param(lambda: sam_optax.wsam(RHO, gamma=0.5), id="wsam_gamma_half"),
    pytest.param(lambda: sam_optax.vasso(RHO, theta=1.0), id="vasso_theta_1"),
    pytest.param(
      lambda: sam_optax.look_sam(RHO, every_k=1), id="look_sam_every_step"
    ),
  ],
)
def test_limits_are_sam(make):
  """GSAM with α = 0, WSAM with γ = 1/2, VaSSO with θ = 1 and LookSAM with
  k = 1 are SAM, step after step."""
  outputs, _, points = _references(sam_reference, _params(), _batches(3))
  tx = make()
  state = tx.init(points[0])
  for t, batch in enumerate(_batches(3)):
    updates, state = tx.update(
      grad_mean(points[t], batch),
      state,
      points[t],
      loss_fn=mlp_loss,
      batch=batch,
    )
    _close(updates, outputs[t])


def test_momentum_sam_keeps_the_base_optimizers_trace():
  """After each step of ``chain(momentum_sam(ρ, μ), sgd(lr, momentum=μ))``
  the two momenta agree; the first step is a plain gradient step."""
  tx = optax.chain(sam_optax.momentum_sam(RHO, MU), optax.sgd(0.3, momentum=MU))
  params = _params()
  state = tx.init(params)
  for t, batch in enumerate(_batches(3)):
    clean = grad_mean(params, batch)
    updates, state = tx.update(
      None, state, params, loss_fn=mlp_loss, batch=batch
    )
    if t == 0:
      _close(updates, scale(clean, -0.3))
    _close(state[0].momentum, state[1][0].trace)
    params = optax.apply_updates(params, updates)


def test_momentum_sam_perturb_mask():
  """Second step (``v ≠ 0``): ``ε = −ρ M⊙v / ‖M⊙v‖``; ``v`` covers every
  leaf."""
  mask = {
    "hidden": {"kernel": True, "bias": False},
    "out": {"kernel": False, "bias": True},
  }
  params = _params()
  first, second = _batches(2)
  tx = sam_optax.momentum_sam(RHO, MU, perturb_mask=mask)
  g1, state = tx.update(
    None, tx.init(params), params, loss_fn=mlp_loss, batch=first
  )
  g2, state = tx.update(None, state, params, loss_fn=mlp_loss, batch=second)
  v1 = grad_mean(params, first)
  masked = jax.tree.map(lambda v, keep: -v if keep else 0.0 * v, v1, mask)
  expected = perturbed(params, second, masked)
  _close(g1, v1)
  _close(g2, expected)
  _close(state.momentum, add(expected, v1, MU))


@pytest.mark.parametrize(
  "factory, argument, fixed, static_args",
  [
    pytest.param(sam_optax.gsam, "alpha", {}, (), id="gsam_alpha"),
    pytest.param(
      sam_optax.look_sam,
      "alpha",
      {"every_k": 2},
      ("every_k",),
      id="look_sam_alpha",
    ),
  ],
)
def test_changing_schedule(factory, argument, fixed, static_args):
  """A schedule of a new hyperparameter equals the fixed-value transform
  built anew at each step (``every_k`` static)."""
  schedule = optax.linear_schedule(0.0, 0.6, 3)
  injected = optax.inject_hyperparams(factory, static_args=static_args)(
    rho=RHO, **{argument: schedule}, **fixed
  )
  params = _params()
  state = injected.init(params)
  inner = state.inner_state
  for t, batch in enumerate(_batches(3)):
    grads = grad_mean(params, batch)
    reference = factory(RHO, **{argument: float(schedule(t))}, **fixed)
    expected, inner = reference.update(
      grads, inner, params, loss_fn=mlp_loss, batch=batch
    )
    got, state = injected.update(
      grads, state, params, loss_fn=mlp_loss, batch=batch
    )
    _close(got, expected, dict(rtol=1e-6, atol=1e-7))
    params = add(params, got, -0.5)


# --- Cost in passes ----------------------------------------------------------


@functools.cache
def _cost_problem():
  params = mlp_params(jax.random.key(0), in_dim=64, hidden=128, out_dim=10)
  batch = mlp_batch(jax.random.key(1), size=128, in_dim=64, out_dim=10)
  size = sum(x.size for x in jax.tree.leaves(params))
  return params, batch, 32 * size


def _step_cost(tx, pass_gradient=True, count=None):
  """Compiled FLOPs of ``tx``'s step, the clean gradient computed in it (or
  ``updates=None``), the state an argument (not folded into constants)
  unless ``count`` fixes LookSAM's step counter."""
  params, batch, _ = _cost_problem()

  def step(params, state):
    if count is not None:
      state = state._replace(count=jnp.asarray(count, jnp.int32))
    grads = grad_mean(params, batch) if pass_gradient else None
    return tx.update(grads, state, params, loss_fn=mlp_loss, batch=batch)[0]

  return compiled_flops(step, params, tx.init(params))


@functools.cache
def _reference_costs():
  """``(forward, clean gradient, SAM step)`` FLOPs; SAM is two passes."""
  params, batch, bound = _cost_problem()
  forward = compiled_flops(lambda p: mlp_loss(p, batch), params)
  clean = compiled_flops(lambda p: grad_mean(p, batch), params)
  sam = _step_cost(sam_optax.sam(RHO))
  assert bound < forward / 4, (bound, forward)
  assert 0 <= sam - 2 * clean <= bound
  return forward, clean, sam


def test_cost_of_the_cheap_steps():
  """LookSAM between its SAM steps and Momentum-SAM: one forward-backward.

  Compiled FLOPs of one step against the clean gradient's and SAM's. The
  rest is O(d) elementwise work, pinned below ``32 d``; the MLP has
  ``B·d ≫ d`` (a forward is ~500 d), so that bound cannot hide a pass. A
  constant step counter lets XLA keep only the branch it selects; with the
  counter an argument (the real step), the cost analysis reports the
  costlier branch.
  """
  _, _, bound = _cost_problem()
  _, clean, sam = _reference_costs()
  look = sam_optax.look_sam(RHO, EVERY_K, LOOK_ALPHA)
  assert 0 <= _step_cost(look, count=0) - sam <= bound  # a SAM step
  assert 0 <= _step_cost(look, count=1) - clean <= bound  # a step in between
  momentum = sam_optax.momentum_sam(RHO, MU)
  momentum_step = _step_cost(momentum, pass_gradient=False)
  assert 0 <= momentum_step - clean <= bound  # one pass
  assert _step_cost(momentum) == momentum_step  # a clean gradient: unused


@pytest.mark.slow
def test_cost_of_the_two_pass_steps():
  """GSAM, WSAM, VaSSO: SAM's two passes plus O(d); LookSAM's real step (a
  counter known at run time only) reports its SAM branch."""
  _, _, bound = _cost_problem()
  _, _, sam = _reference_costs()
  for tx in (
    sam_optax.gsam(RHO, ALPHA),
    sam_optax.wsam(RHO, GAMMA),
    sam_optax.vasso(RHO, THETA),
  ):
    assert 0 <= _step_cost(tx) - sam <= bound
    assert _step_cost(tx, pass_gradient=False) == _step_cost(tx)
  look = sam_optax.look_sam(RHO, EVERY_K, LOOK_ALPHA)
  assert 0 <= _step_cost(look) - _step_cost(look, count=0) <= bound


def test_look_sam_skips_the_perturbed_pass_at_run_time():
  """Under ``jit``, ``loss_fn`` runs only on the SAM steps (counted by a
  callback in it; the clean gradient is computed outside the transform)."""
  calls = []

  def counted_loss(params, batch):
    jax.debug.callback(lambda: calls.append(1))
    return mlp_loss(params, batch)

  tx = sam_optax.look_sam(RHO, every_k=3)
  step = jax.jit(
    lambda g, s, p, b: tx.update(g, s, p, loss_fn=counted_loss, batch=b)
  )
  params, batch = _params(), _batches(1)[0]
  state = tx.init(params)
  counts = []
  for _ in range(7):
    updates, state = step(grad_mean(params, batch), state, params, batch)
    jax.block_until_ready(updates)
    counts.append(len(calls))
  assert counts == [1, 1, 1, 2, 2, 2, 3]


def test_look_sam_zero_orthogonal_part_hands_on_the_clean_gradient():
  """``‖g_v‖ = 0`` (one parameter: ``g_adv`` is parallel to ``g``, exactly)."""
  loss_fn = lambda p, b: 0.5 * (p["w"][0] - b) ** 2  # per example
  params = {"w": jnp.zeros(1)}
  batch = jnp.asarray([1.0, 2.0, 3.0, 6.0])
  tx = sam_optax.look_sam(RHO, every_k=2)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(
      None, state, params, loss_fn=loss_fn, batch=batch
    )
  np.testing.assert_array_equal(state.orthogonal["w"], 0.0)
  np.testing.assert_array_equal(updates["w"], -3.0)  # g = w − mean(b)
