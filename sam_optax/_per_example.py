"""Per-example gradients and Rademacher probes, shared by RW-SAM and diagnostics.

Per-example gradients ``∇ℓ_i(w)`` are never summed here: each is mapped to a
small result (its norm, its squared distance to a mean, its products with
probes) inside ``optax.microbatching.micro_grad``, a ``vmap`` of ``grad`` in
which ``loss_fn`` sees each example as a batch of one. So a model whose loss
depends on the whole batch (batch-norm statistics) gets batch-of-one
gradients.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sam_optax import _contract


def rademacher_like(key: jax.Array, tree: Any) -> Any:
  """A Rademacher probe: independent ``±1`` entries shaped like ``tree``.

  Args:
    key: a PRNG key.
    tree: a pytree of arrays (the parameters).

  Returns:
    A pytree like ``tree`` with float32 leaves, each entry ``+1`` or ``-1``
    with probability 1/2.
  """
  return optax.tree.random_like(
      key, tree, sampler=jax.random.rademacher, dtype=jnp.float32
  )


def map_per_example_gradients(
    fn: Callable[[Any], Any],
    loss_fn: _contract.LossFn,
    params: Any,
    batch: Any,
    *,
    chunk_size: int | None = None,
) -> Any:
  """``fn(∇ℓ_i(w))`` for every example ``i``, stacked along a leading axis.

  ``fn`` receives one example's gradient with float32 leaves shaped like
  ``params``. ``chunk_size`` examples are vectorized at once (it must divide
  ``B``; None: all ``B``), so at most ``chunk_size`` gradients are held.

  Returns:
    ``fn``'s outputs, each leaf with a leading axis of size ``B``.
  """

  def example_loss(p: Any, example: Any) -> jax.Array:
    # micro_grad hands each example over with a leading axis of size 1.
    return loss_fn(p, example)[0].astype(jnp.float32)

  gradient_fn = optax.microbatching.micro_grad(
      example_loss, transform_fn=lambda gradient: (),
      metrics_fn=lambda gradient: fn(optax.tree.cast(gradient, jnp.float32)),
      microbatch_size=chunk_size,
  )
  _, outputs = gradient_fn(params, batch)
  return outputs.metrics


def check_chunk_size(chunk_size: Any, size: int, name: str) -> int | None:
  """``chunk_size`` as an int dividing the batch size ``size``, or None."""
  chunk_size = _contract.check_integer(
      chunk_size, "chunk_size", name, optional=True)
  if chunk_size is not None:
    _contract.check_divides(chunk_size, size, "chunk_size", "the batch size",
                            name)
  return chunk_size
