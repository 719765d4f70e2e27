"""experiments.data and experiments.cifar: label noise, shuffling, MNIST-1D, CIFAR."""

import sys

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cifar
from experiments import data


@hypothesis.given(
  size=st.integers(1, 500),
  rate=st.floats(0.0, 1.0),
  num_classes=st.integers(2, 12),
  seed=st.integers(0, 2**31 - 1),
)
def test_label_noise_corrupts_exactly_the_requested_fraction(
  size, rate, num_classes, seed
):
  labels = np.random.default_rng(seed).integers(0, num_classes, size)
  original = labels.copy()
  noisy = data.symmetric_label_noise(labels, rate, num_classes, seed)
  assert np.sum(noisy != labels) == round(rate * size)
  assert noisy.dtype == np.int32 and noisy.min() >= 0
  assert noisy.max() < num_classes
  np.testing.assert_array_equal(labels, original)  # input untouched
  np.testing.assert_array_equal(
    noisy, data.symmetric_label_noise(labels, rate, num_classes, seed)
  )


def test_label_noise_is_uniform_over_the_other_classes():
  labels = np.zeros(20_000, np.int64)
  noisy = data.symmetric_label_noise(labels, 1.0, 5, seed=3)
  counts = np.bincount(noisy, minlength=5)
  assert counts[0] == 0
  np.testing.assert_allclose(counts[1:] / 20_000, 0.25, atol=0.015)


def test_label_noise_seeds_differ_and_bad_rates_fail():
  labels = np.arange(1000) % 10
  a = data.symmetric_label_noise(labels, 0.3, 10, seed=0)
  b = data.symmetric_label_noise(labels, 0.3, 10, seed=1)
  assert np.any(a != b)
  with pytest.raises(ValueError, match="rate"):
    data.symmetric_label_noise(labels, 1.5, 10, seed=0)
  dataset = data.ArrayDataset(np.zeros((1000, 2), np.float32), labels)
  assert data.with_label_noise(dataset, 0.0, 10, 0) is dataset


def test_label_noise_marks_exactly_the_labels_it_replaced():
  labels = np.arange(1000) % 10
  dataset = data.ArrayDataset(np.arange(1000, dtype=np.float32), labels)
  assert dataset.corrupted is None
  noisy = data.with_label_noise(dataset, 0.3, 10, seed=4)
  np.testing.assert_array_equal(
    noisy.labels, data.symmetric_label_noise(labels, 0.3, 10, seed=4)
  )
  np.testing.assert_array_equal(noisy.corrupted, noisy.labels != labels)
  assert noisy.corrupted.dtype == bool and noisy.corrupted.sum() == 300
  # take() keeps inputs, labels and the mask together.
  head = noisy.take(slice(10))
  assert head.size == 10 and head.corrupted.shape == (10,)
  picked = noisy.take(noisy.corrupted)
  assert picked.size == 300 and picked.corrupted.all()
  np.testing.assert_array_equal(picked.inputs, np.flatnonzero(noisy.corrupted))
  assert dataset.take(slice(5)).corrupted is None


@hypothesis.given(
  size=st.integers(8, 300),
  batch_size=st.integers(1, 8),
  seed=st.integers(0, 1000),
  epoch=st.integers(0, 50),
)
def test_epoch_batches_are_disjoint_and_deterministic(
  size, batch_size, seed, epoch
):
  batches = data.epoch_batches(size, batch_size, seed, epoch)
  assert batches.shape == (size // batch_size, batch_size)
  assert len(np.unique(batches)) == batches.size  # no example twice
  assert batches.min() >= 0 and batches.max() < size
  np.testing.assert_array_equal(
    batches, data.epoch_batches(size, batch_size, seed, epoch)
  )


def test_epochs_and_seeds_shuffle_differently():
  first = data.epoch_permutation(1000, seed=0, epoch=0)
  assert np.any(first != data.epoch_permutation(1000, seed=0, epoch=1))
  assert np.any(first != data.epoch_permutation(1000, seed=1, epoch=0))
  with pytest.raises(ValueError, match="larger than the dataset"):
    data.epoch_batches(10, 11, 0, 0)


def test_mnist1d_is_generated_offline_and_leaves_numpy_alone():
  np.random.seed(123)
  expected = np.random.rand()
  np.random.seed(123)
  splits = data.load_mnist1d()
  assert np.random.rand() == expected  # the global generator is restored
  assert splits.train.inputs.shape == (4000, 40)
  assert splits.test.inputs.shape == (1000, 40)
  assert splits.train.inputs.dtype == np.float32
  assert splits.train.labels.dtype == np.int32
  assert splits.num_classes == 10
  assert set(np.unique(splits.train.labels)) == set(range(10))
  assert splits.train.size == 4000


# --- CIFAR ----------------------------------------------------------------------


def test_cifar_loads_through_tfds_mock_without_tensorflow():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    splits = cifar.load_cifar("cifar100")
  assert splits.num_classes == 100
  assert splits.train.inputs.shape == (12, 32, 32, 3)
  assert splits.train.inputs.dtype == np.uint8
  assert splits.test.labels.dtype == np.int32
  assert splits.train.labels.min() >= 0 and splits.train.labels.max() < 100
  assert "tensorflow" not in sys.modules
  with pytest.raises(ValueError, match="unknown CIFAR"):
    cifar.load_cifar("cifar1000")


def test_crop_and_flip_returns_a_shifted_window_of_the_padded_image():
  images = jax.random.uniform(jax.random.key(0), (16, 6, 6, 2))
  out = np.asarray(
    cifar.random_crop_and_flip(images, jax.random.key(1), padding=2)
  )
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = 0
  for image, result in zip(padded, out):
    windows = [image[i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
    plain = any(np.array_equal(w, result) for w in windows)
    flipped = any(np.array_equal(w[:, ::-1], result) for w in windows)
    assert plain or flipped
    flips += flipped and not plain
  assert 0 < flips < 16  # both outcomes occur
  np.testing.assert_array_equal(
    out, cifar.random_crop_and_flip(images, jax.random.key(1), padding=2)
  )


def test_preprocess_normalizes_per_channel():
  mean = np.asarray(cifar.CHANNEL_MEAN["cifar10"])
  images = jnp.broadcast_to(
    jnp.asarray(np.round(mean * 255), jnp.uint8), (2, 4, 4, 3)
  )
  out = cifar.preprocess(images, "cifar10")
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, 0.0, atol=0.01)
  augmented = cifar.preprocess(images, "cifar10", jax.random.key(0))
  assert augmented.shape == (2, 4, 4, 3)
