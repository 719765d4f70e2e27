"""The scaling benchmark at a toy size: its rows, numbers, JSON and plots."""

import json
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark
from experiments import kernel_profile
from experiments import models
from experiments import nnx_glue
from experiments import optimizers
from experiments import scaling_benchmark
from experiments import steps
import sam_optax


def test_interleaved_times_rotate_the_order_and_time_every_step():
  """The timing loop the benchmarks share: each round starts one name
  later, every step runs ``steps_per_round`` times, a time per round."""
  calls = []
  steps = {
    name: (lambda r, name=name: calls.append((r, name)) or jnp.zeros(()))
    for name in ("a", "b", "c")
  }
  rounds = []
  times = benchmark.interleaved_times(steps, 4, 2, on_round=rounds.append)
  order = [[n for r, n in calls[6 * i : 6 * i + 6 : 2]] for i in range(4)]
  assert order == [list("abc"), list("bca"), list("cab"), list("abc")]
  assert [r for r, _ in calls] == [i for i in range(4) for _ in range(6)]
  assert rounds == [0, 1, 2, 3]
  assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
  assert all(t > 0 for ts in times.values() for t in ts)


def test_median_ratio_is_taken_round_by_round():
  times = {"x": [2.0, 9.0, 3.0], "y": [1.0, 3.0, 2.0]}
  assert benchmark.median_ratio(times, "x", "y") == 2.0  # of 2, 3, 1.5
  assert benchmark.median_ratio(times, "x", "absent") is None


def test_sizes_cover_the_families_and_the_range():
  full = scaling_benchmark.sizes("full")
  assert {s.family for s in full} == {
    "small_cnn",
    "resnet18",
    "mlp",
    "transformer",
  }
  quick = scaling_benchmark.sizes("quick")
  labels = lambda chosen: [(s.family, s.label) for s in chosen]
  assert set(labels(quick)) < set(labels(full))
  assert {s.family for s in quick} == {s.family for s in full}
  assert all(s.setting == "tiny" for s in scaling_benchmark.sizes("tiny"))
  assert all(s.batch_size % s.micro_batch_size == 0 for s in full)


def test_transformer_lm_is_causal():
  model = models.transformer_lm(
    16, dim=16, depth=1, num_heads=2, max_length=6, rngs=models.nnx.Rngs(0)
  )
  tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]])
  changed = tokens.at[0, 4].set(9)
  logits, other = model(tokens), model(changed)
  assert logits.shape == (1, 6, 16)
  # Positions before the change see the same prefix.
  assert jnp.allclose(logits[0, :4], other[0, :4], atol=1e-6)
  assert not jnp.allclose(logits[0, 4:], other[0, 4:])
  untied = models.transformer_lm(
    16, dim=16, depth=1, num_heads=2, max_length=6, tie_embeddings=False,
    rngs=models.nnx.Rngs(0),
  )  # fmt: skip
  leaves = lambda m: len(jax.tree.leaves(nnx_glue.split(m).params))
  assert leaves(untied) == leaves(model) + 2  # the head's kernel and bias


def test_every_registered_variant_gets_a_row():
  setup = scaling_benchmark.make_setup(scaling_benchmark.sizes("tiny")[0])
  names = [v.name for v in scaling_benchmark.variants(setup)]
  # The registry has every variant, the split-loss and the whole-optimizer
  # ones included (no exceptions).
  assert {"functional_sam", "bsam"} <= set(optimizers.VARIANTS)
  for name in optimizers.VARIANTS:
    assert any(n == name or n.startswith(name + "/") for n in names), name
  for form in ("vmap", "unrolled", "sequential", "papers_loop"):
    assert f"m_sam/{form}" in names
  assert "m_sam/vmap/chunk=1" in names


@pytest.mark.parametrize("index", [0, 1], ids=["mlp", "transformer"])
def test_every_setup_carries_the_split_loss(index):
  """Every row's loss_fn is a SplitLoss (functional_sam's contract), the
  same per-example losses as the clean pass's."""
  setup = scaling_benchmark.make_setup(scaling_benchmark.sizes("tiny")[index])
  loss_fn = steps.passes_loss_fn(
    setup.graphdef, setup.params, setup.state, setup.per_example_loss
  )
  assert isinstance(loss_fn, sam_optax.SplitLoss)
  model = nnx.merge(setup.graphdef, setup.params, setup.state)
  losses, _ = setup.per_example_loss(model, setup.batch)
  assert losses.shape == (setup.batch["labels"].shape[0],)
  np.testing.assert_array_equal(loss_fn(setup.params, setup.batch), losses)


