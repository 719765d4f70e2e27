"""The jitted train and eval steps, and the per-example loss they share.

The heart is :func:`make_train_step`: one jitted function that runs the clean
pass (per-example losses, mean gradient, BatchNorm running statistics) and
hands the pure per-example ``loss_fn`` to the optimizer, which takes its
perturbed passes with it (:func:`passes_loss_fn`, from
:func:`sam_optax.flax.nnx_loss_fn`). A batch is
``{"inputs": [B, ...], "labels": [B]}`` everywhere.
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
import dataclasses
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from experiments import config as config_lib
from experiments import input_pipeline
from experiments import nnx_glue
from experiments import optimizers
import sam_optax.flax


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


TrainStep = Callable[..., tuple[TrainState, dict[str, jax.Array]]]
EvalStep = Callable[..., tuple[jax.Array, jax.Array]]


def logits(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
  """The model's outputs on the batch's inputs, in float32."""
  return model(batch["inputs"]).astype(jnp.float32)


def cross_entropy(outputs: jax.Array, batch: dict[str, jax.Array]) -> jax.Array:
  """Softmax cross-entropy of the logits ``outputs`` per example, ``[B]``."""
  return optax.softmax_cross_entropy_with_integer_labels(
    outputs, batch["labels"]
  )


@dataclasses.dataclass(frozen=True)
class SplitPerExampleLoss:
  """A per-example loss split into the model's outputs and a loss of them.

  Called as ``(model, batch) -> (losses [B], outputs)``, the per-example loss
  with its outputs as ``aux``; :func:`passes_loss_fn` turns it into a
  :class:`sam_optax.SplitLoss`, so that ``functional_sam`` (which needs the
  two halves) runs on the same model as every other variant.

  Attributes:
    forward: ``(model, batch) -> outputs`` (the logits).
    output_loss: ``(outputs, batch) -> losses [B]``.
  """

  forward: Callable[[nnx.Module, Any], Any]
  output_loss: Callable[[Any, Any], jax.Array]

  def __call__(self, model: nnx.Module, batch: Any) -> tuple[jax.Array, Any]:
    outputs = self.forward(model, batch)
    return self.output_loss(outputs, batch), outputs


per_example_loss = SplitPerExampleLoss(logits, cross_entropy)
"""Softmax cross-entropy per example (float32), and the logits: the
experiments' loss, split (:class:`SplitPerExampleLoss`)."""


