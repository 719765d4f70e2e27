"""What the scripts report: statistics, tables, the machine, results.json.

Shared by :mod:`experiments.compare`, :mod:`experiments.noise_trace`,
:mod:`experiments.benchmark` and :mod:`experiments.rw_ablation`.
"""

from collections.abc import Sequence
import json
import os
import pathlib
import platform
from typing import Any

import jax
import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """The mean and the sample standard deviation (0 for a single value)."""
  values = np.asarray(values, np.float64)
  return (
    float(values.mean()),
    float(values.std(ddof=1)) if len(values) > 1 else 0.0,
  )


def format_mean_std(
  mean: float, std: float, scale: float = 1.0, form: str = ".2f"
) -> str:
  """``"mean ± std"``, both times ``scale``, formatted by ``form``."""
  return f"{scale * mean:{form}} ± {scale * std:{form}}"


def paired_difference(
  a: dict[int, float], b: dict[int, float]
) -> tuple[float, float, int]:
  """``a − b`` paired by seed: the mean difference, its standard error, n.

  Over the seeds (the keys) present in both; the standard error is the
  sample standard deviation of the differences over ``√n`` (0 for one seed,
  NaN for none).
  """
  seeds = sorted(set(a) & set(b))
  if not seeds:
    return float("nan"), float("nan"), 0
  mean, std = mean_std([a[seed] - b[seed] for seed in seeds])
  return mean, std / np.sqrt(len(seeds)), len(seeds)


def format_difference(
  mean: float, standard_error: float, scale: float = 1.0, form: str = "+.2f"
) -> str:
  """``"+mean ± s.e."``, both times ``scale``; empty for NaN."""
  if np.isnan(mean):
    return ""
  return f"{scale * mean:{form}} ± {scale * standard_error:{form[1:]}}"


def best_epoch(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """``best_test_accuracy``, the largest test accuracy over the epochs, and
  ``best_epoch``, the first epoch that reached it (None without epochs).

  A selection on the test set: an upper bound of what early stopping on a
  validation set would give, not a result to report alone.
  """
  if not history:
    return {"best_test_accuracy": None, "best_epoch": None}
  best = max(history, key=lambda line: line["test_accuracy"])
  return {
    "best_test_accuracy": best["test_accuracy"],
    "best_epoch": best["epoch"],
  }


def seconds_per_epoch(history: Sequence[dict[str, Any]]) -> float:
  """The median epoch time, leaving out the first epoch (compilation)."""
  times = [line["epoch_seconds"] for line in history]
  return float(np.median(times[1:] if len(times) > 1 else times))


def text_table(
  title: str, rows: Sequence[Sequence[str]], left_columns: int = 1
) -> str:
  """A plain-text table: ``title``, then ``rows`` with a rule under the first.

  The first ``left_columns`` columns are aligned left, the others right.
  """
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = [title]
  for index, row in enumerate(rows):
    lines.append(
      "  ".join(
        cell.ljust(width) if i < left_columns else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(row, widths))
      )
    )
    if index == 0:
      lines.append("  ".join("-" * width for width in widths))
  return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
  """A Markdown table; the first row is the header."""
  lines = ["| " + " | ".join(row) + " |" for row in rows]
  lines.insert(1, "|" + "---|" * len(rows[0]))
  return "\n".join(lines)


def pyplot() -> Any:
  """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def save_figure(
  figure: Any, path: pathlib.Path, title: str, dpi: int = 120
) -> None:
  """Titles ``figure``, lays it out, writes it to ``path`` and closes it."""
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=dpi)
  pyplot().close(figure)


def write_results(results: dict[str, Any], output_dir: str) -> pathlib.Path:
  """Writes ``results`` to ``output_dir/results.json``; returns that path."""
  output = pathlib.Path(output_dir)
  output.mkdir(parents=True, exist_ok=True)
  path = output / "results.json"
  path.write_text(json.dumps(results, indent=1) + "\n")
  return path


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """Where the numbers come from: the host, its CPU, JAX and its devices."""
  return {
    "node": platform.node(),
    "platform": platform.platform(),
    "processor": _cpu_name(),
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
  }


def describe_machine(description: dict[str, Any]) -> str:
  """:func:`machine`'s ``description`` in one line."""
  return (
    f"{description['node']}: {description['processor']},"
    f" {description['cpu_count']} CPU cores; JAX {description['jax']}"
    f" on {description['backend']} ({description['device_kind']},"
    f" {len(description['devices'])} device(s))"
  )
