"""Train one configuration with a sam_optax optimizer.

::

  python -m experiments.train --config mnist1d:sam --workdir runs/mnist1d-sam
  python -m experiments.train --config table1:cifar10,resnet18,rw_sam \\
      --workdir runs/t1 --set seed=1
  python -m experiments.train --config table1 --list   # the table's rows

A run loads its data and builds its model and preprocessing once; the
optimizer and the jitted ``train_step`` come from
:func:`experiments.steps.build_steps`. Each epoch appends a line of metrics to
``WORKDIR/metrics.jsonl`` and saves an orbax checkpoint
(:mod:`experiments.workdir`); a killed run started again with the same
``--workdir`` resumes from its last checkpoint and ends where an unbroken run
ends (the data order and every PRNG key are functions of the seed, the epoch
and the step). At the end a run reports the best epoch's test accuracy and,
under label noise, the fraction of the corrupted training labels the final
model predicts (:func:`memorization`); with ``weight_trace_every`` set, some
epochs' metrics also hold RW-SAM's weight trace
(:mod:`experiments.weight_trace`).
"""

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import json
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from experiments import config as config_lib
from experiments import configs
from experiments import data
from experiments import input_pipeline
from experiments import models
from experiments import nnx_glue
from experiments import optimizers
from experiments import reporting
from experiments import steps as steps_lib
from experiments import weight_trace
from experiments import workdir as workdir_lib
import sam_optax


def build_model(
  config: config_lib.TrainConfig, num_classes: int, seed: int
) -> nnx_glue.SplitModel:
  """``config``'s model, initialized with ``seed``, split for training."""
  return nnx_glue.split(
    models.create_model(
      config.model, num_classes, seed=seed, **config.model_options
    )
  )


def calibrate_sigma(
  config: config_lib.TrainConfig,
  train_set: data.ArrayDataset,
  preprocessing: input_pipeline.Preprocessing,
  initial: nnx_glue.SplitModel,
) -> float:
  """RW-SAM's probe scale ``σ``, picked before training.

  As the paper (2509.18001 §5.1): finite-difference estimates of the
  per-example gradient norms are compared with exact ones
  (:func:`sam_optax.calibrate_sigma`) on the first batch of the first epoch.

  Args:
    config: the run.
    train_set: the training set.
    preprocessing: the run's preprocessing.
    initial: the initial model of seed 0 (so all seeds share ``σ`` and their
      compiled steps).

  Returns:
    ``σ``.
  """
  index = data.epoch_batches(train_set.size, config.batch_size, 0, 0)[0]
  key = jax.random.key(0)
  batch = {
    "inputs": preprocessing.train(train_set.inputs[index], key),
    "labels": train_set.labels[index],
  }
  # In training mode, with BatchNorm, the loss couples the examples: the
  # exact norms are then Jacobian rows, what the probe estimates.
  loss_fn = steps_lib.passes_loss_fn(
    initial.graphdef, initial.params, initial.state
  )
  return float(
    sam_optax.calibrate_sigma(loss_fn, initial.params, batch, key).sigma
  )


def resolve_sigma(
  config: config_lib.TrainConfig,
  splits: data.Splits,
  preprocessing: input_pipeline.Preprocessing,
  split: nnx_glue.SplitModel,
  workdir: workdir_lib.Workdir | None,
) -> config_lib.TrainConfig:
  """``config`` with ``options["sigma"] == "calibrate"`` replaced by ``σ``.

  ``σ`` is calibrated once (:func:`calibrate_sigma`), then kept in the
  workdir, so a resumed run does not calibrate again.

  Args:
    config: the run.
    splits: its data.
    preprocessing: its preprocessing.
    split: its initial model; a run of a seed other than 0 builds the model
      of seed 0 to calibrate on.
    workdir: its work directory, if any.

  Returns:
    ``config``, unchanged when it does not ask for calibration.
  """
  options = dict(config.optimizer.options)
  if options.get("sigma") != "calibrate":
    return config
  sigma = workdir.load_sigma() if workdir is not None else None
  if sigma is None:
    initial = (
      split
      if config.seed == 0
      else build_model(config, splits.num_classes, seed=0)
    )
    sigma = calibrate_sigma(config, splits.train, preprocessing, initial)
    if workdir is not None:
      workdir.save_sigma(sigma)
  options["sigma"] = sigma
  optimizer = dataclasses.replace(config.optimizer, options=options)
  return dataclasses.replace(config, optimizer=optimizer)


