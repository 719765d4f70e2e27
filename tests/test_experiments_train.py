"""experiments.train, the configs and the main job (experiments.compare)."""

import copy
import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from experiments import compare
from experiments import config as config_lib
from experiments import configs
from experiments import data
from experiments import input_pipeline
from experiments import models
from experiments import optimizers
from experiments import steps
from experiments import train
from experiments import weight_trace
import sam_optax


def _small_mnist1d(train_examples=256, label_noise=0.0):
  splits = data.load_mnist1d()
  train_set = data.with_label_noise(
    splits.train.take(slice(train_examples)), label_noise, 10, seed=0
  )
  return splits._replace(train=train_set, test=splits.test.take(slice(200)))


def _config(**overrides):
  config = configs.get_config("mnist1d:rw_sam")
  return dataclasses.replace(
    config, **{"epochs": 4, "batch_size": 64, **overrides}
  )


def _same_history(a, b):
  drop = ("epoch_seconds",)
  return [{k: v for k, v in line.items() if k not in drop} for line in a] == [
    {k: v for k, v in line.items() if k not in drop} for line in b
  ]


def test_a_killed_run_resumes_to_the_result_of_an_unbroken_one(tmp_path):
  splits = _small_mnist1d(label_noise=0.25)
  # RW-SAM draws a probe each step: resuming must replay the same keys. The
  # weight trace of epoch 3 is measured again, and equal.
  config = _config(
    checkpoint_every=2, weight_trace_every=3, weight_trace_batches=2
  )
  unbroken = train.train(
    config, tmp_path / "unbroken", splits=splits, progress=False
  )
  # Killed after epoch 3: its last checkpoint is epoch 2, and metrics.jsonl
  # already has a line for epoch 3, which the resumed run must replace.
  killed_dir = tmp_path / "killed"
  train.train(
    config, killed_dir, splits=splits, progress=False, stop_after_epoch=3
  )
  assert len((killed_dir / "metrics.jsonl").read_text().splitlines()) == 3
  resumed = train.train(config, killed_dir, splits=splits, progress=False)
  for a, b in zip(
    jax.tree.leaves(unbroken.train_state), jax.tree.leaves(resumed.train_state)
  ):
    np.testing.assert_array_equal(a, b)
  assert _same_history(unbroken.history, resumed.history)
  assert resumed.final == unbroken.final
  assert [line["epoch"] for line in resumed.history if "weights" in line] == [
    1,
    3,
    4,
  ]
  lines = [
    json.loads(line)
    for line in (killed_dir / "metrics.jsonl").read_text().splitlines()
  ]
  assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
  assert _same_history(lines, unbroken.history)
  # A finished run started again has nothing left to do; one written before
  # a field was added (at its default) still opens.
  stored = json.loads((killed_dir / "config.json").read_text())
  del stored["noise_trace_examples"]
  (killed_dir / "config.json").write_text(json.dumps(stored))
  again = train.train(config, killed_dir, splits=splits, progress=False)
  assert _same_history(again.history, unbroken.history)
  # Another configuration in the same workdir is refused.
  with pytest.raises(ValueError, match="another configuration"):
    train.train(
      dataclasses.replace(config, seed=5),
      killed_dir,
      splits=splits,
      progress=False,
    )


def test_final_metrics_and_the_weight_trace_leave_training_alone():
  splits = _small_mnist1d(label_noise=0.25)
  config = _config()  # the steps of the test above, compiled
  plain = train.train(config, splits=splits, progress=False)
  traced = train.train(
    dataclasses.replace(config, weight_trace_every=2, weight_trace_batches=2),
    splits=splits,
    progress=False,
  )
  for a, b in zip(
    jax.tree.leaves(plain.train_state), jax.tree.leaves(traced.train_state)
  ):
    np.testing.assert_array_equal(a, b)
  without = [
    {k: v for k, v in line.items() if k != "weights"} for line in traced.history
  ]
  assert _same_history(plain.history, without)
  assert plain.final == traced.final
  final = traced.final
  assert final["test_accuracy"] == traced.history[-1]["test_accuracy"]
  assert final["best_test_accuracy"] >= final["test_accuracy"]
  assert final["best_test_accuracy"] == max(
    line["test_accuracy"] for line in traced.history
  )
  assert 0 <= final["memorization"] <= 1 and 0 <= final["clean_fit"] <= 1
  weights = [line["weights"] for line in traced.history if "weights" in line]
  assert len(weights) == 3  # epochs 1, 2 and 4
  for trace in weights:
    assert 0 < trace["corrupted_fraction"] < 1
    for reading in weight_trace.READINGS:
      assert 0 <= trace["share"][reading] <= 1
      assert 1 - 1e-3 <= trace["ess"][reading] <= 64 + 1e-3


