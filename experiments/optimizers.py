"""The optimizers of the experiments: a SAM-family variant chained to SGD.

Every optimizer is ``optax.chain(variant, add_decayed_weights, sgd)`` with
momentum and a cosine learning-rate schedule, as in the papers (weight decay
belongs to the base optimizer, never to the ascent step). ``variant`` is one
entry of :data:`VARIANTS`, a ``sam_optax`` function called with the options
of :class:`experiments.config.OptimizerConfig`; plain SGD uses
``optax.identity()``. bSAM is a whole optimizer and stands alone
(:data:`WHOLE_OPTIMIZERS`). The train step calls every one the same way::

  updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn,
                                 batch=batch, key=key)
"""

from collections.abc import Callable

import optax

from experiments import config as config_lib
import sam_optax

VARIANTS: dict[
  str, Callable[..., optax.GradientTransformationExtraArgs] | None
] = {
  "sgd": None,
  "sam": sam_optax.sam,
  "usam": sam_optax.usam,
  "m_sam": sam_optax.m_sam,
  "asam": sam_optax.asam,
  "f_sam": sam_optax.f_sam,
  "rw_sam": sam_optax.rw_sam,
  "rw_asam": sam_optax.rw_asam,
  "gsam": sam_optax.gsam,
  "wsam": sam_optax.wsam,
  "vasso": sam_optax.vasso,
  "look_sam": sam_optax.look_sam,
  "momentum_sam": sam_optax.momentum_sam,
  "sampa": sam_optax.sampa,
  "esam": sam_optax.esam,
  "lookbehind_sam": sam_optax.lookbehind_sam,
  "multi_step_sam": sam_optax.multi_step_sam,
  # The experiments' loss_fn is a sam_optax.SplitLoss (steps.passes_loss_fn:
  # the logits, then their cross-entropy), so functional_sam runs on the same
  # model as the others.
  "functional_sam": sam_optax.functional_sam,
  "preconditioned_sam": sam_optax.preconditioned_sam,
  "gcsam": sam_optax.gcsam,
  # A whole optimizer: it ends the chain (WHOLE_OPTIMIZERS).
  "bsam": sam_optax.bsam,
}
"""Optimizer name -> its ``sam_optax`` variant, called as ``f(rho, **options)``
(None: plain SGD; the :data:`WHOLE_OPTIMIZERS` as :func:`make_optimizer`
says)."""

WHOLE_OPTIMIZERS = ("bsam",)
"""The variants that are the whole optimizer (their own descent, momentum and
weight decay): :func:`make_optimizer` returns them alone, no SGD after them.
bSAM is called as ``bsam(cosine schedule, rho=rho, b1=momentum,
weight_decay=weight_decay, **options)``; its ``options`` must give
``num_data`` (the training set's size ``N``)."""

BASE_ARGUMENT = {"sampa": "auxiliary_step", "lookbehind_sam": "optimizer"}
"""The variants that take the base optimizer, and the argument they take it
as: SAMPa a copy of it for its auxiliary step, Lookbehind-SAM the base itself
(it ends the chain)."""


def variant(
  config: config_lib.OptimizerConfig,
  base: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The SAM-family transform of ``config`` (``optax.identity()`` for SGD).

  ``base`` is the base optimizer, passed to the variants of
  :data:`BASE_ARGUMENT` (required for them).
  """
  if config.name not in VARIANTS:
    raise ValueError(
      f"unknown optimizer {config.name!r}; choose one of {list(VARIANTS)}."
    )
  if config.name in WHOLE_OPTIMIZERS:
    raise ValueError(
      f"{config.name} is a whole optimizer (it ends the chain): build it"
      " with make_optimizer."
    )
  function = VARIANTS[config.name]
  if function is None:
    if config.options:
      raise ValueError(f"sgd takes no variant options, got {config.options}.")
    return optax.with_extra_args_support(optax.identity())
  options = dict(config.options)
  if config.name in BASE_ARGUMENT:
    if base is None:
      raise ValueError(f"{config.name} needs the base optimizer (base=...).")
    options[BASE_ARGUMENT[config.name]] = base
  return function(config.rho, **options)


def learning_rate_schedule(
  config: config_lib.OptimizerConfig, total_steps: int
) -> optax.Schedule:
  """Cosine decay from ``learning_rate`` to 0 over ``total_steps``."""
  return optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1))


def make_optimizer(
  config: config_lib.OptimizerConfig, total_steps: int
) -> optax.GradientTransformationExtraArgs:
  """``chain(variant, add_decayed_weights, sgd(cosine, momentum))``.

  Lookbehind-SAM owns that base (``lookbehind_sam(..., optimizer=base)``);
  SAMPa gets a copy of it for its auxiliary step. bSAM is the whole
  optimizer (:data:`WHOLE_OPTIMIZERS`): the cosine schedule is its step
  size, ``momentum`` its ``b1``, ``weight_decay`` its ``δ``.

  Args:
    config: the optimizer.
    total_steps: the length of the cosine schedule (all steps of training).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; call its ``update`` with the
    clean gradient and ``loss_fn``, ``batch`` and ``key`` keyword arguments.
  """
  if config.name in WHOLE_OPTIMIZERS:
    options = dict(config.options)
    if "num_data" not in options:
      raise ValueError(
        f"{config.name} needs the training set's size: options="
        "{'num_data': N}."
      )
    return VARIANTS[config.name](
      learning_rate_schedule(config, total_steps),
      rho=config.rho,
      b1=config.momentum,
      weight_decay=config.weight_decay,
      **options,
    )
  base = optax.chain(
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(
      learning_rate_schedule(config, total_steps),
      momentum=config.momentum or None,
      nesterov=config.nesterov,
    ),
  )
  if config.name == "lookbehind_sam":
    return variant(config, base)
  return optax.chain(variant(config, base), base)
