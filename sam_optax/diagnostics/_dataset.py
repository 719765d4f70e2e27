"""A dataset as one pytree, and sums over it in chunks of bounded size.

Every diagnostic takes the dataset as ``data``: one pytree whose leaves share
a leading axis of ``N`` examples (the training set as arrays, or a subset of
it; NumPy arrays may stay in host memory), plus ``chunk_size``, how many
examples are processed at once. Averages are over examples (``mean_i``), so
the result does not depend on ``chunk_size``: only the memory does. A last
chunk smaller than the others is handled, so ``chunk_size`` need not divide
``N``.

The loop over chunks is a Python loop around a jitted function of one chunk
(compiled once per chunk shape), not a ``lax`` loop: XLA's CPU backend runs
model code inside ``lax`` loops several times slower (5–7× measured here for
a small CNN's Hessian-vector products), and only one chunk at a time needs to
be on the device. Inside a caller's ``jit`` the loop unrolls.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax

from sam_optax import _contract

Data = Any
"""A pytree whose leaves share a leading axis: one entry per example."""


def num_examples(data: Data) -> int:
  """``N``, the leading-axis size shared by every leaf of ``data``."""
  return _contract.batch_size(data, "sam_optax.diagnostics")


def check_call(
  loss_fn: _contract.LossFn,
  params: Any,
  data: Data,
  chunk_size: int | None,
  name: str,
) -> tuple[int, int | None]:
  """The checks every diagnostic over ``data`` runs first.

  ``params`` has differentiable leaves
  (:func:`_contract.check_differentiable_params`), ``loss_fn`` returns real
  floating per-example losses on ``data``
  (:func:`_contract.check_per_example_losses`) and ``chunk_size`` is a
  positive integer or None.

  Returns:
    ``(N, chunk_size)``: the number of examples and the checked chunk size.
  """
  _contract.check_differentiable_params(params, name)
  size = _contract.check_per_example_losses(loss_fn, params, data, name)
  chunk_size = _contract.check_integer(
    chunk_size, "chunk_size", name, optional=True, static_hint=False
  )
  return size, chunk_size


def take_examples(data: Data, start: int, stop: int) -> Data:
  """Examples ``[start, stop)`` of every leaf."""
  return jax.tree.map(lambda x: x[start:stop], data)


def dataset_sum(
  chunk_sum: Callable[[Data], Any], data: Data, chunk_size: int | None
) -> Any:
  """``Σ_chunks chunk_sum(chunk)``, ``chunk_size`` examples at a time.

  ``chunk_sum(chunk)`` must return a sum over the examples of its chunk (a
  pytree of float arrays), so that the total is a sum over the whole dataset
  whatever the chunking.

  Args:
    chunk_sum: maps a chunk (a pytree like ``data``) to its sum; jit it.
    data: the dataset.
    chunk_size: examples per chunk, or None for the whole dataset at once.

  Returns:
    The sum over the dataset, shaped like ``chunk_sum``'s output.
  """
  size = num_examples(data)
  step = size if chunk_size is None else min(chunk_size, size)
  total = None
  for start in range(0, size, step):
    part = chunk_sum(take_examples(data, start, min(start + step, size)))
    total = part if total is None else optax.tree.add(total, part)
  return total
