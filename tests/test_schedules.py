"""Hyperparameter schedules through ``optax.inject_hyperparams``, every variant.

Each variant, wrapped as ``inject_hyperparams(variant)(rho=schedule)`` and run
for several steps of a training loop (the parameters move), must give exactly
the updates of the fixed-``rho`` transform: bit for bit without ``jit``, and
to float32 rounding under ``jit`` (where XLA may fold the fixed ``rho`` into
its constants). A changing schedule must use ``rho_t`` at step ``t``.
"""

import functools

from absl.testing import parameterized
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
NUM_STEPS = 3  # F-SAM's EMA first enters the direction at step 3
JITTED = ("sam", "f_sam", "rw_sam", "m_sam")  # compiled twice: a few suffice

# name -> (factory, fixed keyword arguments, inject_hyperparams static_args)
VARIANTS = {
  "sam": (sam_optax.sam, {}, ()),
  "usam": (sam_optax.usam, {}, ()),
  "n_sam": (sam_optax.n_sam, {}, ()),
  "asam": (sam_optax.asam, {"eta": 0.02}, ()),
  "f_sam": (sam_optax.f_sam, {"sigma": 0.7, "ema_decay": 0.6}, ()),
  "f_sam_current": (
    functools.partial(sam_optax.f_sam, momentum_in_direction="current"),
    {"sigma": 0.7, "ema_decay": 0.6},
    (),
  ),
  "rw_sam": (sam_optax.rw_sam, {"lam": 0.5}, ()),
  "rw_sam_two_probes": (
    sam_optax.rw_sam,
    {"lam": 0.5, "num_probes": 2},
    ("num_probes",),
  ),
  "rw_asam": (sam_optax.rw_asam, {"lam": 0.5, "eta": 0.02}, ()),
  "m_sam": (sam_optax.m_sam, {"micro_batch_size": 4}, ("micro_batch_size",)),
  "m_sam_chunks_of_one": (
    functools.partial(
      sam_optax.m_sam, implementation="vmap", micro_batches_per_chunk=1
    ),
    {"micro_batch_size": 4},
    ("micro_batch_size",),
  ),
  "gsam": (sam_optax.gsam, {"alpha": 0.3}, ()),
  "wsam": (sam_optax.wsam, {"gamma": 0.8}, ()),
  "vasso": (sam_optax.vasso, {"theta": 0.4}, ()),
  # Steps 0 and 2 are SAM steps, step 1 reuses g_v.
  "look_sam": (sam_optax.look_sam, {"every_k": 2, "alpha": 0.7}, ("every_k",)),
  "momentum_sam": (sam_optax.momentum_sam, {"momentum": 0.9}, ()),
}


def _batches():
  return [mlp_batch(jax.random.key(100 + t), size=8) for t in range(NUM_STEPS)]


def _ascent_batches():
  return [mlp_batch(jax.random.key(200 + t), size=16) for t in range(NUM_STEPS)]


def _train_step(tx, params, state, batch, ascent_batch, key):
  """One step of ``chain(variant, sgd)``; returns the SAM member's output too."""
  grads = jax.grad(lambda p: jnp.mean(mlp_loss(p, batch)))(params)
  updates, state = tx.update(
    grads,
    state,
    params,
    loss_fn=mlp_loss,
    batch=batch,
    ascent_batch=ascent_batch,
    key=key,
  )
  return optax.apply_updates(params, updates), state, updates


def _run(tx, jit):
  step = (
    jax.jit(functools.partial(_train_step, tx))
    if jit
    else (functools.partial(_train_step, tx))
  )
  params = mlp_params(jax.random.key(0))
  state = tx.init(params)
  outputs = []
  for t, (batch, ascent_batch) in enumerate(zip(_batches(), _ascent_batches())):
    params, state, updates = step(
      params, state, batch, ascent_batch, jax.random.key(t)
    )
    outputs.append(updates)
  return outputs, params


