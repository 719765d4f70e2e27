"""A run's data: the datasets a configuration names, and their preprocessing.

The datasets stay in host memory (:mod:`experiments.data`,
:mod:`experiments.cifar`); the train and eval steps preprocess each batch on
the device with the functions of :func:`preprocessing`.
"""

from collections.abc import Callable
import functools
from typing import NamedTuple

import jax

from experiments import cifar
from experiments import config as config_lib
from experiments import data


def load_data(
  config: config_lib.TrainConfig, train_examples: int | None = None
) -> data.Splits:
  """The train and test sets, with label noise applied to the training set.

  ``train_examples``: keep only the first this many training examples (after
  the noise, so they keep their labels and ``corrupted`` flags); None: all.
  """
  if config.dataset == "mnist1d":
    splits = data.load_mnist1d(config.mnist1d_seed)
  elif config.dataset in cifar.NUM_CLASSES:
    splits = cifar.load_cifar(config.dataset, config.data_dir)
  else:
    raise ValueError(
      f"unknown dataset {config.dataset!r}; use mnist1d, cifar10, cifar100."
    )
  train = data.with_label_noise(
    splits.train,
    config.label_noise,
    splits.num_classes,
    config.label_noise_seed,
  )
  if train_examples is not None:
    train = train.take(slice(train_examples))
  return splits._replace(train=train)


class Preprocessing(NamedTuple):
  """On-device preprocessing of a batch's inputs.

  Attributes:
    train: ``(inputs, key) -> inputs``, augmented with ``key``.
    evaluate: ``inputs -> inputs``, never augmented.
  """

  train: Callable[[jax.Array, jax.Array], jax.Array]
  evaluate: Callable[[jax.Array], jax.Array]


@functools.cache
def preprocessing(dataset: str, augment: bool) -> Preprocessing:
  """The preprocessing of ``dataset``; CIFAR's crop and flip if ``augment``.

  Cached, so that runs of one dataset get the same functions and can share
  the steps compiled with them (:func:`experiments.steps.build_steps`).
  """
  if dataset == "mnist1d":
    return Preprocessing(lambda inputs, key: inputs, lambda inputs: inputs)

  def train(inputs: jax.Array, key: jax.Array) -> jax.Array:
    return cifar.preprocess(inputs, dataset, key if augment else None)

  return Preprocessing(train, lambda inputs: cifar.preprocess(inputs, dataset))
