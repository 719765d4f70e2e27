"""SAMPa, ESAM, Lookbehind-SAM and the multi-step ascent against their
formulas; the authors' options of WSAM, VaSSO and LookSAM.

Each formula is written out below with ``jax.grad`` on the tiny MLP
(``δ = 1e-12`` where a norm divides), and each transform is run over several
steps on different batches (the parameters move between steps, the stateful
ones carry their state), with and without ``jit``, alone and in
``optax.chain``, with the clean gradient given and with ``updates=None``.
Then the limits that are SAM, schedules, ``perturb_mask``, the MultiSteps
and apply_if_finite recipes, the errors, and the cost pinned on compiled
FLOPs. The two-device form of SAMPa runs in a child process
(``XLA_FLAGS=--xla_force_host_platform_device_count=2``), as
``tests/test_data_parallel.py`` does.
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
from _problems import run_child

DELTA = 1e-12
RHO = 0.1
LR = 0.5  # the parameters move by −LR times each output
LAM = 0.3  # SAMPa-λ
BETA, GAMMA = 0.6, 0.5  # ESAM: 4 of 8 examples in the second pass
NUM_STEPS = 3  # multi_step_sam
K, ALPHA, MU = 3, 0.5, 0.9  # lookbehind_sam, its base's momentum
STEPS = 4
TOL = dict(rtol=2e-5, atol=1e-6)
KEY = jax.random.key(7)
SLOW = pytest.mark.slow
# The default suite runs each check under jit; without jit with -m slow.
JIT = [
  pytest.param(True, id="jit"),
  pytest.param(False, id="no_jit", marks=SLOW),
]


def _fast(names, fast):
  """``names`` as parameters, all but ``fast`` marked slow."""
  return [pytest.param(n, marks=() if n in fast else SLOW, id=n) for n in names]


# --- The formulas, written out ---------------------------------------------


@jax.jit
def grad_mean(params, batch):
  return jax.grad(mean_loss, argnums=1)(mlp_loss, params, batch)


def scale(tree, factor):
  return jax.tree.map(lambda x: factor * x, tree)


def unit(tree):
  return scale(tree, 1.0 / (global_norm(tree) + DELTA))


def masked(tree, mask):
  return jax.tree.map(lambda x, m: x if m else 0.0 * x, tree, mask)


MASK = {
  "hidden": {"kernel": True, "bias": False},
  "out": {"kernel": False, "bias": True},
}


def sampa_reference(params, batch, memory, lam=LAM, mask=None):
  """``x̃ = x + ρ ĝ_y``, ``y' = x − LR g_y``; ``(1−λ)∇f(x̃) + λ∇f(y')``."""
  g_y = memory.get("g_y", scale(params, 0.0))
  direction = g_y if mask is None else masked(g_y, mask)
  x_tilde = add(params, unit(direction), RHO)
  y_next = add(params, g_y, -LR)
  new_g_y = grad_mean(y_next, batch)
  out = add(scale(grad_mean(x_tilde, batch), 1 - lam), new_g_y, lam)
  return out, {"g_y": new_g_y}


def _draw(key, beta, params):
  """The Bernoulli(β) mask, one key per leaf of ``jax.random.split``."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [
      jax.random.bernoulli(k, beta, x.shape).astype(jnp.float32)
      for k, x in zip(keys, leaves, strict=True)
    ]
  )


def esam_reference(params, batch, memory, beta=BETA, gamma=GAMMA, mask=None):
  g = grad_mean(params, batch)
  m = _draw(memory["key"], beta, params) if beta < 1 else None
  d = g if m is None else jax.tree.map(jnp.multiply, m, g)
  if mask is not None:
    d = masked(d, mask)
  eps = scale(unit(d), RHO / beta)
  perturbed = add(params, eps)
  if gamma < 1:
    rise = np.asarray(mlp_loss(perturbed, batch) - mlp_loss(params, batch))
    k = max(1, int(np.floor(gamma * len(rise) + 1e-9)))
    chosen = np.argsort(-rise, kind="stable")[:k]
    batch = jax.tree.map(lambda x: x[chosen], batch)
  return grad_mean(perturbed, batch), memory


def multi_step_reference(params, batch, memory, n=NUM_STEPS, mask=None):
  eps = scale(params, 0.0)
  for _ in range(n):
    g = grad_mean(add(params, eps), batch)
    eps = add(eps, unit(g if mask is None else masked(g, mask)), RHO)
  return grad_mean(add(params, eps), batch), memory


def sam_reference(params, batch, memory):
  g = grad_mean(params, batch)
  return grad_mean(add(params, unit(g), RHO), batch), memory


