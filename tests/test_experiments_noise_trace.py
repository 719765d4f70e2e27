"""The Table 6 script (experiments/noise_trace.py) end to end, in a tiny setting."""

import json
import math

from experiments import noise_trace


def test_noise_trace_end_to_end_in_a_tiny_setting(tmp_path, capsys):
  results = noise_trace.main(
    [
      "--epochs",
      "1",
      "--seeds",
      "0",
      "--examples",
      "128",
      "--num-probes",
      "4",
      "--lanczos-iterations",
      "4",
      "--chunk-size",
      "64",
      "--output-dir",
      str(tmp_path),
    ]
  )
  summary = results["summary"]
  assert list(summary) == ["sgd", "sam", "m_sam(m=16)", "rw_sam"]
  for name, runs in results["runs"].items():
    (run,) = runs
    assert run["seed"] == 0
    # Squared norms and, after an epoch of training, the curvature: positive.
    for key in (
      "noise_trace",
      "gradient_sq_norm",
      "hessian_trace",
      "top_eigenvalue",
    ):
      assert math.isfinite(run[key]) and run[key] > 0, (name, key, run[key])
    assert run["top_eigenvalue_residual"] >= 0
    assert summary[name]["noise_trace"] == (run["noise_trace"], 0.0)
  assert results["examples"] == 128
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["summary"] == json.loads(json.dumps(summary))
  table = capsys.readouterr().out
  assert "tr" in table and "rw_sam" in table