def test_memorization_is_the_fit_of_the_noisy_labels_of_corrupted_examples():
  # A stand-in model predicting inputs[:, 0]. Examples 0-3 are corrupted:
  # 0 and 1 are predicted as their noisy label (memorized), 2 and 3 as their
  # clean one (not memorized); of the clean examples 4-7, two are fitted.
  clean = np.arange(8)
  noisy = np.array([5, 6, 7, 8, 4, 5, 6, 7])
  predicted = np.array([5, 6, 2, 3, 4, 5, 0, 0])
  train_set = data.ArrayDataset(
    predicted[:, None].astype(np.float32), noisy, noisy != clean
  )

  def eval_step(params, state, inputs, labels, mask):
    correct = (inputs[:, 0] == labels) * mask
    return 0.0, np.sum(correct)

  fake = steps.Steps(tx=None, train_step=None, eval_step=eval_step)
  state = steps.TrainState(0, None, None, None)
  assert train.memorization(fake, state, train_set, batch_size=3) == {
    "memorization": 0.5,
    "clean_fit": 0.5,
  }
  assert (
    train.memorization(
      fake, state, train_set._replace(corrupted=None), batch_size=3
    )["memorization"]
    is None
  )


def test_seeds_are_deterministic_and_distinct(monkeypatch):
  built = []  # the seed of every model built
  create_model = models.create_model

  def counting_create_model(*args, **kwargs):
    built.append(kwargs["seed"])
    return create_model(*args, **kwargs)

  monkeypatch.setattr(models, "create_model", counting_create_model)
  splits = _small_mnist1d()
  config = dataclasses.replace(
    configs.get_config("mnist1d:sam"), epochs=1, batch_size=64
  )
  a = train.train(config, splits=splits, progress=False)
  b = train.train(config, splits=splits, progress=False)
  c = train.train(
    dataclasses.replace(config, seed=1), splits=splits, progress=False
  )
  assert _same_history(a.history, b.history)
  assert not _same_history(a.history, c.history)
  assert built == [0, 0, 1]  # one model a run


def test_runs_that_differ_only_in_seed_share_their_steps():
  config = configs.get_config("mnist1d:m_sam")
  preprocessing = input_pipeline.preprocessing("mnist1d", True)

  def build(seed, optimizer):
    return steps.build_steps(
      train.build_model(config, 10, seed), optimizer, preprocessing, 100
    )

  first = build(0, config.optimizer)
  assert build(1, copy.deepcopy(config.optimizer)) is first
  assert build(0, dataclasses.replace(config.optimizer, rho=0.1)) is not first
  # A configuration is a fresh copy: editing one leaves the table alone.
  config.optimizer.options["micro_batch_size"] = 4
  assert (
    configs.get_config("mnist1d:m_sam").optimizer.options["micro_batch_size"]
    == 16
  )