# name -> (make the transform, its reference, uses the key)
VARIANTS = {
  "sampa": (lambda: sam_optax.sampa(RHO, LR, LAM), sampa_reference, False),
  "esam": (lambda: sam_optax.esam(RHO, BETA, GAMMA), esam_reference, True),
  "esam_no_swp": (
    lambda: sam_optax.esam(RHO, 1.0, GAMMA),
    functools.partial(esam_reference, beta=1.0),
    False,
  ),
  "multi_step_sam": (
    lambda: sam_optax.multi_step_sam(RHO, NUM_STEPS),
    multi_step_reference,
    False,
  ),
}


def _params(seed=0):
  return mlp_params(jax.random.key(seed))


def _batches(count=STEPS, seed=10):
  return [mlp_batch(jax.random.key(seed + t), size=8) for t in range(count)]


def _keys(count=STEPS):
  return list(jax.random.split(KEY, count))


def _references(reference, params, batches, keys=None):
  memory, outputs, points = {}, [], []
  for t, batch in enumerate(batches):
    points.append(params)
    if keys is not None:
      memory = {**memory, "key": keys[t]}
    out, memory = reference(params, batch, memory)
    outputs.append(out)
    params = add(params, out, -LR)
  return outputs, points


@functools.cache
def _expected(name):
  _, reference, _ = VARIANTS[name]
  return _references(reference, _params(), _batches(), _keys())


def _close(got, expected, tol=None):
  chex.assert_trees_all_close(got, expected, **(tol or TOL))
  assert jax.tree.structure(got) == jax.tree.structure(expected)


def _step(tx, use_jit):
  step = lambda g, s, p, b, k: tx.update(
    g, s, p, loss_fn=mlp_loss, batch=b, key=k
  )
  return jax.jit(step) if use_jit else step


@pytest.mark.parametrize("use_jit", JIT)
@pytest.mark.parametrize("name", _fast(VARIANTS, ("sampa", "esam")))
def test_steps_alone(name, use_jit):
  """Steps 0-1 with the clean gradient, 2-3 with ``updates=None``."""
  make, _, _ = VARIANTS[name]
  outputs, points = _expected(name)
  tx = make()
  step = _step(tx, use_jit)
  state = tx.init(points[0])
  for t, (batch, key) in enumerate(zip(_batches(), _keys(), strict=True)):
    grads = grad_mean(points[t], batch) if t < 2 else None
    updates, state = step(grads, state, points[t], batch, key)
    _close(updates, outputs[t])


@pytest.mark.parametrize("name", _fast(VARIANTS, ()))
def test_in_chain(name):
  """``chain(variant, add_decayed_weights, sgd(LR))``, three steps."""
  make, _, _ = VARIANTS[name]
  outputs, points = _expected(name)
  decay = 1e-3
  tx = optax.chain(make(), optax.add_decayed_weights(decay), optax.sgd(LR))
  state = tx.init(points[0])
  for t, (batch, key) in enumerate(zip(_batches(3), _keys(3), strict=True)):
    updates, state = tx.update(
      grad_mean(points[t], batch),
      state,
      points[t],
      loss_fn=mlp_loss,
      batch=batch,
      key=key,
    )
    expected = jax.tree.map(
      lambda g, w: -LR * (g + decay * w), outputs[t], points[t]
    )
    _close(updates, expected)


@SLOW
def test_sampa_with_its_auxiliary_step_and_next_batch():
  """``auxiliary_step=sgd(η, μ)`` steps ``y`` with the base's momentum
  (tracked from what SAMPa hands on), and ``next_batch`` takes ``∇f(y')``
  on the next batch: the official code's form, written out."""
  eta = 0.2
  tx = optax.chain(
    sam_optax.sampa(RHO, lam=LAM, auxiliary_step=optax.sgd(eta, MU)),
    optax.sgd(eta, MU),
  )
  batches = _batches(5)
  params = _params()
  state = tx.init(params)
  g_y, trace = scale(params, 0.0), scale(params, 0.0)
  for t in range(4):
    batch, following = batches[t], batches[t + 1]
    x_tilde = add(params, unit(g_y), RHO)
    y_next = add(params, add(g_y, trace, MU), -eta)
    new_g_y = grad_mean(y_next, following)
    out = add(scale(grad_mean(x_tilde, batch), 1 - LAM), new_g_y, LAM)
    trace = add(out, trace, MU)
    expected = add(params, trace, -eta)
    updates, state = tx.update(
      None,
      state,
      params,
      loss_fn=mlp_loss,
      batch=batch,
      next_batch=following,
    )
    params = optax.apply_updates(params, updates)
    _close(params, expected)
    g_y = new_g_y


