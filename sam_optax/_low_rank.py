r"""m-SAM's low-rank form: dense layers without per-micro-batch weight copies.

For a dense layer ``y = x W`` the mean gradient of micro-batch ``j`` is
``G_j = X_jᵀ Δ_j``, with ``X_j`` the layer's input on the ``n`` rows of the
micro-batch (its examples, times tokens for a sequence model) and ``Δ_j`` the
cotangent of the layer's output. So ``G_j`` has rank at most ``n`` and m-SAM's
perturbation of the layer, ``ε_j = c_j G_j`` with ``c_j = ρ / (‖g_j‖ + δ)``
(``c_j = ρ`` for m-USAM; ``‖g_j‖`` over every perturbed leaf), never needs to
be materialized:

.. math::
  x' (W + c_j G_j) = x' W + c_j\, (x' X_j^\top)\, \Delta_j, \qquad
  \|X_j^\top \Delta_j\|_F^2 = \langle X_j X_j^\top,\ \Delta_j \Delta_j^\top
  \rangle.

``x' W`` is one matmul for the whole batch, shared by every micro-batch; the
rest are ``n × n`` products per micro-batch. Differentiating the perturbed
loss with ``X_j``, ``Δ_j`` and ``c_j`` held constant gives exactly the
perturbed gradients: ``Σ_j x'_jᵀ Δ'_j`` for ``W`` (one matmul again) and
``Δ'_j (W + c_j G_j)ᵀ`` for ``x'``. The ``Δ_j`` of every layer come from one
clean backward pass: a zero *tap* is added to each factored layer's output
and the per-micro-batch mean losses are differentiated with respect to the
taps (not the weights, whose per-micro-batch gradients are never formed).

A factored layer is cheaper than its per-micro-batch copy where
``n (d_in + d_out) < d_in d_out`` (the factors against the matrix): MLPs,
short sequences, small ``m``. Every other parameter leaf (biases, LayerNorm
scales, convolutions, embedding tables, layers where the copy is cheaper,
anything not recognized) is perturbed by a per-micro-batch copy of that leaf
alone, as the ``"vmap"`` form does for every leaf, so the result is the same
whichever leaves are factored (to float32 rounding).

How dense layers are found, and why this way: the step traces ``loss_fn`` on
one micro-batch to a jaxpr (with ``jax.disable_jit``, so nested ``jit``\ s
are inlined) and interprets it, recognizing a ``dot_general`` one of whose
operands is a parameter leaf (through casts, reshapes, transposes and
unit-dimension broadcasts, each used once) and the other depends on the
batch. The alternatives were Flax's method interception (``nn.intercept_methods``
sees ``Dense`` calls, but only Linen's, not NNX models, not plain functions,
and a module's ``__call__`` does not say how its kernel is used inside) and
a layer-tagging library (kfac-jax pattern-matches jaxprs into tagged dense
layers: the same idea as here, with a dependency and its own model of which
graphs are layers). The jaxpr needs nothing from the user and works for any
``loss_fn``, Flax's included. Its rule for what it may factor is deliberately
narrow: a leaf is factored only if its *single* use is such a
``dot_general`` without batch dimensions, and its ``perturb_mask`` entry is
a Python bool; a leaf used twice (tied embeddings, shared layers), inside a
nested primitive (``scan``, ``cond``, ``custom_jvp``), by a gather or a
convolution, or in any other way, keeps the copy. An unrecognized leaf costs
memory, never exactness.

The micro-batches are mapped with ``jax.vmap`` (the factored weights
unbatched), so a ``loss_fn`` that couples the examples of a batch (BatchNorm
in training mode) sees each micro-batch alone, as in the other forms, and a
batch sharded over devices keeps each device's micro-batches where they live.
"""

from collections.abc import Sequence
import functools
import math
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.extend as jex
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

from sam_optax import _contract
from sam_optax import _micro_batches
from sam_optax import _perturbation

_VIEWS = frozenset(
  {"convert_element_type", "reshape", "transpose", "squeeze", "copy", "copy_p"}
)
"""Primitives through which a weight may reach its ``dot_general``."""


