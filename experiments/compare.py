"""The main job: SGD, SAM, m-SAM and RW-SAM on MNIST-1D with label noise.

::

  python -m experiments.compare            # a few minutes on a 2-core CPU
  python -m experiments.compare --full     # 10 seeds instead of 3

Trains MNIST-1D's small CNN on the 4000 MNIST-1D training signals with 30% of
their labels replaced by another class (the same corrupted set for every
run), with SGD, mini-batch SAM (``m = b = 128``), m-SAM at m = 64, 32, 16, 8,
4 and RW-SAM (λ = 0.5), ρ = 0.05, 100 epochs, seeds 0, 1, 2, all with the
same base optimizer (SGD, momentum 0.9, learning rate 0.1 with cosine decay,
weight decay 5e-4). Then
prints a table of the final and the best-epoch test accuracy (mean ± std over
seeds, on the clean test labels), the training accuracy on the noisy labels,
the fraction of the corrupted training labels the final model fits
(memorization) and the seconds per epoch, and writes into ``--output-dir``:

- ``results.json``: the settings, every run's per-epoch metrics and the summary;
- ``accuracy.png``: test accuracy against ``m`` (m-SAM, with SAM at ``m = b``
  and SGD and RW-SAM as lines), and per optimizer.

The paper's claims (2509.18001) it puts to the test at CPU scale: SAM beats
SGD, accuracy rises as ``m`` falls (m-SAM), RW-SAM beats SAM, and RW-SAM holds
up under label noise. After the table, a ``checks:`` line says which of the
orderings that hold on every CPU measured (:data:`CLAIMS`) this run
reproduces; the digits themselves vary from one CPU to another.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import numpy as np

from experiments import config as config_lib
from experiments import input_pipeline
from experiments import optimizers
from experiments import reporting
from experiments import train as train_lib
from experiments.configs import mnist1d as mnist1d_config


@dataclasses.dataclass
class Settings:
  """What the main job runs (the defaults fit 10 minutes on 2 CPU cores)."""

  epochs: int = 100
  seeds: tuple[int, ...] = (0, 1, 2)
  label_noise: float = 0.3
  micro_batch_sizes: tuple[int, ...] = (64, 32, 16, 8, 4)
  optimizers: tuple[str, ...] = ("sgd", "sam", "m_sam", "rw_sam")
  batch_size: int = 128
  rho: float = 0.05
  lam: float = 0.5
  rw_sam_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  model: str = "cnn1d"
  model_options: dict[str, Any] = dataclasses.field(default_factory=dict)
  train_examples: int | None = None
  output_dir: str = "outputs/compare"


FULL = {"seeds": tuple(range(10))}
"""``--full``: the same runs over 10 seeds (tighter error bars); about 3.5×
the default's time."""


def run_name(optimizer: str, micro_batch_size: int | None) -> str:
  return (
    optimizer
    if micro_batch_size is None
    else (f"{optimizer}(m={micro_batch_size})")
  )


def run_configs(
  settings: Settings,
) -> list[tuple[str, config_lib.TrainConfig]]:
  """``(name, config)`` for every optimizer (and m), seed 0."""
  runs = []
  m_sam_implementation = (
    "unrolled" if jax.default_backend() == "cpu" else ("vmap")
  )
  for optimizer in settings.optimizers:
    base = mnist1d_config.get_config("sgd")
    sizes = settings.micro_batch_sizes if optimizer == "m_sam" else (None,)
    for micro_batch_size in sizes:
      options = {}
      if optimizer == "m_sam":
        options = {
          "micro_batch_size": micro_batch_size,
          "implementation": m_sam_implementation,
        }
      elif optimizer in ("rw_sam", "rw_asam"):
        options = {"lam": settings.lam, **settings.rw_sam_options}
      config = dataclasses.replace(
        base,
        model=settings.model,
        model_options=dict(settings.model_options),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        label_noise=settings.label_noise,
        checkpoint_every=0,
        optimizer=dataclasses.replace(
          base.optimizer, name=optimizer, rho=settings.rho, options=options
        ),
      )
      runs.append((run_name(optimizer, micro_batch_size), config))
  return runs


def _summary(values: Sequence[float]) -> dict[str, float]:
  mean, std = reporting.mean_std(values)
  return {"mean": mean, "std": std}


def summarize(
  runs: dict[str, list[train_lib.RunResult]],
) -> dict[str, dict[str, Any]]:
  """Per optimizer, over seeds: the final and best-epoch test accuracy, the
  training accuracy on the noisy labels, memorization (the fraction of the
  corrupted labels fitted at the end; None without noise) and seconds per
  epoch."""
  summary = {}
  for name, results in runs.items():
    accuracies = [r.history[-1]["test_accuracy"] for r in results]
    best = [r.final["best_test_accuracy"] for r in results]
    memorization = [r.final["memorization"] for r in results]
    train_accuracies = [r.history[-1]["train_accuracy"] for r in results]
    seconds = [reporting.seconds_per_epoch(r.history) for r in results]
    summary[name] = {
      "test_accuracy": _summary(accuracies),
      "best_test_accuracy": _summary(best),
      "train_accuracy_noisy_labels": _summary(train_accuracies),
      "memorization": (
        None if None in memorization else _summary(memorization)
      ),
      "seconds_per_epoch": float(np.median(seconds)),
      "seeds": [r.config.seed for r in results],
      "test_accuracy_per_seed": accuracies,
      "best_test_accuracy_per_seed": best,
      "memorization_per_seed": memorization,
    }
  return summary


