"""The calling contract shared by every transform of the SAM family.

Every transform is called as::

  updates, state = tx.update(grads, state, params, loss_fn=loss_fn, batch=batch,
                             key=key)

where ``loss_fn(params, batch)`` returns one loss per example (shape ``[B]``)
and ``batch`` is any pytree whose leaves share a leading batch axis of size
``B``. The checks below run on shapes only (``jax.eval_shape``), so they cost
nothing at run time and fail at trace time with a message that names the
problem.
"""

from collections.abc import Callable, Iterator
import contextlib
import contextvars
import math
import operator
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike
import numpy as np
import optax

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]
"""``loss_fn(params, batch) -> per-example losses`` of shape ``[B]``."""


def require(value: Any, argument: str, transform_name: str) -> Any:
  """Returns ``value``, or raises a clear error if an extra argument is missing."""
  if value is None:
    raise TypeError(
      f"{transform_name}.update needs the keyword argument `{argument}`; "
      f"call it as tx.update(grads, state, params, loss_fn=..., batch=...)"
      " (optax.chain forwards keyword arguments to every member)."
      f"{_TRAIN_STATE_HINT if argument in ('loss_fn', 'batch') else ''}"
    )
  return value


_TRAIN_STATE_HINT = (
  " Flax's TrainState.apply_gradients calls tx.update(grads, opt_state,"
  " params) without them (its keyword arguments only replace fields of the"
  " state), so loss_fn and batch never reach the transform: call"
  " tx.update yourself and then state.replace(...), as in the Linen recipe"
  " of the guide's Flax page (docs/guide/flax.md)."
)


def require_arguments(
  params: Params, loss_fn: LossFn | None, batch: Batch, transform_name: str
) -> tuple[Params, LossFn, Batch]:
  """``(params, loss_fn, batch)``, or a clear error naming the one missing.

  ``params`` is checked too (see :func:`check_params`).
  """
  params = require(params, "params", transform_name)
  check_params(params, transform_name)
  return (
    params,
    require(loss_fn, "loss_fn", transform_name),
    require(batch, "batch", transform_name),
  )


def check_update_call(
  updates: Any,
  params: Params,
  loss_fn: LossFn | None,
  batch: Batch,
  transform_name: str,
) -> tuple[Params, LossFn, Batch]:
  """The checks every ``update`` of the family runs first, at trace time.

  ``params``, ``loss_fn`` and ``batch`` are required
  (:func:`require_arguments`), ``updates`` (unless None) must have the
  structure and the leaf shapes of ``params`` (:func:`check_same_shapes`;
  a broadcastable shape is an error too, not silently broadcast), and
  ``loss_fn`` must return real floating per-example losses on ``batch``
  (:func:`check_per_example_losses`).

  Returns:
    ``(params, loss_fn, batch)``.
  """
  params, loss_fn, batch = require_arguments(
    params, loss_fn, batch, transform_name
  )
  if updates is not None:
    check_same_shapes(updates, params, "updates", transform_name)
  check_per_example_losses(loss_fn, params, batch, transform_name)
  return params, loss_fn, batch