def _lookbehind_reference(params, batches, k=K, alpha=ALPHA, mask=None):
  """The cycle written out, with ``sgd(LR, μ)`` by hand; returns φ after
  each step."""
  slow, fast, trace = params, params, scale(params, 0.0)
  offset, out = scale(params, 0.0), []
  for t, batch in enumerate(batches):
    g = grad_mean(add(slow, offset), batch)
    offset = add(offset, unit(g if mask is None else masked(g, mask)), RHO)
    g_adv = grad_mean(add(slow, offset), batch)
    trace = add(g_adv, trace, MU)
    fast = add(fast, trace, -LR)
    if t % k == k - 1:
      slow = add(slow, add(fast, slow, -1.0), alpha)
      fast, offset = slow, scale(params, 0.0)
    out.append(fast)
  return out


@pytest.mark.parametrize("use_jit", JIT)
def test_lookbehind_sam(use_jit):
  """Seven steps (two cycles of ``k = 3`` and one step more), the base's
  momentum carried across cycles; ``updates`` given or None alike."""
  batches = _batches(7)
  expected = _lookbehind_reference(_params(), batches)
  tx = sam_optax.lookbehind_sam(
    RHO, K, ALPHA, optimizer=optax.sgd(LR, momentum=MU)
  )
  step = _step(tx, use_jit)
  params = _params()
  state = tx.init(params)
  for t, batch in enumerate(batches):
    grads = grad_mean(params, batch) if t % 2 else None
    updates, state = step(grads, state, params, batch, None)
    params = optax.apply_updates(params, updates)
    _close(params, expected[t])
  assert int(state.count) == 1


# --- Limits ------------------------------------------------------------------


@pytest.mark.parametrize(
  "make",
  [
    pytest.param(lambda: sam_optax.esam(RHO, 1.0, 1.0), id="esam_1_1"),
    pytest.param(lambda: sam_optax.multi_step_sam(RHO, 1), id="multi_step_1"),
  ],
)
def test_limits_are_sam(make):
  outputs, points = _references(sam_reference, _params(), _batches(3))
  tx = make()
  state = tx.init(points[0])
  for t, batch in enumerate(_batches(3)):
    updates, state = tx.update(
      None, state, points[t], loss_fn=mlp_loss, batch=batch
    )
    _close(updates, outputs[t])


def test_esam_with_every_weight_and_example_draws_nothing():
  """``β = 1`` needs no key; ``β < 1`` without one is a clear error."""
  params, batch = _params(), _batches(1)[0]
  sam_optax.esam(RHO, 1.0, GAMMA).update(
    None, optax.EmptyState(), params, loss_fn=mlp_loss, batch=batch
  )
  with pytest.raises(TypeError, match=r"esam.update needs.*`key`"):
    sam_optax.esam(RHO, 0.5).update(
      None, optax.EmptyState(), params, loss_fn=mlp_loss, batch=batch
    )


def test_lookbehind_one_step_full_interpolation_is_sam():
  """``k = 1, α = 1``: ``chain(sam, sgd(LR, μ))`` step after step."""
  batches = _batches(4)
  sam = optax.chain(sam_optax.sam(RHO), optax.sgd(LR, momentum=MU))
  behind = sam_optax.lookbehind_sam(
    RHO, 1, 1.0, optimizer=optax.sgd(LR, momentum=MU)
  )
  p, q = _params(), _params()
  s, r = sam.init(p), behind.init(q)
  for batch in batches:
    u, s = sam.update(None, s, p, loss_fn=mlp_loss, batch=batch)
    v, r = behind.update(None, r, q, loss_fn=mlp_loss, batch=batch)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    _close(q, p)


def test_sampa_without_perturbation_or_mixing_is_the_clean_gradient():
  """SAMPa has no exact SAM setting (its ascent is the gradient at the
  auxiliary iterate); ``ρ = 0, λ = 0`` is the clean gradient, and ``λ = 1``
  hands on ``∇f(y_{t+1})``, the gradient at ``x_t − η ∇f(y_t)``."""
  params = _params()
  tx0 = sam_optax.sampa(0.0, LR, 0.0)
  tx1 = sam_optax.sampa(RHO, LR, 1.0)
  s0, s1 = tx0.init(params), tx1.init(params)
  g_y = scale(params, 0.0)
  for batch in _batches(3):
    u0, s0 = tx0.update(None, s0, params, loss_fn=mlp_loss, batch=batch)
    u1, s1 = tx1.update(None, s1, params, loss_fn=mlp_loss, batch=batch)
    _close(u0, grad_mean(params, batch))
    g_y = grad_mean(add(params, g_y, -LR), batch)
    _close(u1, g_y)


