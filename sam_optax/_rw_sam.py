"""RW-SAM: the ascent reweighted towards examples with large gradients.

2509.18001 (§4, Algorithm 1). The ascent direction is the gradient of a
weighted batch loss, ``g_p = ∇ Σ_i p_i ℓ_i(w)``, with Gibbs weights
``p = softmax(ŝ/λ)`` of the scaled per-example gradient norms
``s_i ≈ ‖∇ℓ_i(w)‖``, estimated by finite differences along a Rademacher probe.
The descent gradient handed on is the plain mean ``∇L_B(w+ε)``: the weights
shape the ascent only. RW-ASAM takes the same direction with ASAM's scale.

The paper says only that the estimates are "normalized before applying the
exponential"; ``norm_scaling`` chooses how (dividing by their mean, the
default, follows that text most closely), and ``score`` whether the norms or
their squares (which the paper's appendix estimates) enter the softmax.
"""

from typing import Any, Literal, NamedTuple
import warnings

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import optax

from sam_optax import _asam
from sam_optax import _contract
from sam_optax import _gradient_norms
from sam_optax import _per_example
from sam_optax import _perturbation
from sam_optax import _precision
from sam_optax import _transform

NormScaling = Literal["mean", "max", "zscore", "none"]
NORM_SCALINGS = ("mean", "max", "zscore", "none")
Score = Literal["norm", "squared_norm"]
SCORES = ("norm", "squared_norm")
GradientNorms = Literal["finite_difference", "exact"]


class ReweightedAscentState(NamedTuple):
  """RW-SAM's state: diagnostics of the last step (zeros before the first).

  They come from the step's own passes, at no extra cost. Read them from a
  chain's state with e.g. ``optax.tree.get(opt_state, "clean_loss")``.

  Attributes:
    clean_loss: ``L_B(w) = mean_i ℓ_i(w)``, at the unperturbed parameters.
    gradient_norm_mean: ``mean_i s_i``, the per-example gradient norms (or
      their estimates) before normalization.
    gradient_norm_std: ``std_i s_i``: their spread over the batch.
    gradient_norm_max: ``max_i s_i``.
    weight_entropy: ``H(p) = −Σ_i p_i log p_i``, in ``[0, log B]``
      (``log B``: uniform weights, mini-batch SAM).
    effective_sample_size: ``1 / Σ_i p_i²``, in ``[1, B]``: how many examples
      the ascent effectively uses.
    unresolved_fraction: the fraction of the batch whose loss change at
      ``w + σv`` is within rounding: ``σ s_i ≤ ½ ε_c |ℓ_i|``, with ``ε_c``
      the epsilon of the precision ``loss_fn`` computes in with the
      parameters (bfloat16's ``2⁻⁷`` for Flax layers with
      ``dtype=jnp.bfloat16``, else float32's), exact zeros included. Above a
      quarter the estimates are rounding noise (a bfloat16-compute model, a
      ``σ`` too small), and the step used uniform weights, SAM's (see
      :func:`rw_sam`). In the exact mode: the fraction of zero norms.
  """

  clean_loss: jax.Array
  gradient_norm_mean: jax.Array
  gradient_norm_std: jax.Array
  gradient_norm_max: jax.Array
  weight_entropy: jax.Array
  effective_sample_size: jax.Array
  unresolved_fraction: jax.Array


def scale_scores(
  scores: jax.Array, norm_scaling: NormScaling = "mean"
) -> jax.Array:
  """``ŝ`` from non-negative scores ``x`` (``δ = 1e-12``).

  ``"mean"``: ``x / (mean x + δ)``; ``"max"``: ``x / (max x + δ)``;
  ``"zscore"``: ``(x − mean x) / (std x + δ)``; ``"none"``: ``x``. The first
  three make ``λ`` scale-free (the same weights for ``x`` and ``c·x``).
  """
  _contract.check_choice(
    norm_scaling, NORM_SCALINGS, "norm_scaling", "scale_scores"
  )
  scores = scores.astype(jnp.float32)
  if norm_scaling == "none":
    return scores
  # Divided by the largest score first (and δ with it), so that no finite
  # scores overflow the mean or the variance.
  magnitude = _perturbation.magnitude_scale(scores)
  scores = _perturbation.divide(scores, magnitude)
  eps = _perturbation.NORM_EPS / magnitude
  if norm_scaling == "mean":
    return scores / (jnp.mean(scores) + eps)
  if norm_scaling == "max":
    return scores / (jnp.max(scores) + eps)
  return (scores - jnp.mean(scores)) / (jnp.std(scores) + eps)  # "zscore"