@pytest.mark.slow  # 4 compiles, bSAM's slowest: ~15 s on 2 shared cores
def test_functional_sam_and_bsam_rows(tmp_path):
  """Their rows run and land in the tables and the JSON, with the note
  that bSAM is the whole optimizer."""
  summary = scaling_benchmark.main(
    [
      "--tiny",
      "--families",
      "mlp",
      "--only",
      "^functional_sam$|^bsam$",
      "--repeats",
      "1",
      "--output-dir",
      str(tmp_path),
      "--no-plots",
    ]
  )
  (result,) = summary["results"]
  assert set(result["rows"]) == {"sgd", "sam", "functional_sam", "bsam"}
  assert not result["errors"]
  for name, row in result["rows"].items():
    assert row["flops"] > 0 and math.isfinite(row["vs_sam"]), name
  assert "bsam" in scaling_benchmark.table(result)
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["results"][0]["rows"].keys() == result["rows"].keys()
  assert scaling_benchmark.WHOLE_NOTE in written["notes"]


@pytest.mark.slow  # about 5 compiles: seconds on a quiet 2-core machine
def test_smoke_run(tmp_path):
  summary = scaling_benchmark.main(
    [
      "--tiny",
      "--families",
      "mlp",
      "--only",
      "^m_sam$|papers_loop|m_sam/sequential",
      "--repeats",
      "1",
      "--output-dir",
      str(tmp_path),
    ]
  )
  (result,) = summary["results"]
  assert set(result["rows"]) == {
    "sgd",
    "sam",
    "m_sam",
    "m_sam/sequential",
    "m_sam/papers_loop",
  }
  assert not result["errors"]
  for name, row in result["rows"].items():
    for key in ("step_seconds", "vs_sgd", "vs_sam", "compile_seconds"):
      assert math.isfinite(row[key]) and row[key] > 0, (name, key)
    assert row["flops"] > 0 and row["bytes_accessed"] > 0, name
    assert row["temp_bytes"] >= 0, name
  assert result["rows"]["m_sam/papers_loop"]["vs_papers_loop"] == 1.0
  assert result["auto"]["plan"]["implementation"] in (
    "unrolled",
    "sequential",
    "low_rank",
  )
  assert result["verdict"].split(":")[0] in (
    "ok",
    "MISSED",
    "NO FORM REACHES IT",
  )
  written = json.loads((tmp_path / "results.json").read_text())
  assert written["results"][0]["rows"].keys() == result["rows"].keys()
  for figure in ("step_vs_sam_by_params", "step_vs_sam_by_leaves"):
    assert (tmp_path / f"{figure}.png").stat().st_size > 0
  assert (tmp_path / "m_sam_forms.png").stat().st_size > 0


if __name__ == "__main__":
  pytest.main([__file__])


def test_auto_plan_reports_the_low_rank_form_where_m_sam_takes_it():
  # The deep MLPs: m_sam's "auto" runs "low_rank" there (weights outweigh
  # activations, no convolution), which the copy forms' plan alone missed.
  size = next(s for s in scaling_benchmark.SIZES if s.label == "d8w128")
  setup = scaling_benchmark.make_setup(size)
  loss_fn = steps.passes_loss_fn(
    setup.graphdef, setup.params, setup.state, setup.per_example_loss
  )
  takes = sam_optax._m_sam.takes_low_rank(
    loss_fn, setup.params, setup.batch, setup.chunked_micro_batch_size
  )
  assert takes
  plan = scaling_benchmark.auto_plan(setup)["plan"]
  assert plan["implementation"] == "low_rank"


def test_kernel_profile_counts_the_kernels_of_a_row():
  # The tiny MLP's SGD and SAM rows, a few profiled steps each.
  results = kernel_profile.main(
    ["--size", "d2w32", "--rows", "sgd", "sam", "--steps", "3", "--top", "2"]
  )
  assert set(results) == {"sgd", "sam"}
  for result in results.values():
    assert result["kernels_per_step"] > 0 and result["kernel_us"] > 0
    assert sum(result["kernels_by_thread"].values()) == pytest.approx(
      result["kernels_per_step"]
    )
  # SAM's step is SGD's twice over, and more.
  assert results["sam"]["kernels_per_step"] > results["sgd"]["kernels_per_step"]


def test_kernel_profile_names_an_unknown_size_or_row(capsys):
  with pytest.raises(SystemExit):
    kernel_profile.main(["--size", "d9w9"])
  assert "--size" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    kernel_profile.main(["--size", "d2w32", "--rows", "sam", "no_such_row"])
  assert "--rows: no row no_such_row" in capsys.readouterr().err