CLAIMS = (
  ("SAM > SGD", "sam", ">", "sgd"),
  ("m-SAM (m = 4) > SAM", "m_sam(m=4)", ">", "sam"),
  ("RW-SAM < SAM", "rw_sam", "<", "sam"),
)
"""What must hold on every machine: ``(claim, left, order, right)``, each a
comparison of the mean final test accuracy of two runs. The digits vary
across CPUs (XLA's CPU kernels differ, and training amplifies the last bits:
a few tenths to about 2 points a row); these orderings held on every CPU
measured (experiments/RESULTS.md, section 1), the smallest margin 2.8
points."""


def checks(summary: dict[str, dict[str, Any]]) -> dict[str, str | None]:
  """Per claim of :data:`CLAIMS`: ``"pass"``, ``"fail"``, or None when the
  run left out one of its two optimizers."""
  verdicts: dict[str, str | None] = {}
  for claim, left, order, right in CLAIMS:
    if left not in summary or right not in summary:
      verdicts[claim] = None
      continue
    a = summary[left]["test_accuracy"]["mean"]
    b = summary[right]["test_accuracy"]["mean"]
    verdicts[claim] = "pass" if (a > b if order == ">" else a < b) else "fail"
  return verdicts


def format_checks(summary: dict[str, dict[str, Any]]) -> str:
  """One line: each claim of :data:`CLAIMS`, its verdict and its two means."""
  parts = []
  for (claim, left, _order, right), verdict in zip(
    CLAIMS, checks(summary).values(), strict=True
  ):
    if verdict is None:
      parts.append(f"{claim}: not run")
      continue
    a = 100 * summary[left]["test_accuracy"]["mean"]
    b = 100 * summary[right]["test_accuracy"]["mean"]
    parts.append(f"{claim}: {verdict} ({a:.2f} vs {b:.2f})")
  return "checks: " + "; ".join(parts)


def format_table(summary: dict[str, dict[str, Any]], settings: Settings) -> str:
  """A plain-text table of the summary."""
  model = settings.model + (
    f" {settings.model_options}" if settings.model_options else ""
  )
  header = (
    f"MNIST-1D, {model}, {settings.label_noise:.0%} label"
    f" noise, batch {settings.batch_size}, {settings.epochs} epochs,"
    f" seeds {list(settings.seeds)}"
  )
  rows = [
    (
      "optimizer",
      "test acc. % (final)",
      "(best epoch)",
      "train acc. % (noisy)",
      "memorized %",
      "s / epoch",
    )
  ]
  for name, entry in summary.items():
    test, best = entry["test_accuracy"], entry["best_test_accuracy"]
    noisy, memorized = (
      entry["train_accuracy_noisy_labels"],
      entry["memorization"],
    )
    rows.append(
      (
        name,
        reporting.format_mean_std(test["mean"], test["std"], 100.0),
        reporting.format_mean_std(best["mean"], best["std"], 100.0),
        f"{100 * noisy['mean']:.1f}",
        "" if memorized is None else f"{100 * memorized['mean']:.1f}",
        f"{entry['seconds_per_epoch']:.3f}",
      )
    )
  return reporting.text_table(header, rows) + (
    "\n(mean ± std over seeds; best epoch: the largest test accuracy over"
    " the epochs, a selection on the test set; memorized: the corrupted"
    " training labels the final model predicts)"
  )


def plot(
  summary: dict[str, dict[str, Any]],
  settings: Settings,
  path: pathlib.Path,
) -> None:
  """Accuracy against m (left) and per optimizer (right), into ``path``."""
  plt = reporting.pyplot()

  def accuracy(name: str) -> tuple[float, float]:
    entry = summary[name]["test_accuracy"]
    return 100 * entry["mean"], 100 * entry["std"]

  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  points = [(settings.batch_size, "sam")] + [
    (m, run_name("m_sam", m)) for m in settings.micro_batch_sizes
  ]
  points = sorted((m, name) for m, name in points if name in summary)
  if points:
    means, stds = zip(*(accuracy(name) for _, name in points))
    left.errorbar(
      [m for m, _ in points],
      means,
      yerr=stds,
      marker="o",
      capsize=3,
      label="m-SAM (m = b: SAM)",
    )
  for name, style in (("sgd", "--"), ("rw_sam", ":")):
    if name in summary:
      mean, std = accuracy(name)
      line = left.axhline(
        mean,
        linestyle=style,
        label=name.upper().replace("_", "-"),
        color="C1" if name == "sgd" else "C2",
      )
      left.axhspan(mean - std, mean + std, alpha=0.12, color=line.get_color())
  left.set_xscale("log", base=2)
  ticks = sorted({m for m, _ in points})
  left.set_xticks(ticks, [str(m) for m in ticks])
  left.minorticks_off()
  left.set_xlabel("micro-batch size m")
  left.set_ylabel("test accuracy % (mean ± std)")
  left.set_title("accuracy against m")
  left.legend()

  names = list(summary)
  for index, name in enumerate(names):
    seeds = [100 * a for a in summary[name]["test_accuracy_per_seed"]]
    right.scatter(
      [index] * len(seeds), seeds, s=12, alpha=0.5, color=f"C{index % 10}"
    )
    mean, std = accuracy(name)
    right.errorbar(
      [index],
      [mean],
      yerr=[std],
      fmt="_",
      markersize=18,
      capsize=4,
      color=f"C{index % 10}",
    )
  right.set_xticks(range(len(names)), names, rotation=30, ha="right")
  right.set_ylabel("test accuracy % (seeds, mean ± std)")
  right.set_title("per optimizer")
  reporting.save_figure(
    figure,
    path,
    f"MNIST-1D, {settings.model}, {settings.label_noise:.0%} label noise,"
    f" {settings.epochs} epochs, {len(settings.seeds)} seeds",
  )