def _is_masked_node(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


def check_params(params: Params, transform_name: str) -> None:
  """Rejects parameters a SAM transform cannot perturb, naming the leaf.

  * ``optax.MaskedNode`` leaves: the transform sits inside ``optax.masked`` or
    ``optax.multi_transform``, which hide the masked-out parameters from it,
    so ``loss_fn`` could not be evaluated. Use ``perturb_mask`` instead.
  * Leaves that are not real floating point. Integer and boolean leaves cannot
    be differentiated (``jax.grad`` rejects them); complex leaves are rejected
    because ``jax.grad`` of a real loss returns the conjugate of the ascent
    direction there, and SAM's ``ε`` would silently climb the wrong way.
    Keep such state out of ``params`` (e.g. in a separate Flax collection).

  Raises:
    ValueError: naming the first offending leaf.
  """
  leaves = jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_masked_node)
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path) or "(the root)"
    if _is_masked_node(leaf):
      raise ValueError(
        f"{transform_name}: params leaf {where} is an optax.MaskedNode: the"
        " transform is inside optax.masked or optax.multi_transform, which"
        " hide the masked-out parameters, so loss_fn cannot be evaluated."
        f" Put {transform_name} outside the mask and choose the perturbed"
        " leaves with its `perturb_mask` argument (a pytree of bools like"
        " params, or a function of params returning one); to freeze leaves,"
        " mask the base optimizer after it."
      )
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      kind = (
        "complex"
        if jnp.issubdtype(dtype, jnp.complexfloating)
        else "non-floating"
      )
      raise ValueError(
        f"{transform_name}: params leaf {where} has the {kind} dtype"
        f" {dtype}; SAM transforms differentiate and perturb every leaf of"
        " params, which must be real floating point. Keep integer, boolean"
        " or complex state out of params."
      )


def check_differentiable_params(params: Params, function_name: str) -> None:
  """Rejects ``params`` a diagnostic cannot differentiate, naming the leaf.

  :func:`check_params` (real floating leaves only), and at least one leaf.

  Raises:
    ValueError: for empty params or a leaf that is not real floating point.
  """
  if not jax.tree.leaves(params):
    raise ValueError(
      f"{function_name}: `params` has no leaves; there is nothing to"
      " differentiate."
    )
  check_params(params, function_name)


def check_same_structure(
  tree: Any,
  reference: Any,
  argument: str,
  transform_name: str,
  reference_name: str = "params",
  *,
  hint: str = "",
) -> None:
  """Raises unless ``tree`` has the pytree structure of ``reference``.

  ``hint`` (a sentence) ends the message: what to do instead.
  """
  if jax.tree.structure(tree) != jax.tree.structure(reference):  # type: ignore[operator]
    raise ValueError(
      f"{transform_name}: `{argument}` must have the structure of"
      f" `{reference_name}`; got {jax.tree.structure(tree)} and"
      f" {jax.tree.structure(reference)}.{' ' + hint if hint else ''}"
    )


def _shape(leaf: Any) -> tuple[int, ...]:
  shape = getattr(leaf, "shape", None)  # arrays, tracers, ShapeDtypeStruct
  return tuple(shape) if shape is not None else np.shape(leaf)


def describe(tree: Any, limit: int = 300) -> str:
  """``tree`` with its leaves as ``dtype[shape]``, cut to ``limit`` chars."""

  def leaf(x: Any) -> str:
    try:
      dtype = jnp.result_type(x).name
    except TypeError:
      return type(x).__name__
    return f"{dtype}{list(_shape(x))}"

  text = str(jax.tree.map(leaf, tree))
  return text if len(text) <= limit else text[: limit - 3] + "..."


def check_same_shapes(
  tree: Any,
  reference: Any,
  argument: str,
  transform_name: str,
  reference_name: str = "params",
  *,
  hint: str = "",
) -> None:
  """Raises unless ``tree`` has the structure and leaf shapes of ``reference``.

  The structure first (:func:`check_same_structure`), then each leaf's
  shape: a shape that would broadcast (``[1, 3]`` for ``[4, 3]``, a scalar)
  is an error too, since the arithmetic would silently broadcast it.
  Dtypes are not compared. Shapes only: free at run time.

  Raises:
    ValueError: naming ``argument`` and the first leaf whose shape differs.
  """
  check_same_structure(
    tree, reference, argument, transform_name, reference_name, hint=hint
  )
  paths = jax.tree_util.tree_leaves_with_path(reference)
  for (path, expected), actual in zip(
    paths, jax.tree.leaves(tree), strict=True
  ):
    if _shape(actual) != _shape(expected):
      where = jax.tree_util.keystr(path) or "(the root)"
      raise ValueError(
        f"{transform_name}: `{argument}` must have the shapes of"
        f" `{reference_name}`; leaf {where} has shape {_shape(actual)},"
        f" where `{reference_name}` has {_shape(expected)}."
        f"{' ' + hint if hint else ''}"
      )


