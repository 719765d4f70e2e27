"""Data-parallel SAM on 8 simulated CPU devices against m_sam and sam on one.

XLA's device count is fixed when jax is first imported, and other test files
import jax earlier in the same pytest run. So the 8-device computations run in
one child process (this file run as a script with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), which prints each
check's two results; the tests below compare them. Errors and a one-device
mesh are tested in-process.
"""

import functools
import os
import re

import jax
import jax.flatten_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import sam_optax

from _problems import child_environment
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params
from _problems import print_results
from _problems import run_child

RHO = 0.1
BATCH = 16  # 2 examples per device on 8 devices
DEVICES = 8


def _problem(seed=0):
  return (
    mlp_params(jax.random.key(seed)),
    mlp_batch(jax.random.key(seed + 1), size=BATCH),
  )


def _m_sam(micro_batch_size, **kwargs):
  # The vmap form compiles fastest here; test_m_sam pins every form of m_sam
  # to the sequential reference.
  return sam_optax.m_sam(RHO, micro_batch_size, implementation="vmap", **kwargs)


def _on_one_device(tx, params, batch):
  return jax.jit(
    lambda p, b: tx.update(None, tx.init(p), p, loss_fn=mlp_loss, batch=b)[0]
  )(params, batch)


def _data_parallel(tx, params, batch, mesh_shape, axis_names, check_vma=True):
  """One update of ``tx`` inside shard_map, the batch sharded over all axes.

  Returns the update and the number of all-reduces in the traced step.
  """
  mesh = jax.make_mesh(mesh_shape, axis_names)
  batch = jax.device_put(batch, NamedSharding(mesh, P(axis_names)))

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P(axis_names)),
    out_specs=P(),
    check_vma=check_vma,
  )
  def step(params, batch):
    return tx.update(
      None, tx.init(params), params, loss_fn=mlp_loss, batch=batch
    )[0]

  return step(params, batch), _all_reduces(step, params, batch)


def _all_reduces(step, params, batch):
  """How many parameter-sized all-reduces the traced step contains.

  Counts the elements of every ``psum`` in the jaxpr (one equation per leaf)
  and divides by the number of parameters.
  """
  jaxpr = str(jax.make_jaxpr(step)(params, batch))
  reduced = 0
  for shape in re.findall(r"\[([\d,]*)\] = psum(?:_invariant)?\[", jaxpr):
    reduced += int(np.prod([int(d) for d in shape.split(",") if d]))
  size = sum(np.size(leaf) for leaf in jax.tree.leaves(params))
  return reduced / size


# --- The checks run on 8 devices: name -> () -> (actual, expected, extra) ----