class DenseLayer(NamedTuple):
  """A factorable use of a parameter leaf: ``dot_general(activation, W')``.

  Attributes:
    leaf: the index of the parameter leaf in ``jax.tree.leaves(params)``.
    eqn: the index of the ``dot_general`` equation in the traced jaxpr.
    weight_operand: which operand of the ``dot_general`` is the weight (0/1).
    rows: ``n``, the activation's non-contracted size on one micro-batch.
    d_in: the contracted size.
    d_out: the weight's non-contracted size.
  """

  leaf: int
  eqn: int
  weight_operand: int
  rows: int
  d_in: int
  d_out: int

  @property
  def factored_size(self) -> int:
    """``n (d_in + d_out)``: the entries of ``X_j`` and ``Δ_j``."""
    return self.rows * (self.d_in + self.d_out)

  @property
  def matrix_size(self) -> int:
    """``d_in d_out``: the entries of the weight (and of one copy)."""
    return self.d_in * self.d_out


class Plan(NamedTuple):
  """How :func:`mean_gradient` treats each leaf, for one micro-batch shape.

  Attributes:
    jaxpr: ``loss_fn`` traced on one micro-batch (leaves, then batch leaves).
    layers: every recognized dense layer, factored or not.
    factored: the layers the step factors, by equation index.
    copied: the indices of the perturbed leaves that get per-micro-batch copies.
    frozen: the indices of the leaves ``perturb_mask`` excludes statically.
  """

  jaxpr: Any
  layers: tuple[DenseLayer, ...]
  factored: dict[int, DenseLayer]
  copied: tuple[int, ...]
  frozen: tuple[int, ...]


def _is_static_bool(value: Any) -> bool:
  return isinstance(value, (bool, np.bool_))


def _atoms_are_vars(atoms: Sequence[Any]) -> list[Any]:
  return [a for a in atoms if not isinstance(a, jex.core.Literal)]


def find_dense_layers(jaxpr: Any, num_params: int) -> tuple[DenseLayer, ...]:
  """The parameter leaves whose single use is a dense layer of the batch.

  ``jaxpr`` takes the ``num_params`` parameter leaves first, then the batch
  leaves. A leaf qualifies if it reaches one ``dot_general`` without batch
  dimensions through single-use views (:data:`_VIEWS`, and
  ``broadcast_in_dim`` that only adds unit dimensions), and the other operand
  depends on the batch.
  """
  inner = jaxpr.jaxpr
  uses: dict[Any, int] = {}
  consumer: dict[Any, int] = {}
  for index, eqn in enumerate(inner.eqns):
    for var in _atoms_are_vars(eqn.invars):
      uses[var] = uses.get(var, 0) + 1
      consumer[var] = index
  for var in _atoms_are_vars(inner.outvars):
    uses[var] = uses.get(var, 0) + 2  # an output is never a single use

  batch_dependent = set(inner.invars[num_params:])
  for eqn in inner.eqns:
    if any(v in batch_dependent for v in _atoms_are_vars(eqn.invars)):
      batch_dependent.update(eqn.outvars)

  layers = []
  for leaf, var in enumerate(inner.invars[:num_params]):
    while uses.get(var, 0) == 1:
      eqn = inner.eqns[consumer[var]]
      name = eqn.primitive.name
      unit_broadcast = name == "broadcast_in_dim" and math.prod(
        eqn.outvars[0].aval.shape
      ) == math.prod(var.aval.shape)
      if (name in _VIEWS or unit_broadcast) and len(eqn.invars) == 1:
        var = eqn.outvars[0]
        continue
      if name != "dot_general" or eqn.invars[0] is eqn.invars[1]:
        break
      (contract_0, contract_1), (batch_0, batch_1) = eqn.params[
        "dimension_numbers"
      ]
      if batch_0 or batch_1:
        break
      weight_operand = 0 if eqn.invars[0] is var else 1
      activation = eqn.invars[1 - weight_operand]
      if activation not in batch_dependent:
        break
      w_contract = (contract_0, contract_1)[weight_operand]
      w_shape = var.aval.shape
      a_shape = activation.aval.shape
      d_in = math.prod(w_shape[i] for i in w_contract)
      layers.append(
        DenseLayer(
          leaf=leaf,
          eqn=consumer[var],
          weight_operand=weight_operand,
          rows=math.prod(a_shape) // max(d_in, 1),
          d_in=d_in,
          d_out=math.prod(w_shape) // max(d_in, 1),
        )
      )
      break
  return tuple(layers)


