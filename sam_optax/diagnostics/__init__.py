"""Diagnostics of sharpness and gradient noise, the quantities SAM's theory uses.

Every function is pure, works on any parameter pytree, and takes the same
per-example ``loss_fn(params, batch)`` as the transforms. The dataset is
``data``, one pytree whose leaves share a leading axis of ``N`` examples (NumPy
arrays may stay in host memory); ``chunk_size`` bounds how many examples are
processed at once (results are averages over examples, whatever the
chunking):

>>> data = batch  # the dataset: leaves share a leading axis of N examples
>>> key = jax.random.key(0)
>>> noise = sam_optax.diagnostics.gradient_noise(loss_fn, params, data,
...                                              chunk_size=4)
>>> trace = sam_optax.diagnostics.hessian_trace(loss_fn, params, data, key,
...                                             num_probes=64)
>>> top = sam_optax.diagnostics.hessian_top_eigenpair(loss_fn, params, data,
...                                                   key)
>>> bool(top.value <= trace.mean + 3 * trace.standard_error)  # λ_max <= tr H
True

Curvature: :func:`hessian_vector_product`, :func:`hessian_trace` (Hutchinson),
:func:`hessian_top_eigenpair` (Lanczos). Gradient noise: :func:`mean_gradient`,
:func:`gradient_noise` (``tr Σ``), :func:`micro_batch_gradient_sq_norm`
(``E_S‖g_S‖²`` exactly), :func:`sample_micro_batch_gradients` (sampled
``E_S‖g_S‖²`` and ``E_S‖g_S − ∇L‖``). Per-example gradient norms (exact, and
RW-SAM's finite-difference estimate) are :func:`sam_optax.per_example_gradient_norms`
and :func:`sam_optax.finite_difference_gradient_norms`.

Call them as they are: the work on one chunk of examples is compiled with
``jax.jit`` (``loss_fn`` static, so later calls with the same ``loss_fn``
reuse it), and the loops over chunks, probe groups and Lanczos steps run in
Python around it (XLA's CPU backend runs model code inside ``lax`` loops 5–7×
slower, measured on a small CNN). They can be traced inside your own ``jit``
too, but the loops then unroll into one program: keep the number of chunks,
probe groups and Lanczos steps small there, or call them outside ``jit``.
"""

from sam_optax.diagnostics._estimate import Estimate
from sam_optax.diagnostics._hessian import hessian_top_eigenpair
from sam_optax.diagnostics._hessian import hessian_trace
from sam_optax.diagnostics._hessian import hessian_vector_product
from sam_optax.diagnostics._hessian import HessianEigenpair
from sam_optax.diagnostics._noise import gradient_noise
from sam_optax.diagnostics._noise import GradientNoise
from sam_optax.diagnostics._noise import mean_gradient
from sam_optax.diagnostics._noise import micro_batch_coefficient
from sam_optax.diagnostics._noise import micro_batch_gradient_sq_norm
from sam_optax.diagnostics._noise import MicroBatchGradients
from sam_optax.diagnostics._noise import sample_micro_batch_gradients

__all__ = (
  "Estimate",
  "GradientNoise",
  "HessianEigenpair",
  "MicroBatchGradients",
  "gradient_noise",
  "hessian_top_eigenpair",
  "hessian_trace",
  "hessian_vector_product",
  "mean_gradient",
  "micro_batch_coefficient",
  "micro_batch_gradient_sq_norm",
  "sample_micro_batch_gradients",
)
