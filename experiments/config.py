"""The configuration types of a run, and ``key=value`` overrides of them.

:class:`TrainConfig` is everything a run depends on; its ``optimizer`` is an
:class:`OptimizerConfig`. The tables in :mod:`experiments.configs` build them;
:mod:`experiments.train` runs them.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import json
from typing import Any


@dataclasses.dataclass
class OptimizerConfig:
  """SGD with momentum, weight decay and a cosine schedule, and a variant.

  Attributes:
    name: a key of :data:`experiments.optimizers.VARIANTS`.
    learning_rate: the initial learning rate of the cosine schedule.
    momentum: SGD's momentum (PyTorch's convention: heavy ball, no dampening).
    nesterov: Nesterov momentum.
    weight_decay: L2 weight decay added to the gradient the variant returns.
    rho: the variant's radius ``ρ`` (unused by SGD).
    options: further keyword arguments of the variant, e.g.
      ``{"micro_batch_size": 16}`` for ``m_sam``, ``{"lam": 0.5}`` for
      ``rw_sam``, ``{"eta": 0.01}`` for ``asam``.
  """

  name: str = "sgd"
  learning_rate: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  rho: float = 0.05
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


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
    weight_trace_every: if positive, measure RW-SAM's Gibbs weights on fixed
      training batches after the first epoch, every this many epochs and
      after the last (:mod:`experiments.weight_trace`): each reading's share
      of the weight on the corrupted examples and its effective sample size,
      recorded in that epoch's metrics.
    weight_trace_batches: how many batches of ``batch_size`` examples the
      weight trace measures on.
  """

  dataset: str = "mnist1d"
  model: str = "cnn1d"
  model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  optimizer: OptimizerConfig = dataclasses.field(
    default_factory=OptimizerConfig
  )
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
  weight_trace_every: int = 0
  weight_trace_batches: int = 4

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
    values = dict(values)
    values["optimizer"] = OptimizerConfig(**values.get("optimizer", {}))
    return cls(**values)


def _parse_value(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def apply_overrides(
  config: TrainConfig, overrides: Sequence[str]
) -> TrainConfig:
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