def check_local_is_m_sam():
  params, batch = _problem(0)
  actual, all_reduces = _data_parallel(
    sam_optax.data_parallel_m_sam(RHO, "data"), params, batch, (8,), ("data",)
  )
  expected = _on_one_device(_m_sam(BATCH // DEVICES), params, batch)
  return actual, expected, {"all_reduces": all_reduces}


def check_local_usam_is_m_usam():
  params, batch = _problem(1)
  actual, _ = _data_parallel(
    sam_optax.data_parallel_m_sam(RHO, "data", normalize=False),
    params,
    batch,
    (8,),
    ("data",),
  )
  expected = _on_one_device(
    _m_sam(BATCH // DEVICES, normalize=False), params, batch
  )
  return actual, expected, {}


def check_local_micro_batches_are_m_sam():
  params, batch = _problem(2)
  actual, _ = _data_parallel(
    sam_optax.data_parallel_m_sam(RHO, "data", micro_batch_size=1),
    params,
    batch,
    (8,),
    ("data",),
  )
  expected = _on_one_device(_m_sam(1), params, batch)
  return actual, expected, {}


def check_local_without_check_vma():
  params, batch = _problem(3)
  actual, _ = _data_parallel(
    sam_optax.data_parallel_m_sam(RHO, "data"),
    params,
    batch,
    (8,),
    ("data",),
    check_vma=False,
  )
  expected = _on_one_device(_m_sam(BATCH // DEVICES), params, batch)
  return actual, expected, {}


def _kernels_only(params):
  return {layer: {"kernel": True, "bias": False} for layer in params}


def check_local_perturb_mask_is_m_sam_with_mask():
  params, batch = _problem(5)
  actual, _ = _data_parallel(
    sam_optax.data_parallel_m_sam(RHO, "data", perturb_mask=_kernels_only),
    params,
    batch,
    (8,),
    ("data",),
  )
  expected = _on_one_device(
    _m_sam(BATCH // DEVICES, perturb_mask=_kernels_only), params, batch
  )
  return actual, expected, {}


def check_synchronized_perturb_mask_is_sam_with_mask():
  params, batch = _problem(6)
  actual, _ = _data_parallel(
    sam_optax.data_parallel_m_sam(
      RHO, "data", sync_perturbation=True, perturb_mask=_kernels_only(params)
    ),
    params,
    batch,
    (8,),
    ("data",),
  )
  expected = _on_one_device(
    sam_optax.sam(RHO, perturb_mask=_kernels_only(params)), params, batch
  )
  return actual, expected, {}


def check_synchronized_is_sam():
  params, batch = _problem(4)
  actual, all_reduces = _data_parallel(
    sam_optax.data_parallel_m_sam(RHO, "data", sync_perturbation=True),
    params,
    batch,
    (8,),
    ("data",),
  )
  expected = _on_one_device(sam_optax.sam(RHO), params, batch)
  return actual, expected, {"all_reduces": all_reduces}


def check_groups_of_2_are_m_sam_4():
  # Mesh (4 groups, 2 members): group g holds the contiguous examples
  # [4g, 4g+4), and syncing over "member" perturbs with their gradient.
  params, batch = _problem(5)
  actual, _ = _data_parallel(
    sam_optax.data_parallel_m_sam(
      RHO, ("group", "member"), sync_perturbation="member"
    ),
    params,
    batch,
    (4, 2),
    ("group", "member"),
  )
  expected = _on_one_device(_m_sam(4), params, batch)
  return actual, expected, {}


def check_groups_of_4_are_m_sam_8():
  params, batch = _problem(6)
  actual, _ = _data_parallel(
    sam_optax.data_parallel_m_sam(
      RHO, ("group", "member"), sync_perturbation="member"
    ),
    params,
    batch,
    (2, 4),
    ("group", "member"),
  )
  expected = _on_one_device(_m_sam(8), params, batch)
  return actual, expected, {}


def check_2d_mesh_needs_every_batch_axis():
  """Batch sharded over both axes of a ("x", "y") mesh: name both.

  ``axis_name="x"`` alone used to return twice m_sam(4)'s update, silently:
  the gradient w.r.t. params replicated over "y" was summed over "y". It now
  raises; ``("x", "y")`` is m_sam with the per-device batch.
  """
  params, batch = _problem(11)
  actual, _ = _data_parallel(
    sam_optax.data_parallel_m_sam(RHO, ("x", "y")),
    params,
    batch,
    (4, 2),
    ("x", "y"),
  )
  expected = _on_one_device(_m_sam(BATCH // DEVICES), params, batch)
  errors = {}
  for sync in (False, True):
    try:
      _data_parallel(
        sam_optax.data_parallel_m_sam(RHO, "x", sync_perturbation=sync),
        params,
        batch,
        (4, 2),
        ("x", "y"),
      )
      errors[str(sync)] = None
    except ValueError as error:
      errors[str(sync)] = str(error)
  return actual, expected, {"errors": errors}


def check_train_steps_with_momentum():
  """Three steps of the docstring's train step against m_sam on one device."""
  params, _ = _problem(7)
  batches = [mlp_batch(jax.random.key(20 + t), size=BATCH) for t in range(3)]
  mesh = jax.make_mesh((8,), ("data",))
  base = optax.sgd(0.2, momentum=0.9)
  parallel = optax.chain(sam_optax.data_parallel_m_sam(RHO, "data"), base)
  single = optax.chain(_m_sam(BATCH // DEVICES), base)

  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=mesh,
    in_specs=(P(), P(), P("data")),
    out_specs=(P(), P()),
  )
  def parallel_step(params, opt_state, batch):
    updates, opt_state = parallel.update(
      None, opt_state, params, loss_fn=mlp_loss, batch=batch
    )
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def single_step(params, opt_state, batch):
    updates, opt_state = single.update(
      None, opt_state, params, loss_fn=mlp_loss, batch=batch
    )
    return optax.apply_updates(params, updates), opt_state

  p_par, s_par = params, parallel.init(params)
  p_one, s_one = params, single.init(params)
  for batch in batches:
    p_par, s_par = parallel_step(
      p_par, s_par, jax.device_put(batch, NamedSharding(mesh, P("data")))
    )
    p_one, s_one = single_step(p_one, s_one, batch)
  return p_par, p_one, {}


def check_jit_sharded_vmap_is_local():
  """Plain jit on a sharded batch: m_sam's vmap form, one all-reduce."""
  params, batch = _problem(8)
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  tx = sam_optax.m_sam(RHO, BATCH // DEVICES)
  step = jax.jit(
    lambda p, b: tx.update(None, tx.init(p), p, loss_fn=mlp_loss, batch=b)[0]
  )
  with jax.set_mesh(mesh):
    actual = step(params, sharded)
    hlo = step.lower(params, sharded).compile().as_text()
  expected = _on_one_device(
    sam_optax.reference.m_sam(RHO, BATCH // DEVICES), params, batch
  )
  count = lambda op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(")
  return (
    actual,
    expected,
    {"all_reduces": count("all-reduce"), "all_gathers": count("all-gather")},
  )


CHECKS = {
  name: fn for name, fn in dict(globals()).items() if name.startswith("check_")
}


def _flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0]).tolist()


def _run_checks():
  results = {}
  for name, fn in CHECKS.items():
    actual, expected, extra = fn()
    results[name] = {
      "actual": _flat(actual),
      "expected": _flat(expected),
      **extra,
    }
  print_results(results)


# --- The tests ----------------------------------------------------------------


def test_child_environment_keeps_the_parents_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
  monkeypatch.setenv("PYTHONPATH", "elsewhere")
  env = child_environment(3)
  assert env["XLA_FLAGS"].split() == [
    "--xla_backend_optimization_level=0",
    "--xla_force_host_platform_device_count=3",
  ]
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["PYTHONPATH"].split(os.pathsep)[-1] == "elsewhere"
  monkeypatch.delenv("XLA_FLAGS")
  flags = child_environment(2)["XLA_FLAGS"]
  assert flags == "--xla_force_host_platform_device_count=2"


@pytest.fixture(scope="module")
def eight_device_results():
  return run_child([__file__], DEVICES)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_on_eight_devices(eight_device_results, name):
  result = eight_device_results[name]
  actual = np.asarray(result["actual"])
  expected = np.asarray(result["expected"])
  assert actual.shape == expected.shape and actual.size > 0
  assert np.all(np.isfinite(actual))
  np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-6)
  # The results must not be trivially equal (e.g. both zero).
  assert np.abs(expected).max() > 1e-3


def test_local_perturbation_saves_an_all_reduce(eight_device_results):
  # Local: one all-reduce (the perturbed gradients). Synchronized: two.
  assert eight_device_results["check_local_is_m_sam"]["all_reduces"] == 1
  assert eight_device_results["check_synchronized_is_sam"]["all_reduces"] == 2


def test_jit_sharded_m_sam_communicates_once(eight_device_results):
  result = eight_device_results["check_jit_sharded_vmap_is_local"]
  assert result["all_reduces"] == 1
  assert result["all_gathers"] == 0


def test_axis_name_must_name_every_batch_axis(eight_device_results):
  errors = eight_device_results["check_2d_mesh_needs_every_batch_axis"][
    "errors"
  ]
  for sync, message in errors.items():
    assert message is not None, f"sync_perturbation={sync} did not raise"
    assert "mesh axes ('y',)" in message
    assert "axis_name=('x', 'y')" in message


def test_local_and_synchronized_differ(eight_device_results):
  # Guards against a check that passes because every variant computes sam.
  local = np.asarray(eight_device_results["check_local_is_m_sam"]["expected"])
  params, batch = _problem(0)
  sam = _flat(_on_one_device(sam_optax.sam(RHO), params, batch))
  assert np.abs(local - np.asarray(sam)).max() > 1e-4


def test_one_device_mesh_is_sam():
  params, batch = _problem(9)
  for sync in (False, True):
    actual, _ = _data_parallel(
      sam_optax.data_parallel_m_sam(RHO, "data", sync_perturbation=sync),
      params,
      batch,
      (1,),
      ("data",),
    )
    expected = _on_one_device(sam_optax.sam(RHO), params, batch)
    np.testing.assert_allclose(
      _flat(actual), _flat(expected), rtol=2e-5, atol=2e-6
    )


def test_errors():
  with pytest.raises(ValueError, match="not among"):
    sam_optax.data_parallel_m_sam(RHO, "data", sync_perturbation="model")
  with pytest.raises(ValueError, match="cannot be combined"):
    sam_optax.data_parallel_m_sam(
      RHO, "data", sync_perturbation=True, micro_batch_size=2
    )
  params, batch = _problem(10)
  tx = sam_optax.data_parallel_m_sam(RHO, "data")
  with pytest.raises(NameError, match="shard_map"):
    jax.jit(
      lambda p: tx.update(None, tx.init(p), p, loss_fn=mlp_loss, batch=batch)
    )(params)


if __name__ == "__main__":
  _run_checks()
