"""Choosing RW-SAM's probe scale ``σ`` against exact per-example gradients.

The finite-difference estimate of ``‖∇ℓ_i‖``
(:func:`sam_optax.finite_difference_gradient_norms`) errs by rounding when
``σ`` is small and by curvature when it is large. 2509.18001 (§5.1) picks
``σ`` on the model before training from the estimation error;
:func:`calibrate_sigma` does that on a batch.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_optax import _contract
from sam_optax import _gradient_norms
from sam_optax import _per_example
from sam_optax import _perturbation

DEFAULT_SIGMA_CANDIDATES = (
  1e-6,
  3e-6,
  1e-5,
  3e-5,
  1e-4,
  3e-4,
  1e-3,
  3e-3,
  1e-2,
  3e-2,
  1e-1,
)
"""The ``σ`` grid :func:`calibrate_sigma` searches by default."""


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
  difference: _gradient_norms.Difference = "forward",
  probe_in_float32: bool = True,
  chunk_size: int | None = None,
  per_example_gradients: _per_example.PerExampleGradients = "auto",
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

  >>> calibration = sam_optax.calibrate_sigma(loss_fn, params, batch,
  ...                                         jax.random.key(0))
  >>> tx = sam_optax.rw_sam(0.05, lam=0.5, sigma=float(calibration.sigma))

  Args:
    loss_fn: ``loss_fn(params, batch)``, per-example losses of shape ``[B]``.
    params: the parameters ``w``.
    batch: the batch.
    key: a PRNG key for the probes.
    candidates: the ``σ`` values to try (all > 0).
    num_probes: probes per candidate.
    difference: ``"forward"`` or ``"central"``, as the training will use.
    probe_in_float32: as in
      :func:`sam_optax.finite_difference_gradient_norms`.
    chunk_size: as in :func:`sam_optax.per_example_gradient_norms`.
    per_example_gradients: how the exact ``∇ℓ_i`` are taken, as in
      :func:`sam_optax.per_example_gradient_norms`. ``"auto"`` (the default)
      takes rows of the Jacobian of the loss vector for a coupled
      ``loss_fn`` (a :mod:`sam_optax.flax` loss of a model with BatchNorm or
      dropout in training mode), so that a BatchNorm model's ``σ`` is picked against what the
      probe measures: example ``i``'s term of the batch's loss, batch
      statistics included, not its loss in a batch of one.

  Returns:
    A :class:`SigmaCalibration`.
  """
  name = "calibrate_sigma"
  method = _per_example.resolve_per_example_gradients(
    per_example_gradients, loss_fn, name
  )
  if not candidates:
    raise ValueError(f"{name}: candidates must not be empty.")
  for sigma in candidates:
    num_probes = _gradient_norms.check_probe_options(
      sigma, num_probes, difference, name
    )
  probe_in_float32 = _contract.check_bool(
    probe_in_float32, "probe_in_float32", name
  )
  size = _contract.check_per_example_losses(loss_fn, params, batch, name)
  chunk_size = _per_example.check_chunk_size(chunk_size, size, name)
  probe_params = _gradient_norms.probe_parameters(params, probe_in_float32)
  keys = jax.random.split(key, num_probes)

  def exact_metrics(gradient: Any) -> tuple[jax.Array, jax.Array]:
    directional = jnp.stack(
      [
        optax.tree.vdot(
          gradient, _per_example.rademacher_like(keys[k], gradient)
        )
        for k in range(num_probes)
      ]
    )
    return optax.tree.norm(gradient), directional

  exact_norms, exact_directional = _per_example.map_per_example_gradients(
    exact_metrics,
    loss_fn,
    probe_params,
    batch,
    chunk_size=chunk_size,
    per_example_gradients=method,
  )
  exact_directional = exact_directional.T  # [K, B]
  losses = _gradient_norms.losses_float32(loss_fn, probe_params, batch)

  @jax.jit
  def estimate(
    p: Any,
    batch: Any,
    probe_key: jax.Array,
    sigma: jax.Array,
    losses: jax.Array,
  ) -> jax.Array:
    return _gradient_norms.directional_derivative_estimate(
      loss_fn, p, batch, probe_key, sigma, losses=losses, difference=difference
    )

  scale = jnp.mean(exact_norms) + _perturbation.NORM_EPS
  sigmas = jnp.asarray(candidates, jnp.float32)
  finite_difference_error_list, norm_error_list = [], []
  for c in range(len(candidates)):
    directional = jnp.stack(
      [
        estimate(probe_params, batch, keys[k], sigmas[c], losses)
        for k in range(num_probes)
      ]
    )
    finite_difference_error_list.append(
      jnp.mean(jnp.abs(directional - exact_directional)) / scale
    )
    norms = jnp.sqrt(jnp.mean(jnp.square(directional), axis=0))
    norm_error_list.append(jnp.mean(jnp.abs(norms - exact_norms)) / scale)
  finite_difference_errors = jnp.stack(finite_difference_error_list)
  monte_carlo_norms = jnp.sqrt(jnp.mean(jnp.square(exact_directional), axis=0))
  best = jnp.argmin(
    jnp.where(
      jnp.isnan(finite_difference_errors), jnp.inf, finite_difference_errors
    )
  )
  return SigmaCalibration(
    sigma=sigmas[best],
    candidates=sigmas,
    finite_difference_errors=finite_difference_errors,
    norm_errors=jnp.stack(norm_error_list),
    monte_carlo_error=jnp.mean(jnp.abs(monte_carlo_norms - exact_norms))
    / scale,
    exact_norms=exact_norms,
  )