def evaluate(
  steps: steps_lib.Steps,
  train_state: steps_lib.TrainState,
  dataset: data.ArrayDataset,
  batch_size: int,
) -> dict[str, float]:
  """Mean loss and accuracy on ``dataset`` (the last batch padded and masked)."""
  total_loss, total_correct = 0.0, 0.0
  size = dataset.size
  batch_size = min(batch_size, size)
  for start in range(0, size, batch_size):
    index = np.arange(start, start + batch_size)
    mask = index < size
    index = np.minimum(index, size - 1)
    loss, correct = steps.eval_step(
      train_state.params,
      train_state.state,
      dataset.inputs[index],
      dataset.labels[index],
      mask.astype(np.float32),
    )
    total_loss += float(loss)
    total_correct += float(correct)
  return {"loss": total_loss / size, "accuracy": total_correct / size}


def memorization(
  steps: steps_lib.Steps,
  train_state: steps_lib.TrainState,
  train_set: data.ArrayDataset,
  batch_size: int,
) -> dict[str, float | None]:
  """How much of the label noise the model fits, in evaluation mode.

  Returns ``memorization``, the fraction of the corrupted training examples
  whose (noisy) label the model predicts, and ``clean_fit``, the same on the
  others; both None when ``train_set`` has no ``corrupted`` mask.
  """
  corrupted = train_set.corrupted
  if corrupted is None:
    return {"memorization": None, "clean_fit": None}
  fit = lambda mask: (
    evaluate(steps, train_state, train_set.take(mask), batch_size)["accuracy"]
    if mask.any()
    else None
  )
  return {"memorization": fit(corrupted), "clean_fit": fit(~corrupted)}


def train_epoch(
  steps: steps_lib.Steps,
  train_state: steps_lib.TrainState,
  config: config_lib.TrainConfig,
  train_set: data.ArrayDataset,
  epoch: int,
  run_key: jax.Array,
  bar: tqdm.tqdm | None = None,
) -> tuple[steps_lib.TrainState, dict[str, float]]:
  """One pass over ``train_set`` in the order of ``(config.seed, epoch)``.

  Returns the new state and the epoch's mean clean-pass ``train_loss`` and
  ``train_accuracy`` (on the labels trained on) and its ``epoch_seconds``.
  """
  start = time.perf_counter()
  step_metrics = []
  for index in data.epoch_batches(
    train_set.size, config.batch_size, config.seed, epoch
  ):
    batch = {
      "inputs": train_set.inputs[index],
      "labels": train_set.labels[index],
    }
    train_state, metrics = steps.train_step(train_state, batch, run_key)
    step_metrics.append(metrics)
    if bar is not None:
      bar.update(1)
  step_metrics = jax.device_get(step_metrics)  # waits for the last step
  return train_state, {
    "train_loss": float(np.mean([m["loss"] for m in step_metrics])),
    "train_accuracy": float(np.mean([m["accuracy"] for m in step_metrics])),
    "epoch_seconds": time.perf_counter() - start,
  }