def _trace(loss_fn: _contract.LossFn, params: Any, micro_batch: Any) -> Any:
  """``loss_fn`` on one micro-batch as a closed jaxpr, nested jits inlined."""
  leaves, treedef = jax.tree.flatten(params)

  def flat_loss(leaves: list[Any], micro_batch: Any) -> jax.Array:
    return loss_fn(jax.tree.unflatten(treedef, leaves), micro_batch)

  shapes = lambda tree: jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
  )
  with jax.disable_jit():
    return jax.make_jaxpr(flat_loss)(shapes(leaves), shapes(micro_batch))


def make_plan(
  loss_fn: _contract.LossFn,
  params: Any,
  micro_batch: Any,
  mask: Any | None,
) -> Plan:
  """Which leaves to factor, copy or leave alone for micro-batches like
  ``micro_batch`` (one micro-batch, leaves ``[m, ...]``)."""
  leaves = jax.tree.leaves(params)
  masks = [True] * len(leaves) if mask is None else jax.tree.leaves(mask)
  jaxpr = _trace(loss_fn, params, micro_batch)
  layers = find_dense_layers(jaxpr, len(leaves))
  factored = {
    layer.eqn: layer
    for layer in layers
    if _is_static_bool(masks[layer.leaf])
    and masks[layer.leaf]
    and layer.factored_size < layer.matrix_size
  }
  factored_leaves = {layer.leaf for layer in factored.values()}
  frozen = tuple(
    i for i, keep in enumerate(masks) if _is_static_bool(keep) and not keep
  )
  copied = tuple(
    i
    for i in range(len(leaves))
    if i not in factored_leaves and i not in frozen
  )
  return Plan(jaxpr, layers, factored, copied, frozen)


# --- The interpreter ----------------------------------------------------------


