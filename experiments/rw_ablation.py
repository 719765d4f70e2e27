"""RW-SAM's open choices against SAM and m-SAM, on MNIST-1D with 30% label noise.

::

  python -m experiments.rw_ablation            # about 20 minutes, 2 CPU cores
  python -m experiments.rw_ablation --quick    # about 3 minutes: a smoke run

The paper (2509.18001) says only that RW-SAM's norm estimates are
"normalized before applying the exponential". This runs SAM, m-SAM (m = 16)
and RW-SAM under each *reading* of that sentence (norms divided by their mean
or by their largest, the norms or their squares, λ = 0.5 or 2, and ``ρ`` in
the exponent; :mod:`experiments.weight_trace` names them; ``max,squared,2``,
whose weights are uniform to 1%, is only traced) on two models: the
main job's CNN (25 channels, which fits about half of the noisy labels) and a
wider one (64 channels, :data:`experiments.configs.mnist1d.WIDE`, which fits
all of them). Everything else is the main job's (:mod:`experiments.compare`:
ρ = 0.05, batch 128, 100 epochs, SGD with momentum, cosine schedule, weight
decay, RW-SAM's finite-difference norms); the default RW-SAM reading on the
default CNN *is* the main job's RW-SAM, run for run.

The decisive rows (SAM and RW-SAM with mean and with max scaling at λ = 0.5)
run 10 seeds, m-SAM 5 and the other readings 3 (seeds 0, 1, 2: each is
paired with SAM's runs of the same seed). Each run reports its final and its
best-epoch test accuracy (the largest over epochs: a selection on the test
set) and the fraction of the corrupted training labels its final model
predicts (memorization); each RW-SAM row reports its seed-paired difference
to SAM (mean ± standard error over the seeds both ran). Every 10 epochs each
run measures, on 4 fixed batches of 128 training examples with exact
per-example gradient norms, the share of each reading's Gibbs weights on the
corrupted examples and their effective sample size
(:mod:`experiments.weight_trace`); the table gives a row's own reading on its
own trajectory.

Writes ``results.json`` and ``ablation.png`` into ``--output-dir``
(``outputs/rw_ablation``) and prints the tables.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import pathlib
import time
from typing import Any

import numpy as np

from experiments import compare
from experiments import config as config_lib
from experiments import input_pipeline
from experiments import reporting
from experiments import train as train_lib
from experiments import weight_trace
from experiments.configs import mnist1d as mnist1d_config

MODELS = {"cnn1d": {}, "cnn1d_wide": mnist1d_config.WIDE}
"""The two models, as ``model_options`` of the main job's ``cnn1d``."""

SAM = "sam"


@dataclasses.dataclass
class Settings:
  """What runs (the defaults fit 30 minutes on 2 shared CPU cores)."""

  epochs: int = 100
  label_noise: float = 0.3
  rho: float = 0.05
  micro_batch_size: int = 16
  models: tuple[str, ...] = tuple(MODELS)
  readings: tuple[str, ...] = (
    "mean,norm,0.5",
    "max,norm,0.5",
    "mean,squared,0.5",
    "max,squared,0.5",
    "mean,norm,2",
    "max,norm,2",
    "mean,squared,2",
    "rho,norm,0.5",
  )
  decisive: tuple[str, ...] = ("mean,norm,0.5", "max,norm,0.5")
  seeds: tuple[int, ...] = tuple(range(10))
  m_sam_seeds: tuple[int, ...] = tuple(range(5))
  other_seeds: tuple[int, ...] = (0, 1, 2)
  weight_trace_every: int = 10
  weight_trace_batches: int = 4
  train_examples: int | None = None
  output_dir: str = "outputs/rw_ablation"


