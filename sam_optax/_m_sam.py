"""m-SAM: a SAM step on every micro-batch, all at once, averaged.

m-SAM splits the batch into ``k = B / m`` contiguous micro-batches, perturbs
each with its own gradient and averages the perturbed gradients. The papers'
code runs the micro-batches one after another; here one micro-batch's step is
written once (it *is* a :func:`sam` step on that micro-batch) and mapped over
the micro-batches (:mod:`sam_optax._micro_batches`).
"""

from typing import Any

import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _micro_batches
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform


def micro_batch_step(
  sam_step: optax.GradientTransformationExtraArgs,
  loss_fn: _contract.LossFn,
) -> _micro_batches.MicroBatchStep:
  """One micro-batch's step: exactly a :func:`sam` (or :func:`usam`) update.

  Returns ``(params, micro_batch) -> ∇L_{B_j}(w + ε_j)`` in float32, so that
  the average over micro-batches accumulates in float32.
  """

  def step(params: Any, micro_batch: Any) -> Any:
    gradient, _ = sam_step.update(
      None, optax.EmptyState(), params, loss_fn=loss_fn, batch=micro_batch
    )
    return optax.tree.cast(gradient, jnp.float32)

  return step


def m_sam(
  rho: ArrayLike,
  micro_batch_size: int,
  *,
  normalize: bool = True,
  implementation: _micro_batches.Implementation = "auto",
  micro_batches_per_chunk: int | None = None,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""m-SAM (and m-USAM): a SAM step on each micro-batch, averaged.

  .. math::
    \varepsilon_j = \rho\, g_{B_j} / (\|g_{B_j}\| + \delta)
    \ (\text{m-USAM: } \rho\, g_{B_j}), \qquad
    \text{returns } \frac{1}{k} \sum_{j=1}^{k}
    \nabla L_{B_j}(w + \varepsilon_j),

  with the batch split into ``k = B / m`` micro-batches ``B_j`` of
  ``m = micro_batch_size`` examples: ``B_j`` is the contiguous slice
  ``[j*m, (j+1)*m)`` of every leaf of ``batch``. ``m = B`` is :func:`sam`
  (:func:`usam` with ``normalize=False``); smaller ``m`` regularizes the
  gradient noise more (2509.18001, Thm 3.5). Each micro-batch needs its own
  clean gradient, so the ``updates`` passed in are not used (None is fine):

  >>> tx = optax.chain(sam_optax.m_sam(0.05, micro_batch_size=2),
  ...                  optax.sgd(0.1, momentum=0.9))
  >>> state = tx.init(params)
  >>> updates, state = tx.update(None, state, params, loss_fn=loss_fn,
  ...                            batch=batch)  # 8 examples: 4 micro-batches

  ``micro_batch_size`` sets shapes, so it stays a Python int: to schedule
  ``rho``, use ``optax.inject_hyperparams(sam_optax.m_sam,
  static_args=("micro_batch_size",))``.

  The micro-batches are processed together, with the FLOPs of one SAM step
  on the whole batch; ``implementation`` picks how:

  - ``"vmap"``: ``jax.vmap`` of the per-micro-batch step. Each micro-batch
    has its own perturbed weights, so its layers become batched matrix
    products and grouped convolutions. One program whatever ``k``; the form
    for GPUs and TPUs; and it shards: under ``jax.jit`` with the batch
    sharded over ``D`` devices and ``m = B/D``, each device computes its own
    micro-batch and one all-reduce averages the gradients (see
    :func:`data_parallel_m_sam` for the explicit ``shard_map`` form).
  - ``"unrolled"``: a Python loop inside the traced function: ``k``
    independent subgraphs, dense layers only, which XLA schedules freely.
    The fastest form on a CPU, where XLA's grouped convolutions are slow
    (measured: about SAM's step time, against 1.8× for ``"vmap"``), but
    compile time and program size grow with ``k``.
  - ``"auto"`` (default): ``"unrolled"`` on a CPU backend for at most 32
    micro-batches in flight and an unsharded batch, ``"vmap"`` otherwise
    (compile time grows with the unrolled count; BENCHMARKS.md).

  Memory: with ``c`` micro-batches in flight, a step holds about
  ``c · (A_m + 3P)`` floats on top of its inputs, with ``P`` the number of
  parameters (each micro-batch's perturbation, perturbed weights and
  gradient) and ``A_m`` the activations of one micro-batch's
  forward-backward; with ``c = k`` that is SAM's activation memory
  ``A_B = k A_m`` plus ``3kP``. ``micro_batches_per_chunk = c`` bounds it:
  chunks of ``c`` micro-batches run one after another in a loop
  (``optax.microbatching.microbatch``, a ``lax.fori_loop``), each chunk
  mapped as above. ``c = k`` (or None) is one chunk, the fastest; ``c = 1``
  is the sequential loop, the leanest. On a CPU, XLA (jax 0.10) runs the
  backward convolutions inside loop bodies without its YNNPACK kernels, so
  chunked steps took 7–20× SAM's time there: chunk for memory on
  accelerators. The chunk loop averages in float32; which micro-batches
  share a chunk does not change the result.

  Args:
    rho: the perturbation radius ``ρ``.
    micro_batch_size: ``m``, the examples per micro-batch; must divide the
      batch size.
    normalize: m-SAM (True) or m-USAM (False, ``ε_j = ρ g_{B_j}``).
    implementation: ``"auto"``, ``"vmap"`` or ``"unrolled"``, see above.
    micro_batches_per_chunk: how many micro-batches are processed at once
      (must divide ``k``); None processes all ``k`` at once.
    perturb_mask: which leaves to perturb; see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless).

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021
    (m-sharpness);
    `Unveiling m-Sharpness Through the Structure of Stochastic Gradient
    Noise <https://arxiv.org/abs/2509.18001>`_, 2025.
  """
  normalize = _contract.check_bool(normalize, "normalize", "m_sam")
  name = "m_sam" if normalize else "m_usam"
  _contract.check_rho(rho, name)
  micro_batch_size = _contract.check_integer(
    micro_batch_size, "micro_batch_size", name
  )
  _contract.check_choice(
    implementation, _micro_batches.IMPLEMENTATIONS, "implementation", name
  )
  if micro_batches_per_chunk is not None:
    micro_batches_per_chunk = _contract.check_integer(
      micro_batches_per_chunk, "micro_batches_per_chunk", name
    )
  sam_step = (_sam.sam if normalize else _sam.usam)(
    rho, perturb_mask=perturb_mask
  )

  def gradient_fn(loss_fn: _contract.LossFn, params: Any, batch: Any) -> Any:
    return _micro_batches.mean_over_micro_batches(
      micro_batch_step(sam_step, loss_fn),
      params,
      batch,
      micro_batch_size,
      implementation=implementation,
      micro_batches_per_chunk=micro_batches_per_chunk,
      name=name,
    )

  return _transform.from_gradient_fn(gradient_fn, name)
