"""SAM across data-parallel devices, with a local perturbation by default.

Synchronous data parallelism in which each device perturbs the weights with
its own local gradient and only the perturbed gradients are averaged is m-SAM
with ``m`` = the per-device batch (2509.18001; Foret et al. 2021, where
m-sharpness came from exactly this): it needs no all-reduce in the ascent
step. Synchronizing the ascent gradient over all devices gives mini-batch SAM
on the global batch, at the price of that all-reduce; synchronizing it within
groups of devices gives m-SAM with ``m`` = the group's batch.

:func:`data_parallel_m_sam` is the transform to call inside ``jax.shard_map``
(the explicit form). Under a plain ``jax.jit`` with the batch sharded over
``D`` devices, ``m_sam(rho, micro_batch_size=B // D)`` (its ``"vmap"`` form,
which ``"auto"`` picks for a sharded batch) compiles to the same design: each
device computes its own micro-batch and a single all-reduce averages the
perturbed gradients.

Several hosts run the same program; each loads its part of the global batch::

  jax.distributed.initialize()  # SLURM, Open MPI, TPU pods: auto-detected;
  # else initialize(coordinator_address="host0:1234", num_processes=N,
  #                 process_id=i) on host i.
  mesh = jax.make_mesh((jax.device_count(),), ("data",))  # every host's devices
  batch = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("data")), local_batch)  # B / N examples per host
  params, opt_state = train_step(params, opt_state, batch)  # as below
"""

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _m_sam
from sam_optax import _micro_batches
from sam_optax import _perturbation
from sam_optax import _sam
from sam_optax import _sharding
from sam_optax import _transform