def test_multi_step_sam_is_optax_contrib_sam_opaque():
  """``optax.contrib.sam(sgd, chain(normalize(), sgd(ρ)), n + 1,
  opaque_mode=True)`` with ``grad_fn`` on the batch."""
  params, batch = _params(), _batches(1)[0]
  base = optax.sgd(LR)
  contrib = optax.contrib.sam(
    base,
    optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
    sync_period=NUM_STEPS + 1,
    opaque_mode=True,
  )
  grad_fn = lambda p, _: grad_mean(p, batch)
  expected, _ = contrib.update(
    grad_mean(params, batch), contrib.init(params), params, grad_fn=grad_fn
  )
  ours = optax.chain(sam_optax.multi_step_sam(RHO, NUM_STEPS), base)
  got, _ = ours.update(
    None, ours.init(params), params, loss_fn=mlp_loss, batch=batch
  )
  _close(got, expected)


# --- Composition -------------------------------------------------------------

# name -> (factory, fixed keyword arguments, static_args)
SCHEDULED = {
  "sampa": (sam_optax.sampa, {"learning_rate": LR, "lam": LAM}, ()),
  "esam": (sam_optax.esam, {"beta": BETA, "gamma": GAMMA}, ("gamma",)),
  "multi_step_sam": (
    sam_optax.multi_step_sam,
    {"num_steps": 2},
    ("num_steps",),
  ),
  "lookbehind_sam": (
    sam_optax.lookbehind_sam,
    {"k": 2, "alpha": ALPHA, "optimizer": optax.sgd(LR, momentum=MU)},
    ("k", "optimizer"),
  ),
  "wsam_decoupled": (
    sam_optax.wsam,
    {
      "gamma": 0.8,
      "decoupled_base": optax.sgd(LR, momentum=MU),
      "learning_rate": LR,
    },
    ("decoupled_base",),
  ),
}


@pytest.mark.parametrize("name", _fast(SCHEDULED, ("sampa",)))
def test_schedule(name):
  """``inject_hyperparams(variant)(rho=schedule)`` equals the fixed-``ρ``
  transform built anew at each step (no ``jit``)."""
  factory, kwargs, static_args = SCHEDULED[name]
  schedule = optax.linear_schedule(0.05, 0.15, 3)
  injected = optax.inject_hyperparams(factory, static_args=static_args)(
    rho=schedule, **kwargs
  )
  params = _params()
  state = injected.init(params)
  inner = state.inner_state
  for t, (batch, key) in enumerate(zip(_batches(3), _keys(3), strict=True)):
    reference = factory(float(schedule(t)), **kwargs)
    extra = dict(loss_fn=mlp_loss, batch=batch, key=key)
    expected, inner = reference.update(None, inner, params, **extra)
    got, state = injected.update(None, state, params, **extra)
    _close(got, expected, dict(rtol=1e-6, atol=1e-7))
    params = optax.apply_updates(params, scale(got, -1.0))


@pytest.mark.parametrize(
  "name, reference",
  [
    ("sampa", functools.partial(sampa_reference, mask=MASK)),
    ("esam", functools.partial(esam_reference, mask=MASK)),
    ("multi_step_sam", functools.partial(multi_step_reference, mask=MASK)),
  ],
)
def test_perturb_mask(name, reference):
  """Three steps with ``perturb_mask``: only the masked leaves move in
  ``ε`` and count in its norm; the result covers every leaf."""
  factory = {
    "sampa": lambda **kw: sam_optax.sampa(RHO, LR, LAM, **kw),
    "esam": lambda **kw: sam_optax.esam(RHO, BETA, GAMMA, **kw),
    "multi_step_sam": lambda **kw: sam_optax.multi_step_sam(
      RHO, NUM_STEPS, **kw
    ),
  }[name]
  outputs, points = _references(reference, _params(), _batches(3), _keys(3))
  unmasked, _ = _expected(name if name != "esam" else "esam")
  tx = factory(perturb_mask=MASK)
  state = tx.init(points[0])
  for t, (batch, key) in enumerate(zip(_batches(3), _keys(3), strict=True)):
    updates, state = tx.update(
      None, state, points[t], loss_fn=mlp_loss, batch=batch, key=key
    )
    _close(updates, outputs[t])
  assert global_norm(add(outputs[1], unmasked[1], -1.0)) > 1e-4


@SLOW
def test_lookbehind_perturb_mask():
  batches = _batches(4)
  expected = _lookbehind_reference(_params(), batches, k=2, mask=MASK)
  tx = sam_optax.lookbehind_sam(
    RHO, 2, ALPHA, optimizer=optax.sgd(LR, momentum=MU), perturb_mask=MASK
  )
  params = _params()
  state = tx.init(params)
  for t, batch in enumerate(batches):
    updates, state = tx.update(
      None, state, params, loss_fn=mlp_loss, batch=batch
    )
    params = optax.apply_updates(params, updates)
    _close(params, expected[t])