def _pair(name, schedule):
  factory, kwargs, static_args = VARIANTS[name]
  fixed = optax.chain(factory(RHO, **kwargs), optax.sgd(0.1))
  injected = optax.chain(
    optax.inject_hyperparams(factory, static_args=static_args)(
      rho=schedule, **kwargs
    ),
    optax.sgd(0.1),
  )
  return fixed, injected


class ConstantScheduleTest(parameterized.TestCase):
  @parameterized.named_parameters(*[(name, name) for name in VARIANTS])
  def test_equals_fixed_rho_step_for_step(self, name):
    fixed, injected = _pair(name, optax.constant_schedule(RHO))
    for jit in (False, True) if name in JITTED else (False,):
      expected, _ = _run(fixed, jit)
      got, _ = _run(injected, jit)
      for t, (a, b) in enumerate(zip(expected, got)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
          if jit:
            np.testing.assert_allclose(
              y, x, rtol=2e-6, atol=1e-7, err_msg=f"{name}, jit, step {t}"
            )
          else:
            np.testing.assert_array_equal(y, x, err_msg=f"{name}, step {t}")


def test_changing_schedule_uses_rho_t_at_step_t():
  """A linear schedule equals a fixed-rho F-SAM built anew at each step."""
  schedule = optax.linear_schedule(0.0, 0.2, NUM_STEPS)
  injected = optax.inject_hyperparams(sam_optax.f_sam)(
    rho=schedule, sigma=0.7, ema_decay=0.6
  )
  params = mlp_params(jax.random.key(0))
  state = injected.init(params)
  reference_state = state.inner_state
  for t, batch in enumerate(_batches()):
    grads = jax.grad(lambda p, b=batch: jnp.mean(mlp_loss(p, b)))(params)
    fixed = sam_optax.f_sam(float(schedule(t)), sigma=0.7, ema_decay=0.6)
    expected, reference_state = fixed.update(
      grads, reference_state, params, loss_fn=mlp_loss, batch=batch
    )
    got, state = injected.update(
      grads, state, params, loss_fn=mlp_loss, batch=batch
    )
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.hyperparams["rho"], schedule(t), rtol=1e-6)
    params = optax.apply_updates(params, optax.tree.scale(-0.1, got))


def test_structural_arguments_need_static_args():
  """An int that sets shapes or passes, injected as an array, is named."""
  params = mlp_params(jax.random.key(0))
  with pytest.raises(ValueError, match=r"static_args=\('num_probes',\)"):
    optax.inject_hyperparams(sam_optax.rw_sam)(rho=0.1, num_probes=2).init(
      params
    )
  with pytest.raises(ValueError, match=r"static_args=\('micro_batch_size',\)"):
    optax.inject_hyperparams(sam_optax.m_sam)(rho=0.1, micro_batch_size=4).init(
      params
    )


def test_callable_perturb_mask_needs_static_args():
  """inject_hyperparams takes any callable for a schedule: said, not silent."""
  params = mlp_params(jax.random.key(0))
  batch = mlp_batch(jax.random.key(1))
  only_kernels = sam_optax.not_bias_mask
  tx = optax.inject_hyperparams(sam_optax.sam)(
    rho=0.1, perturb_mask=only_kernels
  )
  with pytest.raises(ValueError, match="static_args=\\('perturb_mask',\\)"):
    tx.update(None, tx.init(params), params, loss_fn=mlp_loss, batch=batch)
  tx = optax.inject_hyperparams(sam_optax.sam, static_args=("perturb_mask",))(
    rho=0.1, perturb_mask=only_kernels
  )
  expected, _ = sam_optax.sam(0.1, perturb_mask=only_kernels).update(
    None, optax.EmptyState(), params, loss_fn=mlp_loss, batch=batch
  )
  got, _ = tx.update(
    None, tx.init(params), params, loss_fn=mlp_loss, batch=batch
  )
  jax.tree.map(np.testing.assert_array_equal, got, expected)