def synced_gradient_ascent(
  sync_axes: tuple[Hashable, ...],
) -> _transform.AscentDirection:
  """``d = mean over sync_axes of g_{B_d}``: the ascent gradient all-reduced.

  Each device's clean gradient on its own shard, averaged (in float32) over
  the devices along ``sync_axes``: the gradient of the union of their shards.
  Runs inside ``jax.shard_map``; ``updates`` is not used.
  """

  def direction(
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    del updates, key, extra_args  # the local gradient is taken here
    gradient = _contract.mean_gradient(loss_fn, params, batch)
    return (
      jax.lax.pmean(optax.tree.cast(gradient, jnp.float32), sync_axes),
      state,
    )

  return _transform.AscentDirection(
    init=lambda params: optax.EmptyState(), direction=direction
  )


def _check_bound(axes: tuple[Hashable, ...], name: str) -> None:
  for axis in axes:
    try:
      jax.lax.axis_size(axis)
    except NameError as error:
      raise NameError(
        f"{name}: the mesh axis {axis!r} is not bound. Call update inside"
        " jax.shard_map over a mesh with that axis (the batch sharded along"
        " it); under a plain jax.jit use m_sam(rho, micro_batch_size=B//D)"
        " on the sharded batch instead."
      ) from error


def _check_batch_axes(
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  axes: tuple[Hashable, ...],
  name: str,
) -> None:
  """Raises if the batch varies over manual mesh axes missing from ``axes``.

  A batch sharded over a mesh axis that ``axis_name`` leaves out makes the
  per-example losses vary over that axis while ``params`` are replicated
  over it, so the gradient with respect to ``params`` is summed over it (the
  transpose of the implicit broadcast is a ``psum``): the update would come
  out scaled by that axis's size, silently. Only shapes and types are
  evaluated (``jax.eval_shape``).
  """
  losses = jax.eval_shape(loss_fn, params, batch)
  varying = _sharding.varying_axes(losses).union(
    *map(_sharding.varying_axes, jax.tree.leaves(batch))
  )
  missing = varying - set(axes)
  if not missing:
    return
  # In the mesh's order, so that the suggested axis_name reads naturally.
  mesh_axes = tuple(jax.sharding.get_abstract_mesh().axis_names)
  order = lambda a: (
    mesh_axes.index(a) if a in mesh_axes else len(mesh_axes),
    str(a),
  )
  missing_axes = tuple(sorted(missing, key=order))
  every = tuple(sorted(set(axes) | set(missing_axes), key=order))
  raise ValueError(
    f"{name}: the batch varies over the mesh axes {missing_axes}, which are not"
    f" in axis_name={axes}; the gradient with respect to the replicated"
    " params would be summed over them (scaled by their size). Pass every"
    f" axis the batch is sharded over, e.g. axis_name={every}."
  )


def data_parallel_m_sam(
  rho: ArrayLike,
  axis_name: _sharding.AxisName,
  *,
  normalize: bool = True,
  sync_perturbation: bool | _sharding.AxisName = False,
  micro_batch_size: int | None = None,
  implementation: _micro_batches.Implementation = "auto",
  micro_batches_per_chunk: int | None = None,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SAM over data-parallel devices: local perturbations, averaged gradients.

  Call ``update`` inside ``jax.shard_map``, each device holding its shard of
  the batch. By default (``sync_perturbation=False``) device ``d`` perturbs
  with the gradient of its own shard ``B_d`` and the perturbed gradients are
  averaged over ``axis_name``:

  .. math::
    \varepsilon_d = \rho\, g_{B_d} / (\|g_{B_d}\| + \delta), \qquad
    \text{returns } \frac{1}{D} \sum_d \nabla L_{B_d}(w + \varepsilon_d),

  which is :func:`m_sam` with ``m`` = the per-device batch (shard ``d`` is the
  contiguous slice ``d`` of the global batch, as m-SAM's micro-batch ``d``);
  one all-reduce per step instead of SAM's two.

  ``sync_perturbation`` chooses which devices share a perturbation:

  - ``False``: none (local perturbation, m-SAM, ``m = B/D``);
  - ``True``: all of ``axis_name`` (the ascent gradient is all-reduced first:
    mini-batch :func:`sam` on the global batch);
  - a mesh axis name or tuple of names within ``axis_name``: the ascent
    gradient is averaged over those axes only, i.e. within groups of devices.
    Lay the devices out on a 2-D mesh ``(groups, group_size)`` with axes
    ``("group", "member")``, shard the batch over both, pass
    ``axis_name=("group", "member")`` and ``sync_perturbation="member"``:
    m-SAM with ``m = B / groups``. (Groups are mesh axes rather than
    ``axis_index_groups``, which ``shard_map`` collectives do not support.)

  ``micro_batch_size`` splits each device's shard further (m-SAM with a
  smaller ``m`` than the shard, computed as :func:`m_sam` does, with its
  ``implementation`` and ``micro_batches_per_chunk``); it needs
  ``sync_perturbation=False``.

  A complete data-parallel train step (any number of devices; several hosts
  alike, after ``jax.distributed.initialize()``):

  >>> import functools
  >>> from jax.sharding import NamedSharding, PartitionSpec as P
  >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
  >>> tx = optax.chain(
  ...     sam_optax.data_parallel_m_sam(0.05, axis_name="data"),
  ...     optax.sgd(0.1, momentum=0.9),
  ... )
  >>> opt_state = tx.init(params)
  >>> @jax.jit
  ... @functools.partial(
  ...     jax.shard_map, mesh=mesh,
  ...     in_specs=(P(), P(), P("data")), out_specs=(P(), P()),
  ... )
  ... def train_step(params, opt_state, batch):
  ...   # Inside: `batch` is this device's shard; params are replicated.
  ...   updates, opt_state = tx.update(None, opt_state, params,
  ...                                  loss_fn=loss_fn, batch=batch)
  ...   return optax.apply_updates(params, updates), opt_state
  >>> batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
  >>> params, opt_state = train_step(params, opt_state, batch)

  The returned gradient is the same on every device (all-reduced), so the
  base optimizer's state stays replicated. The average is taken in float32.

  ``axis_name`` must name every mesh axis the batch is sharded over: on a
  mesh ``("x", "y")`` with the batch sharded over both, ``axis_name="x"``
  would sum the gradient over ``"y"`` instead of averaging it (the gradient
  with respect to params replicated over ``"y"`` is a ``psum`` over it),
  so ``update`` raises a ``ValueError`` naming the missing axes; pass
  ``axis_name=("x", "y")``. This is detected from the varying-axes types
  that ``jax.shard_map`` tracks by default; with ``check_vma=False`` they are
  absent and the mistake cannot be detected.

  Args:
    rho: the perturbation radius ``ρ``.
    axis_name: the mesh axis (or tuple of axes) the batch is sharded over,
      all of them (see above); the perturbed gradients are averaged over it.
    normalize: SAM-style (True) or USAM-style (False) ascent.
    sync_perturbation: ``False`` (local), ``True`` (all of ``axis_name``) or
      the axes within ``axis_name`` to average the ascent gradient over.
    micro_batch_size: split each device's shard into micro-batches of this
      size (must divide it), or None for one per device.
    implementation: how the micro-batches of a shard are mapped; see
      :func:`m_sam`.
    micro_batches_per_chunk: see :func:`m_sam`.
    perturb_mask: which leaves to perturb; see :func:`sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (stateless) whose ``update``
    must run inside ``jax.shard_map``, or under ``jax.vmap(...,
    axis_name=...)`` with one shard of the batch per mapped instance and
    unmapped params (the same result: a way to run the transform on one
    device). ``updates`` is not used (None is fine).

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021;
    `Unveiling m-Sharpness Through the Structure of Stochastic Gradient
    Noise <https://arxiv.org/abs/2509.18001>`_, 2025.
  """
  name = "data_parallel_m_sam"
  _contract.check_rho(rho, name)
  normalize = _contract.check_bool(normalize, "normalize", name)
  axes = _sharding.as_axes(axis_name, "axis_name", name)
  sync_axes: tuple[Hashable, ...]
  if sync_perturbation is False:
    sync_axes = ()
  elif sync_perturbation is True:
    sync_axes = axes
  else:
    sync_axes = _sharding.as_axes(sync_perturbation, "sync_perturbation", name)
    outside = [a for a in sync_axes if a not in axes]
    if outside:
      raise ValueError(
        f"{name}: sync_perturbation axes {outside} are not among"
        f" axis_name={axes}; groups are sub-axes of the data-parallel mesh"
        " axes."
      )
  if sync_axes and micro_batch_size is not None:
    raise ValueError(
      f"{name}: micro_batch_size splits each device's shard for a local"
      " perturbation; it cannot be combined with sync_perturbation."
    )
  if sync_axes:
    local_step = _transform.sharpness_aware(
      synced_gradient_ascent(sync_axes),
      rho,
      normalize=normalize,
      perturb_mask=perturb_mask,
      name=name,
    )
  elif micro_batch_size is not None:
    local_step = _m_sam.m_sam(
      rho,
      micro_batch_size,
      normalize=normalize,
      implementation=implementation,
      micro_batches_per_chunk=micro_batches_per_chunk,
      perturb_mask=perturb_mask,
    )
  else:
    local_step = (_sam.sam if normalize else _sam.usam)(
      rho, perturb_mask=perturb_mask
    )

  def gradient_fn(loss_fn: _contract.LossFn, params: Any, batch: Any) -> Any:
    _check_bound(axes, name)
    _check_batch_axes(loss_fn, params, batch, axes, name)
    local, _ = local_step.update(
      None,
      optax.EmptyState(),
      _sharding.local_copy(params, axes),
      loss_fn=loss_fn,
      batch=batch,
    )
    return jax.lax.pmean(optax.tree.cast(local, jnp.float32), axes)

  return _transform.from_gradient_fn(gradient_fn, name)
