"""A new variant built from the public pieces, as the guide shows.

The new-variant snippet of docs/guide/variants.md (found by its marker) is run
as it stands, here only (the page shows it as plain code);
the transform it builds from ``AscentDirection`` and ``sharpness_aware`` is
checked over three steps against its formula, ``d_t = g_{t−1}`` (``g_0`` at
the first step), ``ε_t = ρ d_t / ‖d_t‖``, returned ``∇L_B(w_t + ε_t)``, with
and without ``jit``, with the clean gradient given and with ``updates=None``.
"""

import chex
import jax
import optax
import pytest

from _problems import add
from _problems import global_norm
from _problems import guide_snippet
from _problems import mean_loss
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

MARKER = "<!-- new-variant snippet: run by tests/test_new_variant.py -->"
RHO = 0.05
LR = 0.1


def _snippet_scope():
  code = guide_snippet("variants.md", MARKER)
  scope = {}
  exec(compile(code, "docs/guide/variants.md", "exec"), scope)  # pylint: disable=exec-used
  return scope


SCOPE = _snippet_scope()


def _expected_updates(params, batches):
  """The formula, step by step, through the snippet's sgd(0.1, momentum=0.9)."""
  previous, velocity, expected = None, None, []
  for batch in batches:
    clean = jax.grad(lambda p, b=batch: mean_loss(mlp_loss, p, b))(params)
    direction = clean if previous is None else previous
    epsilon = jax.tree.map(
      lambda d: RHO * d / global_norm(direction), direction
    )
    perturbed = jax.grad(lambda p, b=batch: mean_loss(mlp_loss, p, b))(
      add(params, epsilon)
    )
    velocity = perturbed if velocity is None else add(perturbed, velocity, 0.9)
    updates = jax.tree.map(lambda v: -LR * v, velocity)
    expected.append(updates)
    params = optax.apply_updates(params, updates)
    previous = clean
  return expected


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("give_clean_gradient", [True, False])
def test_guide_new_variant_follows_its_formula(use_jit, give_clean_gradient):
  tx = SCOPE["tx"]
  params = mlp_params(jax.random.key(0))
  batches = [mlp_batch(jax.random.key(k)) for k in (1, 2, 3)]

  def step(params, state, batch):
    grads = None
    if give_clean_gradient:
      grads = jax.grad(lambda p: mean_loss(mlp_loss, p, batch))(params)
    return tx.update(grads, state, params, loss_fn=mlp_loss, batch=batch)

  step = jax.jit(step) if use_jit else step
  state = tx.init(params)
  expected = _expected_updates(params, batches)
  for t, batch in enumerate(batches):
    updates, state = step(params, state, batch)
    chex.assert_trees_all_close(updates, expected[t], rtol=2e-5, atol=1e-7)
    params = optax.apply_updates(params, updates)
  assert int(state[0].count) == len(batches)


def test_new_variant_gets_the_contract_checks():
  # sharpness_aware's checks come with the new variant, under its own name.
  tx = SCOPE["tx"]
  params = mlp_params(jax.random.key(0))
  with pytest.raises(TypeError, match=r"previous_gradient_sam\.update needs"):
    tx.update(None, tx.init(params), params, loss_fn=mlp_loss)