@pytest.mark.parametrize(
  "name", _fast(["sampa", "esam", "multi_step_sam"], ("sampa",))
)
def test_multisteps_recipe(name):
  """``chain(variant, MultiSteps(sgd, 2).gradient_transformation())``: the
  base steps once per two micro-steps on the mean of the variant's outputs,
  each taken at the cycle's start (the variant's own state advancing every
  micro-step). SAMPa with a plain ``learning_rate``: its auxiliary step
  then has no state to fall out of step with the accumulated base."""
  make, _, _ = VARIANTS[name]
  tx = optax.chain(
    make(), optax.MultiSteps(optax.sgd(LR), 2).gradient_transformation()
  )
  alone = make()
  params = _params()
  state, alone_state = tx.init(params), alone.init(params)
  batches, keys = _batches(4), _keys(4)
  for cycle in range(2):
    start, outs = params, []
    for j in range(2):
      t = 2 * cycle + j
      extra = dict(loss_fn=mlp_loss, batch=batches[t], key=keys[t])
      out, alone_state = alone.update(None, alone_state, start, **extra)
      outs.append(out)
      updates, state = tx.update(None, state, params, **extra)
      params = optax.apply_updates(params, updates)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *outs)
    _close(params, add(start, mean, -LR))


def _poisoned(batch):
  return {**batch, "x": batch["x"].at[0, 0].set(jnp.inf)}


@pytest.mark.parametrize(
  "name", _fast(["sampa", "esam", "multi_step_sam"], ("sampa",))
)
def test_apply_if_finite_recipe(name):
  """``chain(variant, apply_if_finite(sgd, 5))``: a non-finite step is
  skipped (the parameters do not move) and the next finite step is the
  variant's as if the bad one had not happened (SAMPa keeps its state)."""
  make, _, _ = VARIANTS[name]
  tx = optax.chain(make(), optax.apply_if_finite(optax.sgd(LR), 5))
  clean = optax.chain(make(), optax.sgd(LR))
  params = _params()
  state, clean_state = tx.init(params), clean.init(params)
  batches, keys = _batches(3), _keys(3)
  extra = lambda t, b: dict(loss_fn=mlp_loss, batch=b, key=keys[t])
  updates, state = tx.update(None, state, params, **extra(0, batches[0]))
  expected, clean_state = clean.update(
    None, clean_state, params, **extra(0, batches[0])
  )
  _close(updates, expected)
  params = optax.apply_updates(params, updates)
  updates, state = tx.update(
    None, state, params, **extra(1, _poisoned(batches[1]))
  )
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(updates))
  assert int(optax.tree.get(state, "notfinite_count")) == 1
  updates, state = tx.update(None, state, params, **extra(2, batches[2]))
  expected, _ = clean.update(None, clean_state, params, **extra(2, batches[2]))
  _close(updates, expected)


@SLOW
def test_lookbehind_with_apply_if_finite_base():
  """``optimizer=apply_if_finite(sgd, 5)``: a non-finite step moves nothing
  and leaves the cycle as it was."""
  base = lambda: optax.apply_if_finite(optax.sgd(LR, momentum=MU), 5)
  tx = sam_optax.lookbehind_sam(RHO, 2, ALPHA, optimizer=base())
  clean = sam_optax.lookbehind_sam(RHO, 2, ALPHA, optimizer=base())
  params = _params()
  state, clean_state = tx.init(params), clean.init(params)
  batches = _batches(3)
  updates, state = tx.update(
    None, state, params, loss_fn=mlp_loss, batch=_poisoned(batches[0])
  )
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(updates))
  assert int(state.count) == 0
  p, q = params, params
  for batch in batches[1:]:
    u, state = tx.update(None, state, p, loss_fn=mlp_loss, batch=batch)
    v, clean_state = clean.update(
      None, clean_state, q, loss_fn=mlp_loss, batch=batch
    )
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    _close(p, q)


# --- The authors' options -----------------------------------------------------


@pytest.mark.parametrize("use_jit", JIT)
def test_wsam_decoupled(use_jit):
  """``u(g) − η_t γ/(1−γ)(g_adv − g)`` with ``u`` = SGD with momentum on
  ``g`` alone and ``η_t`` a schedule; ``updates`` given, then None."""
  gamma, weight = 0.8, 0.8 / 0.2
  schedule = optax.linear_schedule(0.3, 0.1, 3)
  tx = sam_optax.wsam(
    RHO,
    gamma,
    decoupled_base=optax.sgd(schedule, momentum=MU),
    learning_rate=schedule,
  )
  step = _step(tx, use_jit)
  params = _params()
  state = tx.init(params)
  trace = scale(params, 0.0)
  for t, batch in enumerate(_batches(4)):
    g = grad_mean(params, batch)
    g_adv = grad_mean(add(params, unit(g), RHO), batch)
    trace = add(g, trace, MU)
    rate = float(schedule(t))
    expected = add(scale(trace, -rate), add(g_adv, g, -1.0), -rate * weight)
    updates, state = step(g if t < 2 else None, state, params, batch, None)
    _close(updates, expected)
    params = optax.apply_updates(params, updates)


