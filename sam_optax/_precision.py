"""The precision a loss computes in with its parameters, read from its jaxpr.

RW-SAM estimates ``‖∇ℓ_i‖`` from ``Δ_i = ℓ_i(w + σv) − ℓ_i(w)``. A model
whose layers compute in bfloat16 (Flax's ``dtype=jnp.bfloat16``) casts
``w + σv`` back to bfloat16 inside the layer, whatever the parameters'
dtype, and a ``σ`` below the bfloat16 spacing of the weights is lost:
``Δ_i`` is then rounding noise. :func:`compute_dtype` finds that cast on
shapes only, once per trace, by following the values derived from the
parameters through the jaxpr of ``loss_fn`` (nested calls, ``custom_jvp``,
``scan``, ``while`` and ``cond`` included). :func:`resolution_floor` is the
loss change that precision cannot tell from rounding, ``ε_c |ℓ_i|``.
"""

from typing import Any

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp

from sam_optax import _contract
from sam_optax import _jaxprs

_LoopCarry = tuple[int, int]  # (index of the first carry input, count)


def _dtype(x: Any) -> Any:
  """``x``'s dtype, extended ones (PRNG keys) included."""
  return getattr(x, "dtype", None) or jnp.result_type(x)


def _is_var(atom: Any) -> bool:
  return not isinstance(atom, jax_core.Literal)


def _float_bits(atom: Any) -> int | None:
  dtype = getattr(getattr(atom, "aval", None), "dtype", None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    return None
  return int(jnp.finfo(dtype).bits)


class _Narrowest:
  """The narrowest floating dtype seen among parameter-derived values."""

  def __init__(self) -> None:
    self.dtype: Any = None

  def see(self, atom: Any) -> None:
    bits = _float_bits(atom)
    if bits is not None and (
      self.dtype is None or bits < jnp.finfo(self.dtype).bits
    ):
      self.dtype = atom.aval.dtype


def _walk(
  jaxpr: Any,
  tainted_inputs: list[bool],
  narrowest: _Narrowest,
  carry: _LoopCarry | None = None,
) -> None:
  """Marks the values derived from tainted inputs, recording their dtypes.

  ``carry``: a loop body's carried inputs (``first`` on, ``count`` of them)
  and its first ``count`` outputs, which feed them: iterated until no new
  carry is tainted.
  """
  while True:
    tainted = {
      var
      for var, flag in zip(jaxpr.invars, tainted_inputs, strict=True)
      if flag
    }
    for var in tainted:
      narrowest.see(var)
    for equation in jaxpr.eqns:
      flags = [_is_var(a) and a in tainted for a in equation.invars]
      if not any(flags):
        continue
      for sub in _jaxprs.sub_jaxprs(equation.params):
        inputs = _sub_inputs(equation, sub, flags)
        _walk(sub, inputs, narrowest, _loop_carry(equation, sub))
      for var in equation.outvars:
        tainted.add(var)
        narrowest.see(var)
    if carry is None:
      return
    first, count = carry
    out = [_is_var(a) and a in tainted for a in jaxpr.outvars[:count]]
    fed = list(tainted_inputs)
    for i, flag in enumerate(out):
      fed[first + i] = fed[first + i] or flag
    if fed == tainted_inputs:
      return
    tainted_inputs = fed


def _sub_inputs(equation: Any, sub: Any, flags: list[bool]) -> list[bool]:
  """Which inputs of a nested jaxpr derive from the parameters."""
  params, n = equation.params, len(sub.invars)
  if equation.primitive.name == "while":
    cond, body = params["cond_nconsts"], params["body_nconsts"]
    loop = flags[cond + body :]
    if sub is _jaxprs.open_jaxpr(params["cond_jaxpr"]):
      return flags[:cond] + loop
    return flags[cond : cond + body] + loop
  if n == len(flags):
    return flags
  if n < len(flags):  # cond: the branch index first, then the operands
    return flags[len(flags) - n :]
  return [any(flags)] * n  # an unknown layout: every input, to be safe


def _loop_carry(equation: Any, sub: Any) -> _LoopCarry | None:
  params = equation.params
  if equation.primitive.name == "scan":
    return params["num_consts"], params["num_carry"]
  if equation.primitive.name == "while" and sub is _jaxprs.open_jaxpr(
    params["body_jaxpr"]
  ):
    return params["body_nconsts"], len(sub.outvars)
  return None


def compute_dtype(loss_fn: _contract.LossFn, params: Any, batch: Any) -> Any:
  """The narrowest floating dtype a value derived from ``params`` takes.

  Traces ``loss_fn(params, batch)`` on shapes only (``jax.make_jaxpr``:
  nothing runs) and follows every value computed from a floating leaf of
  ``params``: a ``convert_element_type`` to bfloat16 before a matmul (what a
  Flax layer with ``dtype=jnp.bfloat16`` does), bfloat16 leaves themselves,
  or any op whose result is narrower. Values from the batch alone (inputs
  cast to bfloat16 and then met by float32 weights) do not count.

  Returns:
    That dtype (e.g. ``jnp.bfloat16``), or None if no floating value derives
    from the parameters.
  """
  shapes = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x), _dtype(x)),
    (params, batch),
  )
  with _contract.shape_check():
    closed = jax.make_jaxpr(loss_fn)(*shapes)
  # Floating parameter leaves only: an integer leaf is not perturbed.
  flags = [
    jnp.issubdtype(leaf.dtype, jnp.floating)
    for leaf in jax.tree.leaves(shapes[0])
  ]
  flags += [False] * (len(closed.jaxpr.invars) - len(flags))
  narrowest = _Narrowest()
  _walk(closed.jaxpr, flags, narrowest)
  return narrowest.dtype


