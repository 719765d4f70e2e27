"""Flax NNX models as the pure per-example ``loss_fn(params, batch)`` of sam_optax.

The ``sam_optax`` transforms evaluate the loss at perturbed parameters
``w + ε`` (and RW-SAM at ``w + σv``), so they take a pure function
``loss_fn(params, batch) -> [B]``. An NNX model is a mutable object whose
BatchNorm layers also update running statistics in training mode. The helpers
here split the model once (``nnx.split``) into a static graph, its parameters
and the rest of its state, and build the two functions a train step needs:

- :func:`pure_loss_fn`: the ``loss_fn`` handed to the transform. It runs the
  model in training mode (BatchNorm normalizes with the batch's statistics)
  and *discards* every state update, so the perturbed passes never touch the
  running statistics.
- :func:`loss_grad_and_state`: the clean pass at ``w``. It returns the
  per-example losses, the mean gradient and the *updated* state: only this
  pass moves the running statistics, as in the SAM papers' PyTorch code.

A jitted train step then reads::

  model_split = nnx_glue.split(model)
  graphdef, state = model_split.graphdef, model_split.state

  def per_example_loss(model, batch):
    logits = model(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["labels"])

  @jax.jit
  def train_step(params, state, opt_state, batch, key):
    losses, grads, new_state, _ = nnx_glue.loss_grad_and_state(
        graphdef, state, per_example_loss, params, batch)
    loss_fn = nnx_glue.pure_loss_fn(graphdef, state, per_example_loss)
    updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn,
                                   batch=batch, key=key)
    return optax.apply_updates(params, updates), new_state, opt_state

``nnx.merge`` inside the step costs nothing at run time: it runs once, when
the step is traced. It merges with ``copy=True``: fresh ``Variable`` objects
at the current trace level, so BatchNorm may update them inside ``jax.grad``
and no update leaks into the ``state`` passed in. Evaluate with ``eval_graphdef`` (BatchNorm on running
statistics): ``nnx.merge(model_split.eval_graphdef, params, state)``.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

Batch = Any
PerExampleLoss = Callable[[nnx.Module, Batch], Any]
"""``(model, batch) -> losses [B]``, or ``(losses, aux)`` with ``has_aux``."""


class SplitModel(NamedTuple):
  """An NNX model split for functional training.

  Attributes:
    graphdef: the static structure, in training mode (BatchNorm on batch
      statistics, dropout on).
    eval_graphdef: the same in evaluation mode (BatchNorm on running
      statistics, dropout off); it takes the same ``params`` and ``state``.
    params: the trainable leaves (``nnx.Param`` by default), an ``nnx.State``.
    state: everything else (BatchNorm running statistics, ...), an
      ``nnx.State``; it may be empty.
  """

  graphdef: nnx.GraphDef
  eval_graphdef: nnx.GraphDef
  params: nnx.State
  state: nnx.State


def split(model: nnx.Module, wrt: Any = nnx.Param) -> SplitModel:
  """Splits ``model`` into static graphs, trainable ``params`` and other ``state``.

  Args:
    model: an NNX module, in training mode.
    wrt: the filter of the trainable variables (``nnx.Param`` by default).

  Returns:
    A :class:`SplitModel`. ``nnx.merge(graphdef, params, state)`` rebuilds the
    model.
  """
  graphdef, params, state = nnx.split(model, wrt, ...)
  evaluation = nnx.view(
      model, use_running_average=True, deterministic=True,
      raise_if_not_found=False,
  )
  eval_graphdef, _, _ = nnx.split(evaluation, wrt, ...)
  return SplitModel(graphdef, eval_graphdef, params, state)


def _call(
    loss: PerExampleLoss, model: nnx.Module, batch: Batch, has_aux: bool
) -> tuple[jax.Array, Any]:
  out = loss(model, batch)
  return out if has_aux else (out, None)


def pure_loss_fn(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    loss: PerExampleLoss,
    *,
    has_aux: bool = False,
) -> Callable[[nnx.State, Batch], jax.Array]:
  """The pure ``loss_fn(params, batch) -> [B]`` for the sam_optax transforms.

  The model runs as ``graphdef`` says (training mode: BatchNorm normalizes
  with the statistics of the batch it is given, so m-SAM's micro-batches use
  their own), with the fixed ``state``. Any update the forward pass makes to
  the state (BatchNorm running statistics) is discarded: the perturbed passes
  leave the running statistics as they are.

  Args:
    graphdef: from :func:`split`.
    state: the non-trainable state to run with (not updated).
    loss: ``(model, batch) -> per-example losses [B]`` (or ``(losses, aux)``
      with ``has_aux``; ``aux`` is dropped).
    has_aux: whether ``loss`` returns ``(losses, aux)``.
  """

  def loss_fn(params: nnx.State, batch: Batch) -> jax.Array:
    model = nnx.merge(graphdef, params, state, copy=True)
    return _call(loss, model, batch, has_aux)[0]

  return loss_fn


def loss_grad_and_state(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    loss: PerExampleLoss,
    params: nnx.State,
    batch: Batch,
    *,
    has_aux: bool = False,
    wrt: Any = nnx.Param,
) -> tuple[jax.Array, nnx.State, nnx.State, Any]:
  """The clean pass: losses, mean gradient and the updated state at ``params``.

  Args:
    graphdef: from :func:`split` (training mode).
    state: the non-trainable state before the step.
    loss: ``(model, batch) -> losses [B]`` (or ``(losses, aux)``).
    params: the parameters ``w``.
    batch: the batch.
    has_aux: whether ``loss`` returns ``(losses, aux)``.
    wrt: the filter that :func:`split` used.

  Returns:
    ``(losses [B], ∇ mean(losses), new_state, aux)``: ``new_state`` carries
    the BatchNorm running statistics updated by this pass (and only by it);
    ``aux`` is None without ``has_aux``.
  """

  def mean_loss(params: nnx.State):
    model = nnx.merge(graphdef, params, state, copy=True)
    losses, aux = _call(loss, model, batch, has_aux)
    _, _, new_state = nnx.split(model, wrt, ...)
    return jnp.mean(losses.astype(jnp.float32)), (losses, new_state, aux)

  (_, (losses, new_state, aux)), grads = jax.value_and_grad(
      mean_loss, has_aux=True)(params)
  return losses, grads, new_state, aux
