"""sam_optax inside optax's wrappers, and the guide's "Composing with optax".

Gradient accumulation (``optax.MultiSteps``), skipping non-finite steps
(``optax.apply_if_finite``), the order in a chain, masks (``perturb_mask``,
``optax.masked``, ``optax.multi_transform``) and schedules
(``optax.inject_hyperparams``): each form the guide recommends against a
formula written out with ``jax.grad``, and each form it warns about pinned to
what it actually does in optax 0.2.8. The last test class runs every recipe
(fenced python block) of docs/guide/composing.md, the one place they run.
"""

import functools
from typing import ClassVar

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sam_optax
from sam_optax import _per_example

from _problems import add
from _problems import global_norm
from _problems import guide_snippets
from _problems import mean_loss
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

DELTA = 1e-12
RHO = 0.1
LR = 0.3
MOMENTUM = 0.9
LAM = 0.5
MICRO = 4  # m_sam's micro_batch_size on batches of 8
TOL = dict(rtol=2e-5, atol=1e-6)


# --- The formulas, written out with jax.grad -------------------------------
# The two gradient evaluations are jitted (compiled once per loss and shape),
# which is much faster here than running them op by op.


@functools.partial(jax.jit, static_argnames="loss_fn")
def grad_mean(params, batch, loss_fn=mlp_loss):
  return jax.grad(mean_loss, argnums=1)(loss_fn, params, batch)


def scale(tree, factor):
  return jax.tree.map(lambda x: factor * x, tree)


def mean_of(trees):
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


@functools.partial(jax.jit, static_argnames="loss_fn")
def perturbed(params, batch, direction, rho=RHO, loss_fn=mlp_loss):
  """``∇L_B(w + ρ d/‖d‖)``."""
  eps = scale(direction, rho / (global_norm(direction) + DELTA))
  return grad_mean(add(params, eps), batch, loss_fn)


def sam_gradient(params, batch, rho=RHO, loss_fn=mlp_loss, mask=None):
  """SAM; with ``mask``, ``ε`` (and its norm) on the masked leaves only."""
  g = grad_mean(params, batch, loss_fn)
  if mask is not None:
    g = masked(g, mask)
  return perturbed(params, batch, g, rho, loss_fn)


def m_sam_gradient(params, batch, rho=RHO, micro=MICRO, loss_fn=mlp_loss):
  """Mean over contiguous micro-batches of their own SAM gradient."""
  size = len(batch["y"])
  return mean_of(
    [
      sam_gradient(
        params,
        jax.tree.map(lambda x, j=j: x[j : j + micro], batch),
        rho,
        loss_fn,
      )
      for j in range(0, size, micro)
    ]
  )


@jax.jit
def rw_sam_gradient(params, batch, rho=RHO, lam=LAM):
  """RW-SAM with exact per-example gradient norms, ``ŝ = s / mean s``."""

  def example_loss(p, example):
    return mlp_loss(p, jax.tree.map(lambda x: x[None], example))[0]

  per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(
    params, batch
  )
  size = len(batch["y"])
  norms = jnp.sqrt(
    sum(
      jnp.sum(g.reshape(size, -1) ** 2, axis=1)
      for g in jax.tree.leaves(per_example)
    )
  )
  weights = jax.nn.softmax(norms / jnp.mean(norms) / lam)
  g_p = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), per_example)
  return perturbed(params, batch, g_p, rho)


PROBE_KEY = jax.random.key(17)
"""The key every step of these tests passes (``_jit_update``): RW-SAM's
finite-difference probe is then the same in the step and in its formula."""