def _scores(
  norms: jax.Array, score: Score, norm_scaling: NormScaling
) -> jax.Array:
  """``s`` or ``s²``, the latter without overflow where the scaling allows."""
  norms = norms.astype(jnp.float32)
  if score == "norm":
    return norms
  if norm_scaling == "none":
    return jnp.minimum(jnp.square(norms), jnp.finfo(jnp.float32).max)
  # The other scalings divide by a statistic of the scores: squaring s/max s
  # gives the same ŝ (up to δ) for norms whose squares overflow float32.
  return jnp.square(
    _perturbation.divide(norms, _perturbation.magnitude_scale(norms))
  )


def gibbs_weights(
  norms: jax.Array,
  lam: ArrayLike,
  norm_scaling: NormScaling = "mean",
  score: Score = "norm",
) -> jax.Array:
  """RW-SAM's weights ``p = softmax(ŝ/λ)`` (2509.18001, Equation 20).

  ``ŝ`` is the scaled score ``x``: ``x = s`` (``score="norm"``) or ``s²``
  (``score="squared_norm"``), then ``x / (mean x + δ)``
  (``norm_scaling="mean"``), ``x / (max x + δ)`` (``"max"``),
  ``(x − mean x) / (std x + δ)`` (``"zscore"``) or ``x`` (``"none"``), with
  ``δ = 1e-12``. ``λ = inf`` gives uniform weights (mini-batch
  SAM); a small ``λ`` puts them on the examples with the largest norms.
  Equal norms give uniform weights. The softmax is taken of
  ``(ŝ − max ŝ)/λ``, the same weights, so that as ``λ → 0`` all the weight
  goes to the largest score (shared by ties): no logit overflows, and a
  ``λ`` that underflows float32 (``1e-45``) gives that limit, not NaN.

  Args:
    norms: per-example gradient norms ``s`` (or estimates), shape ``[B]``.
    lam: the temperature ``λ > 0`` (``jnp.inf`` allowed; checked unless
      traced).
    norm_scaling: ``"mean"``, ``"max"``, ``"zscore"`` or ``"none"``, as
      above.
    score: ``"norm"`` or ``"squared_norm"``.

  Returns:
    float32 weights of shape ``[B]``, summing to 1.
  """
  name = "gibbs_weights"
  _contract.check_choice(score, SCORES, "score", name)
  _contract.check_number(lam, "lam", name, above=0, allow_inf=True)
  if jnp.ndim(norms) != 1:
    raise ValueError(
      f"{name}: norms must be a vector of per-example norms, shape [B]; got"
      f" shape {jnp.shape(norms)}."
    )
  scaled = scale_scores(_scores(norms, score, norm_scaling), norm_scaling)
  top = jnp.max(scaled)
  # ŝ − max ŝ <= 0: the largest score's logit is 0 for every λ, the others
  # go to −∞ as λ → 0. XLA may compute ŝ for the max and for the gap with
  # other roundings (the largest score's gap was 5e-8, not 0, measured), so
  # a gap within a few roundings of 0 counts as a tie with the largest.
  gap = jnp.minimum(scaled - top, 0.0)
  eps = jnp.finfo(jnp.float32).eps
  tie = gap >= -4 * eps * jnp.maximum(jnp.abs(top), 1.0)
  lam = jnp.asarray(lam, jnp.float32)
  # A subnormal λ is the λ → 0 limit (CPUs flush subnormals to zero).
  resolved = lam >= jnp.finfo(jnp.float32).tiny
  safe_lam = jnp.where(resolved, lam, 1.0)
  logits = jnp.where(tie, 0.0, jnp.where(resolved, gap / safe_lam, -jnp.inf))
  largest = jnp.finfo(jnp.float32).max
  # The largest logit is 0 (the ties'), so this is the softmax as
  # jax.nn.softmax takes it, less its own pass for the maximum.
  exponentials = jnp.exp(jnp.clip(logits, -largest, largest))
  return exponentials / jnp.sum(exponentials)


