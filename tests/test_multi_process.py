"""The guide's multi-host snippet on 2 processes × 2 CPU devices against m_sam.

The test starts ``PROCESSES`` workers (``_multi_process_worker.py``) on
localhost, each with 2 forced host devices; they join through
``jax.distributed`` with CPU collectives through gloo, and each executes the
snippet of docs/guide/devices.md as it is for ``STEPS`` train steps. The params after each
step must equal single-process ``m_sam(rho, B // 4)`` steps computed here:
m_sam needs no devices, it splits the global batch into contiguous
micro-batches, which is what the 4 devices hold.
"""

import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.flatten_util
import numpy as np
import optax
import pytest

import sam_optax

import _multi_process_worker as worker
from _problems import child_environment
from _problems import mlp_loss
from _problems import ROOT

RHO = 0.05  # the snippet's data_parallel_m_sam(0.05, ...)
TIMEOUT = 120  # seconds for the workers, all together
_DEVICES = worker.PROCESSES * worker.LOCAL_DEVICES


def _base_optimizer():
  return optax.sgd(0.1, momentum=0.9)  # the snippet's


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(out_dir: pathlib.Path) -> list[int | None]:
  """Runs the workers to completion; returns their exit codes.

  Never hangs: a worker whose peer died blocks in a collective, so waiting
  stops at the first failure or at ``TIMEOUT``, and every worker still
  running then is killed. None is the code of a worker that was killed.
  """
  env = child_environment(worker.LOCAL_DEVICES)
  port = _free_port()
  processes, codes = [], []
  try:
    for i in range(worker.PROCESSES):
      # To a file: a pipe read only at the end could fill and block it.
      with open(out_dir / f"process_{i}.log", "w") as log:
        processes.append(
          subprocess.Popen(
            [sys.executable, worker.__file__, str(i), str(port), str(out_dir)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
          )
        )
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
      codes = [p.poll() for p in processes]
      if all(c == 0 for c in codes) or any(c not in (None, 0) for c in codes):
        break
      time.sleep(0.1)
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.wait()
  return codes


def _m_sam_steps(params, batches, micro_batch_size):
  """The params after each single-process m_sam step, flattened."""
  # The vmap form compiles fastest here; test_m_sam pins every form of m_sam
  # to the sequential reference.
  tx = optax.chain(
    sam_optax.m_sam(RHO, micro_batch_size, implementation="vmap"),
    _base_optimizer(),
  )

  @jax.jit
  def step(params, opt_state, batch):
    updates, opt_state = tx.update(
      None, opt_state, params, loss_fn=mlp_loss, batch=batch
    )
    return optax.apply_updates(params, updates), opt_state

  opt_state, flat = tx.init(params), []
  for batch in batches:
    params, opt_state = step(params, opt_state, batch)
    flat.append(np.asarray(jax.flatten_util.ravel_pytree(params)[0]))
  return flat


def test_guide_snippet_on_two_processes_is_m_sam(tmp_path):
  assert "make_array_from_process_local_data" in worker.guide_snippet()
  codes = _run_workers(tmp_path)
  if codes != [0] * worker.PROCESSES:
    logs = "\n".join(
      f"--- process {i} (exit code {code}):\n"
      + (tmp_path / f"process_{i}.log").read_text()[-3000:]
      for i, code in enumerate(codes)
    )
    pytest.fail(f"workers failed or timed out after {TIMEOUT} s:\n{logs}")

  params, batches = worker.problem()
  expected = _m_sam_steps(params, batches, worker.BATCH // _DEVICES)
  size = worker.BATCH // worker.PROCESSES
  shard = worker.BATCH // _DEVICES
  for i in range(worker.PROCESSES):
    saved = np.load(tmp_path / f"process_{i}.npz")
    for t, batch in enumerate(batches):
      # Process i holds the contiguous slice i of the global batch, one
      # contiguous shard per device: m_sam's micro-batches.
      rows = saved[f"rows_{t}"]
      np.testing.assert_array_equal(
        rows,
        [
          (i * size + d * shard, i * size + (d + 1) * shard)
          for d in range(worker.LOCAL_DEVICES)
        ],
      )
      for (start, stop), x in zip(rows, saved[f"x_{t}"]):
        np.testing.assert_array_equal(x, np.asarray(batch["x"])[start:stop])
      np.testing.assert_allclose(
        saved[f"params_{t}"], expected[t], rtol=1e-5, atol=1e-6
      )

  # The comparison discriminates: m_sam with another m (here SAM, m = B)
  # ends measurably elsewhere.
  other = _m_sam_steps(params, batches, worker.BATCH)
  assert np.abs(expected[-1] - other[-1]).max() > 1e-4