QUICK = {
  "epochs": 30,
  "seeds": (0, 1, 2),
  "m_sam_seeds": (0, 1),
  "other_seeds": (0,),
  "readings": (
    "mean,norm,0.5",
    "max,norm,0.5",
    "mean,squared,0.5",
    "mean,norm,2",
    "rho,norm,0.5",
  ),
}
"""``--quick``: 30 epochs, fewer seeds and readings; checks that everything
runs, settles nothing."""


def run_plan(
  settings: Settings,
) -> list[tuple[str, str, config_lib.TrainConfig, tuple[int, ...]]]:
  """``(model, row, config of seed 0, seeds)`` for every row of both models.

  Rows are ``sam``, ``m_sam(m=16)`` and ``rw_sam READING``.

  The configurations are the main job's (:func:`experiments.compare.run_configs`)
  with the model's options, RW-SAM's reading and the weight trace.
  """
  plan = []
  for model in settings.models:
    base = compare.Settings(
      epochs=settings.epochs,
      label_noise=settings.label_noise,
      rho=settings.rho,
      model_options=MODELS[model],
      micro_batch_sizes=(settings.micro_batch_size,),
    )
    rows = [
      (SAM, None, settings.seeds),
      ("m_sam", None, settings.m_sam_seeds),
    ] + [
      (
        "rw_sam",
        reading,
        settings.seeds
        if reading in settings.decisive
        else settings.other_seeds,
      )
      for reading in settings.readings
    ]
    for optimizer, reading, seeds in rows:
      options = (
        {}
        if reading is None
        else weight_trace.reading_options(reading, settings.rho)
      )
      ((name, config),) = compare.run_configs(
        dataclasses.replace(
          base, optimizers=(optimizer,), rw_sam_options=options
        )
      )
      config = dataclasses.replace(
        config,
        weight_trace_every=settings.weight_trace_every,
        weight_trace_batches=settings.weight_trace_batches,
      )
      if reading is not None:
        name = f"{name} {reading}"
      plan.append((model, name, config, seeds))
  return plan


def _run_record(result: train_lib.RunResult) -> dict[str, Any]:
  """What results.json keeps of a run: its final numbers and its curves."""
  history = result.history
  return {
    "seed": result.config.seed,
    "final": result.final,
    "train_accuracy": history[-1]["train_accuracy"],
    "seconds_per_epoch": reporting.seconds_per_epoch(history),
    "test_accuracy_per_epoch": [line["test_accuracy"] for line in history],
    "weights": {
      line["epoch"]: line["weights"] for line in history if "weights" in line
    },
  }


def _trace(
  runs: Sequence[dict[str, Any]], reading: str, key: str
) -> dict[int, float] | None:
  """Mean over seeds, per traced epoch, of ``reading``'s ``key`` (``"share"``
  or ``"ess"``) on the runs' trajectories; None without a trace."""
  epochs = sorted(runs[0]["weights"])
  if not epochs:
    return None
  return {
    epoch: float(np.mean([run["weights"][epoch][key][reading] for run in runs]))
    for epoch in epochs
  }


def summarize(
  runs: dict[str, dict[str, list[dict[str, Any]]]],
) -> dict[str, dict[str, dict[str, Any]]]:
  """Per model and row: mean ± std over seeds, differences to SAM, traces."""
  summary: dict[str, dict[str, dict[str, Any]]] = {}
  for model, rows in runs.items():
    per_seed = {
      row: {
        key: {run["seed"]: run["final"][key] for run in seeds}
        for key in ("test_accuracy", "best_test_accuracy", "memorization")
      }
      for row, seeds in rows.items()
    }
    summary[model] = {}
    for row, seeds in rows.items():
      entry: dict[str, Any] = {"seeds": [run["seed"] for run in seeds]}
      for key, values in per_seed[row].items():
        entry[key] = reporting.mean_std(list(values.values()))
        if row != SAM and SAM in per_seed:
          mean, error, count = reporting.paired_difference(
            values, per_seed[SAM][key]
          )
          entry[f"{key}_minus_sam"] = {
            "mean": mean,
            "standard_error": error,
            "seeds": count,
          }
      first = seeds[0]["weights"]
      entry["corrupted_fraction"] = (
        first[min(first)]["corrupted_fraction"] if first else None
      )
      own = row.split(" ", 1)[1] if row.startswith("rw_sam ") else None
      entry["weight_share"] = own and _trace(seeds, own, "share")
      entry["effective_sample_size"] = own and _trace(seeds, own, "ess")
      if row == SAM and first:  # every reading at the same parameters
        entry["readings_on_sam"] = {
          reading: {
            "share": _trace(seeds, reading, "share"),
            "ess": _trace(seeds, reading, "ess"),
          }
          for reading in weight_trace.READINGS
          if reading in first[min(first)]["share"]
        }
      entry["seconds_per_epoch"] = float(
        np.median([run["seconds_per_epoch"] for run in seeds])
      )
      summary[model][row] = entry
  return summary


