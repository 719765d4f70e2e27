r"""Per-example gradient norms: exact, and estimated from forward passes only.

RW-SAM weights each example by the norm of its own gradient ``‖∇ℓ_i(w)‖``.
Exactly, that takes one backward pass per example
(:func:`per_example_gradient_norms`, a ``vmap`` of ``grad``). The
finite-difference estimator of 2509.18001 (Eq. 21, Appendix G) takes forward
passes only: for a Rademacher probe ``v ∈ {±1}^d``,

.. math::
  \Delta_i = \ell_i(w + \sigma v) - \ell_i(w)
           = \sigma\, v \cdot \nabla\ell_i(w) + O(\sigma^2), \qquad
  \mathbb{E}_v[(v \cdot \nabla\ell_i)^2] = \|\nabla\ell_i\|^2,

so ``s_i = sqrt(mean_k Δ_ik²) / σ`` estimates ``‖∇ℓ_i‖`` for every example of
the batch from one forward pass of the whole batch per probe ``v_k``
(:func:`finite_difference_gradient_norms`). With ``K`` probes the relative
standard error of ``s_i²`` is at most ``sqrt(2/K)``, since
``Var[(v·g)²] = 2(‖g‖⁴ − Σ_j g_j⁴)`` for Rademacher ``v`` (Gaussian probes
give ``2‖g‖⁴``).

``σ`` trades rounding error (small ``σ``: the two losses agree to nearly all
their digits) against curvature (large ``σ``: the ``O(σ²)`` term).
:func:`calibrate_sigma` picks it on a batch as the paper does, by comparing
the estimates with exact per-example gradients.

Every result is float32. Parameters of a narrower floating dtype (bfloat16,
float16) are promoted to float32 for the probe passes by default: in
bfloat16, ``w + σv`` with a small ``σ`` rounds back to ``w``.
"""

from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _per_example
from sam_optax import _perturbation

DEFAULT_SIGMA = 1e-4
"""Default probe scale ``σ`` for float32 models.

The curvature error grows with ``σ√d`` (``‖σv‖``, ``d`` parameters): with
:func:`calibrate_sigma` at initialization, ``σ = 1e-3`` (MeZO's choice) errs
by 3–5% on a 94k-parameter CNN and by 15% on ResNet-18 (11M), ``σ = 1e-4``
by under 1% and 4%. Smaller ``σ`` meets float32 rounding when gradients are
small (a loss of 2 is known to ~2e-7, so ``s_i`` has a floor near 2e-7/σ).
Calibrate it for your model with :func:`calibrate_sigma`, as the paper does.
"""

Difference = Literal["forward", "central"]


def is_low_precision(leaf: Any) -> bool:
  dtype = jnp.result_type(leaf)
  return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def probe_parameters(params: Any, probe_in_float32: bool = True) -> Any:
  """The parameters at which probe passes are evaluated.

  Floating leaves narrower than float32 are promoted to float32 when
  ``probe_in_float32`` (``w + σv`` would round back to ``w`` in bfloat16);
  every other leaf is returned unchanged.
  """
  if not probe_in_float32:
    return params
  return jax.tree.map(
    lambda w: w.astype(jnp.float32) if is_low_precision(w) else w, params
  )


def losses_float32(
  loss_fn: _contract.LossFn, params: Any, batch: Any
) -> jax.Array:
  return loss_fn(params, batch).astype(jnp.float32)


def check_probe_options(
  sigma: ArrayLike, num_probes: int, difference: str, name: str
) -> int:
  """Raises a clear error for a bad ``num_probes``, ``difference`` or ``σ``.

  Returns ``num_probes`` as a Python int.
  """
  num_probes = _contract.check_integer(num_probes, "num_probes", name)
  _contract.check_choice(difference, ("forward", "central"), "difference", name)
  _contract.check_number(sigma, "sigma", name, above=0)
  return num_probes


