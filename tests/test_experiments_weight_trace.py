"""experiments.weight_trace: RW-SAM's Gibbs weights on the corrupted examples."""

import jax
import numpy as np
import pytest

from experiments import data
from experiments import input_pipeline
from experiments import models
from experiments import nnx_glue
from experiments import steps
from experiments import weight_trace
import sam_optax


def test_readings_are_rw_sam_options():
  assert weight_trace.reading_options(weight_trace.DEFAULT_READING, 0.05) == {
    "lam": 0.5
  }  # the main job's RW-SAM
  assert weight_trace.reading_options("max,squared,2", 0.05) == {
    "lam": 2.0,
    "norm_scaling": "max",
    "score": "squared_norm",
  }
  assert weight_trace.reading_options("rho,norm,0.5", 0.05) == {
    "lam": pytest.approx(10.0),
    "norm_scaling": "none",
  }
  for reading in weight_trace.READINGS:
    sam_optax.rw_sam(0.05, **weight_trace.reading_options(reading, 0.05))
  with pytest.raises(ValueError, match="scaling"):
    weight_trace.reading_options("sum,norm,0.5", 0.05)
  assert weight_trace.trace_epochs(35, 10) == {1, 10, 20, 30, 35}
  assert weight_trace.trace_epochs(35, 0) == set()


def test_share_and_ess_are_those_of_gibbs_weights_on_exact_norms():
  rng = np.random.default_rng(0)  # MNIST-1D-shaped signals
  train_set = data.with_label_noise(
    data.ArrayDataset(
      rng.normal(size=(300, 40)).astype(np.float32),
      rng.integers(0, 10, 300).astype(np.int32),
    ),
    0.3,
    10,
    seed=0,
  )
  # Batches of 64 and every reading: the trace test_experiments_train's
  # resumed run compiles.
  examples = weight_trace.trace_set(train_set, 64, 2, seed=0)
  assert examples.size == 128
  np.testing.assert_array_equal(
    examples.inputs, weight_trace.trace_set(train_set, 64, 2, 0).inputs
  )
  split = nnx_glue.split(models.create_model("cnn1d", 10, seed=0))
  evaluate = input_pipeline.preprocessing("mnist1d", True).evaluate
  readings = ("mean,norm,0.5", "rho,norm,2")
  result = weight_trace.measure(
    split, split.params, split.state, examples, 64, 0.05, evaluate
  )
  assert set(result["share"]) == set(weight_trace.READINGS)
  loss_fn = steps.passes_loss_fn(split.graphdef, split.params, split.state)

  @jax.jit  # eagerly, the per-example gradients take seconds
  def norms_and_weights(params, inputs, labels):
    norms = sam_optax.per_example_gradient_norms(
      loss_fn, params, {"inputs": inputs, "labels": labels}
    )
    weights = {}
    for reading in readings:
      options = weight_trace.reading_options(reading, 0.05)
      weights[reading] = sam_optax.gibbs_weights(
        norms, options["lam"], options.get("norm_scaling", "mean")
      )
    return norms, weights

  norms, shares, sizes = (
    [],
    {r: [] for r in readings},
    {r: [] for r in readings},
  )
  for start in (0, 64):
    batch = examples.take(slice(start, start + 64))
    norm, weights = norms_and_weights(split.params, batch.inputs, batch.labels)
    norms.append(norm)
    for reading in readings:
      shares[reading].append(np.sum(weights[reading][batch.corrupted]))
      sizes[reading].append(1 / np.sum(np.square(weights[reading])))
  for reading in readings:
    assert result["share"][reading] == pytest.approx(
      np.mean(shares[reading]), rel=1e-4
    )
    assert result["ess"][reading] == pytest.approx(
      np.mean(sizes[reading]), rel=1e-4
    )
  norms = np.concatenate(norms)
  assert result["corrupted_fraction"] == examples.corrupted.mean()
  assert result["norm_ratio"] == pytest.approx(
    norms[examples.corrupted].mean() / norms[~examples.corrupted].mean(),
    rel=1e-4,
  )
  # Without label noise: no corrupted examples, no ratio.
  clean = weight_trace.measure(
    split,
    split.params,
    split.state,
    examples._replace(corrupted=None),
    64,
    0.05,
    evaluate,
  )
  assert clean["norm_ratio"] is None and clean["corrupted_fraction"] == 0
  assert clean["ess"] == pytest.approx(result["ess"])