def _mean_over_training(trace: dict[int, float] | None) -> float | None:
  return None if not trace else float(np.mean(list(trace.values())))


def table_rows(
  summary: dict[str, dict[str, Any]], batch_size: int
) -> list[tuple[str, ...]]:
  """The accuracy table: one row per model and optimizer (reading)."""
  rows = [
    (
      "model",
      "optimizer (reading)",
      "seeds",
      "final %",
      "best epoch %",
      "final − SAM",
      "best − SAM",
      "memorized %",
      "weight on corrupted",
      "ESS",
    )
  ]
  for model, entries in summary.items():
    for row, entry in entries.items():
      share = _mean_over_training(entry["weight_share"])
      ess = _mean_over_training(entry["effective_sample_size"])
      if row == SAM:  # uniform weights
        share, ess = entry["corrupted_fraction"], float(batch_size)
      difference = lambda key, entry=entry: (
        reporting.format_difference(
          entry[f"{key}_minus_sam"]["mean"],
          entry[f"{key}_minus_sam"]["standard_error"],
          100.0,
        )
        if (f"{key}_minus_sam" in entry)
        else ""
      )
      memorized = entry["memorization"]
      rows.append(
        (
          model,
          row,
          str(len(entry["seeds"])),
          reporting.format_mean_std(*entry["test_accuracy"], 100.0, ".1f"),
          reporting.format_mean_std(*entry["best_test_accuracy"], 100.0, ".1f"),
          difference("test_accuracy"),
          difference("best_test_accuracy"),
          reporting.format_mean_std(*memorized, 100.0, ".1f"),
          "" if share is None else f"{share:.2f}",
          "" if ess is None else f"{ess:.0f}",
        )
      )
  return rows