def _bind(eqn: Any, operands: Sequence[Any]) -> Any:
  """Applies ``eqn``'s primitive to ``operands``, as ``jax.core.eval_jaxpr``."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns: Sequence[Any] = ()
  if isinstance(params, tuple):  # jax < 0.8: (subfuns, params)
    subfuns, params = params
  return eqn.primitive.bind(*subfuns, *operands, **params)


def _evaluate(jaxpr: Any, args: Sequence[Any], hooks: dict[int, Any]) -> Any:
  """``jax.core.eval_jaxpr``, with the equations in ``hooks`` replaced.

  ``hooks`` maps an equation index to ``operands -> output``.
  """
  inner = jaxpr.jaxpr
  env: dict[Any, Any] = {}

  def read(atom: Any) -> Any:
    return atom.val if isinstance(atom, jex.core.Literal) else env[atom]

  for var, value in zip(inner.constvars, jaxpr.consts, strict=True):
    env[var] = value
  for var, value in zip(inner.invars, args, strict=True):
    env[var] = value
  for index, eqn in enumerate(inner.eqns):
    operands = [read(atom) for atom in eqn.invars]
    hook = hooks.get(index)
    if hook is not None:
      outputs = [hook(operands)]
    else:
      with eqn.ctx.manager:
        result = _bind(eqn, operands)
      outputs = result if eqn.primitive.multiple_results else [result]
    for var, value in zip(eqn.outvars, outputs, strict=True):
      env[var] = value
  (loss,) = [read(atom) for atom in inner.outvars]
  return loss


def _dims(eqn: Any, layer: DenseLayer) -> tuple[tuple[int, ...], ...]:
  """``(activation contracting, activation free, output's activation axes,
  output's weight axes)`` of a factored ``dot_general``."""
  (contract_0, contract_1), _ = eqn.params["dimension_numbers"]
  a = 1 - layer.weight_operand
  a_contract = tuple((contract_0, contract_1)[a])
  a_rank = len(eqn.invars[a].aval.shape)
  w_rank = len(eqn.invars[layer.weight_operand].aval.shape)
  a_free = tuple(i for i in range(a_rank) if i not in a_contract)
  w_free_count = w_rank - len(a_contract)
  if a == 0:
    out_a = tuple(range(len(a_free)))
    out_w = tuple(range(len(a_free), len(a_free) + w_free_count))
  else:
    out_w = tuple(range(w_free_count))
    out_a = tuple(range(w_free_count, w_free_count + len(a_free)))
  return a_contract, a_free, out_a, out_w


def _dot(x: jax.Array, y: jax.Array, x_axes: Any, y_axes: Any) -> jax.Array:
  return lax.dot_general(
    x,
    y,
    ((tuple(x_axes), tuple(y_axes)), ((), ())),
    preferred_element_type=jnp.float32,
  )


def _correction(
  eqn: Any,
  layer: DenseLayer,
  activation: jax.Array,
  inputs: jax.Array,
  cotangent: jax.Array,
  factor: jax.Array,
) -> jax.Array:
  """``c (x' Xᵀ) Δ`` in the layout of the ``dot_general``'s output.

  Computed as ``(x' (X/s)ᵀ) (c s Δ)`` with ``s = max |X|``: ``c s Δ`` is
  bounded by ``ρ``-sized numbers whatever the scale of ``X`` and ``Δ``, so
  neither this product nor its backward pass overflows for a huge gradient.
  """
  a_contract, a_free, out_a, out_w = _dims(eqn, layer)
  inputs = inputs.astype(jnp.float32)
  scale = _perturbation.magnitude_scale(inputs)
  # [free of x', free of X]: the n' × n products of the new and clean rows.
  products = _dot(activation, inputs / scale, a_contract, a_contract)
  scaled = (factor * scale) * cotangent.astype(jnp.float32)
  clean_rows = range(len(a_free), 2 * len(a_free))
  # [free of x', weight's free axes], the order of an activation-first dot.
  correction = _dot(products, scaled, clean_rows, out_a)
  if layer.weight_operand == 0:  # the output puts the weight's axes first
    rows = len(a_free)
    correction = jnp.transpose(
      correction,
      (*range(rows, rows + len(out_w)), *range(rows)),
    )
  return correction.astype(eqn.outvars[0].aval.dtype)


def _factored_norm(
  eqn: Any, layer: DenseLayer, inputs: jax.Array, cotangent: jax.Array
) -> jax.Array:
  """``‖Xᵀ Δ‖_F = sqrt⟨X Xᵀ, Δ Δᵀ⟩``, each factor scaled by its largest entry."""
  a_contract, _, _, out_w = _dims(eqn, layer)
  inputs = inputs.astype(jnp.float32)
  cotangent = cotangent.astype(jnp.float32)
  scale_x = _perturbation.magnitude_scale(inputs)
  scale_d = _perturbation.magnitude_scale(cotangent)
  inputs = inputs / scale_x
  cotangent = cotangent / scale_d
  grams = _dot(inputs, inputs, a_contract, a_contract) * _dot(
    cotangent, cotangent, out_w, out_w
  )
  return scale_x * scale_d * jnp.sqrt(jnp.maximum(jnp.sum(grams), 0.0))


def _combined_norm(norms: Sequence[jax.Array]) -> jax.Array:
  """``sqrt(Σ_l n_l²)`` of per-leaf norms, without overflow."""
  stacked = jnp.stack([jnp.asarray(n, jnp.float32) for n in norms])
  scale = _perturbation.magnitude_scale(stacked)
  return scale * jnp.sqrt(jnp.sum(jnp.square(stacked / scale)))


# --- The step -----------------------------------------------------------------


def _chunk_mean(
  plan: Plan,
  rho: ArrayLike,
  normalize: bool,
  mask_leaves: list[Any],
  leaves: list[Any],
  micro_batches: Any,
) -> list[Any]:
  """``(1/c) Σ_j ∇L_{B_j}(w + ε_j)`` over the leading axis of ``micro_batches``,
  as float32 leaves."""
  eqns = plan.jaxpr.jaxpr.eqns
  factored = plan.factored
  copied = plan.copied

  def with_copied(values: Sequence[Any]) -> list[Any]:
    full = list(leaves)
    for i, value in zip(copied, values, strict=True):
      full[i] = value
    return full

  # The clean pass, per micro-batch: gradients of the copied leaves, and the
  # inputs X_j and output cotangents Δ_j of the factored layers (the taps').
  def clean(
    micro_batch: Any,
  ) -> tuple[list[Any], dict[int, Any], dict[int, Any]]:
    taps = {
      index: jnp.zeros(
        eqns[index].outvars[0].aval.shape, eqns[index].outvars[0].aval.dtype
      )
      for index in factored
    }

    def loss(copies: list[Any], taps: dict[int, Any]) -> tuple[Any, Any]:
      inputs: dict[int, Any] = {}

      def hook(index: int, operands: list[Any]) -> Any:
        eqn = eqns[index]
        layer = factored[index]
        inputs[index] = operands[1 - layer.weight_operand]
        return _bind(eqn, operands) + taps[index]

      hooks = {index: functools.partial(hook, index) for index in factored}
      args = [*with_copied(copies), *jax.tree.leaves(micro_batch)]
      value = jnp.mean(_evaluate(plan.jaxpr, args, hooks))
      return value, inputs

    copies = [leaves[i] for i in copied]
    (grads, cotangents), inputs = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      copies, taps
    )
    return grads, inputs, cotangents

  grads, inputs, cotangents = jax.vmap(clean)(micro_batches)
  grads = [
    _perturbation.apply_mask(g.astype(jnp.float32), mask_leaves[i])
    for i, g in zip(copied, grads, strict=True)
  ]

  if normalize:

    def norm(grads: list[Any], inputs: Any, cotangents: Any) -> jax.Array:
      norms = [_perturbation.global_norm(g) for g in grads]
      norms += [
        _factored_norm(eqns[i], factored[i], inputs[i], cotangents[i])
        for i in factored
      ]
      if not norms:
        return jnp.zeros((), jnp.float32)
      return _combined_norm(norms)

    norms = jax.vmap(norm)(grads, inputs, cotangents)
    factors = jnp.asarray(rho, jnp.float32) / (norms + _perturbation.NORM_EPS)
  else:
    count = jax.tree.leaves(micro_batches)[0].shape[0]
    factors = jnp.full((count,), rho, jnp.float32)

  # The perturbed pass: copies w + c_j g_j of the copied leaves, factored
  # corrections of the dense layers; one gradient of the mean over j.
  def perturbed(
    shared: list[Any],
    grads: list[Any],
    factor: jax.Array,
    inputs: Any,
    cotangents: Any,
    micro_batch: Any,
  ) -> jax.Array:
    full = list(shared)
    for i, g in zip(copied, grads, strict=True):
      full[i] = (shared[i] + factor * g).astype(jnp.result_type(shared[i]))

    def hook(index: int, operands: list[Any]) -> Any:
      eqn = eqns[index]
      layer = factored[index]
      return _bind(eqn, operands) + _correction(
        eqn,
        layer,
        operands[1 - layer.weight_operand],
        inputs[index],
        cotangents[index],
        factor,
      )

    hooks = {index: functools.partial(hook, index) for index in factored}
    args = [*full, *jax.tree.leaves(micro_batch)]
    return jnp.mean(_evaluate(plan.jaxpr, args, hooks))

  def total(shared: list[Any]) -> jax.Array:
    losses = jax.vmap(perturbed, in_axes=(None, 0, 0, 0, 0, 0))(
      shared, grads, factors, inputs, cotangents, micro_batches
    )
    return jnp.mean(losses)

  gradient = jax.grad(total)(list(leaves))
  return [g.astype(jnp.float32) for g in gradient]


