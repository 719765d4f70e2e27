"""Train one configuration with a sam_optax optimizer.

::

  python -m experiments.train --config mnist1d:sam --workdir runs/mnist1d-sam
  python -m experiments.train --config table1:cifar10,resnet18,rw_sam \\
      --workdir runs/t1 --set seed=1
  python -m experiments.train --config table1 --list   # the table's rows

The heart is :func:`make_train_step`: one jitted function that runs the clean
pass (per-example losses, mean gradient, BatchNorm running statistics) and
hands the pure per-example ``loss_fn`` to the optimizer, which takes its
perturbed passes with it (see :mod:`experiments.nnx_glue`). Each epoch
appends a line of metrics to ``WORKDIR/metrics.jsonl`` and saves an orbax
checkpoint; a killed run started again with the same ``--workdir`` resumes
from its last checkpoint and ends where an unbroken run ends (the data order
and every PRNG key are functions of the seed, the epoch and the step).
"""

import argparse
from collections.abc import Callable, Sequence
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from experiments import cifar
from experiments import data
from experiments import models
from experiments import nnx_glue
from experiments import optimizers


@dataclasses.dataclass
class TrainConfig:
  """Everything a run depends on.

  Attributes:
    dataset: ``"mnist1d"``, ``"cifar10"`` or ``"cifar100"``.
    model: a key of :data:`experiments.models.MODELS`.
    model_options: further keyword arguments of the model's constructor.
    optimizer: the optimizer (SGD with momentum, weight decay, cosine
      schedule, and a SAM-family variant).
    epochs: passes over the training set.
    batch_size: the training batch size ``b``.
    eval_batch_size: the batch size for evaluation.
    label_noise: the fraction of training labels corrupted (exactly).
    label_noise_seed: which labels, fixed across runs so every optimizer and
      seed sees the same corrupted training set.
    seed: the run's seed: initialization, data order, augmentation and the
      optimizer's PRNG keys.
    mnist1d_seed: the MNIST-1D generator's seed (42: the published data).
    augment: CIFAR's random crop and flip (ignored for MNIST-1D).
    data_dir: TFDS's data directory for CIFAR (None: TFDS's default).
    checkpoint_every: save a checkpoint every this many epochs (0: never);
      the last epoch is always saved when there is a workdir.
    noise_trace_examples: if positive, measure the gradient-noise trace
      ``tr Σ`` on this many training examples at the end (paper's Table 6).
  """

  dataset: str = "mnist1d"
  model: str = "cnn1d"
  model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  optimizer: optimizers.OptimizerConfig = dataclasses.field(
      default_factory=optimizers.OptimizerConfig)
  epochs: int = 60
  batch_size: int = 128
  eval_batch_size: int = 1000
  label_noise: float = 0.0
  label_noise_seed: int = 0
  seed: int = 0
  mnist1d_seed: int = 42
  augment: bool = True
  data_dir: str | None = None
  checkpoint_every: int = 1
  noise_trace_examples: int = 0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
    values = dict(values)
    values["optimizer"] = optimizers.OptimizerConfig(
        **values.get("optimizer", {}))
    return cls(**values)


class TrainState(NamedTuple):
  """What a checkpoint holds.

  Attributes:
    step: the number of steps taken (int32).
    params: the trainable parameters (``nnx.Param``).
    state: the model's other state (BatchNorm running statistics).
    opt_state: the optimizer's state.
  """

  step: jax.Array
  params: nnx.State
  state: nnx.State
  opt_state: optax.OptState


# --- Data -----------------------------------------------------------------------


def load_data(config: TrainConfig) -> data.Splits:
  """The train and test sets, with label noise applied to the training set."""
  if config.dataset == "mnist1d":
    splits = data.load_mnist1d(config.mnist1d_seed)
  elif config.dataset in cifar.NUM_CLASSES:
    splits = cifar.load_cifar(config.dataset, config.data_dir)
  else:
    raise ValueError(
        f"unknown dataset {config.dataset!r}; use mnist1d, cifar10, cifar100.")
  train = data.with_label_noise(splits.train, config.label_noise,
                                splits.num_classes, config.label_noise_seed)
  return splits._replace(train=train)


def input_pipeline(
    config: TrainConfig,
) -> tuple[Callable[[jax.Array, jax.Array], jax.Array],
           Callable[[jax.Array], jax.Array]]:
  """On-device preprocessing: ``(train(inputs, key), evaluate(inputs))``."""
  if config.dataset == "mnist1d":
    return (lambda inputs, key: inputs), (lambda inputs: inputs)
  name = config.dataset

  def train(inputs: jax.Array, key: jax.Array) -> jax.Array:
    return cifar.preprocess(inputs, name, key if config.augment else None)

  return train, lambda inputs: cifar.preprocess(inputs, name)


