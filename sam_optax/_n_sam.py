"""n-SAM: the ascent taken on a separate, larger set than the descent batch."""

from typing import Any

import jax
from jax.typing import ArrayLike
import optax

from sam_optax import _contract
from sam_optax import _perturbation
from sam_optax import _transform


def ascent_set_ascent() -> _transform.AscentDirection:
  """The ascent direction ``d = ∇L_A(w)`` on an ascent set ``A`` (stateless).

  ``A`` comes as one of two extra arguments of ``update``: ``ascent_batch``
  (a batch, the same pytree layout as ``batch``, of any size; its mean-loss
  gradient is computed) or ``ascent_gradient`` (a precomputed gradient, e.g.
  the full-data gradient ``∇L(w)``, shaped like the parameters).
  """

  def direction(
    updates: optax.Updates | None,
    state: optax.OptState,
    params: optax.Params,
    *,
    loss_fn: _contract.LossFn,
    batch: Any,
    key: jax.Array | None,
    ascent_batch: Any = None,
    ascent_gradient: optax.Updates | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    del updates, batch, key, extra_args
    if (ascent_batch is None) == (ascent_gradient is None):
      raise TypeError(
        "n_sam.update needs exactly one of the keyword arguments"
        " `ascent_batch` (a batch to take the ascent gradient on) or"
        " `ascent_gradient` (a precomputed gradient, e.g. the full-data"
        " gradient); got "
        + ("both." if ascent_batch is not None else "neither.")
      )
    if ascent_gradient is not None:
      _contract.check_same_shapes(
        ascent_gradient, params, "ascent_gradient", "n_sam"
      )
      return ascent_gradient, state
    _contract.check_per_example_losses(
      loss_fn, params, ascent_batch, "n_sam", "ascent_batch"
    )
    return _contract.mean_gradient(loss_fn, params, ascent_batch), state

  return _transform.AscentDirection(
    init=lambda params: optax.EmptyState(), direction=direction
  )


def n_sam(
  rho: ArrayLike = 0.05,
  *,
  normalize: bool = True,
  perturb_mask: _perturbation.PerturbMask = None,
) -> optax.GradientTransformationExtraArgs:
  r"""n-SAM (and n-USAM): the ascent on a larger set ``A``, the descent on ``B``.

  .. math::
    \varepsilon = \rho\, \nabla L_A(w) / (\|\nabla L_A(w)\| + \delta)
    \ (\text{n-USAM: } \rho\, \nabla L_A(w)), \qquad
    \text{returns } \nabla L_B(w + \varepsilon).

  With ``A`` the whole training set this is the paper's n-SAM, whose implicit
  regularizer has no gradient-noise term (2509.18001, Thm 3.4). Pass the set
  as ``ascent_batch=...`` or its gradient as ``ascent_gradient=...``:

  >>> tx = optax.chain(sam_optax.n_sam(0.05), optax.sgd(0.1))
  >>> state = tx.init(params)
  >>> ascent_set = {"x": jnp.ones((32, 4)), "y": jnp.arange(32) % 3}
  >>> updates, state = tx.update(None, state, params, loss_fn=loss_fn,
  ...                            batch=batch, ascent_batch=ascent_set)

  The clean gradient ``updates`` is not used (None is accepted).

  Args:
    rho: the perturbation radius ``ρ``.
    normalize: n-SAM (True) or n-USAM (False).
    perturb_mask: which leaves to perturb; see :func:`sam_optax.sam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Andriushchenko & Flammarion, `Towards Understanding Sharpness-Aware
    Minimization <https://arxiv.org/abs/2206.06232>`_, ICML 2022;
    `Unveiling m-Sharpness Through the Structure of Stochastic Gradient
    Noise <https://arxiv.org/abs/2509.18001>`_, 2025.
  """
  normalize = _contract.check_bool(normalize, "normalize", "n_sam")
  return _transform.sharpness_aware(
    ascent_set_ascent(),
    rho,
    normalize=normalize,
    perturb_mask=perturb_mask,
    name="n_sam" if normalize else "n_usam",
  )
