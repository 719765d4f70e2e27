"""RW-SAM's Gibbs weights along a run: how much of them the corrupted labels get.

RW-SAM (:func:`sam_optax.rw_sam`) weights its ascent by ``p = softmax(ŝ/λ)``
of the scaled per-example gradient norms. Which scaling, which score and which
``λ`` (the *reading*; the paper says only that the norms are "normalized")
decides how much of the ascent goes to the examples whose labels the noise
corrupted. :func:`measure` answers it for every reading of :data:`READINGS`
at once, on the same parameters: the exact per-example gradient norms of a few
fixed training batches (with the labels trained on, the loss as the
transform sees it: the training graph, no augmentation), then per reading and
batch the weight share on the corrupted examples ``Σ_{i corrupted} p_i`` and
the effective sample size ``1 / Σ_i p_i²`` (``B``: uniform weights, SAM),
averaged over the batches. :func:`experiments.train.train` calls it when the
configuration's ``weight_trace_every`` is positive and records the result in
that epoch's metrics under ``"weights"``.

A reading is named ``SCALING,SCORE,LAMBDA``: ``SCALING`` is a
``norm_scaling`` of :func:`sam_optax.gibbs_weights` (``mean``, ``max``,
``zscore``) or ``rho`` (``ρ`` in the exponent: ``softmax(ρ s / λ)``, i.e. no
scaling and ``lam = λ/ρ``); ``SCORE`` is ``norm`` or ``squared``
(``score="squared_norm"``). :func:`reading_options` turns a name into the
options of ``sam_optax.rw_sam``; ``mean,norm,0.5`` is the default, the main
job's RW-SAM.
"""

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import data
from experiments import nnx_glue
from experiments import steps as steps_lib
import sam_optax

DEFAULT_READING = "mean,norm,0.5"
"""The reading closest to the paper's text: norms divided by their mean, λ = 0.5."""

READINGS = (
  "mean,norm,0.5",
  "max,norm,0.5",
  "mean,squared,0.5",
  "max,squared,0.5",
  "rho,norm,0.5",
  "mean,norm,2",
  "max,norm,2",
  "mean,squared,2",
  "max,squared,2",
  "rho,norm,2",
  "zscore,norm,0.5",
)
"""Every reading the trace measures (cheap: one set of norms serves all)."""


def reading_options(reading: str, rho: float) -> dict[str, Any]:
  """The options of ``sam_optax.rw_sam(rho, **options)`` for ``reading``.

  >>> reading_options("mean,norm,0.5", 0.05)
  {'lam': 0.5}
  >>> reading_options("rho,norm,0.5", 0.05)
  {'lam': 10.0, 'norm_scaling': 'none'}
  """
  scaling, score, lam = reading.split(",")
  if scaling not in ("mean", "max", "zscore", "rho"):
    raise ValueError(f"unknown scaling {scaling!r} in reading {reading!r}.")
  if score not in ("norm", "squared"):
    raise ValueError(f"unknown score {score!r} in reading {reading!r}.")
  options: dict[str, Any] = {"lam": float(lam)}
  if scaling == "rho":
    options = {"lam": float(lam) / rho, "norm_scaling": "none"}
  elif scaling != "mean":
    options["norm_scaling"] = scaling
  if score == "squared":
    options["score"] = "squared_norm"
  return options


