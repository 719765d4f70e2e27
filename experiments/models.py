"""The models of the experiments, in Flax NNX.

MNIST-1D (inputs ``[B, 40]``): :class:`MLP` and :class:`CNN1D`, the models of
the MNIST-1D paper (Greydanus & Kobak, 2020). CIFAR (inputs ``[B, 32, 32, 3]``,
NHWC): :class:`SmallCNN` (the benchmark's small convolutional net),
:func:`resnet18`, :func:`resnet50` (the CIFAR variants: a 3×3 stem, no max-pool)
and :func:`wide_resnet28_10`, with BatchNorm. Every model maps a batch of
inputs to logits ``[B, num_classes]``. For the scaling benchmark:
:class:`DeepMLP` (a deep tanh MLP, inputs ``[B, in_features]``) and
:class:`TransformerLM` (a decoder-only language model, tokens ``[B, T]`` to
logits ``[B, T, vocab_size]``).

BatchNorm follows PyTorch's defaults (``momentum=0.9`` in Flax's convention,
i.e. PyTorch's 0.1, and ``epsilon=1e-5``), as in the papers' code. Models are
built in training mode (batch statistics, running statistics updated); use
``nnx.view(model, use_running_average=True)`` (or ``model.eval()``) to
evaluate. :mod:`experiments.nnx_glue` turns a model into the pure per-example
``loss_fn(params, batch)`` the ``sam_optax`` transforms take.
"""

from collections.abc import Sequence
import functools
import itertools

from flax import nnx
import jax
import jax.numpy as jnp

BATCH_NORM_MOMENTUM = 0.9
"""Flax's ``momentum`` for running statistics (PyTorch's ``momentum=0.1``)."""
BATCH_NORM_EPSILON = 1e-5

# He (Kaiming) normal with fan-out, as torchvision's ResNets.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(
    features,
    momentum=BATCH_NORM_MOMENTUM,
    epsilon=BATCH_NORM_EPSILON,
    rngs=rngs,
  )


