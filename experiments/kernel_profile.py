"""Where a step's time goes: the XLA kernels of scaling-benchmark rows.

::

  python -m experiments.kernel_profile --size d8w128 --rows sam rw_sam

Builds the rows of ``experiments.scaling_benchmark`` for one size, runs each
under ``jax.profiler`` and sums, per kind of kernel (the fusion's name without
its number: ``ynn_fusion``, ``dot``, ``xor_gather_fusion``...), the median
time of each kernel over the profiled steps. It also reports how many
kernels a step runs and on which threads: XLA:CPU's executor runs kernels
that are ready together on its thread pool (``tf_XLAEigen``), where a step
whose kernels form a chain stays on the calling thread
(``tf_XLAPjRtCpuClient``). The profiler adds its own overhead to every
kernel; compare rows with each other, not with the benchmark's times.
"""

import argparse
import collections
from collections.abc import Sequence
import pathlib
import re
import statistics
import tempfile
from typing import Any

import jax

from experiments import reporting
from experiments import scaling_benchmark


def kernel_times(run: Any, steps: int) -> dict[str, Any]:
  """Median time of each kernel over ``steps`` profiled runs, by kind."""
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory)
    for _ in range(steps):
      run()
    jax.profiler.stop_trace()
    (path,) = pathlib.Path(directory).rglob("*.xplane.pb")
    profile = jax.profiler.ProfileData.from_file(str(path))
  durations: dict[str, list[float]] = collections.defaultdict(list)
  threads: collections.Counter[str] = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for event in line.events:
        # The executor's own spans and the async kernels' end markers.
        if event.name.startswith(
          ("ThunkExecutor", "ThreadpoolListener", "end:")
        ):
          continue
        durations[event.name].append(event.duration_ns / 1e3)
        threads[line.name.split("/")[0]] += 1
  kinds: collections.Counter[str] = collections.Counter()
  for name, values in durations.items():
    kinds[re.sub(r"\.\d+$", "", name)] += statistics.median(values)
  return {
    "kernels_per_step": sum(map(len, durations.values())) / steps,
    "kernel_us": sum(kinds.values()),
    "by_kind_us": dict(kinds.most_common()),
    "kernels_by_thread": {k: v / steps for k, v in threads.items()},
  }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  labels = [size.label for size in scaling_benchmark.SIZES]
  parser.add_argument(
    "--size", default="d8w128", choices=labels, help="a size's label."
  )
  parser.add_argument("--rows", nargs="+", default=["sam", "rw_sam"])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--top", type=int, default=10)
  args = parser.parse_args(argv)
  print(reporting.describe_machine(reporting.machine()))
  (size,) = [s for s in scaling_benchmark.SIZES if s.label == args.size]
  setup = scaling_benchmark.make_setup(size)
  variants = {v.name: v for v in scaling_benchmark.variants(setup)}
  unknown = sorted(set(args.rows) - set(variants))
  if unknown:
    parser.error(
      f"--rows: no row {', '.join(unknown)} on {args.size}; the rows are"
      f" {', '.join(variants)}."
    )
  results = {}
  for name in args.rows:
    runner = variants[name].build(setup)
    for _ in range(20):  # warm up
      runner.run()
    result = results[name] = kernel_times(runner.run, args.steps)
    threads = ", ".join(
      f"{thread} {count:.0f}"
      for thread, count in result["kernels_by_thread"].items()
    )
    print(
      f"\n{name}: {result['kernels_per_step']:.0f} kernels a step, sum of"
      f" median kernel times {result['kernel_us']:.0f} us; kernels by"
      f" thread: {threads}"
    )
    for kind, micros in list(result["by_kind_us"].items())[: args.top]:
      print(f"  {micros:8.1f} us  {kind}")
  return results


if __name__ == "__main__":
  main()