def measure_noise_trace(
  config: config_lib.TrainConfig,
  loss_fn: Callable[[Any, dict[str, jax.Array]], jax.Array],
  params: Any,
  train_set: data.ArrayDataset,
  chunk_size: int = 100,
) -> float:
  """``tr Σ`` (:func:`sam_optax.diagnostics.gradient_noise`) at ``params``.

  Over ``config.noise_trace_examples`` training examples drawn without
  replacement (seeded by ``config.seed``), with the labels trained on.

  Args:
    config: the run.
    loss_fn: the per-example loss in evaluation mode
      (:func:`experiments.steps.eval_loss_fn`).
    params: the parameters.
    train_set: the training set.
    chunk_size: examples whose gradients are taken at once.
  """
  examples = min(config.noise_trace_examples, train_set.size)
  index = np.sort(
    np.random.default_rng([config.seed, 1]).choice(
      train_set.size, examples, replace=False
    )
  )
  noise = sam_optax.diagnostics.gradient_noise(
    loss_fn,
    params,
    {"inputs": train_set.inputs[index], "labels": train_set.labels[index]},
    chunk_size=min(chunk_size, examples),
  )
  return float(noise.trace)


def progress_bar(**kwargs: Any) -> tqdm.tqdm:
  """A step-counting tqdm bar; redrawn at most every 10 s when not on a terminal.

  In a log file (CI, ``nohup``) every redraw is a new line, so a bar updated
  many times a second would flood it.
  """
  interval = 0.1 if sys.stderr.isatty() else 10.0
  return tqdm.tqdm(
    unit="step", dynamic_ncols=True, mininterval=interval, **kwargs
  )


class RunResult(NamedTuple):
  """What :func:`train` returns.

  Attributes:
    config: the configuration (with a calibrated ``σ`` filled in).
    history: one dict of metrics per epoch (the lines of metrics.jsonl).
    train_state: the final state.
    final: the end of training in a few numbers: ``test_accuracy`` (the last
      epoch's), ``best_test_accuracy`` and ``best_epoch``
      (:func:`experiments.reporting.best_epoch`), and :func:`memorization`'s
      ``memorization`` and ``clean_fit``.
    noise_trace: ``tr Σ`` at the end, if asked for, else None.
    eval_loss_fn: the final model's per-example ``loss_fn(params, batch)`` in
      evaluation mode (:func:`experiments.steps.eval_loss_fn`), for
      diagnostics at ``train_state.params``.
  """

  config: config_lib.TrainConfig
  history: list[dict[str, Any]]
  train_state: steps_lib.TrainState
  final: dict[str, Any]
  noise_trace: float | None
  eval_loss_fn: Callable[[Any, dict[str, jax.Array]], jax.Array]


