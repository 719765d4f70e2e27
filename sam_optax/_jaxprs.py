"""What the library reads from a traced ``loss_fn``: an equation's sub-jaxprs.

m-SAM's cost model (:mod:`sam_optax._micro_batches`) and RW-SAM's compute
precision (:mod:`sam_optax._precision`) walk a jaxpr into the jaxprs nested
in its equations (``jit``, ``remat``, ``scan``, ``while``, ``cond``, custom
derivatives), which JAX keeps among an equation's parameters.
"""

from typing import Any

from jax.extend import core as jax_core


def sub_jaxprs(params: dict[str, Any]) -> list[Any]:
  """The jaxprs among an equation's ``params`` (in lists and tuples too)."""
  found = []
  for value in params.values():
    for item in value if isinstance(value, (list, tuple)) else (value,):
      if isinstance(item, jax_core.ClosedJaxpr):
        found.append(item.jaxpr)
      elif isinstance(item, jax_core.Jaxpr):
        found.append(item)
  return found
