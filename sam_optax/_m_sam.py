"""m-SAM: a SAM step on every micro-batch, all at once, averaged.

m-SAM splits the batch into ``k = B / m`` contiguous micro-batches, perturbs
each with its own gradient and averages the perturbed gradients. The papers'
code runs the micro-batches one after another; here one micro-batch's step is
written once (it *is* a :func:`sam` step on that micro-batch) and mapped over
the micro-batches in one of the forms of :mod:`sam_optax._micro_batches`,
which ``implementation="auto"`` picks by a cost model.
"""

from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _low_rank
from sam_optax import _micro_batches
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _transform

Implementation = _micro_batches.Implementation | Literal["low_rank"]
IMPLEMENTATIONS = (*_micro_batches.IMPLEMENTATIONS, "low_rank")
"""m-SAM's forms: those of :mod:`sam_optax._micro_batches`, and the low-rank
form of :mod:`sam_optax._low_rank`."""

LOW_RANK_SAVING = 0.5
"""``"auto"`` takes ``"low_rank"`` where its parameter-sized bytes are at
most this fraction of the per-micro-batch copies' (see :func:`takes_low_rank`).
"""

LOW_RANK_WEIGHT_FRACTION = 0.5
"""... and where weight copies are more than this share of one micro-batch's
working set (:attr:`sam_optax._micro_batches.Workload.weight_fraction`): where
activations dominate, the copies cost little and the copy forms keep their
measured lead (transformer LMs and CNNs of the scaling benchmark: 0.05)."""


def takes_low_rank(
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  micro_batch_size: int,
  *,
  perturb_mask: _perturbation.PerturbMask = None,
  micro_batches_per_chunk: int | None = None,
) -> bool:
  """Whether ``implementation="auto"`` takes the low-rank form.

  It does where the saving is large and nothing in it is a known slow path:
  the low-rank form's parameter-sized bytes
  (:func:`sam_optax._low_rank.estimated_bytes`) are at most
  :data:`LOW_RANK_SAVING` of the copy forms', weights outweigh activations
  (:data:`LOW_RANK_WEIGHT_FRACTION`), the batch is not sharded over devices
  (the copy forms' ``"vmap"`` is the measured form there) and, on a CPU, the
  model has no convolution (the low-rank form maps the leaves it copies with
  ``jax.vmap``: XLA:CPU's grouped convolutions). Measured on the 64-layer
  tanh MLP (BENCHMARKS.md, the guide's m-SAM page): 0.97× SAM's step at
  ``m = 16`` against 2.9× for the best copy form. Shapes only: it traces
  ``loss_fn``, nothing runs.
  """
  if any(jnp.result_type(x) == jnp.float64 for x in jax.tree.leaves(params)):
    return False  # the low-rank form computes in float32
  micro_batches = _micro_batches.split_micro_batches(
    batch, micro_batch_size, "m_sam"
  )
  work = _micro_batches.workload(params, micro_batches, loss_fn)
  if (
    work.sharded
    or (work.backend == "cpu" and work.has_convolutions)
    or work.weight_fraction <= LOW_RANK_WEIGHT_FRACTION
  ):
    return False
  estimate = _low_rank.estimated_bytes(
    loss_fn,
    params,
    batch,
    micro_batch_size,
    perturb_mask=perturb_mask,
    micro_batches_per_chunk=micro_batches_per_chunk,
  )
  return bool(estimate.factored) and (
    estimate.low_rank <= LOW_RANK_SAVING * estimate.copies
  )


def micro_batch_step(
  sam_step: optax.GradientTransformationExtraArgs,
  loss_fn: _contract.LossFn,
) -> _micro_batches.MicroBatchStep:
  """One micro-batch's step: exactly a :func:`sam` (or :func:`usam`) update.

  Returns ``(params, micro_batch) -> ∇L_{B_j}(w + ε_j)`` in float32 at least
  (float64 for float64 parameters), so that the average over micro-batches
  accumulates in float32, or float64 under ``jax_enable_x64``.
  """

  def step(params: Any, micro_batch: Any) -> Any:
    gradient, _ = sam_step.update(
      None, optax.EmptyState(), params, loss_fn=loss_fn, batch=micro_batch
    )
    return jax.tree.map(
      lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), gradient
    )

  return step


