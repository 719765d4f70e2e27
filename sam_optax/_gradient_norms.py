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

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
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

DEFAULT_SIGMA_CANDIDATES = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3,
                            1e-2, 3e-2, 1e-1)
"""The ``σ`` grid :func:`calibrate_sigma` searches by default."""

Difference = Literal["forward", "central"]


def rademacher_like(key: jax.Array, tree: Any) -> Any:
  """A Rademacher probe: independent ``±1`` entries shaped like ``tree``.

  Args:
    key: a PRNG key.
    tree: a pytree of arrays (the parameters).

  Returns:
    A pytree like ``tree`` with float32 leaves, each entry ``+1`` or ``-1``
    with probability 1/2.
  """
  return optax.tree.random_like(
      key, tree, sampler=jax.random.rademacher, dtype=jnp.float32
  )


def _is_low_precision(leaf: Any) -> bool:
  dtype = jnp.result_type(leaf)
  return (jnp.issubdtype(dtype, jnp.floating)
          and jnp.finfo(dtype).bits < 32)


def probe_parameters(params: Any, probe_in_float32: bool = True) -> Any:
  """The parameters at which probe passes are evaluated.

  Floating leaves narrower than float32 are promoted to float32 when
  ``probe_in_float32`` (``w + σv`` would round back to ``w`` in bfloat16);
  every other leaf is returned unchanged.
  """
  if not probe_in_float32:
    return params
  return jax.tree.map(
      lambda w: w.astype(jnp.float32) if _is_low_precision(w) else w, params
  )


def _losses32(loss_fn: _contract.LossFn, params: Any, batch: Any) -> jax.Array:
  return loss_fn(params, batch).astype(jnp.float32)


