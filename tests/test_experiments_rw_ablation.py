"""The RW-SAM ablation (experiments/rw_ablation.py) end to end, in tiny settings."""

import json

import pytest

from experiments import compare
from experiments import rw_ablation
from experiments import weight_trace


def test_the_plan_runs_the_main_jobs_configs_with_each_reading():
  settings = rw_ablation.parse_settings([])
  plan = rw_ablation.run_plan(settings)
  rows = {(model, row): (config, seeds) for model, row, config, seeds in plan}
  assert len(rows) == 2 * (2 + len(settings.readings))
  # The default reading on the default CNN is the main job's RW-SAM, run for
  # run (the weight trace only reads the parameters).
  main_job = dict(compare.run_configs(compare.Settings()))
  for row, name in (
    ("sam", "sam"),
    ("m_sam(m=16)", "m_sam(m=16)"),
    ("rw_sam mean,norm,0.5", "rw_sam"),
  ):
    config, _ = rows[("cnn1d", row)]
    assert config.optimizer == main_job[name].optimizer
    assert config.model_options == {} and config.weight_trace_every == 10
  wide, seeds = rows[("cnn1d_wide", "rw_sam max,norm,0.5")]
  assert wide.model_options == {"channels": 64}
  assert wide.optimizer.options == {"lam": 0.5, "norm_scaling": "max"}
  assert seeds == tuple(range(10))
  assert rows[("cnn1d", "rw_sam max,squared,0.5")][1] == (0, 1, 2)
  assert rows[("cnn1d", "rw_sam rho,norm,0.5")][0].optimizer.options == {
    "lam": pytest.approx(10.0),
    "norm_scaling": "none",
  }
  quick = rw_ablation.parse_settings(["--quick"])
  assert quick.epochs < settings.epochs
  assert set(quick.readings) <= set(weight_trace.READINGS)
  with pytest.raises(ValueError, match="label noise"):
    rw_ablation.parse_settings(["--label-noise", "0"])


def _tiny(tmp_path, *more):
  # Two epochs of 2 steps: the main job's tiny test compiles the same SAM and
  # RW-SAM steps (compare.main with --train-examples 256 --epochs 2).
  return rw_ablation.main(
    [
      "--epochs",
      "2",
      "--seeds",
      "0,1",
      "--m-sam-seeds",
      "0",
      "--other-seeds",
      "0",
      "--train-examples",
      "256",
      "--weight-trace-every",
      "1",
      "--output-dir",
      str(tmp_path),
      *more,
    ]
  )


def _check(results, tmp_path, table, models, readings):
  summary = results["summary"]
  assert list(summary) == models
  for model in models:
    entries = summary[model]
    assert list(entries) == ["sam", "m_sam(m=16)"] + [
      f"rw_sam {r}" for r in readings
    ]
    assert entries["sam"]["seeds"] == [0, 1]
    default = entries["rw_sam mean,norm,0.5"]
    difference = default["test_accuracy_minus_sam"]
    assert difference["seeds"] == 2
    runs = results["runs"][model]
    assert difference["mean"] == pytest.approx(
      sum(
        rw["final"]["test_accuracy"] - sam["final"]["test_accuracy"]
        for rw, sam in zip(runs["rw_sam mean,norm,0.5"], runs["sam"])
      )
      / 2
    )
    assert entries["m_sam(m=16)"]["test_accuracy_minus_sam"]["seeds"] == 1
    assert sorted(default["weight_share"]) == [1, 2]
    assert entries["sam"]["weight_share"] is None
    for run in runs["sam"]:
      final = run["final"]
      assert final["best_test_accuracy"] >= final["test_accuracy"]
      assert 0 <= final["memorization"] <= 1
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["summary"] == json.loads(json.dumps(summary))
  assert (tmp_path / "ablation.png").stat().st_size > 10_000
  assert "final − SAM" in table and "rw_sam mean,norm,0.5" in table
  assert "epoch 2" in table and "CPU cores" in table


def _record(seed, accuracy, share, epochs=(1, 5)):
  """A run as rw_ablation keeps it, with made-up numbers."""
  weights = {
    e: {
      "corrupted_fraction": 0.25,
      "norm_ratio": 2.0,
      "share": {r: share * e / 5 for r in weight_trace.READINGS},
      "ess": {r: 100.0 / e for r in weight_trace.READINGS},
    }
    for e in epochs
  }
  return {
    "seed": seed,
    "train_accuracy": 0.9,
    "seconds_per_epoch": 0.1,
    "final": {
      "test_accuracy": accuracy,
      "best_test_accuracy": accuracy + 0.1,
      "best_epoch": 3,
      "memorization": share,
      "clean_fit": 1.0,
    },
    "test_accuracy_per_epoch": [accuracy] * 5,
    "weights": weights,
  }


def test_summary_tables_and_plot_from_run_records(tmp_path):
  runs = {
    "cnn1d": {
      "sam": [_record(s, 0.6 + 0.01 * s, 0.25) for s in range(3)],
      "m_sam(m=16)": [_record(s, 0.7, 0.2) for s in range(2)],
      "rw_sam mean,norm,0.5": [
        _record(s, 0.55 + 0.02 * s, 0.8) for s in (0, 1, 2, 3)
      ],
    }
  }
  summary = rw_ablation.summarize(runs)["cnn1d"]
  default = summary["rw_sam mean,norm,0.5"]
  # Paired over seeds 0-2 (seed 3 has no SAM run): −0.05, −0.04, −0.03.
  difference = default["test_accuracy_minus_sam"]
  assert difference["seeds"] == 3
  assert difference["mean"] == pytest.approx(-0.04)
  assert difference["standard_error"] == pytest.approx(0.01 / 3**0.5)
  assert default["test_accuracy"][0] == pytest.approx(0.58)  # all 4 seeds
  assert default["weight_share"] == {1: pytest.approx(0.16), 5: 0.8}
  assert summary["sam"]["weight_share"] is None
  assert summary["sam"]["readings_on_sam"]["max,norm,0.5"]["ess"] == {
    1: 100.0,
    5: 20.0,
  }
  assert summary["sam"]["corrupted_fraction"] == 0.25
  results = {
    "settings": {"label_noise": 0.3, "rho": 0.05, "epochs": 5},
    "summary": {"cnn1d": summary},
    "runs": runs,
  }
  text = rw_ablation.format_tables(results)
  assert "-4.00 ± 0.58" in text  # final − SAM, in points
  assert "0.16 / 100" in text and "0.80 / 20" in text  # epochs 1 and 5
  assert "zscore,norm,0.5" in text  # every reading on SAM's trajectory
  rw_ablation.plot(results, tmp_path / "ablation.png")
  assert (tmp_path / "ablation.png").stat().st_size > 10_000


@pytest.mark.slow
def test_ablation_end_to_end_on_one_model(tmp_path, capsys):
  results = _tiny(tmp_path, "--models", "cnn1d", "--readings", "mean,norm,0.5")
  _check(
    results, tmp_path, capsys.readouterr().out, ["cnn1d"], ["mean,norm,0.5"]
  )


@pytest.mark.slow
def test_ablation_end_to_end_on_both_models(tmp_path, capsys):
  readings = ["mean,norm,0.5", "max,squared,2", "rho,norm,0.5"]
  results = _tiny(tmp_path, "--readings", *readings)
  _check(
    results,
    tmp_path,
    capsys.readouterr().out,
    ["cnn1d", "cnn1d_wide"],
    readings,
  )
