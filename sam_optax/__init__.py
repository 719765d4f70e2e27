"""sam_optax: sharpness-aware minimization (SAM) and its variants as optax transforms.

Every transform returns the gradient the base optimizer should use, so it goes
first in an ``optax.chain``; ``loss_fn(params, batch)`` returns per-example
losses (shape ``[B]``):

>>> tx = optax.chain(sam_optax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
>>> state = tx.init(params)
>>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
>>> updates, state = tx.update(grads, state, params, loss_fn=loss_fn,
...                            batch=batch)

Submodules: :mod:`sam_optax.diagnostics` (sharpness and gradient noise),
:mod:`sam_optax.reference` (the definitions the fast forms are tested
against) and :mod:`sam_optax.flax` (Flax models as ``loss_fn``; ``import
sam_optax.flax``, with the ``[flax]`` extra: ``import sam_optax`` alone does
not import Flax).
"""

from sam_optax import diagnostics
from sam_optax import reference
from sam_optax._asam import adaptive_scale
from sam_optax._asam import asam
from sam_optax._asam import not_bias_mask
from sam_optax._bsam import bsam
from sam_optax._bsam import bsam_variance
from sam_optax._bsam import BsamState
from sam_optax._calibration import calibrate_sigma
from sam_optax._calibration import SigmaCalibration
from sam_optax._contract import LossFn
from sam_optax._data_parallel import data_parallel_m_sam
from sam_optax._esam import esam
from sam_optax._f_sam import f_sam
from sam_optax._f_sam import friendly_ascent
from sam_optax._f_sam import FriendlyAscentState
from sam_optax._functional_sam import functional_sam
from sam_optax._functional_sam import preconditioned_ascent
from sam_optax._functional_sam import preconditioned_sam
from sam_optax._functional_sam import PreconditionedAscentState
from sam_optax._functional_sam import SplitLoss
from sam_optax._gcsam import centralize
from sam_optax._gcsam import centralized_ascent
from sam_optax._gcsam import gcsam
from sam_optax._gcsam import gradient_centralization
from sam_optax._gradient_norms import finite_difference_gradient_norms
from sam_optax._gradient_norms import per_example_gradient_norms
from sam_optax._gsam import gsam
from sam_optax._look_sam import look_sam
from sam_optax._look_sam import LookSamState
from sam_optax._lookbehind import lookbehind_sam
from sam_optax._lookbehind import LookbehindSamState
from sam_optax._lookbehind import multi_step_sam
from sam_optax._m_sam import m_sam
from sam_optax._momentum_sam import momentum_sam
from sam_optax._momentum_sam import MomentumSamState
from sam_optax._n_sam import ascent_set_ascent
from sam_optax._n_sam import n_sam
from sam_optax._rw_sam import gibbs_weights
from sam_optax._rw_sam import reweighted_ascent
from sam_optax._rw_sam import ReweightedAscentState
from sam_optax._rw_sam import rw_asam
from sam_optax._rw_sam import rw_sam
from sam_optax._sam import clean_gradient_ascent
from sam_optax._sam import sam
from sam_optax._sam import usam
from sam_optax._sampa import sampa
from sam_optax._sampa import SampaState
from sam_optax._transform import AscentDirection
from sam_optax._transform import DirectionFn
from sam_optax._transform import sharpness_aware
from sam_optax._transform import sharpness_aware_step
from sam_optax._transform import SharpnessAwareStep
from sam_optax._vasso import variance_suppressed_ascent
from sam_optax._vasso import VarianceSuppressedAscentState
from sam_optax._vasso import vasso
from sam_optax._wsam import DecoupledWsamState
from sam_optax._wsam import wsam

__version__ = "0.3.0"

# What users call. The transforms; the pieces a new variant is built from
# (AscentDirection, DirectionFn, sharpness_aware and sharpness_aware_step,
# each variant's ascent direction and state, ASAM's scale and mask); RW-SAM's
# per-example gradient norms, their σ calibration and weights, to check and
# tune it; and two submodules: diagnostics (sharpness and gradient noise) and
# reference (the definitions the fast forms are tested against).
__all__ = (
  "AscentDirection",
  "BsamState",
  "DecoupledWsamState",
  "DirectionFn",
  "FriendlyAscentState",
  "LookSamState",
  "LookbehindSamState",
  "LossFn",
  "MomentumSamState",
  "PreconditionedAscentState",
  "ReweightedAscentState",
  "SampaState",
  "SharpnessAwareStep",
  "SigmaCalibration",
  "SplitLoss",
  "VarianceSuppressedAscentState",
  "adaptive_scale",
  "asam",
  "ascent_set_ascent",
  "bsam",
  "bsam_variance",
  "calibrate_sigma",
  "centralize",
  "centralized_ascent",
  "clean_gradient_ascent",
  "data_parallel_m_sam",
  "diagnostics",
  "esam",
  "f_sam",
  "finite_difference_gradient_norms",
  "friendly_ascent",
  "functional_sam",
  "gcsam",
  "gibbs_weights",
  "gradient_centralization",
  "gsam",
  "look_sam",
  "lookbehind_sam",
  "m_sam",
  "momentum_sam",
  "multi_step_sam",
  "n_sam",
  "not_bias_mask",
  "per_example_gradient_norms",
  "preconditioned_ascent",
  "preconditioned_sam",
  "reference",
  "reweighted_ascent",
  "rw_asam",
  "rw_sam",
  "sam",
  "sampa",
  "sharpness_aware",
  "sharpness_aware_step",
  "usam",
  "variance_suppressed_ascent",
  "vasso",
  "wsam",
)
