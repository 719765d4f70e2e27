"""Sharpness and gradient noise at the end of training (the paper's Table 6).

::

  python -m experiments.noise_trace                 # a few minutes, 2 CPU cores
  python -m experiments.noise_trace --seeds 0,1,2 --label-noise 0.3

Trains MNIST-1D's small CNN with SGD, mini-batch SAM, m-SAM and RW-SAM (the
``mnist1d`` configurations of :mod:`experiments.train`, the same base
optimizer for all), then measures at the final parameters, on the training
set with the labels trained on:

- ``tr Σ``, the trace of the gradient-noise covariance
  (``sam_optax.diagnostics.gradient_noise``, exact from per-example gradients);
- ``tr H``, the Hessian's trace (Hutchinson, Rademacher probes, ± standard
  error; ``sam_optax.diagnostics.hessian_trace``);
- ``λ_max``, the Hessian's top eigenvalue (Lanczos;
  ``sam_optax.diagnostics.hessian_top_eigenpair``);

and prints them as mean ± std over seeds, next to the final accuracies. The
paper (2509.18001, Table 6: CIFAR-100, ResNet-18) reports ``tr Σ`` of 572
(SGD), 198 (SAM) and 178 (RW-SAM). Writes ``results.json`` into
``--output-dir``.
"""

import argparse
from collections.abc import Sequence
import dataclasses
import time
from typing import Any

import jax
import numpy as np

from experiments import compare
from experiments import config as config_lib
from experiments import input_pipeline
from experiments import reporting
from experiments import train as train_lib
from experiments.configs import mnist1d as mnist1d_config
from sam_optax import diagnostics

PAPER_TABLE6 = {"sgd": 572.0, "sam": 198.0, "rw_sam": 178.0}
"""``tr Σ`` at the end of training, CIFAR-100, ResNet-18 (2509.18001)."""


@dataclasses.dataclass
class Settings:
  """What runs and what is measured."""

  epochs: int = 60
  seeds: tuple[int, ...] = (0, 1, 2)
  label_noise: float = 0.0
  micro_batch_size: int = 16
  examples: int | None = None
  num_probes: int = 64
  lanczos_iterations: int = 20
  chunk_size: int = 1000
  output_dir: str = "outputs/noise_trace"


def run_configs(
  settings: Settings,
) -> list[tuple[str, config_lib.TrainConfig]]:
  """SGD, SAM, m-SAM and RW-SAM: the main job's MNIST-1D runs, seed 0."""
  compare_settings = compare.Settings(
    epochs=settings.epochs,
    seeds=settings.seeds,
    label_noise=settings.label_noise,
    micro_batch_sizes=(settings.micro_batch_size,),
    optimizers=("sgd", "sam", "m_sam", "rw_sam"),
    rho=mnist1d_config.RHO.get("sam", 0.05),
  )
  return compare.run_configs(compare_settings)


def measure(
  loss_fn: Any,
  params: Any,
  dataset: dict[str, np.ndarray],
  settings: Settings,
  key: jax.Array,
) -> dict[str, float]:
  """``tr Σ``, ``‖∇L‖²``, ``tr H`` (± s.e.) and ``λ_max`` at ``params``."""
  chunk = min(settings.chunk_size, len(dataset["labels"]))
  trace_key, lanczos_key = jax.random.split(key)
  start = time.perf_counter()
  noise = diagnostics.gradient_noise(loss_fn, params, dataset, chunk_size=chunk)
  hessian_trace = diagnostics.hessian_trace(
    loss_fn,
    params,
    dataset,
    trace_key,
    num_probes=settings.num_probes,
    chunk_size=chunk,
  )
  top = diagnostics.hessian_top_eigenpair(
    loss_fn,
    params,
    dataset,
    lanczos_key,
    num_iterations=settings.lanczos_iterations,
    chunk_size=chunk,
  )
  values = jax.device_get(
    {
      "noise_trace": noise.trace,
      "gradient_sq_norm": noise.mean_gradient_sq_norm,
      "hessian_trace": hessian_trace.mean,
      "hessian_trace_standard_error": hessian_trace.standard_error,
      "top_eigenvalue": top.value,
      "top_eigenvalue_residual": top.residual_norm,
    }
  )
  values = {name: float(value) for name, value in values.items()}
  values["diagnostics_seconds"] = time.perf_counter() - start
  return values


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  keys = (
    "noise_trace",
    "hessian_trace",
    "top_eigenvalue",
    "gradient_sq_norm",
    "train_loss",
    "train_accuracy",
    "test_accuracy",
  )
  return {
    name: {key: reporting.mean_std([run[key] for run in seeds]) for key in keys}
    for name, seeds in runs.items()
  }