def mean_gradient(
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  micro_batch_size: int,
  *,
  rho: ArrayLike,
  normalize: bool = True,
  perturb_mask: _perturbation.PerturbMask = None,
  micro_batches_per_chunk: int | None = None,
  name: str = "m_sam",
) -> Any:
  r"""m-SAM's gradient ``(1/k) Σ_j ∇L_{B_j}(w + ε_j)`` in the low-rank form.

  The same value as :func:`sam_optax.m_sam`'s other forms (float32 leaves,
  like ``params``); see the module docstring for how it is computed.

  Raises:
    ValueError: if ``m`` does not divide ``B`` or the chunk does not divide
      ``k``.
  """
  count = _micro_batches.num_micro_batches(batch, micro_batch_size, name)
  micro_batches = _micro_batches.split_micro_batches(
    batch, micro_batch_size, name
  )
  per_chunk = _micro_batches.micro_batches_per_chunk_or_all(
    micro_batches_per_chunk, count, name
  )
  mask = _perturbation.resolve_mask(perturb_mask, params, name)
  leaves, treedef = jax.tree.flatten(params)
  mask_leaves = [None] * len(leaves) if mask is None else jax.tree.leaves(mask)
  one = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro_batches
  )
  plan = make_plan(loss_fn, params, one, mask)
  chunk_mean = functools.partial(_chunk_mean, plan, rho, normalize, mask_leaves)
  if per_chunk == count:
    mean = chunk_mean(leaves, micro_batches)
  else:
    mean = optax.microbatching.microbatch(
      chunk_mean,
      argnums=1,
      microbatch_size=per_chunk,
      accumulator=optax.microbatching.AccumulationType.MEAN,
    )(leaves, micro_batches)
  return jax.tree.unflatten(treedef, mean)