@jax.jit
def rw_sam_probe_gradient(params, batch, rho=RHO, lam=LAM, sigma=1e-4):
  """RW-SAM as the paper takes it: ``s_i = |ℓ_i(w + σv) − ℓ_i(w)|/σ`` along
  the probe ``v`` of ``jax.random.split(PROBE_KEY, 1)[0]``, then
  ``g_p = ∇ Σ_i p_i ℓ_i``, ``p = softmax(ŝ/λ)``, ``ŝ = s / mean s``."""
  (probe_key,) = jax.random.split(PROBE_KEY, 1)
  probe = _per_example.rademacher_like(probe_key, params)
  losses = mlp_loss(params, batch)
  ahead = mlp_loss(add(params, probe, sigma), batch)
  norms = jnp.abs(ahead - losses) / sigma
  weights = jax.nn.softmax(norms / jnp.mean(norms) / lam)
  g_p = jax.grad(lambda p: jnp.sum(weights * mlp_loss(p, batch)))(params)
  return perturbed(params, batch, g_p, rho)


# name -> (make the transform, formula(params, batch), pass the clean gradient)
VARIANTS = {
  "sam": (lambda: sam_optax.sam(RHO), sam_gradient, True),
  "m_sam": (lambda: sam_optax.m_sam(RHO, MICRO), m_sam_gradient, False),
  # Chunks of one micro-batch call the step directly, not a vmap of one.
  "m_sam_chunks_of_one": (
    lambda: sam_optax.m_sam(
      RHO, MICRO, implementation="vmap", micro_batches_per_chunk=1
    ),
    m_sam_gradient,
    False,
  ),
  "rw_sam": (
    lambda: sam_optax.rw_sam(RHO, LAM, gradient_norms="exact"),
    rw_sam_gradient,
    False,
  ),
  # The default: norms from the finite-difference probe (the step's key).
  "rw_sam_probe": (
    lambda: sam_optax.rw_sam(RHO, LAM),
    rw_sam_probe_gradient,
    False,
  ),
}


def masked(tree, mask):
  """``tree`` with the leaves where ``mask`` is False set to zero."""
  return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, mask)


def momentum_sgd(params, trace, gradient, learning_rate=LR):
  """``optax.sgd(lr, momentum)``: ``t ← g + μ t``, ``w ← w − lr t``."""
  trace = add(gradient, trace, MOMENTUM)
  return add(params, trace, -learning_rate), trace


def _params(seed=0):
  return mlp_params(jax.random.key(seed))


def _batches(count, seed=10, size=8):
  return [mlp_batch(jax.random.key(seed + j), size=size) for j in range(count)]


def _jit_update(tx, loss_fn=mlp_loss):
  """``tx.update`` with ``loss_fn``, compiled (much faster here than running
  a first step op by op)."""
  return jax.jit(
    lambda grads, state, params, batch, key=PROBE_KEY: tx.update(
      grads, state, params, loss_fn=loss_fn, batch=batch, key=key
    )
  )


def _assert_bit_identical(test, tree, other):
  for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(other)):
    test.assertTrue(np.array_equal(np.asarray(x), np.asarray(y)))


def _assert_all_zero(test, tree):
  for x in jax.tree.leaves(tree):
    test.assertFalse(np.any(np.asarray(x)))


# --- Item 2: gradient accumulation -----------------------------------------


class AccumulationTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(name, name) for name in VARIANTS])
  def test_chain_then_multisteps_is_m_sam_over_micro_steps(self, name):
    make, formula, pass_grads = VARIANTS[name]
    k, cycles = 2, 2
    tx = optax.chain(
      make(),
      optax.MultiSteps(
        optax.sgd(LR, momentum=MOMENTUM), k
      ).gradient_transformation(),
    )
    step = _jit_update(tx)
    params = _params()
    state = tx.init(params)
    expected, trace = params, jax.tree.map(jnp.zeros_like, params)
    batches = _batches(k * cycles)
    for cycle in range(cycles):
      micro_batches = batches[cycle * k : (cycle + 1) * k]
      start = params
      for j, micro_batch in enumerate(micro_batches):
        grads = grad_mean(params, micro_batch) if pass_grads else None
        updates, state = step(grads, state, params, micro_batch)
        params = optax.apply_updates(params, updates)
        if j < k - 1:  # accumulating: nothing moves
          _assert_all_zero(self, updates)
      # The mean over micro-steps of each one's own SAM gradient, all taken
      # at the parameters of the cycle's start, then the base step.
      gradient = mean_of([formula(start, b) for b in micro_batches])
      expected, trace = momentum_sgd(expected, trace, gradient)
      chex.assert_trees_all_close(params, expected, **TOL)

  @parameterized.named_parameters(*[(name, name) for name in VARIANTS])
  def test_multisteps_around_the_chain_descends_on_the_last_micro_batch(
    self, name
  ):
    """Pins the form the guide warns about (optax 0.2.8's MultiSteps).

    MultiSteps accumulates the clean gradients it receives and calls the
    inner chain on every micro-step with their running mean as ``updates``
    and that micro-step's ``batch``; only the k-th call's result is emitted.
    """
    make, formula, _ = VARIANTS[name]
    k = 2
    tx = optax.MultiSteps(optax.chain(make(), optax.sgd(LR)), k)
    step = _jit_update(tx)
    params = _params(seed=1)
    batches = _batches(k, seed=20)
    state = tx.init(params)
    for micro_batch in batches:
      updates, state = step(
        grad_mean(params, micro_batch), state, params, micro_batch
      )
    last = batches[-1]
    if name == "sam":
      # ε along the mean clean gradient of all k micro-batches, but the
      # gradient at w + ε on the last micro-batch alone.
      ascent = mean_of([grad_mean(params, b) for b in batches])
      gradient = perturbed(params, last, ascent)
    else:
      # The variant's own step on the last micro-batch; the others are lost.
      gradient = formula(params, last)
    chex.assert_trees_all_close(updates, scale(gradient, -LR), **TOL)
    # Not the accumulated m-SAM gradient of the recommended form.
    accumulated = mean_of([formula(params, b) for b in batches])
    self.assertGreater(
      float(global_norm(add(updates, scale(accumulated, -LR)))), 1e-4
    )

  def test_multisteps_around_the_chain_rejects_updates_none(self):
    tx = optax.MultiSteps(
      optax.chain(sam_optax.m_sam(RHO, MICRO), optax.sgd(LR)), 2
    )
    params = _params()
    # MultiSteps maps over `updates` to accumulate them: None has no leaves.
    with self.assertRaisesRegex(ValueError, "pytree structure"):
      tx.update(
        None, tx.init(params), params, loss_fn=mlp_loss, batch=_batches(1)[0]
      )


# --- Item 3: skipping non-finite steps --------------------------------------


def walled_loss(center, loss_fn=mlp_loss):
  """``loss_fn`` inside an ℓ∞ box around ``center``, NaN (and NaN gradient)
  outside; the box's half-width is the batch's ``radius`` (one per example).

  A radius below ``ρ/√n`` (``n`` parameters) puts every ``w + ε`` with
  ``‖ε‖ = ρ`` outside while ``w = center`` stays inside.
  """

  def walled(params, batch):
    distance = jnp.max(
      jnp.stack(
        [
          jnp.max(jnp.abs(p - c))
          for p, c in zip(jax.tree.leaves(params), jax.tree.leaves(center))
        ]
      )
    )
    inside = distance < batch["radius"]
    return loss_fn(params, batch) * jnp.where(inside, 1.0, jnp.nan)

  return walled


def _with_radius(batch, radius):
  return dict(batch, radius=jnp.full(batch["y"].shape, radius, jnp.float32))


def _wall_radius(params):
  size = sum(x.size for x in jax.tree.leaves(params))
  return 0.5 * RHO / np.sqrt(size)


class NonFiniteTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(name, name) for name in VARIANTS])
  def test_apply_if_finite_after_the_sam_member_skips_the_step(self, name):
    make, formula, pass_grads = VARIANTS[name]
    params = _params(seed=2)
    loss_fn = walled_loss(params)
    tx = optax.chain(
      make(), optax.apply_if_finite(optax.sgd(LR, momentum=MOMENTUM), 5)
    )
    step = _jit_update(tx, loss_fn)
    state = tx.init(params)
    batches = _batches(4, seed=30)
    radius = _wall_radius(params)
    for t, batch in enumerate(batches[:2]):
      poisoned = _with_radius(batch, radius)
      # Finite at w: only the perturbed point is outside the box.
      self.assertTrue(np.isfinite(float(mean_loss(loss_fn, params, poisoned))))
      grads = grad_mean(params, poisoned, loss_fn) if pass_grads else None
      updates, state = step(grads, state, params, poisoned)
      new_params = optax.apply_updates(params, updates)
      _assert_bit_identical(self, new_params, params)
      self.assertEqual(int(optax.tree.get(state, "notfinite_count")), t + 1)
      self.assertEqual(int(optax.tree.get(state, "total_notfinite")), t + 1)
      self.assertFalse(bool(optax.tree.get(state, "last_finite")))
    # Finite steps proceed, with the base optimizer's state untouched by the
    # skipped ones (the momentum starts from zero).
    expected, trace = params, jax.tree.map(jnp.zeros_like, params)
    for batch in batches[2:]:
      clean = _with_radius(batch, np.inf)
      grads = grad_mean(params, clean, loss_fn) if pass_grads else None
      updates, state = step(grads, state, params, clean)
      params = optax.apply_updates(params, updates)
      expected, trace = momentum_sgd(expected, trace, formula(expected, batch))
      chex.assert_trees_all_close(params, expected, **TOL)
    self.assertEqual(int(optax.tree.get(state, "notfinite_count")), 0)
    self.assertEqual(int(optax.tree.get(state, "total_notfinite")), 2)

  def test_accumulation_skips_with_skip_not_finite(self):
    """MultiSteps' own skip: a non-finite micro-step is dropped, uncounted.

    Without it, one non-finite perturbed gradient makes the accumulator NaN
    for good (MultiSteps resets it as ``(1 - emit) * acc``).
    """
    params = _params(seed=2)
    loss_fn = walled_loss(params)
    batches = [
      _with_radius(b, radius)
      for b, radius in zip(
        _batches(3, seed=30), [_wall_radius(params), np.inf, np.inf]
      )
    ]
    for skip in (optax.skip_not_finite, None):
      tx = optax.chain(
        sam_optax.sam(RHO),
        optax.MultiSteps(
          optax.sgd(LR), 2, should_skip_update_fn=skip
        ).gradient_transformation(),
      )
      step = _jit_update(tx, loss_fn)
      state = tx.init(params)
      emitted = []
      for batch in batches:
        updates, state = step(
          grad_mean(params, batch, loss_fn), state, params, batch
        )
        emitted.append(updates)
      if skip is None:
        self.assertTrue(
          all(np.all(np.isnan(x)) for x in jax.tree.leaves(emitted[-1]))
        )
        continue
      _assert_all_zero(self, emitted[0])
      _assert_all_zero(self, emitted[1])
      gradient = mean_of([sam_gradient(params, b) for b in batches[1:]])
      chex.assert_trees_all_close(emitted[2], scale(gradient, -LR), **TOL)

  def test_apply_if_finite_around_the_chain_lets_the_nan_through(self):
    params = _params(seed=2)
    loss_fn = walled_loss(params)
    tx = optax.apply_if_finite(
      optax.chain(sam_optax.sam(RHO), optax.sgd(LR)), 5
    )
    batch = _with_radius(_batches(1, seed=30)[0], _wall_radius(params))
    grads = grad_mean(params, batch, loss_fn)
    self.assertTrue(all(np.all(np.isfinite(x)) for x in jax.tree.leaves(grads)))
    updates, state = _jit_update(tx, loss_fn)(
      grads, tx.init(params), params, batch
    )
    # It checked the clean gradient, which is finite: the NaN gets through.
    self.assertTrue(all(np.all(np.isnan(x)) for x in jax.tree.leaves(updates)))
    self.assertEqual(int(state.notfinite_count), 0)
    self.assertEqual(int(state.total_notfinite), 0)
    self.assertTrue(bool(state.last_finite))

  def test_apply_if_finite_around_the_chain_rejects_updates_none(self):
    params = _params()
    tx = optax.apply_if_finite(
      optax.chain(sam_optax.m_sam(RHO, MICRO), optax.sgd(LR)), 5
    )
    # Its two branches return the update (a dict) and zeros_like(None).
    with self.assertRaisesRegex(TypeError, "same pytree structure"):
      tx.update(
        None, tx.init(params), params, loss_fn=mlp_loss, batch=_batches(1)[0]
      )