UNRESOLVED_LIMIT = 0.25
"""Above this fraction of unresolved estimates RW-SAM uses SAM's weights.

Unresolved: ``σ s_i ≤ ½ ε_c |ℓ_i|`` (``sam_optax._precision.unresolved``).
Measured by ``experiments/precision_check.py`` (experiments/RESULTS.md, §8;
a CPU, batches of 32): float32 models (an MLP, a CNN, an attention block) at
the default ``σ`` had none; bfloat16-compute MLPs had 90–98% at the default
``σ``, and 4–7% at the ``σ`` that :func:`calibrate_sigma` picks, where their
estimates are as good as float32's. Exact zeros alone missed the models with
a float32 loss head (NNX's ``nnx.Linear(dtype=jnp.bfloat16)``): compiled,
XLA keeps some bfloat16 arithmetic in float32, and such a model had no zero
estimates at all.
"""


def _diagnostics(
  losses: jax.Array,
  norms: jax.Array,
  weights: jax.Array,
  unresolved: jax.Array,
) -> ReweightedAscentState:
  # The sums in one reduction (a small model's step pays per kernel).
  loss_sum, norm_sum, entropy, weight_squares = jnp.sum(
    jnp.stack(
      [
        losses.astype(jnp.float32),
        norms,
        jax.scipy.special.entr(weights),
        jnp.square(weights),
      ]
    ),
    axis=1,
  )
  # max |s_i| = max s_i (the norms are >= 0), as scale_scores takes it, so
  # XLA computes it and the scaled norms once for both.
  largest = optax.tree.norm(norms, ord="inf")
  magnitude = _perturbation.magnitude_scale(norms)
  return ReweightedAscentState(
    clean_loss=loss_sum / losses.shape[0],
    gradient_norm_mean=norm_sum / norms.shape[0],
    # Scaled by the largest norm: no overflow in the squares.
    gradient_norm_std=magnitude
    * jnp.std(_perturbation.divide(norms, magnitude)),
    gradient_norm_max=largest,
    weight_entropy=entropy,
    effective_sample_size=1.0 / weight_squares,
    unresolved_fraction=unresolved,
  )


def low_precision_warning(name: str, dtype: Any) -> str:
  return (
    f"{name}: loss_fn computes with the parameters in"
    f" {jnp.dtype(dtype).name} (e.g. Flax layers with"
    f" dtype=jnp.{jnp.dtype(dtype).name}, which cast w + sigma*v back to"
    f" {jnp.dtype(dtype).name}), and the default sigma ="
    f" {_gradient_norms.DEFAULT_SIGMA:g} is likely below its resolution: the"
    " finite-difference norm estimates would be rounding noise. Steps"
    " whose losses the probe leaves unresolved use SAM's uniform weights"
    " (the state's unresolved_fraction says how many). Pass sigma="
    " explicitly, chosen by sam_optax.calibrate_sigma(loss_fn, params,"
    " batch, key) on this model (this also silences the warning), or use"
    " gradient_norms='exact'."
  )


