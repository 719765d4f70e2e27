"""Shared test settings: hypothesis profiles sized for a 2-core CPU."""

import os

import hypothesis

# Jitted code compiles on first use, so per-example deadlines are meaningless.
hypothesis.settings.register_profile(
  "default",
  max_examples=15,
  deadline=None,
  derandomize=True,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
  "thorough",
  max_examples=200,
  deadline=None,
  suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile(
  os.environ.get("HYPOTHESIS_PROFILE", "default")
)