def is_narrow(dtype: Any) -> bool:
  """Whether ``dtype`` is a floating dtype narrower than float32."""
  return (
    dtype is not None
    and jnp.issubdtype(dtype, jnp.floating)
    and jnp.finfo(dtype).bits < 32
  )


RESOLUTION = 0.5
"""``c`` of :func:`unresolved`: a loss change below ``c ε_c |ℓ_i|`` is noise.

Measured by ``experiments/precision_check.py`` (experiments/RESULTS.md, §8;
a CPU): on a 5-7-3 MLP computing in bfloat16, the fraction of a batch of 32
below ``½ ε_c |ℓ_i|`` is 0.90, 0.68, 0.18 and 0.07 at ``σ`` = 1e-4, 1e-3,
1e-2 and 3e-2 (``calibrate_sigma``'s choice), where the 16-probe estimates'
correlation with the exact norms is 0.09, 0.43, 0.91 and 0.92 (0.92 in
float32); float32 models (an MLP, a CNN, an attention block) at
``σ = 1e-4`` have none.
"""


def unresolved(changes: jax.Array, losses: jax.Array, dtype: Any) -> jax.Array:
  """Which loss changes ``|Δ_i|`` are within rounding of ``ℓ_i``.

  ``|Δ_i| ≤ c ε_c |ℓ_i|``, with ``c`` = :data:`RESOLUTION` and ``ε_c`` the
  machine epsilon of the compute dtype ``dtype`` (:func:`compute_dtype`),
  or of float32 if that is narrower (the differences are taken in float32).
  A heuristic floor: a loss ``ℓ_i`` computed in a precision with epsilon
  ``ε_c`` moves by about ``ε_c |ℓ_i|`` under rounding alone. An exact zero
  is always unresolved.

  Returns:
    A boolean vector, shape ``[B]``.
  """
  eps = jnp.finfo(jnp.float32).eps
  if is_narrow(dtype):
    eps = jnp.finfo(dtype).eps
  changes = jnp.abs(changes.astype(jnp.float32))
  floor = RESOLUTION * float(eps) * jnp.abs(losses.astype(jnp.float32))
  return changes <= floor
