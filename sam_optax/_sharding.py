"""What a traced array's type says about how it is spread over devices.

Two readings, for the two ways a step runs on several devices:

* Under ``jax.jit`` with explicit mesh axes (``jax.sharding.AxisType.Explicit``)
  an array's type carries its sharding: :func:`explicit_shards` and
  :func:`split_leading_axis_sharding` keep a sharded batch sharded when it is
  split into micro-batches.
* Inside ``jax.shard_map`` an array's type carries the manual mesh axes along
  which it may differ between devices (its varying axes):
  :func:`varying_axes`, and :func:`local_copy` to differentiate with respect
  to a device's own copy of replicated parameters.
"""

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

AxisName = Hashable | tuple[Hashable, ...]
"""A mesh axis name, or a tuple of them."""


def as_axes(
  axis_name: AxisName | list[Hashable],
  argument: str = "axis_name",
  name: str = "sam_optax",
) -> tuple[Hashable, ...]:
  """``axis_name`` as a tuple of mesh axis names (a list is taken as one).

  Raises:
    ValueError: if it is empty, or a name is not hashable (or None).
  """
  axes = (
    tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  )
  if not axes or any(
    axis is None or not isinstance(axis, Hashable) for axis in axes
  ):
    raise ValueError(
      f'{name}: {argument} must be a mesh axis name (e.g. "data") or a'
      f" tuple or list of them, got {axis_name!r}."
    )
  return axes


def explicit_shards(x: jax.Array) -> int:
  """Over how many devices the leading axis of ``x`` is explicitly sharded.

  1 unless ``x`` lives on a mesh with explicit axes and its leading axis is
  sharded.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if (
    sharding is None
    or mesh is None
    or not getattr(mesh, "are_all_axes_explicit", False)
  ):
    return 1
  spec = tuple(sharding.spec)
  if not spec or spec[0] is None:
    return 1
  return jnp.shape(x)[0] // sharding.shard_shape(jnp.shape(x))[0]


def split_leading_axis_sharding(x: jax.Array, count: int, name: str) -> Any:
  """The sharding of ``x.reshape(count, -1, ...)`` under explicit mesh axes.

  Explicit sharding asks for the output sharding of a reshape that splits a
  sharded axis: the leading axis's sharding moves to the new leading axis
  of size ``count``, so each device holds whole groups. None where JAX infers
  it (no explicit sharding, the usual case).

  Raises:
    ValueError: if the number of shards does not divide ``count``.
  """
  shards = explicit_shards(x)
  if shards == 1:
    return None
  if count % shards:
    raise ValueError(
      f"{name}: the batch axis is sharded over {shards} devices, which must"
      f" divide the number of micro-batches {count} (each device holds whole"
      " micro-batches)."
    )
  sharding = jax.typeof(x).sharding
  spec = tuple(sharding.spec)
  new_spec = jax.sharding.PartitionSpec(spec[0], None, *spec[1:])
  return jax.sharding.NamedSharding(sharding.mesh, new_spec)


def varying_axes(x: Any) -> frozenset[Hashable]:
  """The manual mesh axes along which ``x`` may differ between devices."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", ()))  # earlier versions


def local_copy(tree: Any, axes: tuple[Hashable, ...]) -> Any:
  """Marks ``tree`` as varying over ``axes``, so gradients w.r.t. it stay local.

  Inside ``jax.shard_map`` (with ``check_vma=True``, the default) the gradient
  with respect to a replicated value is summed over the devices, because the
  transpose of the implicit broadcast is a ``psum``. Differentiating with
  respect to a copy cast to "varying" (``jax.lax.pcast``) keeps each device's
  own gradient. A no-op where ``tree`` already varies, without
  ``check_vma``, and for axes that are not manual mesh axes (those bound by
  ``jax.vmap(..., axis_name=...)``, under which the gradient with respect to
  an unmapped value is already each instance's own).
  """
  mesh = jax.sharding.get_abstract_mesh()
  manual = frozenset(getattr(mesh, "manual_axes", axes))
  axes = tuple(a for a in axes if a in manual)

  def leaf(x: jax.Array) -> jax.Array:
    missing = tuple(a for a in axes if a not in varying_axes(x))
    if not missing:
      return x
    if hasattr(jax.lax, "pcast"):
      return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # type: ignore[attr-defined]  # jax < 0.8

  return jax.tree.map(leaf, tree)
