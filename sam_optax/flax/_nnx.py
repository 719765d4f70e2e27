"""An NNX model as the pure per-example ``loss_fn(params, batch)``.

``nnx_loss_fn`` splits the model once into its static graph, the parameters
(``wrt``) and the rest of its state, and returns a function that merges the
parameters it is given into a *fresh copy* of that graph
(``nnx.merge(..., copy=True)``): fresh ``Variable`` objects at the trace level
of the call, so BatchNorm may update its statistics inside the transforms'
``jax.grad``, ``jax.vjp`` and ``jax.vmap`` (merging the model's own variables
there raises ``TraceContextError: Cannot mutate BatchStat from a different
trace level``), and no update reaches the model. The merge runs when the
step is traced, not when it runs.
"""

from collections.abc import Callable
from typing import Any
import warnings

from flax import nnx
import jax
import jax.numpy as jnp

from sam_optax import _contract
from sam_optax import _per_example

PerExampleLoss = Callable[[nnx.Module, Any], jax.Array]
"""``per_example_loss(model, batch) -> losses [B]``."""


def _draw_pass_streams(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` whose RNG streams restart from fresh keys.

  Each of the model's streams gives one key (which advances it, as one
  Dropout call does); the copy's stream restarts from that key at count 0, so
  every pass run on the copy's state draws the same masks, and no pass
  repeats the clean pass's or another step's.
  """
  streams = {
    path: node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.RngStream)
  }
  copy = nnx.clone(model)
  for path, node in nnx.iter_graph(copy):
    if isinstance(node, nnx.RngStream):
      node.key[...] = streams[path]()
      node.count[...] = jnp.zeros_like(node.count[...])
  return copy


def _couples_examples(model: nnx.Module) -> bool:
  """Whether ``model``, in its mode, makes an example's loss depend on others.

  True if a layer normalizes with batch statistics
  (``use_running_average=False``: BatchNorm in training mode) or is
  stochastic (``deterministic=False``: Dropout in training mode, whose masks
  are drawn for the whole batch); ``model.eval()`` turns both off.
  """
  return any(
    getattr(node, "use_running_average", None) is False
    or getattr(node, "deterministic", None) is False
    for _, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Module)
  )


def _has_rng_streams(model: nnx.Module) -> bool:
  return any(
    isinstance(node, nnx.RngStream) for _, node in nnx.iter_graph(model)
  )


def _is_stochastic(model: nnx.Module) -> bool:
  """Whether a layer of ``model`` draws random masks (Dropout in training)."""
  return _has_rng_streams(model) and any(
    getattr(node, "deterministic", None) is False
    for _, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Module)
  )


def _under_jit() -> bool:
  """Whether this call is being traced for a compiled step.

  Not the transforms' shape-only checks (``jax.eval_shape``, which an eager
  step runs too). False where this JAX cannot tell.
  """
  if _contract.in_shape_check():
    return False
  under_jit = getattr(jax._src.core, "unsafe_am_i_under_a_jit", None)
  return bool(under_jit()) if under_jit is not None else False


REUSED_MASKS_WARNING = (
  "sam_optax.flax.nnx_loss_fn: this loss_fn was built outside the traced"
  " train step, so the dropout keys it drew are constants of the compiled"
  " step: every step reuses the same dropout masks. Build it inside the"
  " train step (after the clean pass), as in its docstring."
)


def nnx_loss_fn(
  model: nnx.Module,
  per_example_loss: PerExampleLoss,
  *,
  wrt: Any = nnx.Param,
) -> _contract.LossFn:
  """The pure ``loss_fn(params, batch) -> [B]`` of an NNX model.

  ``loss_fn(params, batch)`` is ``per_example_loss(model', batch)`` where
  ``model'`` is a fresh copy of ``model`` with the variables ``wrt`` taken
  from ``params`` (the ``nnx.State`` that ``nnx.Optimizer(..., wrt=wrt)``
  passes to the transform, or ``nnx.state(model, wrt)``) and the rest of its
  state as it stands. Build it in the train step, after the clean pass:

  .. code-block:: python

    @nnx.jit
    def train_step(model, optimizer, batch, key):
      grads = nnx.grad(lambda m: per_example_loss(m, batch).mean())(model)
      loss_fn = sam_optax.flax.nnx_loss_fn(model, per_example_loss)
      optimizer.update(model, grads, loss_fn=loss_fn, batch=batch, key=key)

  * The model runs in its current mode. In training mode BatchNorm
    normalizes with the statistics of the batch ``loss_fn`` is given (m-SAM's
    micro-batches with their own), and every state update a call makes (the
    running statistics) is discarded: the perturbed, probe and micro-batch
    passes leave the model as it was, and only the clean pass, the step's
    ``nnx.grad`` on the model, moves the running statistics.
  * Dropout: ``nnx_loss_fn`` draws one key from each of the model's RNG
    streams (advancing each as one Dropout call does), and every call of
    ``loss_fn`` restarts the streams from those keys. So all the passes of
    one step (SAM's perturbed gradient, RW-SAM's probes and the losses they
    are compared with, m-SAM's micro-batches) use the same masks for batches
    of the same shape (m-SAM's micro-batches get the same masks as one
    another), and these masks are drawn independently of the clean pass's
    (as in PyTorch SAM, where each forward pass draws its own) and of every
    other step's.
  * Build it in every step, inside the traced train step: it draws the
    step's keys when it is built. Built once outside ``nnx.jit`` and used
    in a jitted step, those keys are constants of the compiled step and
    every step reuses the same dropout masks; a model with Dropout in
    training mode then warns (``UserWarning``) when the step is traced. (A
    one-off jitted evaluation, e.g. a diagnostic, warns too: filter the
    warning there.)
    (Run eagerly, a ``loss_fn`` built once and reused across steps reuses
    its masks too, and cannot tell.)
  * ``loss_fn.couples_examples`` is True if, in its current mode, the model
    normalizes with batch statistics (a layer with
    ``use_running_average=False``: BatchNorm in training mode) or is
    stochastic (``deterministic=False``: Dropout in training mode): exact
    per-example gradients (:func:`sam_optax.per_example_gradient_norms`,
    :func:`sam_optax.calibrate_sigma`, ``rw_sam(gradient_norms="exact")``)
    are then rows of the Jacobian of the loss vector, what RW-SAM's probe
    estimates, instead of gradients on batches of one (see
    ``per_example_gradients`` there). In eval mode it is False. Set the
    attribute yourself for a layer that couples examples otherwise.

  >>> from flax import nnx
  >>> import jax, jax.numpy as jnp, optax, sam_optax, sam_optax.flax
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.linear = nnx.Linear(3, 2, rngs=rngs)
  ...     self.norm = nnx.BatchNorm(2, rngs=rngs)
  ...     self.dropout = nnx.Dropout(0.5, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.dropout(self.norm(self.linear(x)))
  >>> def per_example_loss(model, batch):
  ...   return jnp.sum((model(batch["x"]) - batch["y"]) ** 2, axis=-1)
  >>> model = Net(nnx.Rngs(0))
  >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}
  >>> loss_fn = sam_optax.flax.nnx_loss_fn(model, per_example_loss)
  >>> params = nnx.state(model, nnx.Param)
  >>> loss_fn(params, batch).shape, loss_fn.couples_examples
  ((4,), True)
  >>> grads = jax.grad(lambda p: loss_fn(p, batch).mean())(params)
  >>> bool(jnp.all(model.norm.mean[...] == 0))   # running statistics untouched
  True
  >>> bool(jnp.all(loss_fn(params, batch) == loss_fn(params, batch)))  # same masks
  True

  Args:
    model: the NNX model, in the mode the passes should run in (training).
      Its RNG streams advance by one key each; nothing else changes.
    per_example_loss: ``per_example_loss(model, batch)``, the losses of the
      batch's examples, shape ``[B]``; the same function as the clean pass's.
    wrt: the filter of the variables ``params`` holds (``nnx.Param`` by
      default), as given to ``nnx.Optimizer``.

  Returns:
    ``loss_fn(params, batch) -> [B]``, pure, with the attribute
    ``couples_examples``.
  """
  passes = _draw_pass_streams(model)
  graphdef, _, state = nnx.split(passes, wrt, ...)  # type: ignore[misc]
  coupled = _couples_examples(model)
  built_outside_trace = _is_stochastic(model) and not any(
    isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(state)
  )
  warned: list[bool] = []

  def loss_fn(params: nnx.State, batch: Any) -> jax.Array:
    if built_outside_trace and not warned and _under_jit():
      warned.append(True)
      warnings.warn(REUSED_MASKS_WARNING, UserWarning, stacklevel=2)
    return per_example_loss(
      nnx.merge(graphdef, params, state, copy=True), batch
    )

  setattr(loss_fn, _per_example.COUPLES_EXAMPLES, coupled)
  return loss_fn


# --- Issue 19 (variants-b): a split loss and parameter masks from a model ----


def nnx_split_loss(
  model: nnx.Module,
  forward: Callable[[nnx.Module, Any], Any],
  output_loss: Callable[[Any, Any], jax.Array],
  *,
  wrt: Any = nnx.Param,
) -> Any:
  """The :class:`sam_optax.SplitLoss` of an NNX model, for ``functional_sam``.

  ``model_fn(params, batch) = forward(model', batch)`` (the outputs, e.g. the
  logits), with ``model'`` the fresh copy :func:`nnx_loss_fn` builds (the
  same rules for BatchNorm statistics and dropout masks), and
  ``output_loss_fn = output_loss``, ``(outputs, batch) -> losses [B]``.
  Called as a loss it is ``output_loss(forward(model', batch), batch)``, so
  every other transform takes it too. Build it in the train step, like
  :func:`nnx_loss_fn`:

  .. code-block:: python

    def forward(model, batch):
      return model(batch["tokens"])                      # logits [B, T, V]

    def output_loss(logits, batch):                      # losses [B]
      return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["targets"]).mean(axis=-1)

    @nnx.jit
    def train_step(model, optimizer, batch):
      grads = nnx.grad(
        lambda m: output_loss(forward(m, batch), batch).mean())(model)
      loss_fn = sam_optax.flax.nnx_split_loss(model, forward, output_loss)
      optimizer.update(model, grads, loss_fn=loss_fn, batch=batch)

  Args:
    model: the NNX model, in the mode the passes should run in.
    forward: ``forward(model, batch) -> outputs``.
    output_loss: ``output_loss(outputs, batch) -> per-example losses [B]``.
    wrt: the filter of the variables ``params`` holds (``nnx.Param``).

  Returns:
    A :class:`sam_optax.SplitLoss` (its ``couples_examples`` as
    :func:`nnx_loss_fn`'s).
  """
  from sam_optax import _functional_sam  # pylint: disable=g-import-not-at-top

  return _functional_sam.SplitLoss(
    nnx_loss_fn(model, forward, wrt=wrt), output_loss
  )


NORMALIZATION_LAYERS = (
  nnx.BatchNorm,
  nnx.LayerNorm,
  nnx.RMSNorm,
  nnx.GroupNorm,
  nnx.InstanceNorm,
)
"""The layers :func:`normalization_mask` selects (their scales and biases)."""


def _key_name(key: Any) -> Any:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return getattr(key, attribute)
  return key


def module_mask(
  model: nnx.Module,
  select: Callable[[nnx.Module], bool] | nnx.Module | tuple[nnx.Module, ...],
  *,
  wrt: Any = nnx.Param,
) -> Callable[[Any], Any]:
  """A ``perturb_mask`` for the parameters inside some submodules of ``model``.

  The mask is True for the variables ``wrt`` of every submodule that
  ``select`` picks (and of the modules inside it), False elsewhere. It is
  returned as a function of the parameters, ``params -> pytree of bools``,
  which matches them by their paths (the attribute names), so it fits both
  the ``nnx.State`` that ``nnx.Optimizer(model, tx, wrt=wrt)`` passes to the
  transform and ``nnx.state(model, wrt)``. (Inside
  ``optax.inject_hyperparams`` pass ``static_args=("perturb_mask",)``.)

  Args:
    model: the NNX model.
    select: ``module -> bool``, or a submodule (or a tuple of them), matched
      by identity (``model.head``).
    wrt: the filter of the variables the parameters hold.

  Returns:
    ``params -> pytree of bools`` shaped like ``params``.

  Raises:
    ValueError: if ``select`` selects no parameter of ``model``.
  """
  if isinstance(select, nnx.Module):
    select = (select,)
  if isinstance(select, tuple):
    chosen = select
    select = lambda module: any(module is m for m in chosen)
  selected = {
    tuple(path)
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Module) and select(node)
  }

  def inside(path: Any, _: Any) -> bool:
    names = tuple(_key_name(k) for k in path)
    return any(names[:n] in selected for n in range(len(names) + 1))

  def mask(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(inside, params)

  if not any(jax.tree.leaves(mask(nnx.state(model, wrt)))):
    raise ValueError(
      "module_mask: no parameter of the model is inside the selected"
      " modules; pass a submodule of the model (e.g. model.head) or a"
      " predicate that selects one."
    )
  return mask


def normalization_mask(
  model: nnx.Module, *, wrt: Any = nnx.Param
) -> Callable[[Any], Any]:
  """SAM-ON's ``perturb_mask``: only the normalization layers' parameters.

  True for the scales and biases of every
  :data:`NORMALIZATION_LAYERS` layer (BatchNorm, LayerNorm, RMSNorm,
  GroupNorm, InstanceNorm), False elsewhere (a function of the parameters,
  as :func:`module_mask` returns). SAM-ON (Müller et al., NeurIPS
  2023, `Normalization Layers Are All That Sharpness-Aware Minimization
  Needs <https://arxiv.org/abs/2306.04226>`_) is
  ``sam(rho, perturb_mask=normalization_mask(model))`` with a larger ``ρ``
  than SAM's (the normalization parameters are a small part of ``‖w‖``).

  The ``ρ`` to start from: the paper's per-model and per-dataset values
  (its tables and appendix) could not be read here (its text is not in the
  corpora this library was checked against). The authors' repository
  (mueller-mp/SAM-ON, commit 8b8869ad1e03) gives one recipe, its README's
  WideResNet-28-10 on CIFAR-100 with AutoAugment: elementwise ASAM-ON with
  biases scaled, ``--rho=10. --eta`` 0 (its ``train.py`` default ``--rho``
  is 0.5), i.e. ``asam(10.0, eta=0.0, scale_mask=lambda p: jax.tree.map(
  lambda _: True, p), perturb_mask=normalization_mask(model))``. That ``ρ``
  is ASAM's (the perturbation scaled by ``|w|``), not SAM's: tune SAM-ON's
  own, from well above SAM's usual 0.05.

  Raises:
    ValueError: if the model has no normalization layer with parameters.
  """
  return module_mask(
    model, lambda node: isinstance(node, NORMALIZATION_LAYERS), wrt=wrt
  )


def output_layer_mask(
  model: nnx.Module, layer: nnx.Module, *, wrt: Any = nnx.Param
) -> Callable[[Any], Any]:
  """Logits-SAM's ``perturb_mask``: only the output layer's parameters.

  ``layer`` is the submodule producing the logits (``model.head``; NNX
  orders a model's attributes by name, so it is not guessed). With tied
  embeddings it is the embedding, and the perturbation then moves the
  input embedding too. Logits-SAM (Luo et al., `Sharpness-Aware
  Minimization in Logit Space Efficiently Enhances Direct Preference
  Optimization <https://arxiv.org/abs/2603.18258>`_, 2026) is
  ``sam(rho, perturb_mask=output_layer_mask(model, model.head))``.
  """
  return module_mask(model, layer, wrt=wrt)
