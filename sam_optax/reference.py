"""Variants written as their definitions, to test and time the fast forms against.

Not for training: these follow the papers' code line by line (a Python loop
over micro-batches) so that a test can compare the parallel forms with the
definition, and a benchmark can time them against the papers' cost.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _micro_batches
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform


def m_sam(
  rho: ArrayLike,
  micro_batch_size: int,
  *,
  normalize: bool = True,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""m-SAM by its definition: a loop of :func:`sam_optax.sam` steps.

  .. math::
    \text{returns } \frac{1}{k} \sum_{j=1}^{k} \nabla L_{B_j}(w + \varepsilon_j),
    \qquad \varepsilon_j = \rho\, g_{B_j} / (\|g_{B_j}\| + \delta),

  computed as the papers' code does: for each contiguous slice
  ``B_j = batch[j*m:(j+1)*m]`` it calls ``sam(rho).update`` (``usam`` with
  ``normalize=False``) and averages the results in float32. Run eagerly it
  processes one micro-batch at a time; under ``jax.jit`` XLA sees the ``k``
  steps unrolled. Same contract and result as :func:`sam_optax.m_sam`:

  >>> fast = sam_optax.m_sam(0.05, micro_batch_size=2)
  >>> by_definition = sam_optax.reference.m_sam(0.05, micro_batch_size=2)
  >>> expected, _ = by_definition.update(None, optax.EmptyState(), params,
  ...                                    loss_fn=loss_fn, batch=batch)
  >>> actual, _ = fast.update(None, optax.EmptyState(), params,
  ...                         loss_fn=loss_fn, batch=batch)
  >>> bool(optax.tree.norm(optax.tree.sub(actual, expected)) < 1e-6)
  True

  Args:
    rho: the perturbation radius ``ρ``.
    micro_batch_size: ``m``; must divide the batch size.
    normalize: m-SAM (True) or m-USAM (False).
    perturb_mask: which leaves to perturb; see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless).
  """
  name = "reference.m_sam"
  _contract.check_rho(rho, name)
  normalize = _contract.check_bool(normalize, "normalize", name)
  micro_batch_size = _contract.check_integer(
    micro_batch_size, "micro_batch_size", name
  )
  sam_step = (_sam.sam if normalize else _sam.usam)(
    rho, perturb_mask=perturb_mask
  )

  def gradient_fn(loss_fn: _contract.LossFn, params: Any, batch: Any) -> Any:
    count = _micro_batches.num_micro_batches(batch, micro_batch_size, name)
    gradients = []
    for j in range(count):
      micro_batch = jax.tree.map(
        lambda x, j=j: x[j * micro_batch_size : (j + 1) * micro_batch_size],
        batch,
      )
      gradient, _ = sam_step.update(
        None, optax.EmptyState(), params, loss_fn=loss_fn, batch=micro_batch
      )
      gradients.append(optax.tree.cast(gradient, jnp.float32))
    return jax.tree.map(lambda *gs: sum(gs) / count, *gradients)

  return _transform.from_gradient_fn(gradient_fn, name)
