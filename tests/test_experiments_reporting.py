"""experiments.reporting: what compare, noise_trace and benchmark print."""

import json

import pytest

from experiments import reporting


def test_mean_std_and_its_format():
  mean, std = reporting.mean_std([1.0, 3.0])
  assert mean == 2.0 and std == pytest.approx(2**0.5)  # sample std
  assert reporting.mean_std([5.0]) == (5.0, 0.0)
  assert reporting.format_mean_std(0.5, 0.01, 100.0) == "50.00 ± 1.00"
  assert reporting.format_mean_std(1.0, 0.25, form=".1f") == "1.0 ± 0.2"


def test_seconds_per_epoch_leaves_out_the_first_epoch():
  history = [{"epoch_seconds": s} for s in (9.0, 1.0, 2.0, 3.0)]
  assert reporting.seconds_per_epoch(history) == 2.0
  assert reporting.seconds_per_epoch(history[:1]) == 9.0


def test_paired_differences_use_the_seeds_both_ran():
  mean, error, count = reporting.paired_difference(
    {0: 0.5, 1: 0.7, 2: 0.9, 5: 0.0}, {0: 0.4, 1: 0.5, 2: 0.9, 3: 1.0}
  )
  assert count == 3 and mean == pytest.approx(0.1)
  assert error == pytest.approx(0.1 / 3**0.5)  # std 0.1 over √3
  assert reporting.paired_difference({0: 1.0}, {1: 1.0})[2] == 0
  assert reporting.format_difference(-0.039, 0.01, 100.0) == "-3.90 ± 1.00"
  assert reporting.format_difference(float("nan"), 0.0) == ""


def test_best_epoch_is_the_first_epoch_with_the_largest_test_accuracy():
  history = [
    {"epoch": e, "test_accuracy": a}
    for e, a in enumerate((0.2, 0.6, 0.5, 0.6, 0.4), start=1)
  ]
  assert reporting.best_epoch(history) == {
    "best_test_accuracy": 0.6,
    "best_epoch": 2,
  }
  assert reporting.best_epoch([])["best_test_accuracy"] is None


def test_tables():
  assert reporting.text_table("T", [("a", "bb"), ("ccc", "d")]) == (
    "T\na    bb\n---  --\nccc   d"
  )
  assert reporting.text_table(
    "T", [("a", "b", "cc"), ("ccc", "d", "e")], left_columns=2
  ) == ("T\na    b  cc\n---  -  --\nccc  d   e")
  assert reporting.markdown_table([("a", "b"), ("1", "")]) == (
    "| a | b |\n|---|---|\n| 1 |  |"
  )


def test_machine_and_results(tmp_path):
  machine = reporting.machine()
  assert machine["cpu_count"] >= 1 and machine["devices"]
  assert " CPU cores; JAX " in reporting.describe_machine(machine)
  path = reporting.write_results({"machine": machine}, str(tmp_path / "out"))
  assert path == tmp_path / "out" / "results.json"
  assert json.loads(path.read_text()) == {"machine": machine}