# --- Cost ---------------------------------------------------------------------


class CostEstimate(NamedTuple):
  """A static model of the bytes one m-SAM step holds beyond SAM's.

  Per perturbed leaf of ``P`` entries a per-micro-batch copy holds ``3 k P``
  entries (each micro-batch's perturbation, perturbed weight and gradient);
  a factored layer holds ``X_j`` and ``Δ_j``, ``2 k n (d_in + d_out)``
  entries counting the clean and perturbed passes' reads, plus its one
  shared gradient, ``P``. The activations of the forward-backward, common
  to both forms, are left out. A model to rank the forms, not a measurement
  (``experiments/low_rank_benchmark.py`` measures them).

  Attributes:
    low_rank: bytes of the low-rank form (factored where cheaper, else copies).
    copies: bytes of the per-micro-batch-copy forms (``"vmap"``,
      ``"unrolled"``), every perturbed leaf copied.
    layers: every recognized dense layer.
    factored: the leaf indices the low-rank form factors.
  """

  low_rank: int
  copies: int
  layers: tuple[DenseLayer, ...]
  factored: tuple[int, ...]


def estimated_bytes(
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  micro_batch_size: int,
  *,
  perturb_mask: _perturbation.PerturbMask = None,
  micro_batches_per_chunk: int | None = None,
) -> CostEstimate:
  """The :class:`CostEstimate` of m-SAM's forms on this model and batch.

  Traces ``loss_fn`` (shapes only; callable on concrete or abstract
  arguments), so it costs a trace, not a step.

  Args:
    loss_fn: ``(params, batch) -> per-example losses``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    batch: the whole batch (arrays or ``jax.ShapeDtypeStruct``).
    micro_batch_size: ``m``.
    perturb_mask: as for :func:`sam_optax.m_sam`.
    micro_batches_per_chunk: the micro-batches in flight, ``c`` (None: all).
  """
  name = "estimated_bytes"
  count = _micro_batches.num_micro_batches(batch, micro_batch_size, name)
  in_flight = micro_batches_per_chunk or count
  one = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(
      (micro_batch_size, *jnp.shape(x)[1:]), jnp.result_type(x)
    ),
    batch,
  )
  mask = _perturbation.resolve_mask(perturb_mask, params, name)
  plan = make_plan(loss_fn, params, one, mask)
  leaves = jax.tree.leaves(params)
  size = lambda i: (
    math.prod(jnp.shape(leaves[i]))
    * jnp.dtype(jnp.result_type(leaves[i])).itemsize
  )
  perturbed = [i for i in range(len(leaves)) if i not in plan.frozen]
  copies = sum(3 * in_flight * size(i) for i in perturbed)
  low_rank = sum(3 * in_flight * size(i) for i in plan.copied)
  for layer in plan.factored.values():
    itemsize = size(layer.leaf) // max(layer.matrix_size, 1)
    low_rank += size(layer.leaf)
    low_rank += 2 * in_flight * layer.factored_size * max(itemsize, 4)
  return CostEstimate(
    low_rank=low_rank,
    copies=copies,
    layers=plan.layers,
    factored=tuple(sorted(layer.leaf for layer in plan.factored.values())),
  )
