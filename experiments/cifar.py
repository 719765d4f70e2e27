"""CIFAR-10/100 through ``tfds.data_source``, with the papers' augmentation.

``tfds.data_source`` reads TFDS's ArrayRecord files by random access and needs
no TensorFlow. The first call downloads and prepares the dataset (internet
required; ``data_dir`` chooses where); the tests use
``tfds.testing.mock_data`` instead, which needs neither.

The images stay ``uint8`` in host memory (150 MB for CIFAR's training set);
the train step augments them on the device with the SAM papers' recipe,
a random 32×32 crop of the image zero-padded by 4 pixels and a random
horizontal flip (PyTorch's ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip``), then normalizes with the per-channel mean and
standard deviation of the training set.
"""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

# Per-channel statistics of the training sets, on images scaled to [0, 1].
CHANNEL_MEAN = {
  "cifar10": (0.4914, 0.4822, 0.4465),
  "cifar100": (0.5071, 0.4865, 0.4409),
}
CHANNEL_STD = {
  "cifar10": (0.2470, 0.2435, 0.2616),
  "cifar100": (0.2673, 0.2564, 0.2762),
}


def _to_arrays(source) -> data.ArrayDataset:
  records = [source[index] for index in range(len(source))]
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([r["label"] for r in records], np.int32)
  return data.ArrayDataset(images, labels)


def load_cifar(name: str, data_dir: str | None = None) -> data.Splits:
  """CIFAR-10 or CIFAR-100 (``name``) as ``uint8`` images and int32 labels.

  Args:
    name: ``"cifar10"`` or ``"cifar100"``.
    data_dir: TFDS's data directory (None: TFDS's default,
      ``~/tensorflow_datasets``).

  Returns:
    :class:`experiments.data.Splits` with images ``[N, 32, 32, 3]`` uint8.
  """
  if name not in NUM_CLASSES:
    raise ValueError(
      f"unknown CIFAR dataset {name!r}; use {list(NUM_CLASSES)}."
    )
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  train, test = tfds.data_source(
    name, split=["train", "test"], data_dir=data_dir
  )
  return data.Splits(_to_arrays(train), _to_arrays(test), NUM_CLASSES[name])


def normalize(images: jax.Array, name: str) -> jax.Array:
  """``(x − mean) / std`` per channel, for images in ``[0, 1]`` (float32)."""
  mean = jnp.asarray(CHANNEL_MEAN[name], jnp.float32)
  std = jnp.asarray(CHANNEL_STD[name], jnp.float32)
  return (images - mean) / std


def random_crop_and_flip(
  images: jax.Array, key: jax.Array, padding: int = 4
) -> jax.Array:
  """A random crop of the zero-padded image and a random horizontal flip.

  Args:
    images: ``[B, H, W, C]``.
    key: a PRNG key; the same key gives the same augmentation.
    padding: pixels of zero padding on each side before cropping.

  Returns:
    Images of the input's shape and dtype.
  """
  size, height, width, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(
    images, ((0, 0), (padding, padding), (padding, padding), (0, 0))
  )
  offsets = jax.random.randint(crop_key, (size, 2), 0, 2 * padding + 1)

  def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (height, width, image.shape[-1])
    )

  cropped = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (size, 1, 1, 1))
  return jnp.where(flip, cropped[:, :, ::-1, :], cropped)


def preprocess(
  images: jax.Array, name: str, key: jax.Array | None = None
) -> jax.Array:
  """``uint8`` images to normalized float32, augmented when ``key`` is given."""
  images = images.astype(jnp.float32) / 255.0
  if key is not None:
    images = random_crop_and_flip(images, key)
  return normalize(images, name)