def m_sam(
  rho: ArrayLike,
  micro_batch_size: int,
  *,
  normalize: bool = True,
  implementation: Implementation = "auto",
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

  All micro-batches together take the FLOPs of one SAM step on the whole
  batch; ``implementation`` picks how they are laid out:

  - ``"vmap"``: ``jax.vmap`` of the per-micro-batch step. Each micro-batch
    has its own perturbed weights, so its layers become batched matrix
    products and grouped convolutions. One program whatever ``k``; the form
    for GPUs and TPUs; and it shards: under ``jax.jit`` with the batch
    sharded over ``D`` devices and ``m = B/D``, each device computes its own
    micro-batch and one all-reduce averages the gradients (see
    :func:`data_parallel_m_sam` for the explicit ``shard_map`` form).
  - ``"unrolled"``: a Python loop inside the traced function: ``k``
    independent subgraphs, dense layers only, which XLA schedules freely.
    The fastest form on a CPU where the model has few leaves (the small
    CNN: 0.72× SAM's step time, against 1.9–2.3× for ``"vmap"``), but
    compile time and program size grow with ``k`` times the leaves.
  - ``"sequential"``: a ``lax.scan`` over the micro-batches inside the step,
    adding each micro-batch's gradient to a float32 sum: one micro-batch's
    perturbed weights and gradient in flight, one compiled body whatever
    ``k``. The form for models whose weights outweigh their activations
    with many leaves on a CPU; slow where the loop body has convolutions on
    XLA:CPU (the small CNN: 11× SAM).
  - ``"low_rank"``: dense layers are not copied per micro-batch. A dense
    layer's micro-batch gradient ``G_j = X_jᵀ Δ_j`` has rank at most the
    micro-batch's rows ``n``, so ``x'(W + c_j G_j) = x'W + c_j (x'X_jᵀ) Δ_j``:
    one shared matmul plus ``n × n`` products (:mod:`sam_optax._low_rank`).
    Layers are found by tracing ``loss_fn``; a layer is factored where
    ``n (d_in + d_out) < d_in d_out``, and every other leaf (biases,
    convolutions, embeddings, anything unrecognized) gets per-micro-batch
    copies of that leaf alone. The same result as the other forms; on a
    64-layer MLP about SAM's bytes and memory at any ``m`` (1-SAM included)
    where the copy forms hold ``k`` weight copies (the guide's m-SAM page).
  - ``"auto"`` (default): the cheapest of the above by a cost model
    (:mod:`sam_optax._micro_batches`): it reads the parameter bytes and
    leaves, one micro-batch's activation bytes and whether there are
    convolutions (from the jaxpr of ``loss_fn`` on one micro-batch: shapes
    only, nothing runs), ``k``, the backend and whether the batch is
    sharded. First, ``"low_rank"`` where it saves at least half the
    parameter-sized bytes and weights outweigh activations, without
    convolutions on a CPU and unsharded (:func:`takes_low_rank`: deep MLPs).
    Otherwise, on a CPU it unrolls while ``k`` × leaves ≤ 512 (compile
    time) and activations outweigh weights, else takes ``"sequential"``
    without convolutions and ``"vmap"`` with them; on an accelerator it
    takes ``"vmap"``, in chunks where ``k`` copies would not fit in half the
    device memory; a sharded batch always takes ``"vmap"``. The table of
    what it picks is in the guide's m-SAM page.

  Memory: with ``c`` micro-batches in flight, a step holds about
  ``c · (A_m + 3P)`` floats on top of its inputs, with ``P`` the number of
  parameters (each micro-batch's perturbation, perturbed weights and
  gradient) and ``A_m`` the activations of one micro-batch's
  forward-backward; with ``c = k`` that is SAM's activation memory
  ``A_B = k A_m`` plus ``3kP``. ``micro_batches_per_chunk = c`` bounds it:
  chunks of ``c`` micro-batches run one after another in a loop
  (``optax.microbatching.microbatch``, a ``lax.fori_loop``), each chunk
  mapped as above. ``c = k`` (or None) is one chunk; ``c = 1``
  is one micro-batch at a time, as ``"sequential"``. On a CPU, XLA (jax 0.10) runs the
  backward convolutions inside loop bodies without its YNNPACK kernels, so
  chunked steps took 7–20× SAM's time there with convolutions: chunk for
  memory on accelerators. The chunk loop averages in float32; which micro-batches
  share a chunk does not change the result.

  Args:
    rho: the perturbation radius ``ρ``.
    micro_batch_size: ``m``, the examples per micro-batch; must divide the
      batch size.
    normalize: m-SAM (True) or m-USAM (False, ``ε_j = ρ g_{B_j}``).
    implementation: ``"auto"``, ``"vmap"``, ``"unrolled"`` or
      ``"sequential"`` or ``"low_rank"``, see above.
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
    implementation, IMPLEMENTATIONS, "implementation", name
  )
  if micro_batches_per_chunk is not None:
    micro_batches_per_chunk = _contract.check_integer(
      micro_batches_per_chunk, "micro_batches_per_chunk", name
    )
  sam_step = (_sam.sam if normalize else _sam.usam)(
    rho, perturb_mask=perturb_mask
  )

  def gradient_fn(loss_fn: _contract.LossFn, params: Any, batch: Any) -> Any:
    low_rank = implementation == "low_rank" or (
      implementation == "auto"
      and takes_low_rank(
        loss_fn,
        params,
        batch,
        micro_batch_size,
        perturb_mask=perturb_mask,
        micro_batches_per_chunk=micro_batches_per_chunk,
      )
    )
    if low_rank:
      return _low_rank.mean_gradient(
        loss_fn,
        params,
        batch,
        micro_batch_size,
        rho=rho,
        normalize=normalize,
        perturb_mask=perturb_mask,
        micro_batches_per_chunk=micro_batches_per_chunk,
        name=name,
      )
    assert implementation != "low_rank"  # taken above
    return _micro_batches.mean_over_micro_batches(
      micro_batch_step(sam_step, loss_fn),
      params,
      batch,
      micro_batch_size,
      implementation=implementation,
      micro_batches_per_chunk=micro_batches_per_chunk,
      loss_fn=loss_fn,
      name=name,
    )

  return _transform.from_gradient_fn(gradient_fn, name)