def test_wsam_decoupled_with_plain_sgd_is_the_coupled_form():
  coupled = optax.chain(sam_optax.wsam(RHO, 0.8), optax.sgd(LR))
  decoupled = sam_optax.wsam(
    RHO, 0.8, decoupled_base=optax.sgd(LR), learning_rate=LR
  )
  params, batch = _params(), _batches(1)[0]
  a, _ = coupled.update(
    None, coupled.init(params), params, loss_fn=mlp_loss, batch=batch
  )
  b, _ = decoupled.update(
    None, decoupled.init(params), params, loss_fn=mlp_loss, batch=batch
  )
  _close(a, b)


def test_decoupled_wsam_in_multisteps_and_apply_if_finite():
  """The decoupled form owns its base, so the recipes wrap that base:
  ``decoupled_base=apply_if_finite(sgd, 5)`` skips a non-finite clean
  gradient's base step."""
  tx = sam_optax.wsam(
    RHO,
    0.8,
    decoupled_base=optax.apply_if_finite(optax.sgd(LR), 5),
    learning_rate=LR,
  )
  params, batch = _params(), _batches(1)[0]
  state = tx.init(params)
  _, state = tx.update(
    None, state, params, loss_fn=mlp_loss, batch=_poisoned(batch)
  )
  assert int(optax.tree.get(state, "notfinite_count")) == 1


@pytest.mark.parametrize("use_jit", JIT)
def test_vasso_starts_at_the_first_gradient(use_jit):
  """``d_1 = g_1``, then ``d_t = (1−θ) d_{t−1} + θ g_t`` (θ = 0.4 here, so
  the start shows)."""
  theta = 0.4
  tx = sam_optax.vasso(RHO, theta)
  step = _step(tx, use_jit)
  params = _params()
  state = tx.init(params)
  d = None
  for t, batch in enumerate(_batches(4)):
    g = grad_mean(params, batch)
    d = g if d is None else add(scale(d, 1 - theta), g, theta)
    expected = grad_mean(add(params, unit(d), RHO), batch)
    updates, state = step(g if t < 2 else None, state, params, batch, None)
    _close(updates, expected)
    _close(state.direction, d)
    params = add(params, updates, -LR)


@pytest.mark.parametrize("use_jit", JIT)
def test_look_sam_layerwise(use_jit):
  """Look-LayerSAM: ``g_v`` and its reuse leaf by leaf; ``k = 2``."""
  alpha = 0.7
  tx = sam_optax.look_sam(RHO, 2, alpha, layerwise=True)
  step = _step(tx, use_jit)
  params = _params()
  state = tx.init(params)

  def leaf_orthogonal(a, g):
    return a - jnp.vdot(a, g) / jnp.vdot(g, g) * g

  g_v = None
  for t, batch in enumerate(_batches(4)):
    g = grad_mean(params, batch)
    if t % 2 == 0:
      g_adv = grad_mean(add(params, unit(g), RHO), batch)
      g_v = jax.tree.map(leaf_orthogonal, g_adv, g)
      expected = g_adv
    else:
      expected = jax.tree.map(
        lambda x, v: x + alpha * jnp.linalg.norm(x) / jnp.linalg.norm(v) * v,
        g,
        g_v,
      )
    updates, state = step(g if t < 2 else None, state, params, batch, None)
    _close(updates, expected)
    params = add(params, updates, -LR)
  # Not the global form: the reused step differs.
  params, (first, second) = _params(), _batches(2)
  outs = []
  for layerwise in (True, False):
    tx = sam_optax.look_sam(RHO, 2, alpha, layerwise=layerwise)
    state = tx.init(params)
    _, state = tx.update(None, state, params, loss_fn=mlp_loss, batch=first)
    out, _ = tx.update(None, state, params, loss_fn=mlp_loss, batch=second)
    outs.append(out)
  assert global_norm(add(outs[0], outs[1], -1.0)) > 1e-4


# --- Errors -------------------------------------------------------------------