def run(settings: Settings, progress: bool = True) -> dict[str, Any]:
  """Trains every run of ``settings``; returns what ``results.json`` holds."""
  unknown = set(settings.optimizers) - set(optimizers.VARIANTS)
  if unknown:
    raise ValueError(
      f"unknown optimizers {sorted(unknown)}; choose from"
      f" {list(optimizers.VARIANTS)}."
    )
  configs = run_configs(settings)
  splits = input_pipeline.load_data(configs[0][1], settings.train_examples)
  steps_per_run = settings.epochs * (splits.train.size // settings.batch_size)
  bar = train_lib.progress_bar(
    total=steps_per_run * len(configs) * len(settings.seeds),
    disable=not progress,
  )
  start = time.perf_counter()
  results: dict[str, list[train_lib.RunResult]] = {}
  for name, config in configs:
    for seed in settings.seeds:
      bar.set_description(f"{name} seed {seed}", refresh=False)
      result = train_lib.train(
        dataclasses.replace(config, seed=seed), splits=splits, progress=bar
      )
      results.setdefault(name, []).append(result)
  bar.close()
  summary = summarize(results)
  return {
    "settings": dataclasses.asdict(settings),
    "machine": reporting.machine(),
    "wall_seconds": time.perf_counter() - start,
    "summary": summary,
    "checks": checks(summary),
    "runs": {
      name: [{"config": r.config.to_dict(), "history": r.history} for r in rs]
      for name, rs in results.items()
    },
  }


def parse_ints(text: str) -> tuple[int, ...]:
  """``"0,1,2"`` as ``(0, 1, 2)``."""
  return tuple(int(x) for x in text.split(",") if x)


def with_command_line(defaults: Any, args: argparse.Namespace) -> Any:
  """``defaults`` (a dataclass) with every field the command line gave."""
  given = {
    field.name: getattr(args, field.name)
    for field in dataclasses.fields(defaults)
    if getattr(args, field.name, None) is not None
  }
  return dataclasses.replace(defaults, **given)


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
  defaults = Settings()
  parser = argparse.ArgumentParser(
    prog="python -m experiments.compare", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--full",
    action="store_true",
    help=f"more seeds for tighter numbers: {FULL}.",
  )
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--seeds", type=parse_ints, help="e.g. 0,1,2")
  parser.add_argument("--label-noise", type=float)
  parser.add_argument(
    "--micro-batch-sizes", type=parse_ints, help="e.g. 32,16,8"
  )
  parser.add_argument(
    "--optimizers",
    type=lambda text: tuple(text.split(",")),
    help=f"e.g. {','.join(defaults.optimizers)}",
  )
  parser.add_argument("--rho", type=float, help="ρ of every SAM variant.")
  parser.add_argument("--lam", type=float, help="RW-SAM's temperature λ.")
  parser.add_argument(
    "--rw-sam-options",
    type=json.loads,
    help="more options of sam_optax.rw_sam as JSON, e.g."
    ' \'{"gradient_norms": "exact"}\' or \'{"sigma": "calibrate"}\'.',
  )
  parser.add_argument("--model", choices=("cnn1d", "mlp"))
  parser.add_argument(
    "--model-options",
    type=json.loads,
    help="the model's options as JSON, e.g. '{\"channels\": 64}' (the"
    " wider CNN of experiments.rw_ablation).",
  )
  parser.add_argument(
    "--train-examples", type=int, help="use only the first N training examples."
  )
  parser.add_argument("--output-dir")
  args = parser.parse_args(argv)
  if args.full:
    defaults = dataclasses.replace(defaults, **FULL)
  return with_command_line(defaults, args)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  settings = parse_settings(argv)
  results = run(settings)
  path = reporting.write_results(results, settings.output_dir)
  figure = path.parent / "accuracy.png"
  plot(results["summary"], settings, figure)
  print(format_table(results["summary"], settings))
  print(format_checks(results["summary"]))
  print(f"{results['wall_seconds']:.0f} s in all; wrote {path} and {figure}")
  return results


if __name__ == "__main__":
  main()
