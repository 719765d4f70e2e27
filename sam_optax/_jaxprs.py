"""What the library reads from a traced ``loss_fn``: an equation's sub-jaxprs.

m-SAM's cost model (:mod:`sam_optax._micro_batches`) and RW-SAM's compute
precision (:mod:`sam_optax._precision`) walk a jaxpr into the jaxprs nested
in its equations (``jit``, ``remat``, ``scan``, ``while``, ``cond``, custom
derivatives), which JAX keeps among an equation's parameters.
"""

from typing import Any

from jax.extend import core as jax_core


def open_jaxpr(value: Any) -> Any:
  """A ``ClosedJaxpr``'s jaxpr; a ``Jaxpr`` as it is."""
  return value.jaxpr if isinstance(value, jax_core.ClosedJaxpr) else value


def sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  """The jaxprs among an equation's ``params`` (in lists and tuples too)."""
  return [
    open_jaxpr(item)
    for value in params.values()
    for item in (value if isinstance(value, (list, tuple)) else (value,))
    if isinstance(item, (jax_core.ClosedJaxpr, jax_core.Jaxpr))
  ]