def check_state(
  state: Any,
  init: Callable[[Params], Any],
  params: Params,
  transform_name: str,
  argument: str = "state",
) -> None:
  """Raises unless ``state`` is shaped like ``init(params)``.

  Compared with ``jax.eval_shape(init, params)``: the pytree structure (the
  state's type and fields) and every leaf's shape, not the values or
  dtypes. Catches a state from another transform, ``optax.EmptyState()`` or
  None where a state is kept, and a state from ``init`` on other
  parameters, at trace time. A transform that keeps no state (its ``init``
  returns an ``optax.EmptyState()``) takes any empty state: ``()``, None.

  Raises:
    ValueError: naming ``argument``, with what was expected and what came.
  """
  expected = jax.eval_shape(init, params)
  if not jax.tree.leaves(expected) and not jax.tree.leaves(state):
    return  # nothing kept, nothing to mix up
  same = jax.tree.structure(state) == jax.tree.structure(expected)  # type: ignore[operator]
  same = same and all(
    _shape(a) == _shape(b)
    for a, b in zip(
      jax.tree.leaves(state), jax.tree.leaves(expected), strict=True
    )
  )
  if not same:
    raise ValueError(
      f"{transform_name}: `{argument}` is not this transform's state for"
      f" these params: expected the shape of tx.init(params),"
      f" {describe(expected)}; got {describe(state)}. Pass the state that"
      " this transform's init (or the previous update) returned, for the"
      " same params."
    )


def check_bool_leaves(tree: Any, argument: str, transform_name: str) -> None:
  """Raises unless every leaf of ``tree`` is a bool or a boolean array.

  For masks (``perturb_mask``, ``scale_mask``): Python and NumPy bools, and
  (concrete or traced) arrays of dtype bool. Strings, numbers and None are
  errors (``"False"`` would otherwise read as True).

  Raises:
    ValueError: naming ``argument`` and the first offending leaf.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, (bool, np.bool_)):
      continue
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and np.dtype(dtype) == np.bool_:
      continue
    where = jax.tree_util.keystr(path) or "(the root)"
    raise ValueError(
      f"{transform_name}: `{argument}` must be a pytree of bools (True or"
      f" False per leaf, or boolean arrays); leaf {where} is {leaf!r}."
    )


def batch_size(
  batch: Batch, transform_name: str = "sam_optax", argument: str = "batch"
) -> int:
  """Returns the leading-axis size shared by every leaf of ``batch``.

  Raises:
    ValueError: if ``batch`` has no array leaves, a scalar leaf, leaves whose
      leading axes differ, or no examples.
  """
  leaves_with_path = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves_with_path:
    raise ValueError(f"{transform_name}: `{argument}` has no array leaves.")
  sizes = {}
  for path, leaf in leaves_with_path:
    shape = jnp.shape(leaf)
    if not shape:
      raise ValueError(
        f"{transform_name}: {argument} leaf {jax.tree_util.keystr(path)} is a"
        " scalar; every leaf needs a leading batch axis."
      )
    sizes[jax.tree_util.keystr(path)] = shape[0]
  if len(set(sizes.values())) != 1:
    raise ValueError(
      f"{transform_name}: the leaves of `{argument}` must share their leading"
      f" (batch) axis, got sizes {sizes}."
    )
  size = next(iter(sizes.values()))
  if size == 0:
    raise ValueError(
      f"{transform_name}: `{argument}` is empty (batch axis of size 0); a SAM"
      " step needs at least one example."
    )
  return size


_SHAPE_CHECK = contextvars.ContextVar("sam_optax_shape_check", default=False)


def in_shape_check() -> bool:
  """Whether ``loss_fn`` is being called by :func:`check_per_example_losses`
  (a ``jax.eval_shape``, shapes only), not by a step's computation."""
  return _SHAPE_CHECK.get()