def reweighted_ascent(
  lam: ArrayLike = 0.5,
  *,
  sigma: ArrayLike | None = None,
  num_probes: int | None = None,
  norm_scaling: NormScaling = "mean",
  score: Score = "norm",
  gradient_norms: GradientNorms = "finite_difference",
  difference: _gradient_norms.Difference = "forward",
  probe_in_float32: bool = True,
  chunk_size: int | None = None,
  per_example_gradients: _per_example.PerExampleGradients = "auto",
  name: str = "rw_sam",
) -> _transform.AscentDirection:
  """RW-SAM's ascent direction ``g_p = ∇ Σ_i p_i ℓ_i(w)``, ``p = softmax(ŝ/λ)``.

  One step: (1) ``ℓ(w)`` and its VJP (one forward); (2) the norm estimates
  ``s_i = |Δ_i|/σ`` from ``num_probes`` forward passes at ``w + σv``
  (:func:`sam_optax.finite_difference_gradient_norms`), or the exact norms
  (``gradient_norms="exact"``, ``B`` backward passes, for validation and
  ablation); (3) the weights ``p`` (:func:`gibbs_weights`), held constant;
  (4) ``g_p``, pulling ``p`` back through the VJP of (1) (one backward). The
  clean gradient ``updates`` is not used. The state is a
  :class:`ReweightedAscentState`.

  The finite-difference mode needs the keyword argument ``key`` in
  ``update``; the exact mode ignores it. See :func:`rw_sam` for the
  arguments.
  """
  _contract.check_choice(norm_scaling, NORM_SCALINGS, "norm_scaling", name)
  _contract.check_choice(score, SCORES, "score", name)
  _contract.check_choice(
    per_example_gradients,
    _per_example.PER_EXAMPLE_GRADIENTS,
    "per_example_gradients",
    name,
  )
  _contract.check_choice(
    gradient_norms, ("finite_difference", "exact"), "gradient_norms", name
  )
  _contract.check_number(lam, "lam", name, above=0, allow_inf=True)
  probe_in_float32 = _contract.check_bool(
    probe_in_float32, "probe_in_float32", name
  )
  # None, not 1, by default: optax.inject_hyperparams turns an int argument
  # into an array, and the probe count must stay a Python int.
  num_probes = 1 if num_probes is None else num_probes
  default_sigma = sigma is None
  sigma = _gradient_norms.DEFAULT_SIGMA if sigma is None else sigma
  num_probes = _gradient_norms.check_probe_options(
    sigma, num_probes, difference, name
  )
  chunk_size = _contract.check_integer(
    chunk_size, "chunk_size", name, optional=True
  )

  def init(params: optax.Params) -> ReweightedAscentState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return ReweightedAscentState(*([zero] * len(ReweightedAscentState._fields)))

  def direction(
    updates: optax.Updates | None,
    state: ReweightedAscentState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, ReweightedAscentState]:
    del updates, state, extra_args  # the clean gradient is not needed
    if gradient_norms == "finite_difference" and key is None:
      raise TypeError(
        f"{name}.update needs the keyword argument `key`, a PRNG key for"
        " the Rademacher probes that estimate per-example gradient norms;"
        " pass a new one each step, e.g. key=jax.random.fold_in(key, step)."
        " (gradient_norms='exact' needs no key.)"
      )
    losses, pullback = jax.vjp(lambda p: loss_fn(p, batch), params)
    if gradient_norms == "exact":
      norms = _gradient_norms.per_example_gradient_norms(
        loss_fn,
        params,
        batch,
        chunk_size=chunk_size,
        per_example_gradients=per_example_gradients,
      )
    else:
      assert key is not None  # checked above, with its message
      norms = _gradient_norms.finite_difference_gradient_norms(
        loss_fn,
        params,
        batch,
        key,
        sigma=sigma,
        num_probes=num_probes,
        losses=losses,
        difference=difference,
        probe_in_float32=probe_in_float32,
      )
    weights = gibbs_weights(norms, lam, norm_scaling, score)
    unresolved = jnp.mean((norms == 0).astype(jnp.float32))
    if gradient_norms == "finite_difference":
      # The precision the probe pass computes in, from its jaxpr (a trace
      # on shapes, once per trace of the step: free at run time).
      compute = _precision.compute_dtype(
        loss_fn,
        _gradient_norms.probe_parameters(params, probe_in_float32),
        batch,
      )
      if default_sigma and _precision.is_narrow(compute):
        warnings.warn(
          low_precision_warning(name, compute), UserWarning, stacklevel=2
        )
      # |Δ_i| = σ s_i (the root mean square over the probes) within the
      # rounding of ℓ_i: too many, and the estimates are rounding noise
      # (bfloat16 compute, σ too small). SAM's weights, not noise's.
      changes = jnp.asarray(sigma, jnp.float32) * norms
      unresolved = jnp.mean(
        _precision.unresolved(changes, losses, compute).astype(jnp.float32)
      )
      weights = jnp.where(
        unresolved > UNRESOLVED_LIMIT,
        jnp.full_like(weights, 1.0 / weights.shape[0]),
        weights,
      )
    weights = jax.lax.stop_gradient(weights)
    (ascent,) = pullback(weights.astype(losses.dtype))
    return ascent, _diagnostics(losses, norms, weights, unresolved)

  return _transform.AscentDirection(init=init, direction=direction)


