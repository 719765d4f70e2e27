"""Flax models as the pure per-example ``loss_fn(params, batch)`` of the transforms.

The transforms evaluate the loss at perturbed parameters ``w + ε`` (RW-SAM
also at ``w + σv``), so they take a pure ``loss_fn(params, batch)`` returning
per-example losses of shape ``[B]``. A Flax model with BatchNorm also updates
running statistics in training mode, and one with Dropout draws random masks;
the helpers here build that ``loss_fn`` with one rule for both:

* **Statistics.** Every pass ``loss_fn`` runs normalizes with the statistics
  of the batch it is given (m-SAM's micro-batches with their own) and drops
  the updates it makes: only the clean pass at ``w``, the train step's own,
  moves the running statistics, as in the SAM papers' code. After one step
  they are those of one plain SGD step from the same state.
* **Dropout.** Every pass ``loss_fn`` runs in a step uses the same dropout
  masks (for batches of the same shape), drawn independently of the clean
  pass's: RW-SAM's finite differences ``ℓ_i(w + σv) − ℓ_i(w)`` then see the
  change of ``w`` alone.

NNX (:func:`nnx_loss_fn`) takes the model and works inside ``nnx.jit`` with
``nnx.Optimizer``, which forwards ``loss_fn``, ``batch`` and ``key`` to the
transform. Linen (:func:`linen_loss_fn`, :func:`linen_clean_pass`) takes
``apply_fn`` and ``batch_stats``; ``TrainState.apply_gradients`` does not
forward keyword arguments, so the train step calls ``tx.update`` itself (the
README has the complete recipe for both).

Their loss functions declare themselves coupled (attribute
``couples_examples``) when an example's loss depends on the rest of the batch
(BatchNorm on batch statistics, dropout masks drawn for the whole batch: a
model in training mode): exact
per-example gradients (:func:`sam_optax.per_example_gradient_norms`,
:func:`sam_optax.calibrate_sigma`, ``rw_sam(gradient_norms="exact")``) are
then rows of the Jacobian of the loss vector, the quantity RW-SAM's probe
estimates, rather than gradients on batches of one.

Install with ``pip install "sam_optax[flax]"``. ``import sam_optax`` does not
import Flax; ``import sam_optax.flax`` does.
"""

import importlib.util

if importlib.util.find_spec("flax") is None:  # pragma: no cover
  raise ImportError('sam_optax.flax needs Flax: pip install "sam_optax[flax]"')

# pylint: disable=g-import-not-at-top,g-bad-import-order
from sam_optax.flax._linen import linen_clean_pass
from sam_optax.flax._linen import linen_loss_fn
from sam_optax.flax._linen import LinenCleanPass

# Issue 19 (variants-b): a split loss and parameter masks from a model.
from sam_optax.flax._nnx import module_mask
from sam_optax.flax._nnx import nnx_loss_fn
from sam_optax.flax._nnx import nnx_split_loss
from sam_optax.flax._nnx import NORMALIZATION_LAYERS
from sam_optax.flax._nnx import normalization_mask
from sam_optax.flax._nnx import output_layer_mask

__all__ = (
  "NORMALIZATION_LAYERS",
  "LinenCleanPass",
  "linen_clean_pass",
  "linen_loss_fn",
  "module_mask",
  "nnx_loss_fn",
  "nnx_split_loss",
  "normalization_mask",
  "output_layer_mask",
)