@pytest.mark.parametrize(
  "build, message",
  [
    (lambda: sam_optax.sampa(RHO), "exactly one of learning_rate"),
    (
      lambda: sam_optax.sampa(RHO, 0.1, auxiliary_step=optax.sgd(0.1)),
      "exactly one of learning_rate",
    ),
    (lambda: sam_optax.sampa(RHO, 0.1, lam=1.5), "lam must be <= 1"),
    (lambda: sam_optax.sampa(-1.0, 0.1), "rho must be >= 0"),
    (lambda: sam_optax.sampa(RHO, -0.1), "learning_rate must be >= 0"),
    (lambda: sam_optax.esam(RHO, 0.0), "beta must be > 0"),
    (lambda: sam_optax.esam(RHO, 1.0, 1.5), "gamma must be <= 1"),
    (lambda: sam_optax.esam(RHO, 1.0, jnp.float32(0.5)), "gamma must be a"),
    (lambda: sam_optax.multi_step_sam(RHO, 0), "num_steps must be"),
    (
      lambda: sam_optax.lookbehind_sam(RHO, 0, optimizer=optax.sgd(0.1)),
      "k must be",
    ),
    (
      lambda: sam_optax.lookbehind_sam(RHO, 2, 1.5, optimizer=optax.sgd(0.1)),
      "alpha must be <= 1",
    ),
    (
      lambda: sam_optax.lookbehind_sam(RHO, 2, optimizer=0.1),
      "optimizer must be an optax.GradientTransformation",
    ),
    (lambda: sam_optax.wsam(RHO, learning_rate=0.1), "decoupled form only"),
    (
      lambda: sam_optax.wsam(RHO, decoupled_base=optax.sgd(0.1)),
      "needs learning_rate",
    ),
    (lambda: sam_optax.vasso(RHO, start="one"), "start must be one of"),
    (lambda: sam_optax.look_sam(RHO, layerwise="yes"), "layerwise must be"),
  ],
)
def test_bad_hyperparameters(build, message):
  with pytest.raises((ValueError, TypeError), match=message):
    build()


def test_sampa_call_errors():
  params, batch = _params(), _batches(1)[0]
  tx = sam_optax.sampa(RHO, LR)
  state = tx.init(params)
  with pytest.raises(TypeError, match="needs the keyword argument `loss_fn`"):
    tx.update(None, state, params, batch=batch)
  with pytest.raises(ValueError, match="next_batch must have the structure"):
    tx.update(
      None,
      state,
      params,
      loss_fn=mlp_loss,
      batch=batch,
      next_batch=mlp_batch(jax.random.key(3), size=4),
    )
  with pytest.raises(NameError, match=r"pair_axis_name.*not bound"):
    sam_optax.sampa(RHO, LR, pair_axis_name="pair").update(
      None, state, params, loss_fn=mlp_loss, batch=batch
    )


@SLOW
def test_zero_and_huge_gradients_give_no_nan():
  """A zero loss (zero gradients) and a huge one: finite results. (SAMPa's
  auxiliary step is an SGD step on the huge gradient: a tiny learning rate
  keeps ``y`` finite, as it would have to keep the base's step finite.)"""
  params, batch = _params(), _batches(1)[0]
  for factor in (0.0, 1e30):
    loss = lambda p, b, f=factor: f * mlp_loss(p, b)
    for tx in (
      sam_optax.sampa(RHO, 1e-40, LAM),
      sam_optax.esam(RHO, BETA, GAMMA),
      sam_optax.multi_step_sam(RHO, 2),
      sam_optax.lookbehind_sam(RHO, 2, optimizer=optax.sgd(1e-40)),
    ):
      state = tx.init(params)
      for _ in range(2):
        out, state = tx.update(
          None, state, params, loss_fn=loss, batch=batch, key=KEY
        )
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


# --- Cost ---------------------------------------------------------------------


@functools.cache
def _cost_problem():
  params = mlp_params(jax.random.key(0), in_dim=64, hidden=256, out_dim=10)
  batch = mlp_batch(jax.random.key(1), size=512, in_dim=64, out_dim=10)
  grad_flops = compiled_flops(
    lambda p, b: jax.grad(mean_loss, argnums=1)(mlp_loss, p, b), params, batch
  )
  forward_flops = compiled_flops(mlp_loss, params, batch)
  return params, batch, grad_flops, forward_flops


def _update_flops(tx, pass_gradient=True):
  params, batch, _, _ = _cost_problem()
  grads = jax.grad(mean_loss, argnums=1)(mlp_loss, params, batch)

  def step(p, b, g):
    return tx.update(
      g if pass_gradient else None,
      tx.init(p),
      p,
      loss_fn=mlp_loss,
      batch=b,
      key=KEY,
    )[0]

  return compiled_flops(step, params, batch, grads)


@pytest.mark.parametrize(
  "gamma", [pytest.param(0.25, marks=SLOW), 0.5, pytest.param(1.0, marks=SLOW)]
)
def test_esam_second_pass_is_gamma_of_a_full_pass(gamma):
  """With ``updates`` given: two forward passes over ``B`` (the losses at
  ``w`` and ``w + ε``) and a forward-backward pass over ``k = γB``
  examples; the last is ``γ`` of SAM's second pass, to 3%. ``γ = 1``: no
  selection, no extra forward, SAM's one perturbed pass."""
  _, _, grad_flops, forward_flops = _cost_problem()
  forwards = 2 * forward_flops if gamma < 1 else 0
  second = _update_flops(sam_optax.esam(RHO, 1.0, gamma)) - forwards
  assert second / grad_flops == pytest.approx(gamma, abs=0.03)


