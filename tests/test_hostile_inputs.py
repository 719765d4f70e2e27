"""Hostile inputs through the public API: a right result or a clear refusal.

Each test is one of issue 18's probes: what used to give a silent wrong
result or a raw error now gives the right result, or an error at trace or
build time that names the argument to fix. The promises of the docs (bf16
compute in RW-SAM, the state diagnostics) have tests named after them.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_optax

from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

RHO = 0.1
PARAMS = mlp_params(jax.random.key(0))
BATCH = mlp_batch(jax.random.key(1))
KEY = jax.random.key(2)


def _grad(loss_fn=mlp_loss, params=PARAMS, batch=BATCH):
  return jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)


_INIT = object()


def _update(tx, updates=None, state=_INIT, params=PARAMS, **kwargs):
  kwargs = {"loss_fn": mlp_loss, "batch": BATCH, **kwargs}
  state = tx.init(params) if state is _INIT else state
  return tx.update(updates, state, params, **kwargs)


# --- 1. LookSAM when g_adv ∥ g ----------------------------------------------


def _line_loss(p, b):
  return (b["x"] @ p["w"] - b["y"]) ** 2


LINE_PARAMS = {"w": jnp.array([0.4, -0.8, 1.2])}
LINE_BATCH = {"x": jnp.eye(3), "y": jnp.array([1.0, -1.0, 0.5])}


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("jit", [False, True])
def test_look_sam_hands_on_g_when_g_v_is_rounding_noise(jit, layerwise):
  # An isotropic Hessian: g_adv ∥ g, so the computed g_v is ~3e-8 noise.
  tx = sam_optax.look_sam(0.05, 2, 0.7, layerwise=layerwise)
  g = _grad(_line_loss, LINE_PARAMS, LINE_BATCH)

  def update(state):
    return tx.update(
      g, state, LINE_PARAMS, loss_fn=_line_loss, batch=LINE_BATCH
    )

  update = jax.jit(update) if jit else update
  _, state = update(tx.init(LINE_PARAMS))
  reused, _ = update(state)
  np.testing.assert_allclose(reused["w"], g["w"], rtol=1e-6)
  assert not np.any(state.orthogonal["w"])


def _two_layer_loss(p, b):
  # "w": an isotropic Hessian (its g_v is rounding noise); "v": not.
  scale = jnp.array([1.0, 2.0, 3.0])
  return _line_loss(p, b) + (b["x"] @ (scale * p["v"]) - b["y"]) ** 2


def test_look_sam_layerwise_guards_each_layer():
  """A layer whose g_v is rounding noise hands on g; the others keep theirs."""
  params = {**LINE_PARAMS, "v": jnp.array([0.3, 0.2, -0.5])}
  batch = LINE_BATCH
  alpha = 0.7
  tx = sam_optax.look_sam(0.05, 2, alpha, layerwise=True)
  g = _grad(_two_layer_loss, params, batch)
  step = jax.jit(
    lambda state: tx.update(
      g, state, params, loss_fn=_two_layer_loss, batch=batch
    )
  )
  _, state = step(tx.init(params))
  reused, _ = step(state)
  assert not np.any(state.orthogonal["w"])
  np.testing.assert_allclose(reused["w"], g["w"], rtol=1e-6)
  g_v = state.orthogonal["v"]
  assert np.linalg.norm(g_v) > 1e-3 * np.linalg.norm(g["v"])
  np.testing.assert_allclose(
    reused["v"],
    g["v"] + alpha * np.linalg.norm(g["v"]) * g_v / np.linalg.norm(g_v),
    rtol=1e-5,
  )


@pytest.mark.parametrize(
  "make",
  [
    lambda: sam_optax.look_sam(0.0, 2, 0.7),
    lambda: sam_optax.look_sam(
      RHO, 2, 0.7, perturb_mask=lambda p: jax.tree.map(lambda _: False, p)
    ),
  ],
  ids=["rho_0", "all_false_mask"],
)
def test_look_sam_without_perturbation_is_the_clean_gradient(make):
  tx = make()
  g = _grad()
  step = jax.jit(lambda state: _update(tx, g, state))
  _, state = step(tx.init(PARAMS))
  reused, _ = step(state)
  for a, b in zip(jax.tree.leaves(reused), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_look_sam_keeps_a_resolved_orthogonal_part():
  tx = sam_optax.look_sam(RHO, 2, 0.7)
  _, state = _update(tx, _grad())
  norm = sam_optax._perturbation.global_norm(state.orthogonal)
  assert norm > 1e-3 * sam_optax._perturbation.global_norm(_grad())


# --- 2. updates against params ----------------------------------------------

UPDATES_CHECKED = {
  "sam": sam_optax.sam,
  "usam": sam_optax.usam,
  "asam": sam_optax.asam,
  "f_sam": sam_optax.f_sam,
  "wsam": sam_optax.wsam,
  "gsam": sam_optax.gsam,
  "vasso": sam_optax.vasso,
  "look_sam": sam_optax.look_sam,
  "momentum_sam": sam_optax.momentum_sam,
  "rw_sam": sam_optax.rw_sam,
  "n_sam": sam_optax.n_sam,
  "m_sam": functools.partial(sam_optax.m_sam, micro_batch_size=2),
}


@pytest.mark.parametrize("name", sorted(UPDATES_CHECKED))
@pytest.mark.parametrize("wrong", ["broadcastable", "scalar"])
def test_updates_of_other_shapes_are_refused(name, wrong):
  g = _grad()
  if wrong == "broadcastable":  # [1, 3] for [7, 3]: would broadcast
    g["out"]["kernel"] = g["out"]["kernel"][:1]
  else:
    g["hidden"]["bias"] = jnp.float32(0.1)
  tx = UPDATES_CHECKED[name](RHO)
  with pytest.raises(ValueError, match=r"`updates` must have the shapes"):
    _update(tx, g, key=KEY, ascent_batch=BATCH)


# --- 3. Integer losses ------------------------------------------------------


@pytest.mark.parametrize(
  "make",
  [
    sam_optax.sam,
    sam_optax.gsam,
    sam_optax.wsam,
    functools.partial(sam_optax.m_sam, micro_batch_size=2),
  ],
)
def test_integer_losses_are_refused_naming_loss_fn(make):
  int_loss = lambda p, b: mlp_loss(p, b).astype(jnp.int32)
  with pytest.raises(TypeError, match=r"loss_fn.*floating-point"):
    _update(make(RHO), loss_fn=int_loss)


# --- 4. RW-SAM's temperature ------------------------------------------------

NORMS = jnp.array([1.0, 2.0, 3.0, 0.5])


@pytest.mark.parametrize("lam", [1e-45, 1e-30, 1e-8])
def test_gibbs_weights_go_to_the_largest_norm_as_lam_goes_to_zero(lam):
  weights = sam_optax.gibbs_weights(NORMS, lam)
  np.testing.assert_allclose(weights, [0.0, 0.0, 1.0, 0.0], atol=1e-6)


def test_gibbs_weights_share_the_limit_between_ties():
  weights = sam_optax.gibbs_weights(jnp.array([3.0, 1.0, 3.0]), 1e-30)
  np.testing.assert_allclose(weights, [0.5, 0.0, 0.5], atol=1e-6)


def test_rw_sam_with_a_tiny_lam_uses_the_largest_norm_only():
  tx = sam_optax.rw_sam(RHO, lam=1e-45, gradient_norms="exact")
  _, state = jax.jit(lambda: _update(tx))()
  np.testing.assert_allclose(state.effective_sample_size, 1.0, rtol=1e-5)


@pytest.mark.parametrize("lam", [1e-45, 1e-30])
def test_a_traced_tiny_lam_puts_all_weight_on_the_largest_norm(lam):
  # Traced, λ is not checked, and the largest score's gap to the max was
  # XLA's rounding (5e-8), not 0: every logit went to -inf (uniform weights,
  # or NaN at LLVM's -O0).
  weights = jax.jit(sam_optax.gibbs_weights)(NORMS, lam)
  np.testing.assert_array_equal(
    weights, jax.nn.one_hot(jnp.argmax(NORMS), NORMS.shape[0])
  )


@pytest.mark.parametrize("lam", [0.0, -1.0, "x", None, np.complex64(0.5j)])
def test_gibbs_weights_name_a_bad_lam(lam):
  with pytest.raises(ValueError, match="gibbs_weights: lam must be"):
    sam_optax.gibbs_weights(NORMS, lam)


@pytest.mark.parametrize("lam", ["x", None])
def test_rw_sam_names_a_bad_lam(lam):
  with pytest.raises(ValueError, match="rw_sam: lam must be"):
    sam_optax.rw_sam(RHO, lam=lam)


@pytest.mark.parametrize("norms", [NORMS[:, None], jnp.float32(1.0)])
def test_gibbs_weights_need_a_vector_of_norms(norms):
  with pytest.raises(ValueError, match="norms must be a vector"):
    sam_optax.gibbs_weights(norms, 0.5)


# --- 5. Flags and numbers ---------------------------------------------------

FLAGGED = [
  ("normalize", lambda v: sam_optax.asam(RHO, normalize=v)),
  ("normalize", lambda v: sam_optax.n_sam(RHO, normalize=v)),
  ("normalize", lambda v: sam_optax.m_sam(RHO, 2, normalize=v)),
  ("normalize", lambda v: sam_optax.reference.m_sam(RHO, 2, normalize=v)),
  ("normalize", lambda v: sam_optax.data_parallel_m_sam(RHO, "d", normalize=v)),
  (
    "normalize",
    lambda v: sam_optax.sharpness_aware(
      sam_optax.clean_gradient_ascent(), RHO, normalize=v
    ),
  ),
  ("probe_in_float32", lambda v: sam_optax.rw_sam(RHO, probe_in_float32=v)),
  ("probe_in_float32", lambda v: sam_optax.rw_asam(RHO, probe_in_float32=v)),
  (
    "probe_in_float32",
    lambda v: sam_optax.finite_difference_gradient_norms(
      mlp_loss, PARAMS, BATCH, KEY, probe_in_float32=v
    ),
  ),
  (
    "probe_in_float32",
    lambda v: sam_optax.calibrate_sigma(
      mlp_loss, PARAMS, BATCH, KEY, probe_in_float32=v
    ),
  ),
  (
    "with_replacement",
    lambda v: sam_optax.diagnostics.micro_batch_coefficient(
      2, 8, with_replacement=v
    ),
  ),
]


@pytest.mark.parametrize("argument, make", FLAGGED)
@pytest.mark.parametrize("value", [None, "False", "no", 0, 1.0])
def test_flags_are_booleans_only(argument, make, value):
  with pytest.raises(ValueError, match=f"{argument} must be True or False"):
    make(value)


def test_numpy_booleans_are_flags():
  a, _ = _update(
    sam_optax.n_sam(RHO, normalize=np.bool_(False)), None, ascent_batch=BATCH
  )
  b, _ = _update(
    sam_optax.n_sam(RHO, normalize=False), None, ascent_batch=BATCH
  )
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
  "make, argument",
  [
    (sam_optax.sam, "rho"),
    (lambda v: sam_optax.gsam(RHO, alpha=v), "alpha"),
    (lambda v: sam_optax.look_sam(RHO, alpha=v), "alpha"),
    (lambda v: sam_optax.rw_sam(RHO, sigma=v), "sigma"),
    (lambda v: sam_optax.asam(RHO, eta=v), "eta"),
  ],
)
@pytest.mark.parametrize(
  "value", [np.complex64(0.3 + 0.1j), 0.3 + 0j, np.array(0.3 + 0.1j)]
)
def test_complex_hyperparameters_are_refused(make, argument, value):
  with pytest.raises(ValueError, match=f"{argument} must be a real number"):
    make(value)


@pytest.mark.parametrize("eta", [-1.0, jnp.nan, "x", None])
def test_adaptive_scale_checks_eta(eta):
  with pytest.raises(ValueError, match="adaptive_scale: eta must be"):
    sam_optax.adaptive_scale(eta)


# --- 6. RW-SAM with bfloat16 compute -----------------------------------------


def _bf16_compute_loss(params, batch):
  """The MLP computing in bfloat16, as a Flax layer with dtype=bfloat16."""
  p = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  hidden = jnp.tanh(
    batch["x"].astype(jnp.bfloat16) @ p["hidden"]["kernel"]
    + p["hidden"]["bias"]
  )
  logits = hidden @ p["out"]["kernel"] + p["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])


BF16_BATCH = mlp_batch(jax.random.key(3), size=32)


def test_rw_sam_bf16_compute_falls_back_to_sam_and_says_so():
  # The default σ = 1e-4 is lost in bfloat16: most losses do not change.
  tx = sam_optax.rw_sam(RHO, 0.5)
  kwargs = {"loss_fn": _bf16_compute_loss, "batch": BF16_BATCH}
  # Found at trace time too: the default σ with bfloat16 compute warns.
  with pytest.warns(UserWarning, match="sigma=.*calibrate_sigma"):
    update, state = jax.jit(
      lambda: tx.update(None, tx.init(PARAMS), PARAMS, key=KEY, **kwargs)
    )()
  assert state.unresolved_fraction > sam_optax._rw_sam.UNRESOLVED_LIMIT
  np.testing.assert_allclose(state.effective_sample_size, 32.0, rtol=1e-5)
  # SAM's weights: the same step as λ = ∞ (uniform weights by definition).
  uniform = sam_optax.rw_sam(RHO, jnp.inf, sigma=1e-4)
  expected, _ = jax.jit(
    lambda: uniform.update(
      None, uniform.init(PARAMS), PARAMS, key=KEY, **kwargs
    )
  )()
  for a, b in zip(jax.tree.leaves(update), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def test_rw_sam_bf16_compute_with_a_calibrated_sigma_reweights():
  tx = sam_optax.rw_sam(RHO, 0.5, sigma=3e-2)
  _, state = tx.update(
    None,
    tx.init(PARAMS),
    PARAMS,
    loss_fn=_bf16_compute_loss,
    batch=BF16_BATCH,
    key=KEY,
  )
  assert state.unresolved_fraction < sam_optax._rw_sam.UNRESOLVED_LIMIT
  assert state.effective_sample_size < 32.0


def test_rw_sam_float32_compute_is_resolved():
  _, state = jax.jit(lambda: _update(sam_optax.rw_sam(RHO, 0.5), key=KEY))()
  assert state.unresolved_fraction == 0.0


# --- The state diagnostics (the docs' promise) ------------------------------


def test_rw_sam_state_holds_the_diagnostics_of_the_last_step():
  tx = sam_optax.rw_sam(RHO, 0.5, gradient_norms="exact")
  _, state = jax.jit(lambda: _update(tx))()
  norms = sam_optax.per_example_gradient_norms(mlp_loss, PARAMS, BATCH)
  weights = sam_optax.gibbs_weights(norms, 0.5)
  expected = {
    "clean_loss": jnp.mean(mlp_loss(PARAMS, BATCH)),
    "gradient_norm_mean": jnp.mean(norms),
    "gradient_norm_std": jnp.std(norms),
    "gradient_norm_max": jnp.max(norms),
    "weight_entropy": -jnp.sum(weights * jnp.log(weights)),
    "effective_sample_size": 1 / jnp.sum(weights**2),
    "unresolved_fraction": 0.0,
  }
  assert set(expected) == set(state._fields)
  for field, value in expected.items():
    np.testing.assert_allclose(
      optax.tree.get(state, field), value, rtol=1e-5, err_msg=field
    )


# --- 9. State misuse --------------------------------------------------------

OTHER_PARAMS = mlp_params(jax.random.key(0), hidden=4)
STATEFUL = {
  "look_sam": sam_optax.look_sam,
  "momentum_sam": sam_optax.momentum_sam,
  "f_sam": sam_optax.f_sam,
  "vasso": sam_optax.vasso,
  "rw_sam": sam_optax.rw_sam,
  "bsam": lambda rho: sam_optax.bsam(0.1, 100, rho),
  "sampa": lambda rho: sam_optax.sampa(rho, 0.1),
  "lookbehind_sam": lambda rho: sam_optax.lookbehind_sam(
    rho, optimizer=optax.sgd(0.1)
  ),
  "wsam_decoupled": lambda rho: sam_optax.wsam(
    rho, decoupled_base=optax.sgd(0.1, momentum=0.9), learning_rate=0.1
  ),
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
@pytest.mark.parametrize(
  "state",
  [
    optax.EmptyState(),
    None,
    sam_optax.LookSamState(jnp.zeros([], jnp.int32), PARAMS),
    "other shapes",
  ],
  ids=["EmptyState", "None", "another_transform", "other_shapes"],
)
def test_a_wrong_state_is_refused_naming_state(name, state):
  tx = STATEFUL[name](RHO)
  if isinstance(state, str):
    if name == "rw_sam":
      pytest.skip("RW-SAM's state (scalars) does not depend on the params")
    state = tx.init(OTHER_PARAMS)
  if name == "look_sam" and isinstance(state, sam_optax.LookSamState):
    state = optax.EmptyState()  # its own type is not "another transform's"
  with pytest.raises(ValueError, match="`state` is not this transform's"):
    _update(tx, _grad(), state, key=KEY)


@pytest.mark.parametrize(
  "make",
  [
    sam_optax.sam,
    functools.partial(sam_optax.m_sam, micro_batch_size=2),
    functools.partial(sam_optax.esam, gamma=0.5),
    sam_optax.multi_step_sam,
  ],
  ids=["sam", "m_sam", "esam", "multi_step_sam"],
)
def test_stateless_transforms_refuse_another_state(make):
  state = sam_optax.look_sam(RHO).init(PARAMS)
  with pytest.raises(ValueError, match="`state` is not this transform's"):
    _update(make(RHO), _grad(), state)


@pytest.mark.parametrize("state", [(), None], ids=["tuple", "None"])
def test_stateless_transforms_take_any_empty_state(state):
  # optax's own stateless transforms are often given () (nothing to mix up).
  tx = sam_optax.sam(RHO)
  expected, _ = _update(tx, _grad(), tx.init(PARAMS))
  actual, _ = _update(tx, _grad(), state)
  for a, b in zip(
    jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_state_check_passes_under_jit_and_in_chains():
  tx = optax.chain(sam_optax.look_sam(RHO, 2), optax.sgd(0.1))
  state = tx.init(PARAMS)
  step = jax.jit(
    lambda s: tx.update(_grad(), s, PARAMS, loss_fn=mlp_loss, batch=BATCH)
  )
  for _ in range(2):
    _, state = step(state)
  assert int(state[0].count) == 2


# --- 10. Custom variants ----------------------------------------------------


def _custom(direction, scale_fn=None):
  ascent = sam_optax.AscentDirection(
    init=lambda params: optax.EmptyState(), direction=direction
  )
  return sam_optax.sharpness_aware(ascent, RHO, scale_fn=scale_fn)


@pytest.mark.parametrize(
  "direction, error, match",
  [
    (lambda u, s, p, **k: ({"w": 1.0}, s), ValueError, "structure"),
    (lambda u, s, p, **k: None, TypeError, r"pair \(d, state\)"),
    (lambda u, s, p, **k: _grad(), TypeError, r"pair \(d, state\)"),
    (
      lambda u, s, p, **k: (jax.tree.map(lambda x: x[:1], _grad()), s),
      ValueError,
      "shapes",
    ),
    (
      lambda u, s, p, **k: (_grad(), {"count": jnp.zeros([])}),
      ValueError,
      "`state",
    ),
  ],
  ids=["wrong_tree", "none", "d_alone", "broadcastable", "bad_state"],
)
def test_a_bad_custom_direction_is_a_clear_error(direction, error, match):
  with pytest.raises(error, match=match):
    _update(_custom(direction))


def test_a_plain_function_as_ascent_is_a_clear_error():
  with pytest.raises(TypeError, match="AscentDirection"):
    sam_optax.sharpness_aware(lambda u, s, p, **k: (u, s), RHO)


@pytest.mark.parametrize(
  "scale_fn", [lambda p: {"w": 1.0}, lambda p: jax.tree.map(lambda x: 2.0, p)]
)
def test_a_bad_scale_fn_is_a_clear_error(scale_fn):
  tx = _custom(
    lambda u, s, p, *, loss_fn, batch, **k: (
      sam_optax._contract.mean_gradient(loss_fn, p, batch),
      s,
    ),
    scale_fn,
  )
  with pytest.raises(ValueError, match=r"`scale_fn\(params\)`"):
    _update(tx)


# --- 11. Masks and leaves ---------------------------------------------------


@pytest.mark.parametrize("leaf", ["False", 1, None])
def test_mask_leaves_must_be_booleans(leaf):
  mask = jax.tree.map(lambda _: True, PARAMS)
  mask["out"]["bias"] = leaf
  if leaf is None:
    mask["out"]["bias"] = [None]  # a None leaf would change the structure
  with pytest.raises(ValueError, match="perturb_mask"):
    _update(sam_optax.sam(RHO, perturb_mask=mask))


def test_boolean_array_masks_are_accepted():
  mask = jax.tree.map(lambda x: jnp.ones(x.shape, bool), PARAMS)
  a, _ = _update(sam_optax.sam(RHO, perturb_mask=mask))
  b, _ = _update(sam_optax.sam(RHO))
  jax.tree.map(np.testing.assert_allclose, a, b)


@pytest.mark.parametrize("name", ["asam", "rw_asam"])
def test_asam_takes_a_python_float_leaf(name):
  params = {"w": jnp.array([0.5, -1.0]), "s": 0.3}
  loss = lambda p, b: (b @ p["w"]) * p["s"] + b[:, 0] ** 2
  batch = jnp.arange(8.0).reshape(4, 2)
  tx = (
    getattr(sam_optax, name)(RHO, gradient_norms="exact")
    if name == ("rw_asam")
    else sam_optax.asam(RHO)
  )
  as_array = {"w": params["w"], "s": jnp.float32(0.3)}
  a, _ = jax.jit(
    lambda: tx.update(None, tx.init(params), params, loss_fn=loss, batch=batch)
  )()
  b, _ = jax.jit(
    lambda: tx.update(
      None, tx.init(as_array), as_array, loss_fn=loss, batch=batch
    )
  )()
  jax.tree.map(np.testing.assert_allclose, a, b)


# --- 12. n_sam ---------------------------------------------------------------


@pytest.mark.parametrize(
  "ascent_batch",
  [
    {"x": jnp.zeros((0, 5)), "y": jnp.zeros((0,), jnp.int32)},
    {"x": jnp.zeros((4, 5)), "y": jnp.zeros((3,), jnp.int32)},
  ],
  ids=["empty", "ragged"],
)
def test_n_sam_names_a_bad_ascent_batch(ascent_batch):
  with pytest.raises(ValueError, match="`ascent_batch`"):
    _update(sam_optax.n_sam(RHO), ascent_batch=ascent_batch)


def test_n_sam_refuses_a_broadcastable_ascent_gradient():
  gradient = _grad()
  gradient["out"]["kernel"] = gradient["out"]["kernel"][:1]
  with pytest.raises(ValueError, match="`ascent_gradient` must have the"):
    _update(sam_optax.n_sam(RHO), ascent_gradient=gradient)


# --- 13. Diagnostics --------------------------------------------------------


@pytest.mark.parametrize(
  "params, vector, match",
  [
    ({"w": jnp.arange(3)}, {"w": jnp.ones(3)}, "non-floating"),
    ({}, {}, "no leaves"),
    ({"w": jnp.ones(3)}, {"w": jnp.ones(1)}, "`vector` must have the shapes"),
  ],
  ids=["int_leaf", "empty", "vector_shape"],
)
def test_hessian_vector_product_checks_its_inputs(params, vector, match):
  loss = lambda p, b: jnp.sum(b * jnp.sum(jnp.asarray(0.0) + 1.0)) * b[:, 0]
  with pytest.raises(ValueError, match=match):
    sam_optax.diagnostics.hessian_vector_product(
      loss, params, jnp.ones((4, 3)), vector
    )


@pytest.mark.parametrize("args", [(1, 0), (2, "5"), (2, 5.0)])
def test_micro_batch_coefficient_names_num_examples(args):
  with pytest.raises(ValueError, match="num_examples must be"):
    sam_optax.diagnostics.micro_batch_coefficient(*args)


def test_sample_micro_batch_gradients_refuses_a_broadcastable_full_gradient():
  gradient = _grad()
  gradient["out"]["kernel"] = gradient["out"]["kernel"][:1]
  with pytest.raises(ValueError, match="`full_gradient` must have the"):
    sam_optax.diagnostics.sample_micro_batch_gradients(
      mlp_loss, PARAMS, BATCH, 2, KEY, full_gradient=gradient
    )


def test_finite_difference_norms_check_the_length_of_losses():
  with pytest.raises(ValueError, match="losses must be"):
    sam_optax.finite_difference_gradient_norms(
      mlp_loss, PARAMS, BATCH, KEY, losses=jnp.zeros(3)
    )


# --- 14. data_parallel_m_sam ------------------------------------------------


def test_data_parallel_m_sam_under_vmap_is_m_sam():
  tx = sam_optax.data_parallel_m_sam(RHO, axis_name=["data"])  # a list too
  shards = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), BATCH)
  local = jax.jit(
    jax.vmap(lambda shard: _update(tx, batch=shard)[0], axis_name="data")
  )(shards)
  expected, _ = jax.jit(lambda: _update(sam_optax.m_sam(RHO, 2)))()
  for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, jnp.broadcast_to(b, a.shape), atol=1e-6)


@pytest.mark.parametrize("axis_name", [[], None, [["data"]]])
def test_data_parallel_m_sam_names_a_bad_axis_name(axis_name):
  with pytest.raises(ValueError, match="axis_name must be"):
    sam_optax.data_parallel_m_sam(RHO, axis_name=axis_name)


# --- 15. Messages that point the right way ----------------------------------


def test_a_per_token_loss_is_told_to_reduce_over_the_tokens():
  per_token = lambda p, b: jnp.stack([mlp_loss(p, b)] * 4, axis=-1)  # [B, T]
  with pytest.raises(ValueError, match="reduce over the other axes"):
    _update(sam_optax.sam(RHO), loss_fn=per_token)


def test_a_mean_loss_is_told_to_return_the_vector():
  mean = lambda p, b: jnp.mean(mlp_loss(p, b))
  with pytest.raises(ValueError, match="not their mean"):
    _update(sam_optax.sam(RHO), loss_fn=mean)


def test_linen_train_state_apply_gradients_is_explained():
  train_state = pytest.importorskip("flax.training.train_state")
  state = train_state.TrainState.create(
    apply_fn=None, params=PARAMS, tx=sam_optax.sam(RHO)
  )
  with pytest.raises(TypeError, match=r"TrainState\.apply_gradients"):
    state.apply_gradients(grads=_grad(), loss_fn=mlp_loss, batch=BATCH)


def test_nnx_loss_fn_built_outside_the_jitted_step_warns():
  nnx = pytest.importorskip("flax.nnx")
  import sam_optax.flax

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(5, 3, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.dropout(self.linear(x))

  def per_example_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(
      model(batch["x"]), batch["y"]
    )

  model = Net(nnx.Rngs(0))
  tx = sam_optax.sam(RHO)

  def update(model, loss_fn):
    params = nnx.state(model, nnx.Param)
    return tx.update(
      None, optax.EmptyState(), params, loss_fn=loss_fn, batch=BATCH
    )[0]

  @nnx.jit
  def built_inside(model):
    return update(model, sam_optax.flax.nnx_loss_fn(model, per_example_loss))

  with warnings.catch_warnings():
    warnings.simplefilter("error")
    built_inside(model)  # the documented use: no warning

  outside = sam_optax.flax.nnx_loss_fn(model, per_example_loss)
  with pytest.warns(UserWarning, match="same dropout masks"):
    jax.jit(lambda m: update(m, outside))(model)