def check_probe_options(sigma: ArrayLike, num_probes: int, difference: str,
                        name: str) -> int:
  """Raises a clear error for a bad ``num_probes``, ``difference`` or ``σ``.

  Returns ``num_probes`` as a Python int.
  """
  num_probes = _contract.check_integer(num_probes, "num_probes", name)
  if difference not in ("forward", "central"):
    raise ValueError(
        f"{name}: difference must be 'forward' or 'central', got"
        f" {difference!r}."
    )
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
  probe = rademacher_like(key, params)
  sigma = jnp.asarray(sigma, jnp.float32)
  shift = lambda scale: _perturbation.perturb(
      params, optax.tree.scale(scale, probe))
  ahead = _losses32(loss_fn, shift(sigma), batch)
  if difference == "central":
    behind = _losses32(loss_fn, shift(-sigma), batch)
    return (ahead - behind) / (2 * sigma)
  if losses is None:
    losses = _losses32(loss_fn, params, batch)
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
      promoted to float32 (see :func:`probe_parameters`).

  Returns:
    A float32 vector ``s`` of shape ``[B]``.
  """
  name = "finite_difference_gradient_norms"
  num_probes = check_probe_options(sigma, num_probes, difference, name)
  _contract.check_per_example_losses(loss_fn, params, batch, name)
  probe_params = probe_parameters(params, probe_in_float32)
  if probe_in_float32 and any(
      _is_low_precision(leaf) for leaf in jax.tree.leaves(params)):
    losses = None  # the baseline must be evaluated at the probes' precision
  if difference == "forward" and losses is None:
    losses = _losses32(loss_fn, probe_params, batch)
  keys = jax.random.split(key, num_probes)
  estimates = jnp.stack([
      directional_derivative_estimate(
          loss_fn, probe_params, batch, keys[k], sigma, losses=losses,
          difference=difference)
      for k in range(num_probes)
  ])
  # sqrt(mean_k x_k²) as a·sqrt(mean_k (x_k/a)²), a = max_k |x_k|: squaring
  # directly overflows float32 for norms above ~1.8e19.
  magnitude = jnp.max(jnp.abs(estimates), axis=0)
  magnitude = jnp.where(jnp.isfinite(magnitude) & (magnitude > 0), magnitude,
                        1.0)
  return magnitude * jnp.sqrt(jnp.mean(jnp.square(estimates / magnitude),
                                       axis=0))


def _check_microbatch_size(microbatch_size: int | None, size: int,
                           name: str) -> int | None:
  if microbatch_size is None:
    return None
  microbatch_size = _contract.check_integer(
      microbatch_size, "microbatch_size", name)
  if size % microbatch_size:
    raise ValueError(
        f"{name}: microbatch_size must divide the batch size {size}, got"
        f" {microbatch_size!r}."
    )
  return microbatch_size


def _per_example_gradient_metrics(
    loss_fn: _contract.LossFn,
    params: Any,
    batch: Any,
    metrics_fn: Any,
    microbatch_size: int | None,
) -> Any:
  """``metrics_fn(∇ℓ_i(w))`` for every example, gradients never summed."""

  def example_loss(p: Any, example: Any) -> jax.Array:
    # micro_grad hands each example over with a leading axis of size 1.
    return loss_fn(p, example)[0].astype(jnp.float32)

  gradient_fn = optax.microbatching.micro_grad(
      example_loss, transform_fn=lambda gradient: (), metrics_fn=metrics_fn,
      microbatch_size=microbatch_size,
  )
  _, outputs = gradient_fn(params, batch)
  return outputs.metrics


def per_example_gradient_norms(
    loss_fn: _contract.LossFn,
    params: Any,
    batch: Any,
    *,
    microbatch_size: int | None = None,
) -> jax.Array:
  """The exact ``‖∇ℓ_i(w)‖`` for every example (float32, shape ``[B]``).

  A ``vmap`` of ``grad`` over examples (``optax.microbatching.micro_grad``):
  ``loss_fn`` sees each example as a batch of one, so a model whose loss
  depends on the whole batch (batch-norm statistics) gets batch-of-one
  gradients. It holds ``microbatch_size × d`` gradient entries at a time
  (``B × d`` by default) and costs ``B`` backward passes: use it to validate
  and calibrate, not in every step.

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    batch: the batch.
    microbatch_size: examples per vectorized chunk (must divide ``B``), or
      None for all at once.
  """
  name = "per_example_gradient_norms"
  size = _contract.check_per_example_losses(loss_fn, params, batch, name)
  microbatch_size = _check_microbatch_size(microbatch_size, size, name)
  return _per_example_gradient_metrics(
      loss_fn, params, batch, _perturbation.global_norm, microbatch_size)


class SigmaCalibration(NamedTuple):
  """What :func:`calibrate_sigma` found.

  Errors are mean absolute errors divided by the mean exact norm
  ``mean_i ‖∇ℓ_i‖`` (relative, and robust to examples with a zero gradient).

  Attributes:
    sigma: the candidate with the smallest ``finite_difference_errors``.
    candidates: the ``σ`` values tried, shape ``[C]``.
    finite_difference_errors: ``mean_{i,k} |Δ_ik/σ − v_k·∇ℓ_i|``, relative:
      the error ``σ`` controls (rounding when small, curvature when large),
      free of the probes' Monte Carlo noise. Shape ``[C]``.
    norm_errors: ``mean_i |s_i − ‖∇ℓ_i‖|``, relative, for the estimate
      ``s_i`` with ``num_probes`` probes (the same probes for every
      candidate). Shape ``[C]``.
    monte_carlo_error: the same error with exact directional derivatives
      ``v_k·∇ℓ_i`` in place of ``Δ_ik/σ``: the floor for ``num_probes``
      probes, whatever ``σ``.
    exact_norms: ``‖∇ℓ_i‖``, shape ``[B]``.
  """

  sigma: jax.Array
  candidates: jax.Array
  finite_difference_errors: jax.Array
  norm_errors: jax.Array
  monte_carlo_error: jax.Array
  exact_norms: jax.Array


def calibrate_sigma(
    loss_fn: _contract.LossFn,
    params: Any,
    batch: Any,
    key: jax.Array,
    *,
    candidates: Sequence[float] = DEFAULT_SIGMA_CANDIDATES,
    num_probes: int = 8,
    difference: Difference = "forward",
    probe_in_float32: bool = True,
    microbatch_size: int | None = None,
) -> SigmaCalibration:
  """Picks the probe scale ``σ`` by comparison with exact per-example gradients.

  As in 2509.18001 (§5.1: ``σ`` chosen on the model before training from the
  estimation error): for each candidate ``σ`` and ``num_probes`` probes ``v_k``
  (the same for every candidate), the finite differences ``Δ_ik/σ`` are
  compared with the exact directional derivatives ``v_k·∇ℓ_i`` and the norm
  estimates ``s_i`` with the exact norms ``‖∇ℓ_i‖`` (from one
  ``vmap``-of-``grad`` pass). The best ``σ`` minimizes the former, which is
  free of Monte Carlo noise. Run it once, before training, on a typical batch
  with the parameters at initialization; pass ``float(result.sigma)`` to
  :func:`sam_optax.rw_sam`. The probe passes compile once and run eagerly,
  ``len(candidates) × num_probes`` times.

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    batch: the batch.
    key: a PRNG key for the probes.
    candidates: the ``σ`` values to try (all > 0).
    num_probes: probes per candidate.
    difference: ``"forward"`` or ``"central"``, as the training will use.
    probe_in_float32: as in :func:`finite_difference_gradient_norms`.
    microbatch_size: as in :func:`per_example_gradient_norms`.

  Returns:
    A :class:`SigmaCalibration`.
  """
  name = "calibrate_sigma"
  if not candidates:
    raise ValueError(f"{name}: candidates must not be empty.")
  for sigma in candidates:
    num_probes = check_probe_options(sigma, num_probes, difference, name)
  size = _contract.check_per_example_losses(loss_fn, params, batch, name)
  microbatch_size = _check_microbatch_size(microbatch_size, size, name)
  probe_params = probe_parameters(params, probe_in_float32)
  keys = jax.random.split(key, num_probes)

  def exact_metrics(gradient: Any) -> tuple[jax.Array, jax.Array]:
    gradient = optax.tree.cast(gradient, jnp.float32)
    directional = jnp.stack([
        optax.tree.vdot(gradient, rademacher_like(keys[k], gradient))
        for k in range(num_probes)
    ])
    return optax.tree.norm(gradient), directional

  exact_norms, exact_directional = _per_example_gradient_metrics(
      loss_fn, probe_params, batch, exact_metrics, microbatch_size)
  exact_directional = exact_directional.T  # [K, B]
  losses = _losses32(loss_fn, probe_params, batch)

  @jax.jit
  def estimate(p: Any, batch: Any, probe_key: jax.Array, sigma: jax.Array,
               losses: jax.Array) -> jax.Array:
    return directional_derivative_estimate(
        loss_fn, p, batch, probe_key, sigma, losses=losses,
        difference=difference)

  scale = jnp.mean(exact_norms) + _perturbation.NORM_EPS
  sigmas = jnp.asarray(candidates, jnp.float32)
  finite_difference_errors, norm_errors = [], []
  for c in range(len(candidates)):
    directional = jnp.stack([
        estimate(probe_params, batch, keys[k], sigmas[c], losses)
        for k in range(num_probes)
    ])
    finite_difference_errors.append(
        jnp.mean(jnp.abs(directional - exact_directional)) / scale)
    norms = jnp.sqrt(jnp.mean(jnp.square(directional), axis=0))
    norm_errors.append(jnp.mean(jnp.abs(norms - exact_norms)) / scale)
  finite_difference_errors = jnp.stack(finite_difference_errors)
  monte_carlo_norms = jnp.sqrt(jnp.mean(jnp.square(exact_directional), axis=0))
  best = jnp.argmin(
      jnp.where(jnp.isnan(finite_difference_errors), jnp.inf,
                finite_difference_errors))
  return SigmaCalibration(
      sigma=sigmas[best],
      candidates=sigmas,
      finite_difference_errors=finite_difference_errors,
      norm_errors=jnp.stack(norm_errors),
      monte_carlo_error=jnp.mean(jnp.abs(monte_carlo_norms - exact_norms))
      / scale,
      exact_norms=exact_norms,
  )