# --- Item 4: the order in a chain -------------------------------------------


class OrderTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.params = _params(seed=4)
    self.batch = _batches(1, seed=40)[0]
    self.grads = grad_mean(self.params, self.batch)
    self.gradient = sam_gradient(self.params, self.batch)
    # Clip to half the perturbed gradient's norm, so that clipping acts.
    self.max_norm = 0.5 * float(global_norm(self.gradient))

  def _update(self, tx):
    updates, _ = _jit_update(tx)(
      self.grads, tx.init(self.params), self.params, self.batch
    )
    return updates

  def test_clipping_after_the_sam_member_clips_the_perturbed_gradient(self):
    updates = self._update(
      optax.chain(
        sam_optax.sam(RHO),
        optax.clip_by_global_norm(self.max_norm),
        optax.sgd(LR),
      )
    )
    clipped = scale(
      self.gradient, self.max_norm / float(global_norm(self.gradient))
    )
    chex.assert_trees_all_close(updates, scale(clipped, -LR), **TOL)
    np.testing.assert_allclose(
      global_norm(updates), LR * self.max_norm, rtol=1e-5
    )

  def test_clipping_before_the_sam_member_is_lost(self):
    updates = self._update(
      optax.chain(
        optax.clip_by_global_norm(self.max_norm),
        sam_optax.sam(RHO),
        optax.sgd(LR),
      )
    )
    # The clipped clean gradient only set the (normalized) ascent direction:
    # the output is the unclipped perturbed gradient.
    chex.assert_trees_all_close(updates, scale(self.gradient, -LR), **TOL)
    self.assertGreater(float(global_norm(updates)), 1.9 * LR * self.max_norm)


# --- Item 5: masks -----------------------------------------------------------

HEAD_ONLY = {
  "hidden": {"kernel": False, "bias": False},
  "out": {"kernel": True, "bias": True},
}
LABELS = jax.tree.map(lambda t: "train" if t else "freeze", HEAD_ONLY)


def head_only(params):
  return {
    name: jax.tree.map(lambda _: name == "out", layer)
    for name, layer in params.items()
  }


class MaskTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(name, name) for name in VARIANTS])
  def test_inside_optax_masked_is_a_clear_error(self, name):
    make, _, _ = VARIANTS[name]
    params = _params()
    batch = _batches(1)[0]
    wrapped = {
      "masked": optax.masked(make(), HEAD_ONLY),
      "multi_transform": optax.multi_transform(
        {"train": make(), "freeze": optax.set_to_zero()}, LABELS
      ),
    }
    for wrapper, tx in wrapped.items():
      with self.subTest(wrapper):
        with self.assertRaisesRegex(ValueError, "perturb_mask"):
          tx.update(
            grad_mean(params, batch),
            tx.init(params),
            params,
            loss_fn=mlp_loss,
            batch=batch,
            key=jax.random.key(0),
          )

  @parameterized.named_parameters(
    ("pytree", HEAD_ONLY), ("callable", head_only)
  )
  def test_freezing_leaves(self, perturb_mask):
    tx = optax.chain(
      sam_optax.sam(RHO, perturb_mask=perturb_mask),
      optax.multi_transform(
        {
          "train": optax.sgd(LR, momentum=MOMENTUM),
          "freeze": optax.set_to_zero(),
        },
        LABELS,
      ),
    )
    step = _jit_update(tx)
    params = _params(seed=5)
    frozen = params["hidden"]
    state = tx.init(params)
    expected, trace = params, jax.tree.map(jnp.zeros_like, params)
    for batch in _batches(3, seed=50):
      updates, state = step(grad_mean(params, batch), state, params, batch)
      params = optax.apply_updates(params, updates)
      _assert_bit_identical(self, params["hidden"], frozen)
      # ε from the trainable leaves' gradient only; the base step on them.
      gradient = masked(
        sam_gradient(expected, batch, mask=HEAD_ONLY), HEAD_ONLY
      )
      expected, trace = momentum_sgd(expected, trace, gradient)
      chex.assert_trees_all_close(params["out"], expected["out"], **TOL)

  @parameterized.parameters(None, 1)
  def test_m_sam_perturb_mask(self, micro_batches_per_chunk):
    """The clean gradient is not passed: each micro-batch's ε is masked."""
    tx = sam_optax.m_sam(
      RHO,
      MICRO,
      perturb_mask=head_only,
      micro_batches_per_chunk=micro_batches_per_chunk,
    )
    params = _params(seed=6)
    batch = _batches(1, seed=60)[0]
    updates, _ = _jit_update(tx)(None, tx.init(params), params, batch)
    expected = mean_of(
      [
        sam_gradient(
          params,
          jax.tree.map(lambda x, j=j: x[j : j + MICRO], batch),
          mask=HEAD_ONLY,
        )
        for j in (0, MICRO)
      ]
    )
    # The returned gradient covers every leaf, frozen ones included.
    chex.assert_trees_all_close(updates, expected, **TOL)


# --- Item 11: the guide's recipes, run ----------------------------------------

PAGE = "composing.md"
SNIPPET_RHO = 0.05
SNIPPET_LR = 0.1


def guide_recipes():
  """The fenced python blocks of docs/guide/composing.md, in order."""
  return guide_snippets(PAGE)


@jax.jit  # jitted, so that the snippets' eager steps run a few programs
def snippet_loss(params, batch):
  """The MLP's per-example loss on ``{"backbone": ..., "head": ...}``, scaled
  so that ``clip_by_global_norm(1.0)`` acts."""
  return 5.0 * mlp_loss(
    {"hidden": params["backbone"], "out": params["head"]}, batch
  )


def snippet_problem():
  """What the snippets may assume: ``params`` (a ``backbone`` and a ``head``
  layer), a per-example ``loss_fn``, a ``batch`` (and, from
  :func:`namespace`, its clean gradient ``grads`` and ``micro_batches``)."""
  mlp = _params(seed=8)
  params = {"backbone": mlp["hidden"], "head": mlp["out"]}
  return params, snippet_loss, mlp_batch(jax.random.key(80), size=32)


def namespace(params, loss_fn, batch):
  return {
    "jax": jax,
    "jnp": jnp,
    "optax": optax,
    "sam_optax": sam_optax,
    "params": params,
    "loss_fn": loss_fn,
    "batch": batch,
    "grads": grad_mean(params, batch, loss_fn),
    "micro_batches": [
      mlp_batch(jax.random.key(81 + j), size=8) for j in range(4)
    ],
  }


def run_snippet(snippet, params, loss_fn, batch):
  scope = namespace(params, loss_fn, batch)
  code = compile(snippet, f"docs/guide/{PAGE}", "exec")
  exec(code, scope)  # pylint: disable=exec-used
  return scope


def first_update(tx, params, loss_fn, batch, state=None):
  state = tx.init(params) if state is None else state
  return _jit_update(tx, loss_fn)(
    grad_mean(params, batch, loss_fn), state, params, batch
  )


