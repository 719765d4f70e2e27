"""One process of tests/test_multi_process.py: runs the guide's multi-host snippet.

``python tests/_multi_process_worker.py PROCESS_ID PORT OUT_DIR``, started by
the test once per process on localhost with
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` in its environment
(the device count is fixed when jax is imported). The worker joins the others
through ``jax.distributed`` (CPU collectives through gloo), defines what the
snippet assumes (``loss_fn``, ``params``, ``local_batches``), executes the
snippet from docs/guide/devices.md as it is, and saves what each step left: the params
and this process's shards of the global batch.

The test imports this module too, for the problem and the snippet.
"""

import os
import pathlib
import sys
import traceback

import jax
import jax.flatten_util
import numpy as np

import _problems
from _problems import mlp_batch
from _problems import mlp_loss
from _problems import mlp_params

PROCESSES = 2
LOCAL_DEVICES = 2
BATCH = 16  # global: 8 examples per process, 4 per device
STEPS = 3
MARKER = "<!-- multi-host snippet: run by tests/test_multi_process.py -->"


def guide_snippet() -> str:
  """The fenced python block right after ``MARKER`` on docs/guide/devices.md."""
  return _problems.guide_snippet("devices.md", MARKER)


def problem():
  """The initial params and the ``STEPS`` global batches, in every process."""
  params = mlp_params(jax.random.key(0))
  batches = [
    mlp_batch(jax.random.key(10 + t), size=BATCH) for t in range(STEPS)
  ]
  return params, batches


def main(process_id: int, port: int, out_dir: pathlib.Path) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  address = f"127.0.0.1:{port}"
  # The coordinator binds to loopback only (by default it listens on every
  # interface; gloo's own sockets take the address of the host's name); a
  # missing peer ends the wait after a minute, not five.
  jax.distributed.initialize(
    coordinator_address=address,
    num_processes=PROCESSES,
    process_id=process_id,
    coordinator_bind_address=address,
    initialization_timeout=60,
  )
  if jax.local_device_count() != LOCAL_DEVICES:
    raise RuntimeError(
      f"{jax.local_device_count()} local devices, expected {LOCAL_DEVICES}:"
      " run with XLA_FLAGS=--xla_force_host_platform_device_count="
      f"{LOCAL_DEVICES}."
    )
  params, batches = problem()
  size = BATCH // PROCESSES
  namespace = {}
  saved = {}

  def local_batches():
    for t, batch in enumerate(batches):
      # This process's contiguous slice of the global batch, as host data.
      yield jax.tree.map(
        lambda x: np.asarray(x)[process_id * size : (process_id + 1) * size],
        batch,
      )
      # Resumed when the snippet's loop asks for the next batch: step t is
      # done. Its params are replicated, so every process can read them.
      saved[f"params_{t}"] = np.asarray(
        jax.flatten_util.ravel_pytree(namespace["params"])[0]
      )
      shards = namespace["batch"]["x"].addressable_shards
      saved[f"rows_{t}"] = np.asarray(
        [(s.index[0].start, s.index[0].stop) for s in shards]
      )
      saved[f"x_{t}"] = np.stack([np.asarray(s.data) for s in shards])

  namespace.update(
    loss_fn=mlp_loss, params=params, local_batches=local_batches()
  )
  exec(guide_snippet(), namespace)  # pylint: disable=exec-used
  np.savez(out_dir / f"process_{process_id}.npz", **saved)
  jax.distributed.shutdown()


if __name__ == "__main__":
  try:
    main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
  except BaseException:  # pylint: disable=broad-exception-caught
    # Exit at once: jax.distributed's exit handler would first wait for the
    # other processes, which may be waiting for this one.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