@contextlib.contextmanager
def shape_check() -> Iterator[None]:
  """Marks the calls of ``loss_fn`` inside as shapes-only traces (see
  :func:`in_shape_check`)."""
  token = _SHAPE_CHECK.set(True)
  try:
    yield
  finally:
    _SHAPE_CHECK.reset(token)


def check_per_example_losses(
  loss_fn: LossFn,
  params: Params,
  batch: Batch,
  transform_name: str,
  argument: str = "batch",
) -> int:
  """Checks that ``loss_fn(params, batch)`` returns shape ``[B]``; returns B.

  Only shapes are evaluated (``jax.eval_shape``): no computation happens.
  ``argument`` names ``batch`` in the messages (e.g. ``ascent_batch``).

  Raises:
    ValueError: if the output is not a vector with one loss per example.
    TypeError: if the losses are not real floating point (an integer loss
      has no gradient: ``jax.grad`` would give zeros or fail).
  """
  size = batch_size(batch, transform_name, argument)
  token = _SHAPE_CHECK.set(True)
  try:
    out = jax.eval_shape(loss_fn, params, batch)
  finally:
    _SHAPE_CHECK.reset(token)
  shape = getattr(out, "shape", None)
  if shape != (size,):
    if shape is not None and len(shape) > 1 and shape[0] == size:
      advice = (
        f" It returned one loss per example and per position {shape[1:]}"
        " (e.g. per token): reduce over the other axes inside loss_fn"
        " (e.g. losses.mean(axis=-1), or a masked mean over the tokens), so"
        " that each example has one loss."
      )
    elif shape == ():
      advice = " Return the vector of losses, not their mean."
    else:
      advice = (
        f" Its leading axis must be the batch axis of `{argument}` (size"
        f" {size})."
      )
    raise ValueError(
      f"{transform_name}: loss_fn(params, {argument}) must return"
      f" per-example losses of shape ({size},) (one per example of"
      f" `{argument}`), got"
      f" {shape if shape is not None else type(out).__name__}.{advice}"
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise TypeError(
      f"{transform_name}: loss_fn(params, {argument}) must return real"
      f" floating-point losses, got dtype {out.dtype}: an integer or"
      " boolean loss has no gradient. Compute the loss in floating point"
      " (e.g. cast with .astype(jnp.float32) before any rounding)."
    )
  return size


def mean_loss(loss_fn: LossFn, params: Params, batch: Batch) -> jax.Array:
  """``L_B(w) = mean_i ℓ_i(w)``, accumulated in float32."""
  return jnp.mean(loss_fn(params, batch).astype(jnp.float32))


def mean_gradient(loss_fn: LossFn, params: Params, batch: Batch) -> Params:
  """``∇L_B(w)``: the gradient of the mean per-example loss."""
  return jax.grad(mean_loss, argnums=1)(loss_fn, params, batch)


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def check_number(
  value: Any,
  argument: str,
  transform_name: str,
  *,
  minimum: float | None = None,
  above: float | None = None,
  below: float | None = None,
  maximum: float | None = None,
  allow_inf: bool = False,
) -> None:
  """Rejects a hyperparameter that is not a real number in range.

  The one check for real-valued hyperparameters (``rho``, ``sigma``, ``eta``,
  ...), run when a transform is built. ``None``, booleans, strings, complex
  numbers, arrays with more than one element, NaN and (unless ``allow_inf``) infinities are
  errors, as are values below ``minimum``, at or below ``above``, at or
  above ``below``, or above ``maximum``. Concrete arrays are checked like
  numbers; traced values (under ``jax.jit``, e.g. hyperparameters injected
  by ``optax.inject_hyperparams``) cannot be inspected and pass unchecked.

  Raises:
    ValueError: naming ``argument`` and ``transform_name``.
  """
  if _is_traced(value):
    return

  def fail(requirement: str) -> None:
    raise ValueError(
      f"{transform_name}: {argument} must be {requirement}, got {value!r}."
    )

  if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
    fail("a real number")
  if isinstance(value, complex) or np.iscomplexobj(value):
    fail("a real number, not complex")
  try:
    number = float(value)
  except (TypeError, ValueError):
    fail("a real number (a Python or NumPy scalar, or a scalar array)")
  if math.isnan(number):
    fail("a real number, not NaN")
  if math.isinf(number) and not allow_inf:
    fail("finite")
  if minimum is not None and number < minimum:
    fail(f">= {minimum}")
  if above is not None and number <= above:
    fail(f"> {above}")
  if below is not None and number >= below:
    fail(f"< {below}")
  if maximum is not None and number > maximum:
    fail(f"<= {maximum}")


def check_rho(rho: ArrayLike, transform_name: str) -> None:
  """``rho`` must be a finite number ``>= 0`` (traced values pass)."""
  check_number(rho, "rho", transform_name, minimum=0)


def check_bool(value: Any, argument: str, transform_name: str) -> bool:
  """Returns ``value`` as a Python bool, or raises naming ``argument``.

  The one check for flags (``normalize``, ``probe_in_float32``, ...): only
  Python and NumPy booleans are accepted. None, strings (``"False"`` is
  truthy), numbers and arrays are errors, as are traced values (a flag
  chooses the computation, so it must be static: with
  ``optax.inject_hyperparams`` name it in ``static_args``).

  Raises:
    ValueError: if ``value`` is not a boolean.
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  hint = ""
  if _is_traced(value) or isinstance(value, jax.Array):
    hint = (
      " It chooses the computation, so it must be static: with"
      f" optax.inject_hyperparams pass static_args=({argument!r},)."
    )
  raise ValueError(
    f"{transform_name}: {argument} must be True or False, got {value!r}.{hint}"
  )


@overload
def check_integer(
  value: Any,
  argument: str,
  transform_name: str,
  *,
  minimum: int = ...,
  maximum: int | None = ...,
  optional: Literal[False] = ...,
  static_hint: bool = ...,
) -> int: ...


@overload
def check_integer(
  value: Any,
  argument: str,
  transform_name: str,
  *,
  minimum: int = ...,
  maximum: int | None = ...,
  optional: bool,
  static_hint: bool = ...,
) -> int | None: ...


def check_integer(
  value: Any,
  argument: str,
  transform_name: str,
  *,
  minimum: int = 1,
  maximum: int | None = None,
  optional: bool = False,
  static_hint: bool = True,
) -> int | None:
  """Returns ``value`` as a Python int, or raises naming ``argument``.

  The one check for integer options (sizes, counts): Python and NumPy integers
  are accepted; booleans, floats and JAX arrays are not.
  Such options set shapes or loop counts, so they must be concrete: a traced
  value (e.g. one ``optax.inject_hyperparams`` turned into an array) is an
  error that says to make it static.

  ``optional`` lets None through (returned as None).

  Raises:
    ValueError: if ``value`` is not an integer in ``[minimum, maximum]``.
  """
  if optional and value is None:
    return None
  # A JAX array is rejected even when concrete, so that the same call does
  # not work eagerly and then fail under jit.
  is_jax = _is_traced(value) or isinstance(value, jax.Array)
  hint = ""
  if static_hint and is_jax:
    hint = (
      f" It sets shapes or loop counts, so it must be static: with"
      f" optax.inject_hyperparams pass static_args=({argument!r},)."
    )
  if not isinstance(value, (bool, np.bool_)) and not is_jax:
    try:
      number = operator.index(value)
    except TypeError:
      number = None
    if (
      number is not None
      and number >= minimum
      and (maximum is None or number <= maximum)
    ):
      return number
  requirement = "a positive int" if minimum == 1 else f"an int >= {minimum}"
  requirement += "" if maximum is None else f" and <= {maximum}"
  requirement += " or None" if optional else ""
  raise ValueError(
    f"{transform_name}: {argument} must be {requirement}, got {value!r}.{hint}"
  )


def check_choice(
  value: Any, choices: tuple[str, ...], argument: str, transform_name: str
) -> str:
  """Returns ``value`` if it is one of ``choices``, else raises naming it.

  Raises:
    ValueError: listing the choices.
  """
  if isinstance(value, str) and value in choices:
    return value
  raise ValueError(
    f"{transform_name}: {argument} must be one of"
    f" {', '.join(map(repr, choices))}; got {value!r}."
  )


def check_divides(
  value: int,
  total: int,
  argument: str,
  what: str,
  transform_name: str,
  *,
  why: str = "",
) -> int:
  """Returns ``total // value``, or raises if ``value`` does not divide it.

  Args:
    value: the size of a part (an int already checked by
      :func:`check_integer`).
    total: the size to divide.
    argument: the name of ``value``'s argument, for the message.
    what: what ``total`` counts ("the batch size", "the number of
      micro-batches"), for the message.
    transform_name: the name used in the message.
    why: why it must divide, for the message (optional).

  Raises:
    ValueError: listing the divisors of ``total``.
  """
  if total % value:
    divisors = [d for d in range(1, total + 1) if total % d == 0]
    raise ValueError(
      f"{transform_name}: {argument}={value} must divide {what} {total}"
      f"{f' ({why})' if why else ''}; divisors of {total}: {divisors}."
    )
  return total // value


# --- Leaf shapes (bsam's explicit noise) -------------------------------------


def check_leaf_shapes(
  tree: Any,
  reference: Any,
  argument: str,
  transform_name: str,
  reference_name: str = "params",
  *,
  leading: tuple[int, ...] = (),
) -> None:
  """Raises unless ``tree`` is like ``reference`` with leaves of shape
  ``leading + reference leaf's shape``, naming the first leaf that is not.

  Raises:
    ValueError: on a different structure or a leaf of another shape.
  """
  check_same_structure(tree, reference, argument, transform_name)
  paths = jax.tree_util.tree_leaves_with_path(reference)
  for (path, ref), leaf in zip(paths, jax.tree.leaves(tree), strict=True):
    expected = (*leading, *jnp.shape(ref))
    if jnp.shape(leaf) != expected:
      raise ValueError(
        f"{transform_name}: `{argument}` leaf"
        f" {jax.tree_util.keystr(path) or '(the root)'} must have shape"
        f" {expected} (the {reference_name} leaf's shape"
        f"{' after a leading axis of ' + str(leading) if leading else ''}),"
        f" got {jnp.shape(leaf)}."
      )


# --- A loss split into a model and a loss of its outputs (functional_sam) ----


def require_split_loss(loss_fn: Any, transform_name: str) -> Any:
  """Returns ``loss_fn`` if it has callable ``model_fn`` and
  ``output_loss_fn`` (a :class:`sam_optax.SplitLoss`), else raises.

  Raises:
    TypeError: saying how to build one.
  """
  if callable(getattr(loss_fn, "model_fn", None)) and callable(
    getattr(loss_fn, "output_loss_fn", None)
  ):
    return loss_fn
  raise TypeError(
    f"{transform_name}.update needs `loss_fn` split into the model and a loss"
    " of its outputs: pass sam_optax.SplitLoss(model_fn, output_loss_fn),"
    " with model_fn(params, batch) -> outputs (the logits) and"
    " output_loss_fn(outputs, batch) -> per-example losses [B] (with Flax"
    " NNX: sam_optax.flax.nnx_split_loss(model, forward, output_loss)); got"
    f" {type(loss_fn).__name__}."
  )