class GuideRecipesTest(parameterized.TestCase):
  """Every python block of docs/guide/composing.md is run here (and only
  here: the page shows them as plain code, not doctests).

  Each check recognizes its block by a string in it; every block must have
  exactly one check, so a new recipe needs a new check.
  """

  MARKERS: ClassVar[dict[str, str]] = {
    "order": "clip_by_global_norm",
    "accumulation": "MultiSteps",
    "non_finite": "apply_if_finite",
    "freezing": "set_to_zero",
    "schedules": "inject_hyperparams",
  }

  def _snippet(self, name):
    snippets = guide_recipes()
    matches = [s for s in snippets if self.MARKERS[name] in s]
    self.assertLen(
      matches, 1, f"one {PAGE} block should contain {self.MARKERS[name]!r}"
    )
    return matches[0]

  def test_every_block_has_a_check(self):
    snippets = guide_recipes()
    self.assertLen(snippets, len(self.MARKERS))
    for snippet in snippets:
      self.assertLen(
        [m for m in self.MARKERS.values() if m in snippet], 1, snippet
      )

  def test_order(self):
    params, loss_fn, batch = snippet_problem()
    scope = run_snippet(self._snippet("order"), params, loss_fn, batch)
    updates, _ = first_update(scope["tx"], params, loss_fn, batch)
    gradient = sam_gradient(params, batch, SNIPPET_RHO, loss_fn)
    max_norm = 1.0  # as in the snippet
    norm = float(global_norm(gradient))
    self.assertGreater(norm, max_norm)  # clipping acts
    chex.assert_trees_all_close(
      updates, scale(gradient, -SNIPPET_LR * max_norm / norm), **TOL
    )

  def test_accumulation(self):
    params, loss_fn, batch = snippet_problem()
    scope = run_snippet(self._snippet("accumulation"), params, loss_fn, batch)
    micro_batches = scope["micro_batches"]
    self.assertLen(micro_batches, 4)  # one step of every_k_schedule=4
    # The first three micro-steps leave the parameters as they were.
    current, state = params, scope["tx"].init(params)
    for micro_batch in micro_batches[:3]:
      current, state = scope["micro_step"](current, state, micro_batch)
    _assert_bit_identical(self, current, params)
    gradient = mean_of(
      [sam_gradient(params, b, SNIPPET_RHO, loss_fn) for b in micro_batches]
    )
    chex.assert_trees_all_close(
      scope["params"], add(params, gradient, -SNIPPET_LR), **TOL
    )

  def test_non_finite(self):
    params, loss_fn, batch = snippet_problem()
    tx = run_snippet(self._snippet("non_finite"), params, loss_fn, batch)["tx"]
    # A finite step goes through...
    updates, state = first_update(tx, params, loss_fn, batch)
    gradient = sam_gradient(params, batch, SNIPPET_RHO, loss_fn)
    chex.assert_trees_all_close(updates, scale(gradient, -SNIPPET_LR), **TOL)
    self.assertEqual(int(optax.tree.get(state, "total_notfinite")), 0)
    # ...one whose loss is finite at w but NaN at w + ε is skipped.
    size = sum(x.size for x in jax.tree.leaves(params))
    walled = walled_loss(params, loss_fn)
    radius = 0.5 * SNIPPET_RHO / np.sqrt(size)
    walled_batch = _with_radius(batch, radius)
    self.assertTrue(
      all(
        np.all(np.isfinite(x))
        for x in jax.tree.leaves(grad_mean(params, walled_batch, walled))
      )
    )
    updates, state = first_update(tx, params, walled, walled_batch)
    _assert_bit_identical(self, optax.apply_updates(params, updates), params)
    self.assertEqual(int(optax.tree.get(state, "total_notfinite")), 1)

  def test_freezing(self):
    params, loss_fn, batch = snippet_problem()
    scope = run_snippet(self._snippet("freezing"), params, loss_fn, batch)
    tx = scope["tx"]
    trainable = {
      "backbone": {"kernel": False, "bias": False},
      "head": {"kernel": True, "bias": True},
    }
    self.assertEqual(scope["trainable"], trainable)
    step = _jit_update(tx, loss_fn)
    state, current = tx.init(params), params
    for _ in range(2):
      updates, state = step(
        grad_mean(current, batch, loss_fn), state, current, batch
      )
      current = optax.apply_updates(current, updates)
    _assert_bit_identical(self, current["backbone"], params["backbone"])
    expected, trace = params, jax.tree.map(jnp.zeros_like, params)
    for _ in range(2):
      gradient = masked(
        sam_gradient(expected, batch, SNIPPET_RHO, loss_fn, mask=trainable),
        trainable,
      )
      expected, trace = momentum_sgd(expected, trace, gradient, SNIPPET_LR)
    chex.assert_trees_all_close(current["head"], expected["head"], **TOL)

  def test_schedules(self):
    params, loss_fn, batch = snippet_problem()
    scope = run_snippet(self._snippet("schedules"), params, loss_fn, batch)
    step = 500
    rho = float(optax.linear_schedule(0.0, SNIPPET_RHO, 1000)(step))
    self.assertGreater(rho, 0.0)

    def at_step(tx):
      """The first update with the schedule moved to ``step``."""
      state = tx.init(params)
      chained = not isinstance(state, optax.InjectStatefulHyperparamsState)
      inject_state = state[0] if chained else state
      moved = inject_state._replace(
        hyperparams_states={
          name: schedule_state._replace(count=jnp.asarray(step, jnp.int32))
          for name, schedule_state in inject_state.hyperparams_states.items()
        }
      )
      state = (moved, *state[1:]) if chained else moved
      updates, state = first_update(tx, params, loss_fn, batch, state)
      if chained:  # as the guide says
        np.testing.assert_allclose(state[0].hyperparams["rho"], rho, rtol=1e-6)
      return updates

    chex.assert_trees_all_close(
      at_step(scope["tx"]),
      scale(sam_gradient(params, batch, rho, loss_fn), -SNIPPET_LR),
      **TOL,
    )
    chex.assert_trees_all_close(
      at_step(scope["tx_m_sam"]),
      m_sam_gradient(params, batch, rho, micro=16, loss_fn=loss_fn),
      **TOL,
    )
    chex.assert_trees_all_close(
      at_step(scope["tx_weights_only"]),
      sam_gradient(
        params, batch, rho, loss_fn, mask=sam_optax.not_bias_mask(params)
      ),
      **TOL,
    )


