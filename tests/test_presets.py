"""The recipes of docs/guide/presets.md, run as written and checked.

Every fenced python block of the page runs in order in one namespace (the
first defines the model and the train step); after each recipe, its one step
is compared with SAM's formula written out here on the same initial weights
(``Net(nnx.Rngs(0))``): ``ε = ρ u / ‖u‖`` with ``u`` the masked (SAM-ON,
logits-SAM) or centralized (GCSAM) clean gradient, then one step of
``sgd(0.1, momentum=0.9)`` (the first: ``w − 0.1 g``). Also: the masks the
``sam_optax.flax`` helpers build, and ``nnx_split_loss``.
"""

import functools
import pathlib
import re

import chex
import pytest

pytest.importorskip("flax")

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import sam_optax
import sam_optax.flax

PAGE = (
  pathlib.Path(__file__).resolve().parents[1] / "docs" / "guide" / "presets.md"
)
TOL = dict(rtol=2e-5, atol=1e-6)
LR = 0.1


@functools.cache
def _blocks():
  text = PAGE.read_text(encoding="utf-8")
  return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@functools.cache
def _scopes():
  """The namespace after each block (the blocks run in order)."""
  scope, scopes = {}, []
  for block in _blocks():
    exec(compile(block, str(PAGE), "exec"), scope)  # pylint: disable=exec-used
    scopes.append(dict(scope))
  return scopes


