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


def check_num_samples(num_samples: int, argument: str, name: str) -> None:
  """At least two samples are needed for a standard error."""
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or (
      num_samples < 2):
    raise ValueError(
        f"{name}: {argument} must be an int >= 2 (a standard error needs two"
        f" samples), got {num_samples!r}."
    )
