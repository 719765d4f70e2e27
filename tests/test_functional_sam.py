"""Functional-SAM, preconditioned SAM and GCSAM against their formulas.

Each formula is written out with ``jax.grad`` / ``jax.vjp`` on the tiny MLP
(``∇_F L`` of the mean cross-entropy written out as ``(softmax(F) − y)/B``)
and each transform run over several steps on different batches (the
parameters move, the state carries), with and without ``jit``, with the
clean gradient given (steps 0-1) and ``updates=None`` (steps 2-3), alone and
in a chain; then the limits, the masks, the schedules and the MultiSteps and
apply_if_finite recipes.
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
from _problems import mlp_batch
from _problems import mlp_params

DELTA = 1e-12
RHO = 0.1
B2 = 0.9
EPS = 1e-3
NUM_STEPS = 4
TOL = dict(rtol=2e-5, atol=1e-6)


def model_fn(params, batch):
  """The MLP's logits ``F(w)``, shape ``[B, 3]``."""
  hidden = jnp.tanh(
    batch["x"] @ params["hidden"]["kernel"] + params["hidden"]["bias"]
  )
  return hidden @ params["out"]["kernel"] + params["out"]["bias"]


def output_loss_fn(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


LOSS = sam_optax.SplitLoss(model_fn, output_loss_fn)


@jax.jit
def grad_mean(params, batch):
  return jax.grad(lambda p: LOSS(p, batch).mean())(params)


def logit_derivative(params, batch):
  """``∇_F L_B`` at ``F(w)``, written out: ``(softmax(F) − onehot(y)) / B``."""
  logits = model_fn(params, batch)
  onehot = jax.nn.one_hot(batch["y"], logits.shape[-1])
  return (jax.nn.softmax(logits) - onehot) / logits.shape[0]


@jax.jit
def functional_gradient(params, batch, direction):
  """``J_F(w + ε)ᵀ ∇_F L_B(F(w))``, ``ε = ρ d / (‖d‖ + δ)``."""
  eps = jax.tree.map(
    lambda x: RHO * x / (global_norm(direction) + DELTA), direction
  )
  _, vjp = jax.vjp(lambda p: model_fn(p, batch), add(params, eps))
  return vjp(logit_derivative(params, batch))[0]


@jax.jit
def perturbed(params, batch, direction):
  eps = jax.tree.map(
    lambda x: RHO * x / (global_norm(direction) + DELTA), direction
  )
  return grad_mean(add(params, eps), batch)


def preconditioned(gradient, memory):
  t = memory.get("t", 0) + 1
  nu = memory.get("nu", jax.tree.map(jnp.zeros_like, gradient))
  nu = jax.tree.map(lambda v, g: B2 * v + (1 - B2) * g**2, nu, gradient)
  d = jax.tree.map(
    lambda g, v: g / (jnp.sqrt(v / (1 - B2**t)) + EPS), gradient, nu
  )
  return d, {"t": t, "nu": nu}


def centralized(tree):
  return jax.tree.map(
    lambda x: x - x.mean(axis=0, keepdims=True) if x.ndim == 2 else x, tree
  )


def functional_reference(params, batch, memory):
  return functional_gradient(params, batch, grad_mean(params, batch)), memory


def preconditioned_functional_reference(params, batch, memory):
  d, memory = preconditioned(grad_mean(params, batch), memory)
  return functional_gradient(params, batch, d), memory


def preconditioned_sam_reference(params, batch, memory):
  d, memory = preconditioned(grad_mean(params, batch), memory)
  return perturbed(params, batch, d), memory


def gcsam_reference(params, batch, memory):
  g = centralized(grad_mean(params, batch))
  return centralized(perturbed(params, batch, g)), memory


def gcsam_authors_reference(params, batch, memory):
  """The authors' code: ``ρ GC(g) / (‖g‖ + δ)``, the descent not centralized."""
  g = grad_mean(params, batch)
  scale = RHO / (global_norm(g) + DELTA)
  eps = jax.tree.map(lambda x: scale * x, centralized(g))
  return grad_mean(add(params, eps), batch), memory


VARIANTS = {
  "functional_sam": (
    lambda: sam_optax.functional_sam(RHO),
    functional_reference,
  ),
  "preconditioned_functional_sam": (
    lambda: sam_optax.functional_sam(RHO, precondition=True, b2=B2, eps=EPS),
    preconditioned_functional_reference,
  ),
  "preconditioned_sam": (
    lambda: sam_optax.preconditioned_sam(RHO, B2, EPS),
    preconditioned_sam_reference,
  ),
  # Flax kernels are [in, out]: one mean per output unit, over axis 0.
  "gcsam": (lambda: sam_optax.gcsam(RHO), gcsam_reference),
  "gcsam_authors": (
    lambda: sam_optax.gcsam(RHO, norm="gradient", centralize_descent=False),
    gcsam_authors_reference,
  ),
}


def _params(seed=0):
  return mlp_params(jax.random.key(seed))


def _batches(count=NUM_STEPS, seed=10):
  return [mlp_batch(jax.random.key(seed + t), size=8) for t in range(count)]


@functools.cache
def _expected(name):
  params, memory, outputs, points = _params(), {}, [], []
  for batch in _batches():
    points.append(params)
    out, memory = VARIANTS[name][1](params, batch, memory)
    outputs.append(out)
    params = add(params, out, -0.5)
  return outputs, points


def _step(tx, use_jit, loss_fn=LOSS):
  step = lambda g, s, p, b: tx.update(g, s, p, loss_fn=loss_fn, batch=b)
  return jax.jit(step) if use_jit else step


@pytest.mark.parametrize(
  "name, use_jit",
  [
    *[pytest.param(n, True, id=f"{n}-jit") for n in VARIANTS],
    pytest.param("functional_sam", False, id="functional_sam-no_jit"),
    *[
      pytest.param(n, False, id=f"{n}-no_jit", marks=pytest.mark.slow)
      for n in VARIANTS
      if n != "functional_sam"
    ],
  ],
)
def test_steps_alone(name, use_jit):
  """Steps 0-1 with the clean gradient, 2-3 with ``updates=None``."""
  outputs, points = _expected(name)
  tx = VARIANTS[name][0]()
  step = _step(tx, use_jit)
  state = tx.init(points[0])
  for t, batch in enumerate(_batches()):
    grads = grad_mean(points[t], batch) if t < 2 else None
    updates, state = step(grads, state, points[t], batch)
    chex.assert_trees_all_close(updates, outputs[t], **TOL)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_in_chain(name):
  """``chain(variant, add_decayed_weights, sgd)``, two jitted steps."""
  outputs, points = _expected(name)
  lr, decay = 0.5, 1e-3
  tx = optax.chain(
    VARIANTS[name][0](), optax.add_decayed_weights(decay), optax.sgd(lr)
  )
  step = _step(tx, True)
  state = tx.init(points[0])
  for t, batch in enumerate(_batches(2)):
    updates, state = step(grad_mean(points[t], batch), state, points[t], batch)
    expected = jax.tree.map(
      lambda g, w: -lr * (g + decay * w), outputs[t], points[t]
    )
    chex.assert_trees_all_close(updates, expected, **TOL)


@pytest.mark.slow
def test_functional_gradient_differs_from_sam():
  """The logit path is dropped: Functional-SAM's gradient is not SAM's."""
  params, batch = _params(), _batches(1)[0]
  got, _ = sam_optax.functional_sam(RHO).update(
    None, optax.EmptyState(), params, loss_fn=LOSS, batch=batch
  )
  sam = perturbed(params, batch, grad_mean(params, batch))
  assert float(global_norm(add(got, sam, -1.0))) > 1e-4


# --- Limits -----------------------------------------------------------------


def test_linear_output_loss_is_sam():
  """``ℓ_i(F) = c_i · F_i`` (``∇_F L`` constant): Functional-SAM is SAM."""
  c = jax.random.normal(jax.random.key(3), (8, 3))
  linear = sam_optax.SplitLoss(model_fn, lambda f, b: jnp.sum(c * f, axis=-1))
  tx, sam = sam_optax.functional_sam(RHO), sam_optax.sam(RHO)
  params = _params()
  for batch in _batches(2):
    got, _ = tx.update(
      None, optax.EmptyState(), params, loss_fn=linear, batch=batch
    )
    expected, _ = sam.update(
      None, optax.EmptyState(), params, loss_fn=linear, batch=batch
    )
    chex.assert_trees_all_close(got, expected, **TOL)
    params = add(params, got, -0.5)


def test_linear_model_is_gradient_descent():
  """A linear model with least squares: ``J_F`` is constant, so
  Functional-SAM returns the clean gradient for every ``ρ`` (SAM does not:
  on this problem its whole effect is the logit path)."""
  w = {"w": jax.random.normal(jax.random.key(0), (5, 2)), "b": jnp.zeros(2)}
  batch = {
    "x": jax.random.normal(jax.random.key(1), (8, 5)),
    "t": jax.random.normal(jax.random.key(2), (8, 2)),
  }
  linear = sam_optax.SplitLoss(
    lambda p, b: b["x"] @ p["w"] + p["b"],
    lambda f, b: 0.5 * jnp.sum((f - b["t"]) ** 2, axis=-1),
  )
  clean = jax.grad(lambda p: linear(p, batch).mean())(w)
  got, _ = sam_optax.functional_sam(1.0).update(
    None, optax.EmptyState(), w, loss_fn=linear, batch=batch
  )
  chex.assert_trees_all_close(got, clean, **TOL)
  sam, _ = sam_optax.sam(1.0).update(
    None, optax.EmptyState(), w, loss_fn=linear, batch=batch
  )
  assert float(global_norm(add(sam, clean, -1.0))) > 1e-2


def test_rho_zero_and_large_eps_limits():
  """``ρ = 0``: the clean gradient. A huge ``eps`` makes the preconditioner
  a constant: preconditioned SAM is SAM, preconditioned Functional-SAM is
  Functional-SAM."""
  params, batch = _params(), _batches(1)[0]
  clean = grad_mean(params, batch)

  def first(tx):
    return tx.update(None, tx.init(params), params, loss_fn=LOSS, batch=batch)[
      0
    ]

  chex.assert_trees_all_close(
    first(sam_optax.functional_sam(0.0)), clean, **TOL
  )
  chex.assert_trees_all_close(
    first(sam_optax.preconditioned_sam(RHO, eps=1e6)),
    first(sam_optax.sam(RHO)),
    **TOL,
  )
  chex.assert_trees_all_close(
    first(sam_optax.functional_sam(RHO, precondition=True, eps=1e6)),
    first(sam_optax.functional_sam(RHO)),
    **TOL,
  )


def test_gcsam_without_kernels_is_sam():
  """GC leaves vectors alone: on a model of vectors only, GCSAM is SAM."""
  params = {"a": jnp.arange(3.0), "b": jnp.ones(2)}
  batch = {"t": jax.random.normal(jax.random.key(0), (4, 5))}
  loss = lambda p, b: jnp.sum(
    (jnp.concatenate([p["a"], p["b"]]) - b["t"]) ** 2 * jnp.arange(1.0, 6.0),
    axis=-1,
  )
  got, _ = sam_optax.gcsam(RHO).update(
    None, sam_optax.gcsam(RHO).init(params), params, loss_fn=loss, batch=batch
  )
  expected, _ = sam_optax.sam(RHO).update(
    None, optax.EmptyState(), params, loss_fn=loss, batch=batch
  )
  chex.assert_trees_all_close(got, expected, **TOL)


def test_centralize_layouts():
  """``axis=-1``: one mean per output unit of a ``[in, out]`` kernel (each
  column sums to zero); ``axis=0`` is ``optax.centralize`` (PyTorch's
  ``[out, in]``)."""
  x = {"k": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
  flax_gc = sam_optax.centralize(x)
  np.testing.assert_allclose(flax_gc["k"].sum(axis=0), 0.0, atol=1e-6)
  np.testing.assert_array_equal(flax_gc["b"], x["b"])
  torch_gc = sam_optax.centralize(x, axis=0)
  expected, _ = optax.centralize().update(x, optax.EmptyState())
  chex.assert_trees_all_close(torch_gc, expected, atol=1e-6)


# --- Composition ------------------------------------------------------------

MASK = {
  "hidden": {"kernel": True, "bias": False},
  "out": {"kernel": False, "bias": True},
}


def test_functional_sam_perturb_mask():
  params, batch = _params(), _batches(1)[0]
  got, _ = sam_optax.functional_sam(RHO, perturb_mask=MASK).update(
    None, optax.EmptyState(), params, loss_fn=LOSS, batch=batch
  )
  g = jax.tree.map(
    lambda x, keep: x if keep else 0 * x, grad_mean(params, batch), MASK
  )
  chex.assert_trees_all_close(got, functional_gradient(params, batch, g), **TOL)


def test_rho_schedule():
  """``inject_hyperparams(functional_sam)(rho=schedule)`` is the fixed-ρ
  transform built anew at each step."""
  schedule = optax.linear_schedule(0.0, 0.2, 3)
  injected = optax.inject_hyperparams(
    sam_optax.functional_sam, static_args=("precondition",)
  )(rho=schedule, precondition=True)
  params = _params()
  state = injected.init(params)
  inner = state.inner_state
  for t, batch in enumerate(_batches(3)):
    fixed = sam_optax.functional_sam(float(schedule(t)), precondition=True)
    expected, inner = fixed.update(
      None, inner, params, loss_fn=LOSS, batch=batch
    )
    got, state = injected.update(None, state, params, loss_fn=LOSS, batch=batch)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)
    params = add(params, got, -0.5)


def test_multisteps_recipe():
  """``chain(functional_sam, MultiSteps(sgd).gradient_transformation())``:
  the base step takes the mean of the micro-steps' Functional-SAM
  gradients, all at the cycle's start."""
  lr, k = 0.3, 2
  tx = optax.chain(
    sam_optax.functional_sam(RHO),
    optax.MultiSteps(optax.sgd(lr), k).gradient_transformation(),
  )
  step = _step(tx, True)
  params = _params()
  state = tx.init(params)
  batches = _batches(k)
  start = params
  for batch in batches:
    updates, state = step(None, state, params, batch)
    params = optax.apply_updates(params, updates)
  mean = jax.tree.map(
    lambda *g: sum(g) / k,
    *[functional_reference(start, b, {})[0] for b in batches],
  )
  chex.assert_trees_all_close(params, add(start, mean, -lr), **TOL)


def test_apply_if_finite_recipe():
  """``chain(functional_sam, apply_if_finite(sgd))`` skips a step whose
  Functional-SAM gradient is NaN (the model NaN beyond a box that ``w``
  is inside and ``w + ε`` is not) and counts it."""
  params, batch = _params(), _batches(1)[0]
  radius = 0.5 * RHO / np.sqrt(sum(x.size for x in jax.tree.leaves(params)))

  def walled(p, b):
    distance = jnp.max(
      jnp.stack(
        [
          jnp.max(jnp.abs(a - c))
          for a, c in zip(
            jax.tree.leaves(p), jax.tree.leaves(params), strict=True
          )
        ]
      )
    )
    return model_fn(p, b) * jnp.where(distance < radius, 1.0, jnp.nan)

  loss = sam_optax.SplitLoss(walled, output_loss_fn)
  tx = optax.chain(
    sam_optax.functional_sam(RHO), optax.apply_if_finite(optax.sgd(0.1), 3)
  )
  updates, state = _step(tx, True, loss)(None, tx.init(params), params, batch)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert int(optax.tree.get(state, "notfinite_count")) == 1


# --- Errors -----------------------------------------------------------------


def test_plain_loss_fn_is_a_clear_error():
  params, batch = _params(), _batches(1)[0]
  with pytest.raises(TypeError, match=r"SplitLoss\(model_fn, output_loss_fn\)"):
    sam_optax.functional_sam(RHO).update(
      None,
      optax.EmptyState(),
      params,
      loss_fn=lambda p, b: LOSS(p, b),
      batch=batch,
    )


@pytest.mark.parametrize(
  "precondition, state",
  [
    (True, optax.EmptyState()),
    (True, "other shapes"),
    (False, "preconditioned"),
  ],
  ids=["EmptyState", "other_shapes", "another_transform"],
)
def test_a_wrong_state_is_refused_naming_state(precondition, state):
  params, batch = _params(), _batches(1)[0]
  tx = sam_optax.functional_sam(RHO, precondition=precondition)
  if state == "other shapes":
    state = tx.init(mlp_params(jax.random.key(0), hidden=4))
  elif state == "preconditioned":
    state = sam_optax.functional_sam(RHO, precondition=True).init(params)
  with pytest.raises(ValueError, match="`state` is not this transform's"):
    tx.update(None, state, params, loss_fn=LOSS, batch=batch)


@pytest.mark.parametrize(
  "make, message",
  [
    (lambda: sam_optax.functional_sam(-1.0), "rho must be >= 0"),
    (
      lambda: sam_optax.functional_sam(precondition=True, b2=1.0),
      "b2 must be < 1",
    ),
    (lambda: sam_optax.preconditioned_sam(eps=0.0), "eps must be > 0"),
    (lambda: sam_optax.gcsam(axis=1.5), "axis must be"),
    (lambda: sam_optax.gcsam(norm="raw"), "norm must be one of"),
  ],
)
def test_bad_hyperparameters(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_split_loss_is_a_loss_fn():
  """``SplitLoss`` is the per-example loss, so any transform takes it."""
  params, batch = _params(), _batches(1)[0]
  np.testing.assert_allclose(
    LOSS(params, batch), output_loss_fn(model_fn(params, batch), batch)
  )
  assert LOSS(params, batch).shape == (8,)
  assert not LOSS.couples_examples


@pytest.mark.slow
def test_cost_is_sams():
  """Compiled FLOPs of one step (``updates=None``): Functional-SAM's two
  passes cost SAM's, less the loss's own backward at ``w + ε`` (the
  cotangent is reused): within half a forward pass of SAM, so no pass more
  or less; with the clean gradient given it adds at most one forward pass at
  ``w`` (the cotangent needs the clean outputs)."""
  params = mlp_params(jax.random.key(0), in_dim=64, hidden=128, out_dim=10)
  batch = mlp_batch(jax.random.key(1), size=128, in_dim=64, out_dim=10)
  split = sam_optax.SplitLoss(model_fn, output_loss_fn)
  bound = 32 * sum(x.size for x in jax.tree.leaves(params))
  forward = compiled_flops(lambda p: split(p, batch), params)

  def cost(tx, grads):
    return compiled_flops(
      lambda p, g: tx.update(g, tx.init(p), p, loss_fn=split, batch=batch)[0],
      params,
      grads,
    )

  clean = jax.grad(lambda p: split(p, batch).mean())(params)
  sam = cost(sam_optax.sam(RHO), None)
  functional = cost(sam_optax.functional_sam(RHO), None)
  assert 0 <= sam - functional <= forward / 2, (functional, sam, forward)
  given = cost(sam_optax.functional_sam(RHO), clean)
  sam_given = cost(sam_optax.sam(RHO), clean)
  assert 0 <= given - sam_given <= forward + bound, (given, sam_given)