def format_table(
  summary: dict[str, Any], settings: Settings, examples: int
) -> str:
  header = (
    f"MNIST-1D, cnn1d, {settings.label_noise:.0%} label noise,"
    f" {settings.epochs} epochs, seeds {list(settings.seeds)};"
    f" measured on {examples} training examples"
    " (mean ± std over seeds)"
  )
  rows = [
    (
      "optimizer",
      "tr Σ",
      "tr H",
      "λ_max",
      "‖∇L‖²",
      "train loss",
      "test acc. %",
      "paper tr Σ (C100, R18)",
    )
  ]
  for name, entry in summary.items():
    cell = lambda key, scale=1.0, form=".2f", entry=entry: (
      reporting.format_mean_std(*entry[key], scale, form)
    )
    paper = PAPER_TABLE6.get(name)
    rows.append(
      (
        name,
        cell("noise_trace", form=".3f"),
        cell("hessian_trace"),
        cell("top_eigenvalue", form=".3f"),
        cell("gradient_sq_norm", form=".1e"),
        cell("train_loss", form=".4f"),
        cell("test_accuracy", 100.0, ".1f"),
        f"{paper:.0f}" if paper else "",
      )
    )
  return reporting.text_table(header, rows)


def run(settings: Settings) -> dict[str, Any]:
  """Trains every optimizer and seed, and measures each final model."""
  configs = run_configs(settings)
  splits = input_pipeline.load_data(configs[0][1])
  train_set = splits.train
  examples = min(settings.examples or train_set.size, train_set.size)
  dataset = {
    "inputs": train_set.inputs[:examples],
    "labels": train_set.labels[:examples],
  }
  start = time.perf_counter()
  runs: dict[str, list[dict[str, Any]]] = {}
  for name, config in configs:
    for seed in settings.seeds:
      result = train_lib.train(
        dataclasses.replace(config, seed=seed), splits=splits, progress=False
      )
      values = measure(
        result.eval_loss_fn,
        result.train_state.params,
        dataset,
        settings,
        jax.random.key(seed),
      )
      last = result.history[-1]
      values.update(
        train_loss=last["train_loss"],
        train_accuracy=last["train_accuracy"],
        test_accuracy=last["test_accuracy"],
        seconds_per_epoch=reporting.seconds_per_epoch(result.history),
        seed=seed,
      )
      print(
        f"{name} seed {seed}: "
        + ", ".join(f"{key} {value:.4g}" for key, value in values.items()),
        flush=True,
      )
      runs.setdefault(name, []).append(values)
  return {
    "settings": dataclasses.asdict(settings),
    "examples": examples,
    "machine": reporting.machine(),
    "wall_seconds": time.perf_counter() - start,
    "summary": summarize(runs),
    "runs": runs,
  }


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.noise_trace", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--epochs", type=int)
  parser.add_argument("--seeds", type=compare.parse_ints, help="e.g. 0,1,2")
  parser.add_argument("--label-noise", type=float)
  parser.add_argument("--micro-batch-size", type=int, help="m-SAM's m.")
  parser.add_argument(
    "--examples",
    type=int,
    help="measure on the first N training examples (default: all).",
  )
  parser.add_argument(
    "--num-probes", type=int, help="Hutchinson probes for tr H."
  )
  parser.add_argument("--lanczos-iterations", type=int)
  parser.add_argument(
    "--chunk-size",
    type=int,
    help="examples processed at once by the diagnostics.",
  )
  parser.add_argument("--output-dir")
  return compare.with_command_line(Settings(), parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  settings = parse_settings(argv)
  results = run(settings)
  path = reporting.write_results(results, settings.output_dir)
  print(format_table(results["summary"], settings, results["examples"]))
  print(f"{results['wall_seconds']:.0f} s in all; wrote {path}")
  return results


if __name__ == "__main__":
  main()