def train(
  config: config_lib.TrainConfig,
  workdir: str | os.PathLike[str] | None = None,
  *,
  splits: data.Splits | None = None,
  progress: bool | tqdm.tqdm = True,
  stop_after_epoch: int | None = None,
) -> RunResult:
  """Trains ``config``; resumes from ``workdir``'s last checkpoint if any.

  Args:
    config: the run.
    workdir: where ``config.json``, ``metrics.jsonl`` and ``checkpoints/``
      go (see :mod:`experiments.workdir`); None keeps everything in memory.
    splits: the data, if already loaded (label noise already applied, as
      :func:`experiments.input_pipeline.load_data` returns); None loads it.
    progress: show a progress bar (True), none (False), or advance the given
      ``tqdm`` bar by one per step.
    stop_after_epoch: return after this epoch as if killed (for tests).

  Returns:
    A :class:`RunResult`.
  """
  splits = input_pipeline.load_data(config) if splits is None else splits
  train_set = splits.train
  steps_per_epoch = train_set.size // config.batch_size
  total_steps = config.epochs * steps_per_epoch
  directory = (
    workdir_lib.Workdir(workdir, config) if workdir is not None else None
  )
  preprocessing = input_pipeline.preprocessing(config.dataset, config.augment)
  split = build_model(config, splits.num_classes, config.seed)
  config = resolve_sigma(config, splits, preprocessing, split, directory)
  steps = steps_lib.build_steps(
    split, config.optimizer, preprocessing, total_steps
  )
  train_state = steps_lib.TrainState(
    jnp.zeros([], jnp.int32),
    split.params,
    split.state,
    steps.tx.init(split.params),
  )
  start_epoch, history = 0, []
  if directory is not None:
    train_state, start_epoch, history = directory.restore(train_state)
  schedule = optimizers.learning_rate_schedule(config.optimizer, total_steps)
  run_key = jax.random.key(config.seed)
  traced = weight_trace.trace_epochs(config.epochs, config.weight_trace_every)
  if traced:
    trace_examples = weight_trace.trace_set(
      train_set,
      config.batch_size,
      config.weight_trace_batches,
      config.label_noise_seed,
    )

  own_bar = progress is True
  bar = (
    progress_bar(
      total=total_steps,
      initial=start_epoch * steps_per_epoch,
      desc=f"{config.optimizer.name} seed {config.seed}",
    )
    if own_bar
    else progress or None
  )
  for epoch in range(start_epoch, config.epochs):
    train_state, record = train_epoch(
      steps, train_state, config, train_set, epoch, run_key, bar
    )
    test = evaluate(steps, train_state, splits.test, config.eval_batch_size)
    step = (epoch + 1) * steps_per_epoch
    record = {
      "epoch": epoch + 1,
      "step": step,
      **record,
      "test_loss": test["loss"],
      "test_accuracy": test["accuracy"],
      "learning_rate": float(schedule(step)),
    }
    if epoch + 1 in traced:
      record["weights"] = weight_trace.measure(
        split,
        train_state.params,
        train_state.state,
        trace_examples,
        config.batch_size,
        config.optimizer.rho,
        preprocessing.evaluate,
      )
    history.append(record)
    if bar is not None:
      bar.set_postfix(
        loss=f"{record['train_loss']:.3f}",
        acc=f"{record['train_accuracy']:.3f}",
        test_acc=f"{record['test_accuracy']:.3f}",
        refresh=False,
      )  # redraws follow the bar's mininterval
    if directory is not None:
      directory.append_metrics(record)
      if epoch + 1 == config.epochs or (
        config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0
      ):
        directory.save(epoch + 1, train_state)
    if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
      break
  if own_bar:
    bar.close()
  if directory is not None:
    directory.close()

  final = {
    "test_accuracy": history[-1]["test_accuracy"] if history else None,
    **reporting.best_epoch(history),
    **memorization(steps, train_state, train_set, config.eval_batch_size),
  }
  eval_loss_fn = steps_lib.eval_loss_fn(
    split.eval_graphdef, train_state.state, preprocessing.evaluate
  )
  noise_trace = None
  if config.noise_trace_examples > 0:
    noise_trace = measure_noise_trace(
      config, eval_loss_fn, train_state.params, train_set
    )
    if directory is not None:
      directory.save_noise_trace(noise_trace, config.noise_trace_examples)
  return RunResult(
    config, history, train_state, final, noise_trace, eval_loss_fn
  )


def main(argv: Sequence[str] | None = None) -> RunResult | None:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.train", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--config",
    default="mnist1d",
    help="TABLE or TABLE:ROW, e.g. mnist1d:sam, table1:cifar10,resnet18,sam"
    f" (tables: {', '.join(configs.TABLES)}).",
  )
  parser.add_argument(
    "--workdir",
    default=None,
    help="output and checkpoint directory (resumes if it"
    " holds a checkpoint); default runs/CONFIG.",
  )
  parser.add_argument(
    "--set",
    nargs="*",
    default=[],
    metavar="KEY=VALUE",
    help="overrides, e.g. epochs=2 optimizer.rho=0.1",
  )
  parser.add_argument(
    "--list", action="store_true", help="print the table's rows and exit."
  )
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  if args.list:
    print("\n".join(configs.rows(args.config.partition(":")[0])))
    return None
  config = config_lib.apply_overrides(configs.get_config(args.config), args.set)
  workdir = args.workdir or os.path.join(
    "runs",
    args.config.replace(":", "-").replace(",", "-") + f"-seed{config.seed}",
  )
  result = train(config, workdir, progress=not args.no_progress)
  last = result.history[-1] if result.history else {}
  print(
    json.dumps(
      {
        "workdir": str(workdir),
        **last,
        **result.final,
        "noise_trace": result.noise_trace,
      }
    )
  )
  return result


if __name__ == "__main__":
  main()
