"""The experiments' functional NNX training: a split model and its clean pass.

The experiments keep an NNX model as arrays (``graphdef``, ``params`` and the
rest of its ``state``: BatchNorm running statistics) so that a train step is a
pure ``jax.jit`` function and a checkpoint is a pytree. Two pieces are
specific to that style and live here:

- :func:`split`: the static graphs in training and evaluation mode, the
  parameters and the state.
- :func:`loss_grad_and_state`: the clean pass at ``w``. It returns the
  per-example losses, the mean gradient and the *updated* state: only this
  pass moves the running statistics, as in the SAM papers' PyTorch code.

The ``loss_fn`` handed to the transforms, whose passes leave the statistics
alone, is the package's :func:`sam_optax.flax.nnx_loss_fn`
(``experiments.steps.passes_loss_fn``). Evaluate with ``eval_graphdef``
(BatchNorm on running statistics): ``nnx.merge(split.eval_graphdef, params,
state)``.
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
    model,
    use_running_average=True,
    deterministic=True,
    raise_if_not_found=False,
  )
  eval_graphdef, _, _ = nnx.split(evaluation, wrt, ...)
  return SplitModel(graphdef, eval_graphdef, params, state)


def _call(
  loss: PerExampleLoss, model: nnx.Module, batch: Batch, has_aux: bool
) -> tuple[jax.Array, Any]:
  out = loss(model, batch)
  return out if has_aux else (out, None)


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
    mean_loss, has_aux=True
  )(params)
  return losses, grads, new_state, aux