def _conv(
  in_features: int,
  out_features: int,
  kernel_size: int,
  stride: int,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """A bias-free 2-D convolution (BatchNorm follows), padded like PyTorch's."""
  pad = kernel_size // 2
  return nnx.Conv(
    in_features,
    out_features,
    (kernel_size, kernel_size),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=_conv_init,
    rngs=rngs,
  )


# --- MNIST-1D ---------------------------------------------------------------


class MLP(nnx.Module):
  """MNIST-1D's MLP: ``40 → 100 → 100 → 10`` with ReLU (about 15k parameters)."""

  def __init__(
    self,
    in_features: int = 40,
    hidden: int = 100,
    num_classes: int = 10,
    *,
    rngs: nnx.Rngs,
  ):
    self.hidden1 = nnx.Linear(in_features, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.out(x)


class CNN1D(nnx.Module):
  """MNIST-1D's small CNN (about 5k parameters).

  Three 1-D convolutions of ``channels`` filters (kernel 5 then 3, stride 2,
  padding 1, ReLU), then a linear layer on the flattened features: the
  ``ConvBase`` of the MNIST-1D paper, which reports about 94% test accuracy.
  """

  def __init__(
    self,
    length: int = 40,
    channels: int = 25,
    num_classes: int = 10,
    *,
    rngs: nnx.Rngs,
  ):
    conv = functools.partial(nnx.Conv, strides=2, padding=((1, 1),), rngs=rngs)
    self.conv1 = conv(1, channels, 5)
    self.conv2 = conv(channels, channels, 3)
    self.conv3 = conv(channels, channels, 3)
    for kernel in (5, 3, 3):
      length = (length + 2 - kernel) // 2 + 1
    self.out = nnx.Linear(length * channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x[..., None]  # [B, L] -> [B, L, 1]
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.relu(self.conv3(x))
    return self.out(x.reshape(x.shape[0], -1))


# --- CIFAR --------------------------------------------------------------------


class SmallCNN(nnx.Module):
  """A small CIFAR-shaped CNN: three 3×3 convolutions (32/64/128 channels),
  each with ReLU and 2×2 max-pooling, then a spatial mean and a dense layer.

  The model of /work/shared/PERFORMANCE-NOTES.md and the benchmark; no
  BatchNorm.
  """

  def __init__(
    self,
    num_classes: int = 10,
    channels: Sequence[int] = (32, 64, 128),
    in_channels: int = 3,
    *,
    rngs: nnx.Rngs,
  ):
    features = (in_channels, *channels)
    self.convs = nnx.List(
      [
        nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs)
        for a, b in itertools.pairwise(features)
      ]
    )
    self.out = nnx.Linear(features[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for conv in self.convs:
      x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), strides=(2, 2))
    return self.out(jnp.mean(x, axis=(1, 2)))


class BasicBlock(nnx.Module):
  """ResNet's basic block: two 3×3 convolutions and a shortcut."""

  expansion = 1

  def __init__(
    self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs
  ):
    self.conv1 = _conv(in_features, features, 3, stride, rngs)
    self.bn1 = _batch_norm(features, rngs)
    self.conv2 = _conv(features, features, 3, 1, rngs)
    self.bn2 = _batch_norm(features, rngs)
    if stride != 1 or in_features != features:
      self.shortcut = nnx.Sequential(
        _conv(in_features, features, 1, stride, rngs),
        _batch_norm(features, rngs),
      )
    else:
      self.shortcut = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nnx.Module):
  """ResNet's bottleneck block: 1×1, 3×3, 1×1 (×4) convolutions."""

  expansion = 4

  def __init__(
    self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs
  ):
    out_features = features * self.expansion
    self.conv1 = _conv(in_features, features, 1, 1, rngs)
    self.bn1 = _batch_norm(features, rngs)
    self.conv2 = _conv(features, features, 3, stride, rngs)
    self.bn2 = _batch_norm(features, rngs)
    self.conv3 = _conv(features, out_features, 1, 1, rngs)
    self.bn3 = _batch_norm(out_features, rngs)
    if stride != 1 or in_features != out_features:
      self.shortcut = nnx.Sequential(
        _conv(in_features, out_features, 1, stride, rngs),
        _batch_norm(out_features, rngs),
      )
    else:
      self.shortcut = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
  """ResNet for 32×32 inputs (He et al., 2016; the CIFAR variant used by SAM
  papers): a 3×3 stem with 64 channels, no max-pool, four stages of blocks
  with 64/128/256/512 base channels and strides 1/2/2/2, global average
  pooling and a dense layer.
  """

  def __init__(
    self,
    block: type[BasicBlock] | type[Bottleneck],
    stage_sizes: Sequence[int],
    num_classes: int = 10,
    width: int = 64,
    in_channels: int = 3,
    *,
    rngs: nnx.Rngs,
  ):
    self.stem = _conv(in_channels, width, 3, 1, rngs)
    self.stem_bn = _batch_norm(width, rngs)
    blocks = []
    in_features = width
    for stage, size in enumerate(stage_sizes):
      features = width * 2**stage
      for index in range(size):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(block(in_features, features, stride, rngs=rngs))
        in_features = features * block.expansion
    self.blocks = nnx.List(blocks)
    self.out = nnx.Linear(in_features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.out(jnp.mean(x, axis=(1, 2)))


def resnet18(
  num_classes: int = 10,
  *,
  rngs: nnx.Rngs,
  stage_sizes: Sequence[int] = (2, 2, 2, 2),
  **kwargs,
) -> ResNet:
  """ResNet-18 (CIFAR variant, about 11.2M parameters).

  ``stage_sizes`` and ``width`` shrink it (for tests).
  """
  return ResNet(BasicBlock, stage_sizes, num_classes, rngs=rngs, **kwargs)


def resnet50(
  num_classes: int = 10,
  *,
  rngs: nnx.Rngs,
  stage_sizes: Sequence[int] = (3, 4, 6, 3),
  **kwargs,
) -> ResNet:
  """ResNet-50 (CIFAR variant, about 23.5M parameters).

  ``stage_sizes`` and ``width`` shrink it (for tests).
  """
  return ResNet(Bottleneck, stage_sizes, num_classes, rngs=rngs, **kwargs)


class WideBlock(nnx.Module):
  """Wide ResNet's pre-activation block: BN-ReLU-conv, BN-ReLU-conv."""

  def __init__(
    self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs
  ):
    self.bn1 = _batch_norm(in_features, rngs)
    self.conv1 = _conv(in_features, features, 3, stride, rngs)
    self.bn2 = _batch_norm(features, rngs)
    self.conv2 = _conv(features, features, 3, 1, rngs)
    if stride != 1 or in_features != features:
      self.shortcut = _conv(in_features, features, 1, stride, rngs)
    else:
      self.shortcut = None

  def __call__(self, x: jax.Array) -> jax.Array:
    activated = nnx.relu(self.bn1(x))
    y = self.conv1(activated)
    y = self.conv2(nnx.relu(self.bn2(y)))
    # As in the reference code: a projection shortcut sees the activated input.
    return y + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nnx.Module):
  """Wide ResNet-``depth``-``widen`` (Zagoruyko & Komodakis, 2016), no dropout.

  ``(depth − 4) / 6`` blocks in each of three stages of ``16k/32k/64k``
  channels (``k = widen``), strides 1/2/2, then BN-ReLU, global average
  pooling and a dense layer.
  """

  def __init__(
    self,
    depth: int = 28,
    widen: int = 10,
    num_classes: int = 10,
    in_channels: int = 3,
    *,
    rngs: nnx.Rngs,
  ):
    if (depth - 4) % 6:
      raise ValueError(f"WideResNet: depth must be 6n + 4, got {depth}.")
    per_stage = (depth - 4) // 6
    self.stem = _conv(in_channels, 16, 3, 1, rngs)
    blocks = []
    in_features = 16
    for stage, base in enumerate((16, 32, 64)):
      features = base * widen
      for index in range(per_stage):
        stride = 2 if stage > 0 and index == 0 else 1
        blocks.append(WideBlock(in_features, features, stride, rngs=rngs))
        in_features = features
    self.blocks = nnx.List(blocks)
    self.final_bn = _batch_norm(in_features, rngs)
    self.out = nnx.Linear(in_features, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    x = nnx.relu(self.final_bn(x))
    return self.out(jnp.mean(x, axis=(1, 2)))


def wide_resnet28_10(
  num_classes: int = 10,
  *,
  rngs: nnx.Rngs,
  depth: int = 28,
  widen: int = 10,
  **kwargs,
) -> WideResNet:
  """WRN-28-10 (about 36.5M parameters); ``depth``/``widen`` shrink it for tests."""
  return WideResNet(depth, widen, num_classes, rngs=rngs, **kwargs)


# --- Scaling benchmark ----------------------------------------------------------


class DeepMLP(nnx.Module):
  """``depth`` dense layers of ``width`` with tanh, then a dense head.

  The weight-dominated model of the cost issue: at depth 64 and width 256,
  about 4.2M parameters in 130 leaves (a kernel and a bias per layer).
  """

  def __init__(
    self,
    in_features: int = 256,
    width: int = 256,
    depth: int = 64,
    num_classes: int = 10,
    *,
    rngs: nnx.Rngs,
  ):
    features = (in_features, *([width] * depth))
    self.layers = nnx.List(
      [nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(features)]
    )
    self.out = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return self.out(x)


class DecoderBlock(nnx.Module):
  """A pre-LN transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``.

  Causal multi-head self-attention (``nnx.MultiHeadAttention``, with biases)
  and a GELU MLP of ``mlp_ratio × dim`` hidden units: 16 parameter leaves.
  """

  def __init__(
    self, dim: int, num_heads: int, mlp_ratio: int = 4, *, rngs: nnx.Rngs
  ):
    self.attention_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads, dim, decode=False, rngs=rngs
    )
    self.mlp_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), mask=mask)
    return x + self.mlp_out(nnx.gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerLM(nnx.Module):
  """A decoder-only transformer language model (GPT-style, pre-LN).

  Token embedding plus a learned position embedding, ``depth``
  :class:`DecoderBlock` s, a final LayerNorm and a head on the vocabulary:
  the embedding's transpose (``tie_embeddings``, as GPT-2) or its own dense
  layer. Maps tokens ``[B, T]`` (``T ≤ max_length``) to logits
  ``[B, T, vocab_size]``; position ``t`` sees positions ``≤ t`` only.
  """

  def __init__(
    self,
    vocab_size: int = 256,
    dim: int = 128,
    depth: int = 2,
    num_heads: int = 4,
    max_length: int = 64,
    tie_embeddings: bool = True,
    *,
    rngs: nnx.Rngs,
  ):
    self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
    self.position = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (max_length, dim))
    )
    self.blocks = nnx.List(
      [DecoderBlock(dim, num_heads, rngs=rngs) for _ in range(depth)]
    )
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = (
      None if tie_embeddings else nnx.Linear(dim, vocab_size, rngs=rngs)
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    x = self.embed(tokens) + self.position[:length]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    x = self.norm(x)
    return self.embed.attend(x) if self.head is None else self.head(x)


def deep_mlp(num_classes: int = 10, *, rngs: nnx.Rngs, **kwargs) -> DeepMLP:
  """:class:`DeepMLP` (``in_features``, ``width``, ``depth`` as keywords)."""
  return DeepMLP(num_classes=num_classes, rngs=rngs, **kwargs)


def transformer_lm(
  num_classes: int = 256, *, rngs: nnx.Rngs, **kwargs
) -> TransformerLM:
  """:class:`TransformerLM` with ``vocab_size = num_classes``."""
  return TransformerLM(vocab_size=num_classes, rngs=rngs, **kwargs)


MODELS = {
  "mlp": MLP,
  "cnn1d": CNN1D,
  "small_cnn": SmallCNN,
  "resnet18": resnet18,
  "resnet50": resnet50,
  "wrn28_10": wide_resnet28_10,
  "deep_mlp": deep_mlp,
  "transformer_lm": transformer_lm,
}
"""Model constructors by name: ``MODELS[name](num_classes=..., rngs=...)``."""


def create_model(
  name: str, num_classes: int = 10, *, seed: int = 0, **kwargs
) -> nnx.Module:
  """Builds the model ``name`` (a key of :data:`MODELS`) with ``nnx.Rngs(seed)``."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, rngs=nnx.Rngs(seed), **kwargs)