def directional_derivative_estimate(
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  key: jax.Array,
  sigma: ArrayLike,
  *,
  losses: jax.Array | None = None,
  difference: Difference = "forward",
) -> jax.Array:
  """``Δ_i / σ ≈ v·∇ℓ_i(w)`` for one probe ``v = rademacher_like(key, params)``.

  ``"forward"``: ``Δ_i = ℓ_i(w+σv) − ℓ_i(w)``, one forward pass (``ℓ_i(w)`` is
  ``losses`` if given, else one more pass), error ``O(σ)``. ``"central"``:
  ``Δ_i = (ℓ_i(w+σv) − ℓ_i(w−σv))/2``, two forward passes, error ``O(σ²)``.
  Evaluated at ``params`` as given (see :func:`probe_parameters`).

  Returns:
    A float32 vector of shape ``[B]``.
  """
  probe = _per_example.rademacher_like(key, params)
  sigma = jnp.asarray(sigma, jnp.float32)
  shift = lambda scale: _perturbation.perturb(
    params, optax.tree.scale(scale, probe)
  )
  ahead = losses_float32(loss_fn, shift(sigma), batch)
  if difference == "central":
    behind = losses_float32(loss_fn, shift(-sigma), batch)
    return (ahead - behind) / (2 * sigma)
  if losses is None:
    losses = losses_float32(loss_fn, params, batch)
  return (ahead - losses.astype(jnp.float32)) / sigma


def finite_difference_gradient_norms(
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  key: jax.Array,
  *,
  sigma: ArrayLike = DEFAULT_SIGMA,
  num_probes: int = 1,
  losses: jax.Array | None = None,
  difference: Difference = "forward",
  probe_in_float32: bool = True,
) -> jax.Array:
  r"""Estimates ``‖∇ℓ_i(w)‖`` for every example from forward passes only.

  .. math::
    s_i = \frac{1}{\sigma} \sqrt{\tfrac{1}{K} \textstyle\sum_k \Delta_{ik}^2},
    \qquad \Delta_{ik} = \ell_i(w + \sigma v_k) - \ell_i(w),

  with ``K = num_probes`` Rademacher probes ``v_k`` over every leaf of
  ``params``, shared by all examples (2509.18001, Eq. 21; ``K = 1`` in the
  paper). ``E[s_i²] = ‖∇ℓ_i‖² + O(σ²)``; the relative standard error of
  ``s_i²`` is at most ``sqrt(2/K)``.

  Cost: ``K`` forward passes of the batch (``"forward"``, when ``losses`` is
  given), ``2K`` for ``"central"``; probes are unrolled, so keep ``K`` small
  inside ``jit``. No backward pass.

  >>> exact = sam_optax.per_example_gradient_norms(loss_fn, params, batch)
  >>> estimate = sam_optax.finite_difference_gradient_norms(
  ...     loss_fn, params, batch, jax.random.key(0), num_probes=64)
  >>> exact.shape, estimate.shape
  ((8,), (8,))
  >>> bool(jnp.mean(jnp.abs(estimate - exact) / exact) < 0.3)
  True

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w`` (any pytree).
    batch: the batch (leaves share a leading axis ``B``).
    key: a PRNG key for the probes.
    sigma: the probe scale ``σ > 0``.
    num_probes: ``K >= 1``.
    losses: ``ℓ_i(w)`` if already computed (saves a forward pass; ignored when
      the parameters are promoted to float32 or ``difference="central"``).
    difference: ``"forward"`` (the paper) or ``"central"``.
    probe_in_float32: evaluate probes with low-precision floating leaves
      promoted to float32 (``w + σv`` would round back to ``w`` in
      bfloat16).

  Returns:
    A float32 vector ``s`` of shape ``[B]``.
  """
  name = "finite_difference_gradient_norms"
  num_probes = check_probe_options(sigma, num_probes, difference, name)
  probe_in_float32 = _contract.check_bool(
    probe_in_float32, "probe_in_float32", name
  )
  size = _contract.check_per_example_losses(loss_fn, params, batch, name)
  if losses is not None and jnp.shape(losses) != (size,):
    raise ValueError(
      f"{name}: losses must be loss_fn(params, batch), shape ({size},);"
      f" got shape {jnp.shape(losses)}."
    )
  probe_params = probe_parameters(params, probe_in_float32)
  if probe_in_float32 and any(
    is_low_precision(leaf) for leaf in jax.tree.leaves(params)
  ):
    losses = None  # the baseline must be evaluated at the probes' precision
  if difference == "forward" and losses is None:
    losses = losses_float32(loss_fn, probe_params, batch)
  keys = _per_example.split_key(key, num_probes)
  estimates = jnp.stack(
    [
      directional_derivative_estimate(
        loss_fn,
        probe_params,
        batch,
        keys[k],
        sigma,
        losses=losses,
        difference=difference,
      )
      for k in range(num_probes)
    ]
  )
  # sqrt(mean_k x_k²) as a·sqrt(mean_k (x_k/a)²), a = max_k |x_k|: squaring
  # directly overflows float32 for norms above ~1.8e19.
  magnitude = jnp.max(jnp.abs(estimates), axis=0)
  magnitude = jnp.where(
    jnp.isfinite(magnitude) & (magnitude > 0), magnitude, 1.0
  )
  return magnitude * jnp.sqrt(
    jnp.mean(jnp.square(estimates / magnitude), axis=0)
  )


