"""A run's work directory: its configuration, results and checkpoints.

::

  WORKDIR/config.json            the configuration, as asked for
  WORKDIR/calibrated_sigma.json  RW-SAM's calibrated σ, if calibrated
  WORKDIR/metrics.jsonl          one line of metrics per epoch
  WORKDIR/noise_trace.json       tr Σ at the end, if measured
  WORKDIR/checkpoints/           orbax checkpoints, one per saved epoch

A run killed and started again with the same directory resumes from its last
checkpoint (:meth:`Workdir.restore`).
"""

import json
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from experiments import config as config_lib
from experiments import steps as steps_lib


def _as_json(config: config_lib.TrainConfig) -> dict[str, Any]:
  return json.loads(json.dumps(config.to_dict()))


def _stored(config_path: pathlib.Path) -> dict[str, Any] | None:
  """The configuration in ``config_path``, fields added since it was written
  at their defaults (so such a run still resumes); None if it no longer
  parses."""
  try:
    return _as_json(
      config_lib.TrainConfig.from_dict(json.loads(config_path.read_text()))
    )
  except TypeError:  # a field that no longer exists
    return None


class Workdir:
  """A run's directory (see the module's docstring).

  Opening it with a configuration other than the one it holds is an error, so
  a run never resumes from another run's checkpoint.
  """

  def __init__(
    self, path: str | os.PathLike[str], config: config_lib.TrainConfig
  ):
    self.path = pathlib.Path(path)
    self.path.mkdir(parents=True, exist_ok=True)
    config_path = self.path / "config.json"
    as_json = _as_json(config)
    if config_path.exists() and _stored(config_path) != as_json:
      raise ValueError(
        f"{self.path} holds a run of another configuration ({config_path});"
        " resume it with that configuration or use a new --workdir."
      )
    config_path.write_text(json.dumps(as_json, indent=2) + "\n")
    self.metrics = self.path / "metrics.jsonl"
    self.sigma = self.path / "calibrated_sigma.json"
    self.noise_trace = self.path / "noise_trace.json"
    self.checkpoints = ocp.CheckpointManager(
      (self.path / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=False
      ),
    )

  def restore(
    self, train_state: steps_lib.TrainState
  ) -> tuple[steps_lib.TrainState, int, list[dict[str, Any]]]:
    """``(state, epochs done, their metrics)`` from the last checkpoint.

    Args:
      train_state: the initial state, returned as it is when there is no
        checkpoint; otherwise its shapes and dtypes are what is restored.

    Metric lines past the checkpoint (a run killed between checkpoints wrote
    them) are dropped from the file: the resumed run writes them again.
    """
    epoch = self.checkpoints.latest_step()
    if epoch is None:
      epoch = 0
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)
      train_state = self.checkpoints.restore(
        epoch, args=ocp.args.StandardRestore(abstract)
      )
    history = []
    if self.metrics.exists():
      history = [
        json.loads(line)
        for line in self.metrics.read_text().splitlines()
        if line
      ]
      history = [line for line in history if line["epoch"] <= epoch]
    self.metrics.write_text("".join(json.dumps(h) + "\n" for h in history))
    return train_state, epoch, history

  def append_metrics(self, record: dict[str, Any]) -> None:
    with self.metrics.open("a") as file:
      file.write(json.dumps(record) + "\n")

  def save(self, epoch: int, train_state: steps_lib.TrainState) -> None:
    self.checkpoints.save(epoch, args=ocp.args.StandardSave(train_state))
    self.checkpoints.wait_until_finished()

  def load_sigma(self) -> float | None:
    """The σ calibrated by an earlier start of this run, if any."""
    if not self.sigma.exists():
      return None
    return json.loads(self.sigma.read_text())["sigma"]

  def save_sigma(self, sigma: float) -> None:
    self.sigma.write_text(json.dumps({"sigma": sigma}) + "\n")

  def save_noise_trace(self, noise_trace: float, examples: int) -> None:
    self.noise_trace.write_text(
      json.dumps({"noise_trace": noise_trace, "examples": examples}) + "\n"
    )

  def close(self) -> None:
    self.checkpoints.close()