@SLOW
def test_multi_step_passes():
  """``multi_step_sam(n)``: ``n`` passes with the clean gradient given."""
  _, _, grad_flops, _ = _cost_problem()
  ratio = _update_flops(sam_optax.multi_step_sam(RHO, 3)) / grad_flops
  assert ratio == pytest.approx(3.0, abs=0.05)


def test_sampa_passes():
  """SAMPa: two passes (its vmapped pair), with or without ``updates``."""
  _, _, grad_flops, _ = _cost_problem()
  for pass_gradient in (True, False):
    ratio = _update_flops(sam_optax.sampa(RHO, LR), pass_gradient) / grad_flops
    assert ratio == pytest.approx(2.0, abs=0.05)


# --- Two devices --------------------------------------------------------------

_CHILD = r"""
import functools
import jax, jax.numpy as jnp, optax
from jax.sharding import PartitionSpec as P
import sam_optax
from _problems import mlp_params, mlp_batch, mlp_loss, mean_loss
from _problems import print_results

assert jax.device_count() == 2
mesh = jax.make_mesh((2,), ("pair",))
out = {}

def run(params, batches, tx, sharded):
    state = tx.init(params)
    if sharded:
        step = jax.jit(jax.shard_map(
            lambda p, s, b, n: tx.update(None, s, p, loss_fn=mlp_loss,
                                         batch=b, next_batch=n),
            mesh=mesh, in_specs=(P(), P(), P(), P()), out_specs=(P(), P())))
    else:
        step = jax.jit(lambda p, s, b, n: tx.update(
            None, s, p, loss_fn=mlp_loss, batch=b, next_batch=n))
    for t in range(3):
        u, state = step(params, state, batches[t], batches[t + 1])
        params = optax.apply_updates(params, u)
    return params, step, state

params = mlp_params(jax.random.key(0))
batches = [mlp_batch(jax.random.key(10 + t)) for t in range(4)]
make = lambda axis: optax.chain(
    sam_optax.sampa(0.1, lam=0.3, auxiliary_step=optax.sgd(0.2, 0.9),
                    pair_axis_name=axis), optax.sgd(0.2, 0.9))
one, _, _ = run(params, batches, make(None), False)
two, _, _ = run(params, batches, make("pair"), True)
out["max_difference"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                            zip(jax.tree.leaves(one), jax.tree.leaves(two)))

# FLOPs per device, and the collectives, on a larger MLP.
params = mlp_params(jax.random.key(0), in_dim=64, hidden=256, out_dim=10)
batch = mlp_batch(jax.random.key(1), size=512, in_dim=64, out_dim=10)
tx = sam_optax.sampa(0.1, 0.2, 0.3, pair_axis_name="pair")
state = tx.init(params)
step = jax.jit(jax.shard_map(
    lambda p, s, b: tx.update(None, s, p, loss_fn=mlp_loss, batch=b),
    mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P())))
compiled = step.lower(params, state, batch).compile()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, (list, tuple)) else cost
grad = jax.jit(lambda p, b: jax.grad(mean_loss, argnums=1)(mlp_loss, p, b))
gcost = grad.lower(params, batch).compile().cost_analysis()
gcost = gcost[0] if isinstance(gcost, (list, tuple)) else gcost
text = compiled.as_text()
out["flops_per_device"] = cost["flops"]
out["gradient_flops"] = gcost["flops"]
ops = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
       "collective-permute")
out["collectives"] = {
    op: sum(1 for line in text.splitlines()
            if f" {op}(" in line or f" {op}-start(" in line)
    for op in ops}
print_results(out)
"""


@pytest.fixture(scope="module")
def two_devices():
  return run_child(["-c", _CHILD], 2, timeout=600)


def test_sampa_on_two_devices_equals_the_vmapped_pair(two_devices):
  assert two_devices["max_difference"] < 1e-6


def test_sampa_on_two_devices_costs_one_gradient_per_device(two_devices):
  """Each device's compiled program has one gradient's FLOPs (plus O(d)
  elementwise work), and the step has one collective: the all-reduce of
  the two gradients' slots (one per parameter leaf before XLA's combiner
  merges them; counted in the compiled HLO)."""
  ratio = two_devices["flops_per_device"] / two_devices["gradient_flops"]
  assert ratio == pytest.approx(1.0, abs=0.05)
  collectives = two_devices["collectives"]
  assert 1 <= collectives["all-reduce"] <= 4
  assert sum(collectives.values()) == collectives["all-reduce"]