def per_example_gradient_norms(
  loss_fn: _contract.LossFn,
  params: Any,
  batch: Any,
  *,
  chunk_size: int | None = None,
  per_example_gradients: _per_example.PerExampleGradients = "auto",
) -> jax.Array:
  """The exact ``‖∇ℓ_i(w)‖`` for every example (float32, shape ``[B]``).

  With ``per_example_gradients="batch_of_one"``, a ``vmap`` of ``grad`` over
  examples (``optax.microbatching.micro_grad``): ``loss_fn`` sees each example
  as a batch of one, ``B`` backward passes of one example. With
  ``"jacobian"``, ``∇ℓ_i`` is row ``i`` of the Jacobian of
  ``loss_fn(params, batch)``: example ``i``'s term of the batch's loss, with
  BatchNorm's statistics (and dropout masks) of the whole batch, the quantity
  :func:`finite_difference_gradient_norms` estimates for such a model; it
  costs ``B`` backward passes of the whole batch. ``"auto"`` (the default)
  takes ``"jacobian"`` for a ``loss_fn`` whose attribute
  ``couples_examples`` is true (those of :mod:`sam_optax.flax` for models
  with BatchNorm or dropout in training mode), ``"batch_of_one"`` otherwise; the two agree
  when no example's loss depends on the others. It holds ``chunk_size × d``
  gradient entries at a time (``B × d`` by default): use it to validate and
  calibrate, not in every step.

  >>> import jax, jax.numpy as jnp, sam_optax
  >>> square_loss = lambda w, x: (x @ w) ** 2      # ℓ_i depends on x_i alone
  >>> w, x = jnp.ones(3), jnp.arange(12.0).reshape(4, 3)
  >>> one = sam_optax.per_example_gradient_norms(square_loss, w, x)
  >>> rows = sam_optax.per_example_gradient_norms(
  ...     square_loss, w, x, per_example_gradients="jacobian")
  >>> bool(jnp.allclose(one, rows))
  True
  >>> def centered_loss(w, x):                    # couples examples, as BatchNorm
  ...   return square_loss(w, x - x.mean(axis=0))
  >>> centered_loss.couples_examples = True       # so "auto" takes Jacobian rows
  >>> rows = sam_optax.per_example_gradient_norms(centered_loss, w, x)
  >>> bool(jnp.allclose(rows, jnp.linalg.norm(
  ...     jax.jacrev(centered_loss)(w, x), axis=1)))
  True

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    batch: the batch.
    chunk_size: examples per vectorized chunk (must divide ``B``), or None
      for all at once.
    per_example_gradients: ``"auto"``, ``"batch_of_one"`` or ``"jacobian"``.
  """
  name = "per_example_gradient_norms"
  method = _per_example.resolve_per_example_gradients(
    per_example_gradients, loss_fn, name
  )
  size = _contract.check_per_example_losses(loss_fn, params, batch, name)
  chunk_size = _per_example.check_chunk_size(chunk_size, size, name)
  return _per_example.map_per_example_gradients(
    _perturbation.global_norm,
    loss_fn,
    params,
    batch,
    chunk_size=chunk_size,
    per_example_gradients=method,
  )
