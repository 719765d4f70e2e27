"""The 1-SAM sweep (experiments/one_sam.py): its plan, and a tiny run."""

import dataclasses
import json

import pytest

from experiments import compare
from experiments import one_sam


def test_the_plan_is_the_main_jobs_mlp_with_m_sam_low_rank():
  settings = one_sam.parse_settings([])
  plan = one_sam.run_configs(settings)
  assert [m for m, _ in plan] == [1, 2, 4, 8, 16, 32, 64, 128]
  main_job = dict(
    compare.run_configs(
      compare.Settings(model="mlp", micro_batch_sizes=(1, 16))
    )
  )
  by_m = dict(plan)
  assert by_m[128] == main_job["sam"]  # m = b is SAM, unchanged
  expected = main_job["m_sam(m=16)"]
  expected = dataclasses.replace(
    expected,
    optimizer=dataclasses.replace(
      expected.optimizer,
      options={"micro_batch_size": 16, "implementation": "low_rank"},
    ),
  )
  assert by_m[16] == expected
  assert by_m[1].model == "mlp" and by_m[1].label_noise == 0.3
  assert by_m[1].optimizer.options["micro_batch_size"] == 1


@pytest.mark.slow
def test_a_tiny_sweep_end_to_end(tmp_path, capsys):
  results = one_sam.main(
    [
      "--epochs",
      "1",
      "--seeds",
      "0",
      "--micro-batch-sizes",
      "1,128",
      "--train-examples",
      "256",
      "--num-probes",
      "2",
      "--output-dir",
      str(tmp_path),
    ]
  )
  out = capsys.readouterr().out
  assert "128 (SAM)" in out and "tr H" in out
  summary = results["summary"]
  assert set(summary) == {"m_sam(m=1)", "sam"}
  for entry in summary.values():
    assert entry["hessian_trace"]["mean"] > 0
    assert 0 <= entry["memorization"]["mean"] <= 1
  written = json.loads((tmp_path / "results.json").read_text())
  assert set(written["summary"]) == set(summary)
  assert (tmp_path / "one_sam.png").stat().st_size > 10_000
