"""The calling contract shared by every transform of the SAM family.

Every transform is called as::

  updates, state = tx.update(grads, state, params, loss_fn=loss_fn, batch=batch,
                             key=key)

where ``loss_fn(params, batch)`` returns one loss per example (shape ``[B]``)
and ``batch`` is any pytree whose leaves share a leading batch axis of size
``B``. The checks below run on shapes only (``jax.eval_shape``), so they cost
nothing at run time and fail at trace time with a message that names the
problem.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]
"""``loss_fn(params, batch) -> per-example losses`` of shape ``[B]``."""


def require(value: Any, argument: str, transform_name: str) -> Any:
  """Returns ``value``, or raises a clear error if an extra argument is missing."""
  if value is None:
    raise TypeError(
        f"{transform_name}.update needs the keyword argument `{argument}`; "
        f"call it as tx.update(grads, state, params, loss_fn=..., batch=...)"
        " (optax.chain forwards keyword arguments to every member)."
    )
  return value


def require_arguments(
    params: Params, loss_fn: LossFn | None, batch: Batch, transform_name: str
) -> tuple[Params, LossFn, Batch]:
  """``(params, loss_fn, batch)``, or a clear error naming the one missing."""
  return (require(params, "params", transform_name),
          require(loss_fn, "loss_fn", transform_name),
          require(batch, "batch", transform_name))


def batch_size(batch: Batch, transform_name: str = "sam_optax") -> int:
  """Returns the leading-axis size shared by every leaf of ``batch``.

  Raises:
    ValueError: if ``batch`` has no array leaves, a scalar leaf, or leaves whose
      leading axes differ.
  """
  leaves_with_path = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves_with_path:
    raise ValueError(f"{transform_name}: `batch` has no array leaves.")
  sizes = {}
  for path, leaf in leaves_with_path:
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(
          f"{transform_name}: batch leaf {jax.tree_util.keystr(path)} is a"
          " scalar; every leaf needs a leading batch axis."
      )
    sizes[jax.tree_util.keystr(path)] = shape[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(
        f"{transform_name}: the leaves of `batch` must share their leading"
        f" (batch) axis, got sizes {sizes}."
    )
  return next(iter(sizes.values()))


def check_per_example_losses(
    loss_fn: LossFn, params: Params, batch: Batch, transform_name: str
) -> int:
  """Checks that ``loss_fn(params, batch)`` returns shape ``[B]``; returns B.

  Only shapes are evaluated (``jax.eval_shape``): no computation happens.

  Raises:
    ValueError: if the output is not a vector with one loss per example.
  """
  size = batch_size(batch, transform_name)
  out = jax.eval_shape(loss_fn, params, batch)
  shape = getattr(out, "shape", None)
  if shape != (size,):
    raise ValueError(
        f"{transform_name}: loss_fn(params, batch) must return per-example"
        f" losses of shape ({size},) (one per example of the batch), got"
        f" {shape if shape is not None else type(out).__name__}. Return the"
        " vector of losses, not their mean."
    )
  return size


def mean_loss(loss_fn: LossFn, params: Params, batch: Batch) -> jax.Array:
  """``L_B(w) = mean_i ℓ_i(w)``, accumulated in float32."""
  return jnp.mean(loss_fn(params, batch).astype(jnp.float32))


def mean_gradient(loss_fn: LossFn, params: Params, batch: Batch) -> Params:
  """``∇L_B(w)``: the gradient of the mean per-example loss."""
  return jax.grad(mean_loss, argnums=1)(loss_fn, params, batch)


def check_sign(
    value: ArrayLike, argument: str, transform_name: str, *,
    allow_zero: bool,
) -> None:
  """Rejects a concrete ``value`` below zero (or at zero); traced values pass."""
  try:
    number = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not (number > 0 or (allow_zero and number == 0)):  # NaN fails too
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(
        f"{transform_name}: {argument} must be {bound}, got {value}."
    )


def check_rho(rho: ArrayLike, transform_name: str) -> None:
  """Rejects a negative (concrete) radius early; traced values pass."""
  check_sign(rho, "rho", transform_name, allow_zero=True)