def rw_sam(
  rho: ArrayLike = 0.05,
  lam: ArrayLike = 0.5,
  *,
  sigma: ArrayLike | None = None,
  num_probes: int | None = None,
  norm_scaling: NormScaling = "mean",
  score: Score = "norm",
  gradient_norms: GradientNorms = "finite_difference",
  difference: _gradient_norms.Difference = "forward",
  probe_in_float32: bool = True,
  chunk_size: int | None = None,
  per_example_gradients: _per_example.PerExampleGradients = "auto",
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Reweighted SAM (RW-SAM).

  .. math::
    s_i = \frac{|\ell_i(w + \sigma v) - \ell_i(w)|}{\sigma}, \quad
    p = \mathrm{softmax}(\hat s / \lambda), \quad
    g_p = \nabla \textstyle\sum_i p_i \ell_i(w), \quad
    \varepsilon = \rho\, g_p / (\|g_p\| + \delta), \quad
    \text{returns } \nabla L_B(w + \varepsilon),

  with ``v`` a Rademacher probe over every leaf, ``ŝ = s / (mean s + δ)``
  (``norm_scaling="mean"``, ``score="norm"``) and ``p`` held constant.
  ``λ → ∞`` is :func:`sam`;
  a small ``λ`` concentrates the ascent on the examples with the largest
  gradients. One step costs two forward-backward passes plus one forward per
  probe, like SAM plus one forward; ``updates`` (the clean gradient) is not
  used, so under ``jit`` it costs nothing and may be None. Pass a new PRNG
  key each step:

  >>> tx = optax.chain(sam_optax.rw_sam(rho=0.05, lam=0.5),
  ...                  optax.sgd(0.1, momentum=0.9))
  >>> opt_state = tx.init(params)
  >>> probe_key, step = jax.random.key(0), 0
  >>> updates, opt_state = tx.update(
  ...     None, opt_state, params, loss_fn=loss_fn, batch=batch,
  ...     key=jax.random.fold_in(probe_key, step))
  >>> ess = optax.tree.get(opt_state, "effective_sample_size")
  >>> bool(1 <= ess <= batch["y"].shape[0])
  True

  ``loss_fn(params, batch)`` returns per-example losses (shape ``[B]``). The
  state (:class:`ReweightedAscentState`) holds diagnostics of the last step.

  bfloat16 compute needs ``σ`` from :func:`calibrate_sigma`. A model whose
  layers compute in bfloat16 (Flax's ``dtype=jnp.bfloat16``) rounds
  ``w + σv`` back to bfloat16 inside, whatever the parameters' dtype (so
  ``probe_in_float32`` cannot help), and with the default ``σ`` the
  estimates are rounding noise. RW-SAM finds this at trace time, from the
  jaxpr of ``loss_fn`` (at no run-time cost): with the default ``σ`` it
  warns, naming ``sigma`` and :func:`calibrate_sigma`; an explicit ``σ`` is
  used as given, without a warning. Every step it compares the loss changes
  with the rounding of that precision, ``σ s_i ≤ ½ ε_c |ℓ_i|``: when more
  than a quarter of the batch is unresolved, the step uses uniform weights
  (SAM's), and the state's ``unresolved_fraction`` says so. Run
  :func:`calibrate_sigma` on the model as it trains, and pass its ``σ``.

  Args:
    rho: the perturbation radius ``ρ``.
    lam: the temperature ``λ > 0`` of the weights (0.5 in the paper; ``jnp.inf``
      gives SAM).
    sigma: the probe scale ``σ > 0`` (finite). None (the default) is 1e-4,
      which suits float32 models from small CNNs to ResNet-18 (see
      ``DEFAULT_SIGMA`` in ``sam_optax._gradient_norms``); the paper
      calibrates it before training: :func:`calibrate_sigma`. Models that
      compute in bfloat16 (e.g. Flax layers with ``dtype=jnp.bfloat16``,
      which cast ``w + σv`` back to bfloat16) need it calibrated: with
      None, they get a warning at trace time (see above).
    num_probes: probes ``K``; ``s_i = sqrt(mean_k Δ_ik²)/σ``; None is
      ``K = 1``, as in the paper. Each adds a forward pass. It sets the
      number of passes, so inside ``optax.inject_hyperparams`` an explicit
      value needs ``static_args=("num_probes",)``.
    norm_scaling: how the scores are scaled before the softmax (the paper
      says only "normalized"): ``"mean"`` (``x / mean x``, the default),
      ``"max"`` (``x / max x``), ``"zscore"`` (``(x − mean x) / std x``) or
      ``"none"``; the first three make ``λ`` scale-free (see
      :func:`gibbs_weights`). The form with ``ρ`` in the exponent,
      ``p = softmax(ρ s / λ')``, is ``norm_scaling="none"`` with
      ``lam = λ'/ρ``.
    score: ``"norm"`` (``x = s``, the default) or ``"squared_norm"``
      (``x = s²``, the quantity the paper's appendix estimates).
    gradient_norms: ``"finite_difference"`` (the paper), or ``"exact"``:
      ``s_i = ‖∇ℓ_i‖`` from :func:`per_example_gradient_norms` (``B``
      backward passes; for validation and ablation).
    difference: ``"forward"`` (the paper; reuses ``ℓ(w)``) or ``"central"``
      (two forwards per probe, error ``O(σ²)``).
    probe_in_float32: evaluate the probe pass with bfloat16/float16 leaves
      promoted to float32, where ``w + σv`` does not round back to ``w``
      (this costs one more float32 forward for its baseline ``ℓ(w)``);
      float32 parameters are unaffected.
    chunk_size: examples whose gradients are held at once in the exact mode
      (divides ``B``); None: all ``B``.
    per_example_gradients: how the exact mode takes ``∇ℓ_i``:
      ``"batch_of_one"``, ``"jacobian"`` (rows of the Jacobian of the loss
      vector, what the probe estimates when examples are coupled, e.g. by
      BatchNorm in training mode) or ``"auto"`` (the latter for a
      ``loss_fn`` that declares ``couples_examples``, as those of
      :mod:`sam_optax.flax` do); see
      :func:`per_example_gradient_norms`.
    perturb_mask: which leaves to perturb; see :func:`sam`. The weights ``p``
      come from per-example gradient norms over every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`ReweightedAscentState`.

  References:
    `Unveiling m-Sharpness Through the Structure of Stochastic Gradient
    Noise <https://arxiv.org/abs/2509.18001>`_, 2025 (§4, Algorithm 1).
  """
  return _transform.sharpness_aware(
    reweighted_ascent(
      lam,
      sigma=sigma,
      num_probes=num_probes,
      norm_scaling=norm_scaling,
      score=score,
      gradient_norms=gradient_norms,
      difference=difference,
      probe_in_float32=probe_in_float32,
      chunk_size=chunk_size,
      per_example_gradients=per_example_gradients,
      name="rw_sam",
    ),
    rho,
    normalize=True,
    perturb_mask=perturb_mask,
    name="rw_sam",
  )


def rw_asam(
  rho: ArrayLike = 0.5,
  lam: ArrayLike = 0.5,
  eta: ArrayLike = 0.01,
  *,
  scale_mask: _asam.Mask = None,
  sigma: ArrayLike | None = None,
  num_probes: int | None = None,
  norm_scaling: NormScaling = "mean",
  score: Score = "norm",
  gradient_norms: GradientNorms = "finite_difference",
  difference: _gradient_norms.Difference = "forward",
  probe_in_float32: bool = True,
  chunk_size: int | None = None,
  per_example_gradients: _per_example.PerExampleGradients = "auto",
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Reweighted ASAM: RW-SAM's weighted ascent with ASAM's scale.

  .. math::
    T = |w| + \eta, \quad
    \varepsilon = \rho\, T^2 g_p / (\|T g_p\| + \delta), \quad
    \text{returns } \nabla L_B(w + \varepsilon),

  with ``g_p`` RW-SAM's reweighted gradient (see :func:`rw_sam`) and ``T = 1``
  where ``scale_mask`` is False (see :func:`asam`). ``λ → ∞`` is :func:`asam`.
  Needs ``key`` in ``update`` like :func:`rw_sam`.

  Args:
    rho: the radius ``ρ`` (ASAM scale; e.g. 0.5 on CIFAR-10).
    lam: the temperature ``λ`` of the weights.
    eta: ``η``, the offset of ASAM's scale.
    scale_mask: the leaves ASAM scales (default: all but those named
      ``bias``).
    sigma: see :func:`rw_sam`.
    num_probes: see :func:`rw_sam`.
    norm_scaling: see :func:`rw_sam`.
    score: see :func:`rw_sam`.
    gradient_norms: see :func:`rw_sam`.
    difference: see :func:`rw_sam`.
    probe_in_float32: see :func:`rw_sam`.
    chunk_size: see :func:`rw_sam`.
    per_example_gradients: see :func:`rw_sam`.
    perturb_mask: see :func:`rw_sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with a
    :class:`ReweightedAscentState`.

  References:
    2509.18001 (Table 9); Kwon et al., `ASAM
    <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  _contract.check_number(eta, "eta", "rw_asam", minimum=0)
  return _transform.sharpness_aware(
    reweighted_ascent(
      lam,
      sigma=sigma,
      num_probes=num_probes,
      norm_scaling=norm_scaling,
      score=score,
      gradient_norms=gradient_norms,
      difference=difference,
      probe_in_float32=probe_in_float32,
      chunk_size=chunk_size,
      per_example_gradients=per_example_gradients,
      name="rw_asam",
    ),
    rho,
    normalize=True,
    scale_fn=_asam.adaptive_scale(eta, scale_mask),
    perturb_mask=perturb_mask,
    name="rw_asam",
  )