def _shown_epochs(epochs: Sequence[int]) -> list[int]:
  """The first, the 10th, the middle and the last traced epochs."""
  return sorted(
    {epochs[0], epochs[len(epochs) // 2], epochs[-1]} | ({10} & set(epochs))
  )


def trace_rows(
  summary: dict[str, dict[str, Any]], on_sam: bool = False
) -> list[tuple[str, ...]]:
  """The mechanism table: weight share / ESS by epoch, for each RW-SAM row
  on its own trajectory, or (``on_sam``) for every reading on SAM's."""
  rows, shown = [], None
  for model, entries in summary.items():
    if on_sam:
      traces = {
        reading: (trace["share"], trace["ess"])
        for reading, trace in entries.get(SAM, {})
        .get("readings_on_sam", {})
        .items()
      }
    else:
      traces = {
        row: (entry["weight_share"], entry["effective_sample_size"])
        for row, entry in entries.items()
        if entry["weight_share"]
      }
    for name, (share, ess) in traces.items():
      shown = shown or _shown_epochs(sorted(share))
      rows.append(
        (model, name, *(f"{share[e]:.2f} / {ess[e]:.0f}" for e in shown))
      )
  if not rows:
    return []
  return [("model", "reading", *(f"epoch {e}" for e in shown)), *rows]


def format_tables(results: dict[str, Any]) -> str:
  """The printed report: the accuracy table, then the mechanism table."""
  settings = results["settings"]
  summary = results["summary"]
  text = reporting.text_table(
    f"MNIST-1D, {settings['label_noise']:.0%} label noise, ρ ="
    f" {settings['rho']}, {settings['epochs']} epochs (mean ± std over"
    " seeds; differences to SAM paired by seed, ± standard error; weight"
    " and ESS: the row's reading on its own trajectory, mean over the"
    " traced epochs)",
    table_rows(summary, compare.Settings().batch_size),
    left_columns=2,
  )
  for on_sam, where in (
    (False, "each RW-SAM row on its own trajectory"),
    (True, "every reading on SAM's trajectory (the same parameters for all)"),
  ):
    rows = trace_rows(summary, on_sam)
    if rows:
      text += "\n\n" + reporting.text_table(
        "Weight on the corrupted examples / effective sample size (of"
        f" 128): {where}; exact norms on 4 fixed batches of 128, mean over"
        " seeds",
        rows,
        left_columns=2,
      )
  return text


def plot(results: dict[str, Any], path: pathlib.Path) -> None:
  """Accuracy per row (top) and each reading's weight share (middle) and ESS
  (bottom) over training, one column per model."""
  plt = reporting.pyplot()
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  summary = results["summary"]
  models = list(summary)
  figure, axes = plt.subplots(
    3, len(models), figsize=(6.5 * len(models), 12), squeeze=False
  )
  for column, model in enumerate(models):
    entries = summary[model]
    names = list(entries)
    top, middle, bottom = axes[:, column]
    for index, name in enumerate(names):
      color = f"C{index % 10}"
      for key, marker, offset in (
        ("test_accuracy", "o", -0.12),
        ("best_test_accuracy", "s", 0.12),
      ):
        seeds = [
          100 * run["final"][key] for run in results["runs"][model][name]
        ]
        mean, std = entries[name][key]
        top.scatter(
          [index + offset] * len(seeds), seeds, s=8, alpha=0.4, color=color
        )
        top.errorbar(
          [index + offset],
          [100 * mean],
          yerr=[100 * std],
          fmt=marker,
          capsize=3,
          color=color,
          mfc=color if key == "test_accuracy" else "white",
        )
      share = entries[name]["weight_share"]
      if share is not None:
        epochs = sorted(share)
        middle.plot(
          epochs,
          [share[e] for e in epochs],
          marker=".",
          color=color,
          label=name.split(" ", 1)[1],
        )
        ess = entries[name]["effective_sample_size"]
        bottom.plot(
          epochs,
          [ess[e] for e in epochs],
          marker=".",
          color=color,
          label=name.split(" ", 1)[1],
        )
    sam = entries.get(SAM)
    if sam is not None:
      top.axhline(100 * sam["test_accuracy"][0], color="gray", lw=0.8, ls="--")
      if sam["corrupted_fraction"] is not None:
        middle.axhline(
          sam["corrupted_fraction"],
          color="gray",
          ls="--",
          label="uniform (SAM)",
        )
    top.set_xticks(range(len(names)), names, rotation=35, ha="right")
    top.set_ylabel("test accuracy % (● final, □ best epoch)")
    top.set_title(f"{model}: accuracy per row (seeds, mean ± std)")
    middle.set_ylim(0, 1)
    middle.set_ylabel("Gibbs weight on corrupted examples")
    middle.set_title("the row's reading on its own trajectory")
    middle.legend(fontsize=7)
    bottom.set_ylabel("effective sample size (of 128)")
    bottom.set_yscale("log")
    bottom.set_ylim(1, 150)
    bottom.yaxis.set_major_formatter(ticker.ScalarFormatter())
    bottom.set_xlabel("epoch")
    bottom.legend(fontsize=7)
  settings = results["settings"]
  reporting.save_figure(
    figure,
    path,
    f"RW-SAM readings, MNIST-1D, {settings['label_noise']:.0%} label noise,"
    f" ρ = {settings['rho']}, {settings['epochs']} epochs",
    dpi=110,
  )


def run(settings: Settings, progress: bool = True) -> dict[str, Any]:
  """Trains every row and seed; returns what ``results.json`` holds."""
  plan = run_plan(settings)
  splits = input_pipeline.load_data(plan[0][2], settings.train_examples)
  steps_per_run = settings.epochs * (splits.train.size // plan[0][2].batch_size)
  bar = train_lib.progress_bar(
    total=steps_per_run * sum(len(seeds) for *_, seeds in plan),
    disable=not progress,
  )
  start = time.perf_counter()
  runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
  for model, row, config, seeds in plan:
    for seed in seeds:
      bar.set_description(f"{model} {row} seed {seed}", refresh=False)
      result = train_lib.train(
        dataclasses.replace(config, seed=seed), splits=splits, progress=bar
      )
      runs.setdefault(model, {}).setdefault(row, []).append(_run_record(result))
  bar.close()
  return {
    "settings": dataclasses.asdict(settings),
    "configs": {
      f"{model} {row}": config.to_dict() for model, row, config, _ in plan
    },
    "machine": reporting.machine(),
    "wall_seconds": time.perf_counter() - start,
    "summary": summarize(runs),
    "runs": runs,
  }


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
  defaults = Settings()
  parser = argparse.ArgumentParser(
    prog="python -m experiments.rw_ablation", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help=f"a smoke run of a few minutes: {QUICK}.",
  )
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--label-noise", type=float)
  parser.add_argument("--rho", type=float)
  parser.add_argument(
    "--models",
    type=lambda text: tuple(text.split(",")),
    help=f"of {','.join(MODELS)}",
  )
  parser.add_argument(
    "--readings",
    nargs="+",
    help="RW-SAM readings SCALING,SCORE,LAMBDA, e.g."
    " mean,norm,0.5 max,squared,2 rho,norm,0.5.",
  )
  parser.add_argument(
    "--decisive", nargs="+", help="the readings run with --seeds."
  )
  parser.add_argument(
    "--seeds",
    type=compare.parse_ints,
    help="of SAM and the decisive readings, e.g. 0,1,2",
  )
  parser.add_argument("--micro-batch-size", type=int, help="m-SAM's m.")
  parser.add_argument("--m-sam-seeds", type=compare.parse_ints)
  parser.add_argument("--other-seeds", type=compare.parse_ints)
  parser.add_argument("--weight-trace-every", type=int)
  parser.add_argument(
    "--train-examples", type=int, help="use only the first N training examples."
  )
  parser.add_argument("--output-dir")
  args = parser.parse_args(argv)
  for name in ("readings", "decisive"):
    if getattr(args, name) is not None:
      setattr(args, name, tuple(getattr(args, name)))
  if args.quick:
    defaults = dataclasses.replace(defaults, **QUICK)
  settings = compare.with_command_line(defaults, args)
  if not settings.label_noise > 0:
    raise ValueError(
      "the ablation measures memorization: it needs label"
      f" noise, got {settings.label_noise}."
    )
  unknown = set(settings.models) - set(MODELS)
  if unknown:
    raise ValueError(f"unknown models {sorted(unknown)}; use {list(MODELS)}.")
  for reading in settings.readings:
    weight_trace.reading_options(reading, settings.rho)  # checks the name
  return settings


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  settings = parse_settings(argv)
  results = run(settings)
  path = reporting.write_results(results, settings.output_dir)
  figure = path.parent / "ablation.png"
  plot(results, figure)
  print(format_tables(results))
  print(
    f"{results['wall_seconds']:.0f} s in all on"
    f" {reporting.describe_machine(results['machine'])};"
    f" wrote {path} and {figure}"
  )
  return results


if __name__ == "__main__":
  main()