def passes_loss_fn(
  graphdef: nnx.GraphDef,
  params: nnx.State,
  state: nnx.State,
  loss: Callable[..., Any] = per_example_loss,
) -> Callable[[nnx.State, dict[str, jax.Array]], jax.Array]:
  """The pure per-example ``loss_fn`` the transforms take their passes with.

  :func:`sam_optax.flax.nnx_loss_fn` of the model ``graphdef`` describes, at
  ``state``: in training mode BatchNorm normalizes each pass with its batch's
  statistics and no pass moves the running ones (only the clean pass does).
  ``loss`` is ``(model, batch) -> (losses [B], aux)``
  (:func:`per_example_loss` by default). A :class:`SplitPerExampleLoss`
  gives :func:`sam_optax.flax.nnx_split_loss`'s ``SplitLoss`` (the same
  losses, and the two halves ``functional_sam`` needs).
  """
  model = nnx.merge(graphdef, params, state)
  if isinstance(loss, SplitPerExampleLoss):
    return sam_optax.flax.nnx_split_loss(model, loss.forward, loss.output_loss)
  return sam_optax.flax.nnx_loss_fn(
    model, lambda model, batch: loss(model, batch)[0]
  )


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformationExtraArgs,
  preprocess: Callable[[jax.Array, jax.Array], jax.Array],
) -> TrainStep:
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
    with scalar ``loss`` and ``accuracy`` metrics of the clean pass.
  """

  def train_step(
    train_state: TrainState, batch: dict[str, jax.Array], run_key: jax.Array
  ) -> tuple[TrainState, dict[str, jax.Array]]:
    key = jax.random.fold_in(run_key, train_state.step)
    augment_key, optimizer_key = jax.random.split(key)
    batch = {
      "inputs": preprocess(batch["inputs"], augment_key),
      "labels": batch["labels"],
    }
    losses, grads, new_state, logits = nnx_glue.loss_grad_and_state(
      graphdef,
      train_state.state,
      per_example_loss,
      train_state.params,
      batch,
      has_aux=True,
    )
    loss_fn = passes_loss_fn(graphdef, train_state.params, train_state.state)
    updates, opt_state = tx.update(
      grads,
      train_state.opt_state,
      train_state.params,
      loss_fn=loss_fn,
      batch=batch,
      key=optimizer_key,
    )
    params = optax.apply_updates(train_state.params, updates)
    metrics = {
      "loss": jnp.mean(losses),
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"]),
    }
    return TrainState(
      train_state.step + 1, params, new_state, opt_state
    ), metrics

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(
  eval_graphdef: nnx.GraphDef, preprocess: Callable[[jax.Array], jax.Array]
) -> EvalStep:
  """The jitted ``eval_step(params, state, inputs, labels, mask)``.

  Returns the masked sums of the losses and of the correct predictions, with
  BatchNorm on its running statistics.
  """

  @jax.jit
  def eval_step(params, state, inputs, labels, mask):
    model = nnx.merge(eval_graphdef, params, state)
    losses, logits = per_example_loss(
      model, {"inputs": preprocess(inputs), "labels": labels}
    )
    correct = jnp.argmax(logits, -1) == labels
    return jnp.sum(losses * mask), jnp.sum(correct * mask)

  return eval_step


def eval_loss_fn(
  eval_graphdef: nnx.GraphDef,
  state: nnx.State,
  preprocess: Callable[[jax.Array], jax.Array],
) -> Callable[[nnx.State, dict[str, jax.Array]], jax.Array]:
  """The pure per-example ``loss_fn(params, batch)`` in evaluation mode.

  What the diagnostics measure (:mod:`sam_optax.diagnostics`): BatchNorm on
  the running statistics ``state`` and no augmentation, so that each
  example's loss, and so its gradient, is its own (with batch statistics an
  example alone would be normalized by itself).
  """

  def loss_fn(params: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    model_loss = passes_loss_fn(eval_graphdef, params, state)
    return model_loss(
      params, {"inputs": preprocess(batch["inputs"]), "labels": batch["labels"]}
    )

  return loss_fn


class Steps(NamedTuple):
  """The optimizer and the compiled steps of a configuration."""

  tx: optax.GradientTransformationExtraArgs
  train_step: TrainStep
  eval_step: EvalStep


_CACHE_SIZE = 16
_cache: dict[Hashable, Steps] = {}


def _hashable(value: Any) -> Hashable:
  """``value`` with its dicts and lists turned into tuples."""
  if isinstance(value, Mapping):
    return tuple(sorted((key, _hashable(item)) for key, item in value.items()))
  if isinstance(value, Sequence) and not isinstance(value, str):
    return tuple(_hashable(item) for item in value)
  return value


def build_steps(
  split: nnx_glue.SplitModel,
  optimizer: config_lib.OptimizerConfig,
  preprocessing: input_pipeline.Preprocessing,
  total_steps: int,
) -> Steps:
  """The optimizer and the jitted steps of a run.

  Cached on what they are built from (the model's graphs, the optimizer's
  configuration, the preprocessing and the schedule's length), so runs that
  differ only in seeds or data reuse the compiled steps.

  Args:
    split: the run's model (only its graphs are used).
    optimizer: the optimizer's configuration.
    preprocessing: from :func:`input_pipeline.preprocessing`.
    total_steps: the length of the learning-rate schedule.

  Returns:
    :class:`Steps`.
  """
  key = (
    split.graphdef,
    split.eval_graphdef,
    preprocessing,
    _hashable(dataclasses.asdict(optimizer)),
    total_steps,
  )
  if key not in _cache:
    if len(_cache) >= _CACHE_SIZE:
      del _cache[next(iter(_cache))]  # the oldest
    tx = optimizers.make_optimizer(optimizer, total_steps)
    _cache[key] = Steps(
      tx,
      make_train_step(split.graphdef, tx, preprocessing.train),
      make_eval_step(split.eval_graphdef, preprocessing.evaluate),
    )
  return _cache[key]