def trace_set(
  train_set: data.ArrayDataset, batch_size: int, batches: int, seed: int
) -> data.ArrayDataset:
  """``batches × batch_size`` training examples drawn once by ``seed``.

  The same examples for every optimizer and seed of a data set (pass its
  ``label_noise_seed``), in ``batches`` consecutive batches.
  """
  count = min(batches * batch_size, train_set.size // batch_size * batch_size)
  index = np.random.default_rng([seed, 2]).choice(
    train_set.size, count, replace=False
  )
  return train_set.take(index)


Measure = Callable[..., dict[str, Any]]
_CACHE_SIZE = 8
_cache: dict[Hashable, Measure] = {}


def _make_measure(
  graphdef: Any,
  preprocess: Callable[[jax.Array], jax.Array],
  batch_size: int,
  rho: float,
  readings: tuple[str, ...],
) -> Measure:
  """The jitted ``measure(params, state, inputs, labels, corrupted)``."""

  def one_batch(params, state, inputs, labels, corrupted):
    loss_fn = steps_lib.passes_loss_fn(graphdef, params, state)
    batch = {"inputs": preprocess(inputs), "labels": labels}
    norms = sam_optax.per_example_gradient_norms(loss_fn, params, batch)
    share, ess = {}, {}
    for reading in readings:
      options = reading_options(reading, rho)
      weights = sam_optax.gibbs_weights(
        norms,
        options["lam"],
        options.get("norm_scaling", "mean"),
        options.get("score", "norm"),
      )
      share[reading] = jnp.sum(jnp.where(corrupted, weights, 0.0))
      ess[reading] = 1.0 / jnp.sum(jnp.square(weights))
    return norms, share, ess

  @jax.jit
  def measure_batches(params, state, inputs, labels, corrupted):
    def reshape(x):
      return x.reshape(-1, batch_size, *x.shape[1:])

    norms, share, ess = jax.lax.map(
      lambda xs: one_batch(params, state, *xs),
      (reshape(inputs), reshape(labels), reshape(corrupted)),
    )
    mean = lambda tree: jax.tree.map(jnp.mean, tree)
    return {"norms": norms.reshape(-1), "share": mean(share), "ess": mean(ess)}

  return measure_batches


def measure(
  split: nnx_glue.SplitModel,
  params: Any,
  state: Any,
  examples: data.ArrayDataset,
  batch_size: int,
  rho: float,
  preprocess: Callable[[jax.Array], jax.Array],
  readings: Sequence[str] = READINGS,
) -> dict[str, Any]:
  """Each reading's weight share on the corrupted examples and its ESS.

  Args:
    split: the run's model (its training graph is used).
    params: the parameters to measure at.
    state: the model's other state.
    examples: the examples (:func:`trace_set`), ``batch_size`` at a time;
      their ``corrupted`` mask says which labels are noise (None: none).
    batch_size: the batch the weights are normalized over (the run's).
    rho: ``ρ``, for the readings with ``ρ`` in the exponent.
    preprocess: the run's preprocessing without augmentation.
    readings: names as in :data:`READINGS`.

  Returns:
    ``{"corrupted_fraction", "norm_ratio", "share": {reading: ...}, "ess":
    {reading: ...}}``: the fraction of corrupted examples (the share uniform
    weights give), the mean gradient norm of the corrupted examples over that
    of the clean ones (None without noise), and per reading the mean over
    batches of ``Σ_{i corrupted} p_i`` and of ``1 / Σ_i p_i²``.
  """
  key = (split.graphdef, preprocess, batch_size, float(rho), tuple(readings))
  if key not in _cache:
    if len(_cache) >= _CACHE_SIZE:
      del _cache[next(iter(_cache))]
    _cache[key] = _make_measure(*key)
  corrupted = (
    np.zeros(examples.size, bool)
    if examples.corrupted is None
    else examples.corrupted
  )
  values = jax.device_get(
    _cache[key](params, state, examples.inputs, examples.labels, corrupted)
  )
  norms = values["norms"]
  ratio = (
    float(norms[corrupted].mean() / norms[~corrupted].mean())
    if corrupted.any() and (~corrupted).any()
    else None
  )
  return {
    "corrupted_fraction": float(corrupted.mean()),
    "norm_ratio": ratio,
    "share": {k: float(v) for k, v in values["share"].items()},
    "ess": {k: float(v) for k, v in values["ess"].items()},
  }


def trace_epochs(epochs: int, every: int) -> set[int]:
  """The epochs after which the trace measures: 1, every ``every``, the last."""
  if every <= 0:
    return set()
  return {1, epochs, *range(every, epochs + 1, every)}
