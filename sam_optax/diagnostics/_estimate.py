"""A Monte Carlo estimate with its standard error."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Estimate(NamedTuple):
  """The mean of ``K`` independent samples and its standard error.

  Attributes:
    mean: ``mean_k x_k``.
    standard_error: ``std(x, ddof=1) / sqrt(K)``; the true value lies within
      about two standard errors of ``mean`` in 95% of draws (for large ``K``).
  """

  mean: jax.Array
  standard_error: jax.Array


def from_samples(samples: jax.Array) -> Estimate:
  """The :class:`Estimate` of a float vector of ``K >= 2`` i.i.d. samples."""
  samples = jnp.asarray(samples, jnp.float32)
  count = samples.shape[0]
  return Estimate(
    mean=jnp.mean(samples),
    standard_error=jnp.std(samples, ddof=1) / jnp.sqrt(count),
  )
