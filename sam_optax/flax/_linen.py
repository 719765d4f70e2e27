"""A Linen model's ``apply_fn`` as the pure per-example ``loss_fn(params, batch)``.

Linen is functional already: ``apply_fn(variables, ..., mutable=
["batch_stats"])`` returns the outputs and the updated statistics. Both
helpers hand ``per_example_loss`` a ``model`` callable,
``model(*args, **kwargs) = apply_fn(variables, *args, rngs=rngs, **kwargs)``'s
outputs, so that the clean pass and ``loss_fn`` share one loss function
written as for NNX; :func:`linen_clean_pass` keeps the updated statistics and
:func:`linen_loss_fn` drops them.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sam_optax import _contract
from sam_optax import _per_example

ApplyFn = Callable[..., Any]
"""``flax.linen.Module.apply`` (``TrainState.apply_fn``)."""
PerExampleLoss = Callable[[Callable[..., Any], Any], jax.Array]
"""``per_example_loss(model, batch) -> losses [B]``, ``model(*args, **kwargs)``
the bound ``apply_fn``."""
Rngs = Mapping[str, jax.Array] | None


class LinenCleanPass(NamedTuple):
  """What :func:`linen_clean_pass` returns.

  Attributes:
    losses: the per-example losses ``ℓ_i(w)``, shape ``[B]``.
    grads: ``∇ mean_i ℓ_i(w)``, shaped like ``params``: the transform's
      ``updates``.
    batch_stats: the running statistics after this pass (None without
      ``batch_stats``).
  """

  losses: jax.Array
  grads: Any
  batch_stats: Any


def _run(
  apply_fn: ApplyFn,
  per_example_loss: PerExampleLoss,
  params: Any,
  batch: Any,
  batch_stats: Any,
  rngs: Rngs,
) -> tuple[jax.Array, Any]:
  """``(losses, updated batch_stats)`` of one pass of the model."""
  variables = {"params": params}
  if batch_stats is not None:
    variables["batch_stats"] = batch_stats
  updated = {"batch_stats": batch_stats}

  def model(*args: Any, **kwargs: Any) -> Any:
    if batch_stats is None:
      return apply_fn(variables, *args, rngs=rngs, **kwargs)
    outputs, mutated = apply_fn(
      variables, *args, rngs=rngs, mutable=["batch_stats"], **kwargs
    )
    updated["batch_stats"] = mutated.get("batch_stats", batch_stats)
    return outputs

  losses = per_example_loss(model, batch)
  return losses, updated["batch_stats"]


def linen_loss_fn(
  apply_fn: ApplyFn,
  per_example_loss: PerExampleLoss,
  *,
  batch_stats: Any = None,
  rngs: Rngs = None,
) -> _contract.LossFn:
  """The pure ``loss_fn(params, batch) -> [B]`` of a Linen model.

  ``loss_fn(params, batch) = per_example_loss(model, batch)`` with
  ``model(*args, **kwargs)`` the outputs of ``apply_fn({"params": params,
  "batch_stats": batch_stats}, *args, rngs=rngs, mutable=["batch_stats"],
  **kwargs)``: in training mode BatchNorm normalizes with the statistics of
  the batch ``loss_fn`` is given (m-SAM's micro-batches with their own), and
  the updated statistics are dropped, so the perturbed, probe and
  micro-batch passes leave ``batch_stats`` as it is; the clean pass
  (:func:`linen_clean_pass`) keeps its update.

  Every call uses the same ``rngs``, hence the same dropout masks for
  batches of the same shape (RW-SAM's probes and the losses they are compared
  with, the perturbed gradient). Pass a key of its own, not the clean pass's
  (e.g. ``jax.random.fold_in(dropout_key, 1)``), for masks independent of
  the clean pass's as :func:`nnx_loss_fn` draws them; the clean pass's key
  gives its masks to the perturbed passes too.

  ``loss_fn.couples_examples`` is True with ``batch_stats`` or ``rngs``: exact
  per-example gradients are then rows of the Jacobian of the loss vector (see
  :func:`sam_optax.per_example_gradient_norms`). The helper cannot see the
  mode ``per_example_loss`` runs in; for one in eval mode (running
  statistics, no dropout) set ``loss_fn.couples_examples = False`` to keep
  the cheaper batch-of-one gradients.

  >>> import flax.linen as nn
  >>> import jax, jax.numpy as jnp, sam_optax.flax
  >>> class Net(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, x, train):
  ...     return nn.BatchNorm(use_running_average=not train)(nn.Dense(2)(x))
  >>> def per_example_loss(model, batch):
  ...   return jnp.sum((model(batch["x"], train=True) - batch["y"]) ** 2, -1)
  >>> batch = {"x": jnp.arange(12.0).reshape(4, 3), "y": jnp.zeros((4, 2))}
  >>> variables = Net().init(jax.random.key(0), batch["x"], train=False)
  >>> loss_fn = sam_optax.flax.linen_loss_fn(
  ...     Net().apply, per_example_loss, batch_stats=variables["batch_stats"])
  >>> loss_fn(variables["params"], batch).shape, loss_fn.couples_examples
  ((4,), True)

  Args:
    apply_fn: the model's ``apply`` (``TrainState.apply_fn``).
    per_example_loss: ``per_example_loss(model, batch)``, the losses of the
      batch's examples, shape ``[B]``; the same function as the clean pass's.
    batch_stats: the ``"batch_stats"`` collection, or None for a model
      without BatchNorm.
    rngs: the ``rngs`` of ``apply_fn`` (e.g. ``{"dropout": key}``), or None.

  Returns:
    ``loss_fn(params, batch) -> [B]``, pure, with the attribute
    ``couples_examples``.
  """

  def loss_fn(params: Any, batch: Any) -> jax.Array:
    return _run(apply_fn, per_example_loss, params, batch, batch_stats, rngs)[0]

  coupled = batch_stats is not None or bool(rngs)
  setattr(loss_fn, _per_example.COUPLES_EXAMPLES, coupled)
  return loss_fn


def linen_clean_pass(
  apply_fn: ApplyFn,
  per_example_loss: PerExampleLoss,
  params: Any,
  batch: Any,
  *,
  batch_stats: Any = None,
  rngs: Rngs = None,
) -> LinenCleanPass:
  """The clean pass at ``w``: losses, mean gradient and updated statistics.

  The train step's pass at the unperturbed parameters, run as
  :func:`linen_loss_fn` runs its passes but keeping the updated
  ``batch_stats``: the only pass of a step that moves them.

  Args:
    apply_fn: the model's ``apply``.
    per_example_loss: as in :func:`linen_loss_fn`.
    params: the parameters ``w``.
    batch: the batch.
    batch_stats: the ``"batch_stats"`` collection before the step, or None.
    rngs: the ``rngs`` of ``apply_fn`` (e.g. ``{"dropout": key}``), or None.

  Returns:
    A :class:`LinenCleanPass`: ``grads`` is the transform's ``updates``,
    ``batch_stats`` the statistics to keep.
  """

  def mean_loss(p: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    losses, new_stats = _run(
      apply_fn, per_example_loss, p, batch, batch_stats, rngs
    )
    return jnp.mean(losses.astype(jnp.float32)), (losses, new_stats)

  (_, (losses, new_stats)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
    params
  )
  return LinenCleanPass(losses, grads, new_stats)
