"""m-SAM down to 1-SAM: an MLP on MNIST-1D with label noise, m = 1, 2, 4, … b.

::

  python -m experiments.one_sam            # m = 1 … 128, 3 seeds, 2-core CPU
  python -m experiments.one_sam --epochs 2 --train-examples 256  # a smoke run

Wen, Ma & Li (2211.05729) prove that 1-SAM (every example its own
perturbation) minimizes the trace of the Hessian, while mini-batch SAM
(``m = b``) regularizes its top eigenvalue; 2509.18001 says accuracy rises as
``m`` falls. This trains MNIST-1D's MLP (:class:`experiments.models.MLP`,
40 → 100 → 100 → 10, ReLU) with m-SAM at every power of two ``m`` from 1 to
the batch size (``m = b`` is SAM), ρ = 0.05, and the main job's everything
else (:mod:`experiments.compare`: 30% label noise, batch 128, SGD with
momentum, cosine schedule, weight decay; 100 epochs), with m-SAM's low-rank
form (``implementation="low_rank"``): 1-SAM at about SAM's cost. For each
``m`` and seed it reports the final and best-epoch test accuracy, the
fraction of the corrupted training labels the final model predicts, and
``tr H`` of the final model's training loss (on the labels trained on, the
4000 training examples) by Hutchinson's estimator
(:func:`sam_optax.diagnostics.hessian_trace`).

Writes ``results.json`` and ``one_sam.png`` (accuracy, memorization and
``tr H`` against ``m``) into ``--output-dir`` (``outputs/one_sam``) and prints
the table.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import pathlib
import time
from typing import Any

import jax

from experiments import compare
from experiments import input_pipeline
from experiments import reporting
from experiments import train as train_lib
from sam_optax import diagnostics


@dataclasses.dataclass
class Settings:
  """What runs (the defaults: about 15 minutes on 2 shared CPU cores)."""

  epochs: int = 100
  seeds: tuple[int, ...] = (0, 1, 2)
  label_noise: float = 0.3
  micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
  batch_size: int = 128
  rho: float = 0.05
  num_probes: int = 64
  chunk_size: int = 1000
  train_examples: int | None = None
  output_dir: str = "outputs/one_sam"


def name(m: int, batch_size: int) -> str:
  return "sam" if m == batch_size else compare.run_name("m_sam", m)


def run_configs(settings: Settings) -> list[tuple[int, Any]]:
  """``(m, config of seed 0)`` for every ``m``: the main job's configs with
  the MLP, m-SAM in the low-rank form and ``m = b`` as SAM."""
  base = compare.Settings(
    epochs=settings.epochs,
    label_noise=settings.label_noise,
    batch_size=settings.batch_size,
    rho=settings.rho,
    model="mlp",
    optimizers=("sam", "m_sam"),
    micro_batch_sizes=tuple(
      m for m in settings.micro_batch_sizes if m != settings.batch_size
    ),
  )
  runs = []
  for run_name, config in compare.run_configs(base):
    if config.optimizer.name == "sam":
      if settings.batch_size in settings.micro_batch_sizes:
        runs.append((settings.batch_size, config))
      continue
    options = {**config.optimizer.options, "implementation": "low_rank"}
    optimizer = dataclasses.replace(config.optimizer, options=options)
    m = options["micro_batch_size"]
    assert run_name == name(m, settings.batch_size)
    runs.append((m, dataclasses.replace(config, optimizer=optimizer)))
  return sorted(runs, key=lambda run: run[0])


def run(settings: Settings) -> dict[str, Any]:
  """Trains every ``m`` and seed and measures ``tr H`` of each final model."""
  configs = run_configs(settings)
  splits = input_pipeline.load_data(configs[0][1], settings.train_examples)
  dataset = {"inputs": splits.train.inputs, "labels": splits.train.labels}
  chunk = min(settings.chunk_size, len(dataset["labels"]))
  start = time.perf_counter()
  results: dict[str, list[train_lib.RunResult]] = {}
  traces: dict[str, list[float]] = {}
  for m, config in configs:
    label = name(m, settings.batch_size)
    for seed in settings.seeds:
      result = train_lib.train(
        dataclasses.replace(config, seed=seed), splits=splits, progress=False
      )
      trace = diagnostics.hessian_trace(
        result.eval_loss_fn,
        result.train_state.params,
        dataset,
        jax.random.key(1000 + seed),
        num_probes=settings.num_probes,
        chunk_size=chunk,
      )
      results.setdefault(label, []).append(result)
      traces.setdefault(label, []).append(float(trace.mean))
      print(
        f"{label} seed {seed}: test {result.history[-1]['test_accuracy']:.4f}"
        f" best {result.final['best_test_accuracy']:.4f}"
        f" memorized {result.final['memorization']}"
        f" tr H {float(trace.mean):.4g}"
        f" ({reporting.seconds_per_epoch(result.history):.3f} s/epoch)",
        flush=True,
      )
  summary = compare.summarize(results)
  for label, values in traces.items():
    mean, std = reporting.mean_std(values)
    summary[label]["hessian_trace"] = {"mean": mean, "std": std}
    summary[label]["hessian_trace_per_seed"] = values
  return {
    "settings": dataclasses.asdict(settings),
    "machine": reporting.machine(),
    "wall_seconds": time.perf_counter() - start,
    "summary": summary,
    "runs": {
      label: [{"config": r.config.to_dict(), "history": r.history} for r in rs]
      for label, rs in results.items()
    },
  }


def format_table(summary: dict[str, Any], settings: Settings) -> str:
  header = (
    f"MNIST-1D, MLP, {settings.label_noise:.0%} label noise, batch"
    f" {settings.batch_size}, {settings.epochs} epochs, seeds"
    f" {list(settings.seeds)}, m-SAM low-rank form"
  )
  rows = [
    (
      "m",
      "test acc. % (final)",
      "(best epoch)",
      "memorized %",
      "tr H",
      "s / epoch",
    )
  ]
  for m in sorted(settings.micro_batch_sizes):
    entry = summary.get(name(m, settings.batch_size))
    if entry is None:
      continue
    test, best = entry["test_accuracy"], entry["best_test_accuracy"]
    memorized = entry["memorization"]
    trace = entry["hessian_trace"]
    rows.append(
      (
        f"{m}" + (" (SAM)" if m == settings.batch_size else ""),
        reporting.format_mean_std(test["mean"], test["std"], 100.0),
        reporting.format_mean_std(best["mean"], best["std"], 100.0),
        "" if memorized is None else f"{100 * memorized['mean']:.1f}",
        reporting.format_mean_std(trace["mean"], trace["std"]),
        f"{entry['seconds_per_epoch']:.3f}",
      )
    )
  return reporting.text_table(header, rows) + (
    "\n(mean ± std over seeds; best epoch: the largest test accuracy over"
    " the epochs, a selection on the test set; memorized: the corrupted"
    " training labels the final model predicts; tr H: Hutchinson,"
    f" {settings.num_probes} probes, on the training set as trained on)"
  )


def plot(
  summary: dict[str, Any], settings: Settings, path: pathlib.Path
) -> None:
  """Accuracy, memorization and ``tr H`` against ``m``, into ``path``."""
  plt = reporting.pyplot()
  points = [
    (m, summary[name(m, settings.batch_size)])
    for m in sorted(settings.micro_batch_sizes)
    if name(m, settings.batch_size) in summary
  ]
  ms = [m for m, _ in points]
  figure, axes = plt.subplots(1, 3, figsize=(14, 4))

  def series(axis: Any, key: str, scale: float, label: str) -> None:
    means = [scale * e[key]["mean"] for _, e in points if e[key] is not None]
    stds = [scale * e[key]["std"] for _, e in points if e[key] is not None]
    axis.errorbar(
      ms[: len(means)], means, yerr=stds, marker="o", capsize=3, label=label
    )

  series(axes[0], "test_accuracy", 100.0, "final")
  series(axes[0], "best_test_accuracy", 100.0, "best epoch")
  axes[0].set_ylabel("test accuracy %")
  axes[0].legend()
  series(axes[1], "memorization", 100.0, "memorized")
  axes[1].set_ylabel("corrupted labels predicted %")
  series(axes[2], "hessian_trace", 1.0, "tr H")
  axes[2].set_ylabel("tr H of the final model")
  for axis in axes:
    axis.set_xscale("log", base=2)
    axis.set_xticks(ms, [str(m) for m in ms])
    axis.minorticks_off()
    axis.set_xlabel("micro-batch size m (m = b: SAM)")
  reporting.save_figure(
    figure,
    path,
    f"m-SAM on MNIST-1D's MLP, {settings.label_noise:.0%} label noise,"
    f" {settings.epochs} epochs, {len(settings.seeds)} seeds",
  )


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.one_sam", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--seeds", type=compare.parse_ints, help="e.g. 0,1,2")
  parser.add_argument("--label-noise", type=float)
  parser.add_argument(
    "--micro-batch-sizes", type=compare.parse_ints, help="e.g. 1,4,16,128"
  )
  parser.add_argument("--num-probes", type=int, help="Hutchinson probes.")
  parser.add_argument(
    "--train-examples", type=int, help="use only the first N training examples."
  )
  parser.add_argument("--output-dir")
  return compare.with_command_line(Settings(), parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  settings = parse_settings(argv)
  results = run(settings)
  path = reporting.write_results(results, settings.output_dir)
  figure = path.parent / "one_sam.png"
  plot(results["summary"], settings, figure)
  print(format_table(results["summary"], settings))
  print(f"{results['wall_seconds']:.0f} s in all; wrote {path} and {figure}")
  return results


if __name__ == "__main__":
  main()