def test_command_line_writes_config_metrics_and_checkpoints(tmp_path, capsys):
  workdir = tmp_path / "run"
  result = train.main(
    [
      "--config",
      "mnist1d:sgd",
      "--workdir",
      str(workdir),
      "--no-progress",
      "--set",
      "epochs=2",
      "batch_size=500",
      "optimizer.learning_rate=0.05",
    ]
  )
  assert result.config.optimizer.learning_rate == 0.05
  lines = [
    json.loads(line)
    for line in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  assert [line["epoch"] for line in lines] == [1, 2]
  for key in (
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "epoch_seconds",
    "learning_rate",
    "step",
  ):
    assert np.isfinite(lines[-1][key])
  assert lines[-1]["step"] == 2 * (4000 // 500)
  assert lines[-1]["learning_rate"] == pytest.approx(0.0)  # cosine to zero
  assert json.loads((workdir / "config.json").read_text())["epochs"] == 2
  assert (workdir / "checkpoints").is_dir()
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["epoch"] == 2
  train.main(["--config", "table7", "--list"])
  assert "table7:m_sam,8" in capsys.readouterr().out
  with pytest.raises(ValueError, match="unknown configuration key"):
    config_lib.apply_overrides(config_lib.TrainConfig(), ["optimizer.radius=1"])


def test_every_row_of_every_table_is_a_valid_configuration():
  for table in configs.TABLES:
    rows = configs.rows(table)
    assert rows
    for row in rows:
      config = configs.get_config(row)
      assert config.optimizer.name in optimizers.VARIANTS
      assert config_lib.TrainConfig.from_dict(config.to_dict()) == config
  table1 = {row: configs.get_config(row) for row in configs.rows("table1")}
  assert len(table1) == 18
  assert table1["table1:cifar10,resnet18,sgd"].epochs == 400
  assert table1["table1:cifar100,wrn28_10,rw_sam"].optimizer.rho == 0.1
  assert configs.get_config("table4:0.6,sam").label_noise == 0.6
  assert configs.get_config("table5:2").optimizer.options["lam"] == 2.0
  m_usam = configs.get_config("table7:m_usam,16").optimizer.options
  assert m_usam["micro_batch_size"] == 16 and m_usam["normalize"] is False
  with pytest.raises(ValueError, match="unknown row"):
    configs.get_config("table1:cifar10,vgg,sam")


# One row of each table, a few steps on tfds's mock CIFAR with the model
# shrunk (same architecture code, fewer and narrower blocks).
SHRINK = {
  "resnet18": {"width": 4, "stage_sizes": [1, 1]},
  "resnet50": {"width": 2, "stage_sizes": [1, 1]},
  "wrn28_10": {"depth": 10, "widen": 1},
}
# Two rows in the default suite (a ResNet with SGD, m-SAM's micro-batches);
# the others, which compile the same pipeline again, with -m slow.
MOCK_ROWS = [
  "table1:cifar10,resnet50,sgd",
  pytest.param("table1:cifar100,wrn28_10,sam", marks=pytest.mark.slow),
  pytest.param("table4:0.4,sam", marks=pytest.mark.slow),
  pytest.param("table5:0.5", marks=pytest.mark.slow),
  pytest.param("table6:sam", marks=pytest.mark.slow),
  "table7:m_sam,4",
]


@pytest.mark.parametrize("row", MOCK_ROWS)
def test_paper_tables_run_on_mock_cifar(row, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  if row == "table7:m_sam,4":
    config = configs.get_config("table7:m_sam,8")
    config.optimizer.options["micro_batch_size"] = 4
  else:
    config = configs.get_config(row)
  if config.optimizer.options.get("sigma") == "calibrate":
    # Calibration is tested on MNIST-1D below (it compiles a lot).
    config.optimizer.options["sigma"] = 1e-3
  config = dataclasses.replace(
    config,
    epochs=1,
    batch_size=8,
    eval_batch_size=16,
    model_options=SHRINK[config.model],
    noise_trace_examples=min(config.noise_trace_examples, 16),
  )
  with tfds.testing.mock_data(num_examples=16):
    result = train.train(config, tmp_path, progress=False)
    noisy = input_pipeline.load_data(config)
    clean = input_pipeline.load_data(
      dataclasses.replace(config, label_noise=0.0)
    )
  (line,) = result.history
  assert line["step"] == 2 and np.isfinite(line["train_loss"])
  assert 0.0 <= line["test_accuracy"] <= 1.0
  if config.noise_trace_examples:
    assert result.noise_trace > 0
    assert json.loads((tmp_path / "noise_trace.json").read_text())[
      "noise_trace"
    ] == pytest.approx(result.noise_trace)
  if config.label_noise:  # exactly round(0.4 × 16) = 6 labels changed
    assert np.sum(noisy.train.labels != clean.train.labels) == 6


def test_rw_sam_calibrates_sigma_once_and_a_resumed_run_keeps_it(
  tmp_path, monkeypatch
):
  # sam_optax.calibrate_sigma itself is the library's to test (and slow to
  # compile); here, that train calls it once, on per-example losses of the
  # initial model, and that the run and its resumption use its σ.
  calls = []

  def fake_calibrate_sigma(loss_fn, params, batch, key):
    calls.append(loss_fn(params, batch).shape)
    return types.SimpleNamespace(sigma=jax.numpy.float32(0.002))

  monkeypatch.setattr(sam_optax, "calibrate_sigma", fake_calibrate_sigma)
  splits = _small_mnist1d()
  config = _config(epochs=2, checkpoint_every=1)
  config.optimizer.options["sigma"] = "calibrate"
  result = train.train(
    config, tmp_path, splits=splits, progress=False, stop_after_epoch=1
  )
  assert calls == [(64,)]
  sigma = json.loads((tmp_path / "calibrated_sigma.json").read_text())["sigma"]
  assert (
    result.config.optimizer.options["sigma"] == sigma == (pytest.approx(0.002))
  )
  assert (
    json.loads((tmp_path / "config.json").read_text())["optimizer"]["options"][
      "sigma"
    ]
    == "calibrate"
  )  # the run's config as asked for
  (tmp_path / "calibrated_sigma.json").write_text(json.dumps({"sigma": 0.003}))
  resumed = train.train(config, tmp_path, splits=splits, progress=False)
  assert len(calls) == 1  # not calibrated again
  assert resumed.config.optimizer.options["sigma"] == 0.003
  assert [line["epoch"] for line in resumed.history] == [1, 2]


def test_main_job_end_to_end_in_a_tiny_setting(tmp_path, capsys):
  results = compare.main(
    [
      "--epochs",
      "2",
      "--seeds",
      "0,1",
      "--micro-batch-sizes",
      "32",
      "--train-examples",
      "256",
      "--label-noise",
      "0.25",
      "--output-dir",
      str(tmp_path),
    ]
  )
  summary = results["summary"]
  assert list(summary) == ["sgd", "sam", "m_sam(m=32)", "rw_sam"]
  for entry in summary.values():
    assert entry["seeds"] == [0, 1]
    assert len(entry["test_accuracy_per_seed"]) == 2
    assert 0.0 <= entry["test_accuracy"]["mean"] <= 1.0
    assert entry["seconds_per_epoch"] > 0
    for final, best in zip(
      entry["test_accuracy_per_seed"], entry["best_test_accuracy_per_seed"]
    ):
      assert best >= final
    assert all(0 <= m <= 1 for m in entry["memorization_per_seed"])
  assert json.loads((tmp_path / "results.json").read_text())["summary"] == (
    summary
  )
  assert (tmp_path / "accuracy.png").stat().st_size > 10_000
  table = capsys.readouterr().out
  assert "m_sam(m=32)" in table and "±" in table and "s / epoch" in table
  assert "best epoch" in table and "memorized %" in table
  # The orderings of compare.CLAIMS are reported, not asserted, at this size.
  assert "checks: SAM > SGD: " in table and "RW-SAM < SAM: " in table
  assert "m-SAM (m = 4) > SAM: not run" in table  # m = 32 only
  assert set(results["checks"].values()) <= {"pass", "fail", None}
  runs = results["runs"]["rw_sam"]
  assert runs[0]["config"]["label_noise"] == 0.25
  assert len(runs[0]["history"]) == 2


def test_main_job_checks_the_orderings_not_the_digits():
  def summary(**means):
    return {name: {"test_accuracy": {"mean": m}} for name, m in means.items()}

  # RESULTS.md section 1's rows on two machines: the digits differ, the
  # orderings hold.
  for sgd, sam, m4, rw_sam in (
    (0.627, 0.6693, 0.791, 0.6167),
    (0.6203, 0.6627, 0.79, 0.635),
  ):
    runs = summary(sgd=sgd, sam=sam, **{"m_sam(m=4)": m4}, rw_sam=rw_sam)
    assert set(compare.checks(runs).values()) == {"pass"}
  verdicts = compare.checks(
    summary(sgd=0.70, sam=0.66, **{"m_sam(m=4)": 0.65}, rw_sam=0.67)
  )
  assert list(verdicts.values()) == ["fail", "fail", "fail"]
  line = compare.format_checks(summary(sgd=0.627, sam=0.6693))
  assert line == (
    "checks: SAM > SGD: pass (66.93 vs 62.70);"
    " m-SAM (m = 4) > SAM: not run; RW-SAM < SAM: not run"
  )


def test_main_job_settings():
  default = compare.parse_settings([])
  assert default.optimizers == ("sgd", "sam", "m_sam", "rw_sam")
  assert len(default.seeds) == 3 and default.label_noise > 0
  assert len(default.micro_batch_sizes) >= 3
  full = compare.parse_settings(["--full", "--label-noise", "0.5"])
  assert len(full.seeds) > len(default.seeds)
  assert full.label_noise == 0.5 and full.epochs == default.epochs
  names = [name for name, _ in compare.run_configs(default)]
  assert names[:2] == ["sgd", "sam"] and names[-1] == "rw_sam"
  assert [f"m_sam(m={m})" for m in default.micro_batch_sizes] == names[2:-1]