def _norm(tree):
  return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def _expected_step(scope, rho, direction_of):
  """One SAM step + SGD from ``Net(nnx.Rngs(0))``'s weights, ``d =
  direction_of(g)``; and the gradient handed on ``post`` unchanged."""
  model = scope["Net"](nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  batch = scope["batch"]

  def loss(p):
    return scope["per_example_loss"](nnx.merge(graphdef, p), batch).mean()

  grad = jax.jit(jax.grad(loss))
  g = grad(params)
  u = direction_of(g)
  eps = jax.tree.map(lambda x: rho * x / (_norm(u) + 1e-12), u)
  g_adv = grad(jax.tree.map(jnp.add, params, eps))
  return params, g_adv


def _params_after(scope):
  return nnx.state(scope["model"], nnx.Param)


def test_every_block_runs():
  assert len(_blocks()) == 4
  _scopes()


def test_sam_on():
  scope = _scopes()[1]
  model = scope["Net"](nnx.Rngs(0))
  mask = sam_optax.flax.normalization_mask(model)(nnx.state(model, nnx.Param))
  selected = {
    jax.tree_util.keystr(path)
    for path, keep in jax.tree_util.tree_leaves_with_path(mask)
    if keep
  }
  assert selected == {"['norm']['bias'].value", "['norm']['scale'].value"}
  params, g_adv = _expected_step(
    scope,
    0.5,
    lambda g: jax.tree.map(lambda x, k: x if k else 0 * x, g, mask),
  )
  chex.assert_trees_all_close(
    _params_after(scope),
    jax.tree.map(lambda w, g: w - LR * g, params, g_adv),
    **TOL,
  )


def test_logits_sam():
  scope = _scopes()[2]
  model = scope["Net"](nnx.Rngs(0))
  mask = sam_optax.flax.output_layer_mask(model, model.head)(
    nnx.state(model, nnx.Param)
  )
  selected = {
    jax.tree_util.keystr(path)
    for path, keep in jax.tree_util.tree_leaves_with_path(mask)
    if keep
  }
  assert selected == {"['head']['bias'].value", "['head']['kernel'].value"}
  params, g_adv = _expected_step(
    scope,
    0.05,
    lambda g: jax.tree.map(lambda x, k: x if k else 0 * x, g, mask),
  )
  chex.assert_trees_all_close(
    _params_after(scope),
    jax.tree.map(lambda w, g: w - LR * g, params, g_adv),
    **TOL,
  )


def test_gcsam():
  scope = _scopes()[3]

  def centralize(tree):  # Flax kernels [in, out]: mean over axis 0
    return jax.tree.map(
      lambda x: x - x.mean(axis=0, keepdims=True) if x.ndim == 2 else x, tree
    )

  params, g_adv = _expected_step(scope, 0.05, centralize)
  expected = jax.tree.map(lambda w, g: w - LR * g, params, centralize(g_adv))
  chex.assert_trees_all_close(_params_after(scope), expected, **TOL)
  # The hand-built chain is the same transform.
  by_hand, preset = scope["gcsam_by_hand"], scope["gcsam"]
  graphdef, p0 = nnx.split(scope["Net"](nnx.Rngs(0)), nnx.Param)
  loss_fn = lambda p, b: scope["per_example_loss"](nnx.merge(graphdef, p), b)
  a, _ = by_hand.update(
    None, by_hand.init(p0), p0, loss_fn=loss_fn, batch=scope["batch"]
  )
  b, _ = preset.update(
    None, preset.init(p0), p0, loss_fn=loss_fn, batch=scope["batch"]
  )
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


def test_module_mask_errors_and_selection():
  model = _scopes()[0]["Net"](nnx.Rngs(0))
  with pytest.raises(ValueError, match="no parameter of the model"):
    sam_optax.flax.module_mask(model, nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  mask = sam_optax.flax.module_mask(model, lambda m: isinstance(m, nnx.Linear))(
    nnx.state(model, nnx.Param)
  )
  assert sum(jax.tree.leaves(mask)) == 4  # linear and head: kernel, bias
  assert jax.tree.structure(mask) == jax.tree.structure(
    nnx.state(model, nnx.Param)
  )


def test_nnx_split_loss_with_functional_sam():
  """``nnx_split_loss`` is the model's per-example loss, and
  ``functional_sam`` on it inside ``nnx.Optimizer`` takes the step
  ``w − lr J_F(w + ε)ᵀ ∇_F L(F(w))``."""
  scope = _scopes()[0]
  net, batch = scope["Net"], scope["batch"]

  def forward(model, b):
    return model(b["x"])

  def output_loss(logits, b):
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"])

  model = net(nnx.Rngs(0))
  split = sam_optax.flax.nnx_split_loss(model, forward, output_loss)
  assert isinstance(split, sam_optax.SplitLoss)
  params = nnx.state(model, nnx.Param)
  chex.assert_trees_all_close(
    split(params, batch), scope["per_example_loss"](model, batch)
  )
  # Expected step, written out.
  graphdef, p0 = nnx.split(net(nnx.Rngs(0)), nnx.Param)
  f = lambda p: nnx.merge(graphdef, p)(batch["x"])
  logits = f(p0)
  onehot = jax.nn.one_hot(batch["y"], 3)
  cotangent = (jax.nn.softmax(logits) - onehot) / logits.shape[0]
  g = jax.vjp(f, p0)[1](cotangent)[0]
  eps = jax.tree.map(lambda x: 0.05 * x / (_norm(g) + 1e-12), g)
  g_f = jax.vjp(f, jax.tree.map(jnp.add, p0, eps))[1](cotangent)[0]
  optimizer = nnx.Optimizer(
    model,
    optax.chain(sam_optax.functional_sam(0.05), optax.sgd(LR)),
    wrt=nnx.Param,
  )

  @nnx.jit
  def step(model, optimizer, batch):
    grads = nnx.grad(lambda m: output_loss(forward(m, batch), batch).mean())(
      model
    )
    loss_fn = sam_optax.flax.nnx_split_loss(model, forward, output_loss)
    optimizer.update(model, grads, loss_fn=loss_fn, batch=batch)

  step(model, optimizer, batch)
  chex.assert_trees_all_close(
    nnx.state(model, nnx.Param),
    jax.tree.map(lambda w, d: w - LR * d, p0, g_f),
    **TOL,
  )