class StaticArgsTest(parameterized.TestCase):
  """The guide's rule for ``optax.inject_hyperparams``: ints that set shapes
  or loop counts, and callables, go in ``static_args``."""

  @parameterized.named_parameters(
    (
      "m_sam_micro_batch_size",
      sam_optax.m_sam,
      {"micro_batch_size": MICRO},
      "micro_batch_size",
      ValueError,
      "static_args=\\('micro_batch_size',\\)",
    ),
    (
      "rw_sam_num_probes",
      sam_optax.rw_sam,
      {"num_probes": 2},
      "num_probes",
      ValueError,
      "static_args=\\('num_probes',\\)",
    ),
    (
      "rw_sam_chunk_size",
      sam_optax.rw_sam,
      {"gradient_norms": "exact", "chunk_size": 4},
      "chunk_size",
      ValueError,
      "static_args=\\('chunk_size',\\)",
    ),
    # Taken for a schedule, a function is called with the step count: what
    # fails then depends on the function.
    (
      "sam_callable_perturb_mask",
      sam_optax.sam,
      {"perturb_mask": head_only},
      "perturb_mask",
      AttributeError,
      "items",
    ),
    (
      "asam_callable_scale_mask",
      sam_optax.asam,
      {"scale_mask": sam_optax.not_bias_mask},
      "scale_mask",
      ValueError,
      "",
    ),
  )
  def test_needs_static_args(self, factory, kwargs, argument, error, message):
    params = _params()
    batch = _batches(1)[0]
    rho = optax.linear_schedule(0.0, RHO, 10)

    def update(tx):  # traced only: the numbers are the recipe test's job
      return jax.eval_shape(
        _jit_update(tx), None, tx.init(params), params, batch, jax.random.key(0)
      )

    with self.assertRaisesRegex(error, message):
      update(optax.inject_hyperparams(factory)(rho=rho, **kwargs))
    updates, _ = update(
      optax.inject_hyperparams(factory, static_args=(argument,))(
        rho=rho, **kwargs
      )
    )
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
