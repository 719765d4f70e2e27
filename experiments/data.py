"""Data shared by the experiments: MNIST-1D, label noise and shuffling.

MNIST-1D (Greydanus & Kobak, 2020) is generated offline by the ``mnist1d``
package (4000 training and 1000 test signals of length 40, ten classes): no
download. Label noise and shuffling are pure functions of a seed, so a run is
reproducible and a resumed run sees the same batches as an unbroken one.
"""

import functools
from typing import NamedTuple

import numpy as np


class ArrayDataset(NamedTuple):
  """A dataset held in memory.

  Attributes:
    inputs: ``[N, ...]`` float32.
    labels: ``[N]`` int32.
    corrupted: ``[N]`` bool, which labels label noise replaced
      (:func:`with_label_noise`); None where no noise was applied.
  """

  inputs: np.ndarray
  labels: np.ndarray
  corrupted: np.ndarray | None = None

  @property
  def size(self) -> int:
    """The number of examples (``len`` counts the tuple's fields)."""
    return len(self.labels)

  def take(self, index: np.ndarray | slice) -> "ArrayDataset":
    """The examples at ``index`` (an index array, a boolean mask or a slice)."""
    return ArrayDataset(
      self.inputs[index],
      self.labels[index],
      None if self.corrupted is None else self.corrupted[index],
    )


class Splits(NamedTuple):
  """Train and test sets, and the number of classes."""

  train: ArrayDataset
  test: ArrayDataset
  num_classes: int


@functools.lru_cache(maxsize=4)
def _generate_mnist1d(seed: int, num_samples: int) -> dict[str, np.ndarray]:
  from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top

  args = mnist1d_data.get_dataset_args()
  args.seed = seed
  args.num_samples = num_samples
  # make_dataset seeds numpy's global generator; leave the caller's untouched.
  saved = np.random.get_state()
  try:
    return mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(saved)


def load_mnist1d(seed: int = 42, num_samples: int = 5000) -> Splits:
  """MNIST-1D, generated offline (``seed=42`` is the published dataset).

  Args:
    seed: the generator's seed; 42 reproduces the dataset of the paper.
    num_samples: train + test size; 80% goes to training.

  Returns:
    :class:`Splits` with float32 inputs ``[N, 40]`` and int32 labels.
  """
  raw = _generate_mnist1d(seed, num_samples)

  def split(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
    return ArrayDataset(x.astype(np.float32), y.astype(np.int32))

  return Splits(
    split(raw["x"], raw["y"]),
    split(raw["x_test"], raw["y_test"]),
    num_classes=10,
  )


def symmetric_label_noise(
  labels: np.ndarray, rate: float, num_classes: int, seed: int
) -> np.ndarray:
  """Corrupts exactly ``round(rate · N)`` labels, chosen uniformly at random.

  Each chosen label is replaced by a label drawn uniformly from the *other*
  ``num_classes − 1`` classes, so the corrupted fraction is exactly ``rate``
  (up to rounding), not ``rate · (1 − 1/num_classes)`` as when the new label
  may equal the old one.

  Args:
    labels: ``[N]`` integer labels in ``[0, num_classes)``.
    rate: the fraction of labels to corrupt, in ``[0, 1]``.
    num_classes: the number of classes (at least 2).
    seed: fixes which labels are corrupted and their new values.

  Returns:
    A new int32 array; ``labels`` is not modified.
  """
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"label noise rate must be in [0, 1], got {rate}.")
  if num_classes < 2:
    raise ValueError(f"label noise needs >= 2 classes, got {num_classes}.")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  count = round(rate * len(labels))
  chosen = rng.choice(len(labels), size=count, replace=False)
  # A shift in [1, num_classes) moves every chosen label to another class,
  # uniformly over the other classes.
  shift = rng.integers(1, num_classes, size=count)
  noisy = labels.astype(np.int32).copy()
  noisy[chosen] = (noisy[chosen] + shift) % num_classes
  return noisy


def with_label_noise(
  dataset: ArrayDataset, rate: float, num_classes: int, seed: int
) -> ArrayDataset:
  """``dataset`` with :func:`symmetric_label_noise` applied to its labels.

  Its ``corrupted`` mask marks the labels the noise replaced: exactly those
  that differ from the clean ones, since every chosen label moves to another
  class. ``rate == 0`` returns ``dataset`` itself (``corrupted`` None).
  """
  if rate == 0:
    return dataset
  labels = symmetric_label_noise(dataset.labels, rate, num_classes, seed)
  return dataset._replace(labels=labels, corrupted=labels != dataset.labels)


def epoch_permutation(size: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the examples in ``epoch``: a function of ``(seed, epoch)`` only."""
  return np.random.default_rng([seed, epoch]).permutation(size)


def epoch_batches(
  size: int, batch_size: int, seed: int, epoch: int
) -> np.ndarray:
  """Indices ``[steps, batch_size]`` of the batches of one epoch.

  Shuffled by :func:`epoch_permutation`; the last partial batch is dropped
  (static shapes keep one compiled step), and a fresh permutation each epoch
  lets every example be seen.
  """
  steps = size // batch_size
  if steps == 0:
    raise ValueError(
      f"batch size {batch_size} is larger than the dataset ({size})."
    )
  order = epoch_permutation(size, seed, epoch)
  return order[: steps * batch_size].reshape(steps, batch_size)
