"""Shared test settings, sized for a 2-core CPU.

Nearly all of the default suite's time is XLA compiling small programs (a
second run with every program cached takes a quarter of the time), so:

- XLA:CPU compiles for speed of compilation (``_FAST_COMPILE_FLAGS``):
  LLVM's optimization level 0 (``--xla_backend_optimization_level=0``, about
  30% off the suite), the fusions' older LLVM IR emitters instead of the
  MLIR ones (``--xla_cpu_use_fusion_emitters=false``) and one LLVM module
  per program (``--xla_cpu_parallel_codegen_split_count=1``): each on top of
  -O0, tests/test_composition.py on one worker took 14.1 s with the emitters
  flag and 20.2 s with the split count, against 22.6 s; the suite with all
  three took 3:44 against 5:39 on 2 cores (docs/conf.py sets the same flags
  for the doctests). -O0 and the split count leave XLA's HLO passes as they
  are; without the MLIR emitters XLA no longer
  wraps single operations as fusions (a SAM step on an MLP: 79 loop fusions
  against 155), which moves the cost analysis' bytes by under 0.3%, temp
  memory by under 3% and FLOPs by under 1e-5, measured. The checks of
  compiled cost (test_cost_pins.py, test_m_sam_auto.py, test_probes.py) pass
  either way, and .ci/run runs them again at XLA's defaults. The tests'
  programs run for milliseconds, so slower machine code costs nothing.
  ``SAM_OPTAX_TEST_XLA_DEFAULTS=1`` keeps XLA's defaults (.ci/run runs the
  numerical-edge checks that way too). A flag already in ``XLA_FLAGS`` is
  kept as given.
- Every process of one run (the xdist workers, and their subprocesses) shares
  one JAX persistent compilation cache, in a fresh temporary directory: a
  program compiled by one test is not compiled again by another. It is empty
  at the start of every run, so the time measured is a fresh clone's.
- hypothesis takes 8 examples by default (``HYPOTHESIS_PROFILE=thorough``:
  200).
"""

import os
import shutil
import tempfile

import hypothesis
import pytest

# Both before JAX is imported (by a test module or a plugin's first use):
# XLA reads its flags once, when the backend starts.
_FAST_COMPILE_FLAGS = {
  "xla_backend_optimization_level": "0",
  "xla_cpu_use_fusion_emitters": "false",
  "xla_cpu_parallel_codegen_split_count": "1",
}
if os.environ.get("SAM_OPTAX_TEST_XLA_DEFAULTS") != "1":
  _flags = os.environ.get("XLA_FLAGS", "").split()
  for _name, _value in _FAST_COMPILE_FLAGS.items():
    if not any(_flag.startswith(f"--{_name}=") for _flag in _flags):
      _flags.append(f"--{_name}={_value}")
  os.environ["XLA_FLAGS"] = " ".join(_flags)

# The controller (or a run without xdist) makes the directory; the workers it
# starts afterwards inherit the variable and use the same one.
_CACHE_VARIABLE = "SAM_OPTAX_TEST_COMPILATION_CACHE"
_OWNS_CACHE = _CACHE_VARIABLE not in os.environ
if _OWNS_CACHE:
  os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="sam-optax-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[_CACHE_VARIABLE])
# Every program, however small or quick to compile, is worth keeping here.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  del config
  if _OWNS_CACHE:
    shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)


# Jitted code compiles on first use, so per-example deadlines are meaningless.
hypothesis.settings.register_profile(
  "default",
  max_examples=8,
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


# The default suite's time budget (BUILD.md: under 5 minutes on 2 cores).
# These checks are the costliest of the default suite (each 8-40 s of compile
# time on 2 cores) and repeat what a cheaper default check covers: the same
# formula without jit, another model family, a larger shape, a second mock
# CIFAR row. They run with `-m slow`. Listed here, in one place, so that the
# budget is visible; a new costly check is marked where it is written. An
# entry is a prefix of test ids, or one whole id where it ends in "$".
SLOW_IN_THE_DEFAULT_BUDGET = (
  "test_experiments_noise_trace.py::test_noise_trace_end_to_end",
  "test_core_properties.py::test_f_sam_without_sigma_is_sam",
  "test_experiments_models.py::test_every_optimizer_trains_every_model_family"
  "[sam-wide_resnet]",
  "test_experiments_models.py::test_every_optimizer_trains_every_model_family"
  "[sam-resnet_bottleneck]",
  "test_experiments_models.py::test_every_optimizer_trains_every_model_family"
  "[m_sam-resnet]",
  "test_experiments_models.py::test_every_optimizer_trains_every_model_family"
  "[rw_sam-resnet]",
  "test_experiments_models.py::test_model_sizes_match_the_papers",
  "test_experiments_train.py::test_rw_sam_calibrates_sigma_once",
  "test_experiments_train.py::test_paper_tables_run_on_mock_cifar[table7",
  "test_sampa_esam_lookbehind.py::test_sampa_on_two_devices",
  "test_m_sam.py::test_random_shapes_match_the_reference",
  "test_m_sam.py::MSamTest::test_every_formulation_matches_the_reference_"
  "without_jit",
  "test_m_sam.py::MSamTest::test_chunked_equals_unchunked__without_jit",
  "test_m_sam.py::MSamTest::test_whole_batch_is_sam_and_usam__without_jit",
  "test_m_sam_auto.py::AutoLowRankTest::test_auto_equals_vmap_where_it_takes"
  "_low_rank__without_jit",
  "test_per_example_coupled.py::test_rw_sam_exact_norms_are_jacobian_rows",
  "test_input_checks.py::test_numpy_integers_are_ints",
  "test_gradient_norms.py::ExactNormsTest::test_matches_one_grad_per_example"
  "__without_jit",
  "test_perturbation.py::test_vmapped_perturbation_matches_one_at_a_time",
  "test_hostile_inputs.py::test_rw_sam_state_holds_the_diagnostics",
  "test_hostile_inputs.py::test_rw_sam_bf16_compute_with_a_calibrated_sigma",
  "test_schedules.py::ConstantScheduleTest::test_equals_fixed_rho_step_for"
  "_step_m_sam",
  # The MLP's case checks the same split; the Gaussian case, Prop. 3.9.
  "test_experiments_scaling_benchmark.py::test_every_setup_carries_the_split"
  "_loss[transformer]",
  "test_theory.py::MeanNoiseNormTest::test_decreases_in_micro_batch_size1",
  # The same transform as the rw_sam_two_probes and f_sam_current cases; a
  # micro-batch of the whole batch (test_whole_batch_is_sam_and_usam's case).
  "test_schedules.py::ConstantScheduleTest::test_equals_fixed_rho_step_for"
  "_step_rw_sam$",
  "test_schedules.py::ConstantScheduleTest::test_equals_fixed_rho_step_for"
  "_step_f_sam$",
  "test_m_sam.py::MSamTest::test_every_formulation_matches_the_reference_"
  "under_jit2",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    node = item.nodeid.split("tests/", 1)[-1]
    if any(_matches(node, entry) for entry in SLOW_IN_THE_DEFAULT_BUDGET):
      item.add_marker(pytest.mark.slow)


def _matches(node: str, entry: str) -> bool:
  """A test id's prefix, or (ending in ``$``) the whole test id."""
  if entry.endswith("$"):
    return node == entry[:-1]
  return node.startswith(entry)