# --- Steps ----------------------------------------------------------------------


def per_example_loss(
    model: nnx.Module, batch: dict[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy per example (float32), and the logits."""
  logits = model(batch["inputs"]).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["labels"])
  return losses, logits


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformationExtraArgs,
    preprocess: Callable[[jax.Array, jax.Array], jax.Array],
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted ``train_step(train_state, batch, run_key)``.

  One step: preprocess (augment) the batch; the clean pass at ``w`` gives the
  losses, the gradient ``g_B`` and the updated BatchNorm statistics; the
  optimizer gets ``g_B`` and the pure ``loss_fn`` (whose passes leave the
  statistics alone) and returns the update. The step's key is
  ``fold_in(run_key, step)``: resuming replays the same keys.

  Args:
    graphdef: the model's graph in training mode (:func:`nnx_glue.split`).
    tx: the optimizer (:func:`optimizers.make_optimizer`).
    preprocess: ``(inputs, key) -> inputs`` on the device.

  Returns:
    ``train_step(train_state, batch, run_key) -> (train_state, metrics)``
    with ``batch = {"inputs", "labels"}`` and scalar ``loss`` and
    ``accuracy`` metrics of the clean pass.
  """

  def train_step(
      train_state: TrainState, batch: dict[str, jax.Array], run_key: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(run_key, train_state.step)
    augment_key, optimizer_key = jax.random.split(key)
    batch = {"inputs": preprocess(batch["inputs"], augment_key),
             "labels": batch["labels"]}
    losses, grads, new_state, logits = nnx_glue.loss_grad_and_state(
        graphdef, train_state.state, per_example_loss, train_state.params,
        batch, has_aux=True)
    loss_fn = nnx_glue.pure_loss_fn(
        graphdef, train_state.state, per_example_loss, has_aux=True)
    updates, opt_state = tx.update(
        grads, train_state.opt_state, train_state.params, loss_fn=loss_fn,
        batch=batch, key=optimizer_key)
    params = optax.apply_updates(train_state.params, updates)
    metrics = {
        "loss": jnp.mean(losses),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"]),
    }
    return TrainState(train_state.step + 1, params, new_state,
                      opt_state), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(
    eval_graphdef: nnx.GraphDef, preprocess: Callable[[jax.Array], jax.Array]
) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """The jitted ``eval_step(params, state, inputs, labels, mask)``.

  Returns the masked sums of the losses and of the correct predictions, with
  BatchNorm on its running statistics.
  """

  @jax.jit
  def eval_step(params, state, inputs, labels, mask):
    model = nnx.merge(eval_graphdef, params, state)
    losses, logits = per_example_loss(
        model, {"inputs": preprocess(inputs), "labels": labels})
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(losses * mask), jnp.sum(correct * mask)

  return eval_step


class Steps(NamedTuple):
  """The compiled pieces of a configuration (shared by its seeds)."""

  split: nnx_glue.SplitModel
  tx: optax.GradientTransformationExtraArgs
  train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  eval_step: Callable[..., tuple[jax.Array, jax.Array]]


def _steps_key(config: TrainConfig, num_classes: int, total_steps: int) -> str:
  """What the compiled steps depend on: not the seeds, so seeds share them."""
  values = config.to_dict()
  for unused in ("seed", "label_noise", "label_noise_seed", "mnist1d_seed",
                 "epochs", "checkpoint_every", "data_dir",
                 "noise_trace_examples"):
    values.pop(unused)
  return json.dumps([values, num_classes, total_steps], sort_keys=True)


@functools.lru_cache(maxsize=16)
def _cached_steps(key: str) -> Steps:
  values, num_classes, total_steps = json.loads(key)
  config = TrainConfig.from_dict(values)
  model = models.create_model(config.model, num_classes, seed=0,
                              **config.model_options)
  split = nnx_glue.split(model)
  tx = optimizers.make_optimizer(config.optimizer, total_steps)
  train_preprocess, eval_preprocess = input_pipeline(config)
  return Steps(split, tx, make_train_step(split.graphdef, tx, train_preprocess),
               make_eval_step(split.eval_graphdef, eval_preprocess))


def build_steps(
    config: TrainConfig, num_classes: int, total_steps: int
) -> Steps:
  """The model's graphs, the optimizer and the jitted steps of ``config``.

  Cached: runs that differ only in seeds (or label noise) reuse the compiled
  steps.
  """
  return _cached_steps(_steps_key(config, num_classes, total_steps))


def init_train_state(
    config: TrainConfig, num_classes: int, steps: Steps
) -> TrainState:
  """The model initialized with ``config.seed``, and the optimizer's state."""
  model = models.create_model(config.model, num_classes, seed=config.seed,
                              **config.model_options)
  _, params, state = nnx.split(model, nnx.Param, ...)
  return TrainState(jnp.zeros([], jnp.int32), params, state,
                    steps.tx.init(params))


def calibrate_sigma(
    config: TrainConfig, splits: data.Splits
) -> tuple[TrainConfig, float | None]:
  """Replaces ``options["sigma"] == "calibrate"`` by a calibrated ``σ``.

  As the paper (2509.18001 §5.1), RW-SAM's probe scale ``σ`` is picked before
  training by comparing finite-difference estimates of the per-example
  gradient norms with exact ones (:func:`sam_optax.calibrate_sigma`), on the
  initial model (seed 0, so all seeds share ``σ`` and their compiled steps)
  and the first batch of the first epoch.

  Returns:
    ``(config, σ)``; ``config`` unchanged and ``σ = None`` when not asked for.
  """
  options = dict(config.optimizer.options)
  if options.get("sigma") != "calibrate":
    return config, None
  import sam_optax  # pylint: disable=g-import-not-at-top

  train_preprocess, _ = input_pipeline(config)
  model = models.create_model(config.model, splits.num_classes, seed=0,
                              **config.model_options)
  split = nnx_glue.split(model)
  index = data.epoch_batches(splits.train.size, config.batch_size, 0, 0)[0]
  key = jax.random.key(0)
  batch = {"inputs": train_preprocess(splits.train.inputs[index], key),
           "labels": splits.train.labels[index]}
  loss_fn = nnx_glue.pure_loss_fn(split.graphdef, split.state,
                                  per_example_loss, has_aux=True)
  sigma = float(sam_optax.calibrate_sigma(
      loss_fn, split.params, batch, key).sigma)
  options["sigma"] = sigma
  optimizer = dataclasses.replace(config.optimizer, options=options)
  return dataclasses.replace(config, optimizer=optimizer), sigma


def evaluate(
    steps: Steps, train_state: TrainState, dataset: data.ArrayDataset,
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
        train_state.params, train_state.state, dataset.inputs[index],
        dataset.labels[index], mask.astype(np.float32))
    total_loss += float(loss)
    total_correct += float(correct)
  return {"loss": total_loss / size, "accuracy": total_correct / size}


# --- Work directory: configuration, σ, checkpoints and metrics -------------------


class Workdir:
  """A run's directory: ``config.json``, ``calibrated_sigma.json``,
  ``metrics.jsonl``, ``noise_trace.json`` and orbax ``checkpoints/``.

  Opening it with a configuration other than the one it holds is an error, so
  a run never resumes from another run's checkpoint.
  """

  def __init__(self, path: str | os.PathLike[str], config: TrainConfig):
    self.path = pathlib.Path(path)
    self.path.mkdir(parents=True, exist_ok=True)
    config_path = self.path / "config.json"
    as_json = json.loads(json.dumps(config.to_dict()))
    if config_path.exists() and json.loads(config_path.read_text()) != as_json:
      raise ValueError(
          f"{self.path} holds a run of another configuration ({config_path});"
          " resume it with that configuration or use a new --workdir.")
    config_path.write_text(json.dumps(as_json, indent=2) + "\n")
    self.metrics = self.path / "metrics.jsonl"
    self.sigma = self.path / "calibrated_sigma.json"
    self.noise_trace = self.path / "noise_trace.json"
    self.checkpoints = ocp.CheckpointManager(
        (self.path / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False))

  def restore(
      self, train_state: TrainState
  ) -> tuple[TrainState, int, list[dict[str, Any]]]:
    """``(state, epochs done, their metrics)`` from the last checkpoint.

    Metric lines past the checkpoint (a run killed between checkpoints wrote
    them) are dropped from the file: the resumed run writes them again.
    """
    epoch = self.checkpoints.latest_step()
    if epoch is None:
      epoch = 0
    else:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)
      train_state = self.checkpoints.restore(
          epoch, args=ocp.args.StandardRestore(abstract))
    history = []
    if self.metrics.exists():
      history = [json.loads(line) for line in
                 self.metrics.read_text().splitlines() if line]
      history = [line for line in history if line["epoch"] <= epoch]
    self.metrics.write_text("".join(json.dumps(h) + "\n" for h in history))
    return train_state, epoch, history

  def append_metrics(self, record: dict[str, Any]) -> None:
    with self.metrics.open("a") as file:
      file.write(json.dumps(record) + "\n")

  def save(self, epoch: int, train_state: TrainState) -> None:
    self.checkpoints.save(epoch, args=ocp.args.StandardSave(train_state))
    self.checkpoints.wait_until_finished()

  def close(self) -> None:
    self.checkpoints.close()


def _resolve_sigma(
    config: TrainConfig, splits: data.Splits, workdir: Workdir | None
) -> TrainConfig:
  """RW-SAM's calibrated ``σ``: computed once, then kept in the workdir."""
  if workdir is not None and workdir.sigma.exists():
    options = {**config.optimizer.options,
               "sigma": json.loads(workdir.sigma.read_text())["sigma"]}
    return dataclasses.replace(config, optimizer=dataclasses.replace(
        config.optimizer, options=options))
  config, sigma = calibrate_sigma(config, splits)
  if sigma is not None and workdir is not None:
    workdir.sigma.write_text(json.dumps({"sigma": sigma}) + "\n")
  return config


# --- The loop -------------------------------------------------------------------


class RunResult(NamedTuple):
  """What :func:`train` returns.

  Attributes:
    config: the configuration (with a calibrated ``σ`` filled in).
    history: one dict of metrics per epoch (the lines of metrics.jsonl).
    train_state: the final state.
    noise_trace: ``tr Σ`` at the end, if asked for, else None.
  """

  config: TrainConfig
  history: list[dict[str, Any]]
  train_state: TrainState
  noise_trace: float | None


def train_epoch(
    steps: Steps, train_state: TrainState, config: TrainConfig,
    train_set: data.ArrayDataset, epoch: int, run_key: jax.Array,
    bar: tqdm.tqdm | None = None,
) -> tuple[TrainState, dict[str, float]]:
  """One pass over ``train_set`` in the order of ``(config.seed, epoch)``.

  Returns the new state and the epoch's mean clean-pass ``train_loss`` and
  ``train_accuracy`` (on the labels trained on) and its ``epoch_seconds``.
  """
  start = time.perf_counter()
  step_metrics = []
  for index in data.epoch_batches(train_set.size, config.batch_size,
                                  config.seed, epoch):
    batch = {"inputs": train_set.inputs[index],
             "labels": train_set.labels[index]}
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


def progress_bar(**kwargs: Any) -> tqdm.tqdm:
  """A step-counting tqdm bar; redrawn at most every 10 s when not on a terminal.

  In a log file (CI, ``nohup``) every redraw is a new line, so a bar updated
  many times a second would flood it.
  """
  interval = 0.1 if sys.stderr.isatty() else 10.0
  return tqdm.tqdm(unit="step", dynamic_ncols=True, mininterval=interval,
                   **kwargs)


def train(
    config: TrainConfig,
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
      go (see :class:`Workdir`); None keeps everything in memory.
    splits: the data, if already loaded (label noise already applied, as
      :func:`load_data` returns); None loads it.
    progress: show a progress bar (True), none (False), or advance the given
      ``tqdm`` bar by one per step.
    stop_after_epoch: return after this epoch as if killed (for tests).

  Returns:
    A :class:`RunResult`.
  """
  splits = load_data(config) if splits is None else splits
  train_set = splits.train
  steps_per_epoch = train_set.size // config.batch_size
  total_steps = config.epochs * steps_per_epoch
  directory = Workdir(workdir, config) if workdir is not None else None
  config = _resolve_sigma(config, splits, directory)
  steps = build_steps(config, splits.num_classes, total_steps)
  train_state = init_train_state(config, splits.num_classes, steps)
  start_epoch, history = 0, []
  if directory is not None:
    train_state, start_epoch, history = directory.restore(train_state)
  schedule = optimizers.learning_rate_schedule(config.optimizer, total_steps)
  run_key = jax.random.key(config.seed)

  own_bar = progress is True
  bar = (progress_bar(total=total_steps, initial=start_epoch * steps_per_epoch,
                      desc=f"{config.optimizer.name} seed {config.seed}")
         if own_bar else progress or None)
  for epoch in range(start_epoch, config.epochs):
    train_state, record = train_epoch(steps, train_state, config, train_set,
                                      epoch, run_key, bar)
    test = evaluate(steps, train_state, splits.test, config.eval_batch_size)
    step = (epoch + 1) * steps_per_epoch
    record = {"epoch": epoch + 1, "step": step, **record,
              "test_loss": test["loss"], "test_accuracy": test["accuracy"],
              "learning_rate": float(schedule(step))}
    history.append(record)
    if bar is not None:
      bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                      acc=f"{record['train_accuracy']:.3f}",
                      test_acc=f"{record['test_accuracy']:.3f}",
                      refresh=False)  # redraws follow the bar's mininterval
    if directory is not None:
      directory.append_metrics(record)
      if epoch + 1 == config.epochs or (
          config.checkpoint_every
          and (epoch + 1) % config.checkpoint_every == 0):
        directory.save(epoch + 1, train_state)
    if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
      break
  if own_bar:
    bar.close()
  if directory is not None:
    directory.close()

  noise_trace = None
  if config.noise_trace_examples > 0:
    noise_trace = measure_noise_trace(config, steps, train_state, train_set)
    if directory is not None:
      directory.noise_trace.write_text(json.dumps(
          {"noise_trace": noise_trace,
           "examples": config.noise_trace_examples}) + "\n")
  return RunResult(config, history, train_state, noise_trace)


def measure_noise_trace(
    config: TrainConfig, steps: Steps, train_state: TrainState,
    train_set: data.ArrayDataset, chunk_size: int = 100,
) -> float:
  """``tr Σ`` (:func:`sam_optax.diagnostics.gradient_noise`) at the end.

  Over ``config.noise_trace_examples`` training examples drawn without
  replacement (seeded by ``config.seed``), with the labels trained on, the
  inputs preprocessed without augmentation, and BatchNorm on its running
  statistics, so that each example's gradient is its own (with batch
  statistics an example alone would be normalized by itself).
  """
  import sam_optax  # pylint: disable=g-import-not-at-top

  examples = min(config.noise_trace_examples, train_set.size)
  index = np.sort(np.random.default_rng([config.seed, 1]).choice(
      train_set.size, examples, replace=False))
  _, evaluate_preprocess = input_pipeline(config)
  model_loss = nnx_glue.pure_loss_fn(
      steps.split.eval_graphdef, train_state.state, per_example_loss,
      has_aux=True)

  def loss_fn(params, batch):
    return model_loss(params, {"inputs": evaluate_preprocess(batch["inputs"]),
                               "labels": batch["labels"]})

  noise = sam_optax.diagnostics.gradient_noise(
      loss_fn, train_state.params,
      {"inputs": train_set.inputs[index], "labels": train_set.labels[index]},
      chunk_size=min(chunk_size, examples))
  return float(noise.trace)


def summary_seconds_per_epoch(history: Sequence[dict[str, Any]]) -> float:
  """The median epoch time, leaving out the first epoch (compilation)."""
  times = [line["epoch_seconds"] for line in history]
  return float(np.median(times[1:] if len(times) > 1 else times))


# --- Command line ---------------------------------------------------------------


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
  """Applies ``key=value`` overrides; ``optimizer.rho=0.1`` reaches inside.

  Values are parsed as JSON when they can be (``3``, ``0.1``, ``true``,
  ``{"micro_batch_size": 16}``), else taken as strings.
  """
  values = config.to_dict()
  for override in overrides:
    key, separator, text = override.partition("=")
    if not separator:
      raise ValueError(f"an override is key=value, got {override!r}.")
    *parents, leaf = key.split(".")
    target = values
    for parent in parents:
      target = target[parent]
    if leaf not in target:
      raise ValueError(f"unknown configuration key {key!r}.")
    target[leaf] = _parse_value(text)
  return TrainConfig.from_dict(values)


def main(argv: Sequence[str] | None = None) -> RunResult | None:
  from experiments import configs  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="python -m experiments.train", description=__doc__.split("\n")[0])
  parser.add_argument(
      "--config", default="mnist1d",
      help="TABLE or TABLE:ROW, e.g. mnist1d:sam, table1:cifar10,resnet18,sam"
           f" (tables: {', '.join(configs.TABLES)}).")
  parser.add_argument("--workdir", default=None,
                      help="output and checkpoint directory (resumes if it"
                           " holds a checkpoint); default runs/CONFIG.")
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                      help="overrides, e.g. epochs=2 optimizer.rho=0.1")
  parser.add_argument("--list", action="store_true",
                      help="print the table's rows and exit.")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  if args.list:
    print("\n".join(configs.rows(args.config.partition(":")[0])))
    return None
  config = apply_overrides(configs.get_config(args.config), args.set)
  workdir = args.workdir or os.path.join(
      "runs", args.config.replace(":", "-").replace(",", "-")
      + f"-seed{config.seed}")
  result = train(config, workdir, progress=not args.no_progress)
  last = result.history[-1] if result.history else {}
  print(json.dumps({"workdir": str(workdir), **last,
                    "noise_trace": result.noise_trace}))
  return result


if __name__ == "__main__":
  main()
