"""Sphinx extension: sam_optax's public names, documented where they are public.

The API pages document ``sam_optax.X``, not the private modules that define
``X`` (``sam_optax._sam``, ...), so that they survive moves between private
modules. This extension does four things for that:

- Coverage: the public names are ``__all__`` of ``sam_optax`` and of each of
  its public submodules (no part of the dotted name starting with ``_``), or
  for a submodule without ``__all__`` the functions and classes it defines.
  After the sources are read, a public name that no ``auto*`` directive
  documented is a warning, so an error under ``-W``: a name added to
  ``__all__`` needs a line in ``docs/api/``. A name that moved breaks the other
  way, as an autodoc import warning from the page that still lists it.
- Constants and aliases: autodoc looks for the docstring of ``sam_optax.X``
  (the string after ``X = ...``) in ``sam_optax/__init__.py``, which only
  imports it, and falls back to the value's own (``float``'s docstring for a
  float constant, none for ``LossFn``). It is looked up in the module that
  defines ``X`` instead.
- Private names: a docstring may point at a helper that is not public
  (:func:`probe_parameters`); there is no page to link to, so the reference
  is shown as code, without a warning, as long as the package defines that
  name somewhere. A reference to a name it does not define at all (a typo, a
  renamed helper) stays a warning.
- Signatures: annotations are shown evaluated, so ``ArrayLike`` and optax's
  pytree aliases appear expanded into long unions; they are shown by name.
"""

import functools
import importlib
import pkgutil
import re
import types
from typing import Any

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

PACKAGE = "sam_optax"

logger = logging.getLogger(__name__)


def _qualified(name: str) -> str:
  """A pattern for ``name``, maybe qualified (``~typing.Any``, ``typing.Any``)."""
  return r"~?(?:[\w.]+\.)?" + name


_ARRAY_LIKE = r" \| ".join(
  [_qualified(n) for n in ("Array", "ndarray", "bool", "number")]
  + ["bool", "int", "float", "complex"]
)
# Evaluated annotations, as autodoc prints them (fully qualified), and the
# names they stand for; ArrayTree first, since it contains ArrayLike.
ANNOTATION_NAMES = tuple(
  (re.compile(pattern), name)
  for pattern, name in (
    (
      _ARRAY_LIKE
      + r" \| "
      + _qualified(r"Iterable\[ArrayTree\]")
      + r" \| "
      + _qualified(r"Mapping\[")
      + _qualified(r"Any, ArrayTree\]"),
      "ArrayTree",
    ),
    (_ARRAY_LIKE, "~jax.typing.ArrayLike"),
    (
      _qualified(r"Callable\[\[")
      + _qualified("Any, ")
      + _qualified(r"Any\], ")
      + _qualified(r"Array\]"),
      "~sam_optax.LossFn",
    ),
    (r"\bjax\.jaxlib\._jax\.Array\b", "jax.Array"),
    # In attribute types (``:type:``), which are shown qualified.
    (r"\b(?:collections\.abc|typing)\.", ""),
    (r"\bsam_optax(?:\.\w+)*\._\w+\.", ""),
  )
)


def shorten(text: str | None) -> str | None:
  """``text`` with the annotations of ``ANNOTATION_NAMES`` named."""
  if text is None:
    return None
  for pattern, name in ANNOTATION_NAMES:
    text = pattern.sub(name, text)
  return text


@functools.cache
def _modules(package: str, private: bool) -> tuple[types.ModuleType, ...]:
  """The package and its submodules, recursively; private ones if asked.

  A submodule that cannot be imported (an optional dependency missing, such
  as Flax for ``sam_optax.flax``) is a warning, and is left out.
  """
  root = importlib.import_module(package)
  modules = [root]
  for info in pkgutil.walk_packages(
    root.__path__, prefix=package + ".", onerror=lambda name: None
  ):
    if not private and any(
      part.startswith("_") for part in info.name.split(".")
    ):
      continue
    try:
      modules.append(importlib.import_module(info.name))
    except ImportError as error:
      logger.warning(
        "cannot import %s (%s); install the docs extra,"
        ' pip install -e ".[docs]"',
        info.name,
        error,
        type="public_api",
        once=True,
      )
  return tuple(modules)


def _exported(module: types.ModuleType) -> list[str]:
  """``__all__``, or else the public functions and classes defined there."""
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return [
    name
    for name, value in vars(module).items()
    if not name.startswith("_")
    and callable(value)
    and getattr(value, "__module__", None) == module.__name__
  ]


def public_names(package: str = PACKAGE) -> tuple[set[str], set[str]]:
  """``(objects, modules)``: the dotted names that need an API entry."""
  objects, modules = set(), set()
  for module in _modules(package, private=False):
    modules.add(module.__name__)
    for name in _exported(module):
      value = getattr(module, name)
      if isinstance(value, types.ModuleType):
        modules.add(value.__name__)
      else:
        objects.add(f"{module.__name__}.{name}")
  return objects, modules


def check_coverage(app: Sphinx, env: BuildEnvironment) -> None:
  del app
  domain: Any = env.get_domain("py")
  objects, modules = public_names()
  missing = sorted(objects - set(domain.objects))
  missing += sorted(modules - set(domain.modules))
  for name in missing:
    logger.warning(
      "%s is public (in __all__) but has no entry in the API reference;"
      " add it to a page under docs/api/.",
      name,
      type="public_api",
      location="api/index",
    )


def defining_attribute_doc(name: str, value: Any) -> list[str] | None:
  """The docstring after ``X = ...`` in the module of the package defining it.

  ``name`` is the documented dotted name (``sam_optax.LossFn``); the module
  is the one whose attribute of that name is ``value`` itself.
  """
  short = name.rpartition(".")[2]
  for module in _modules(PACKAGE, private=True):
    if getattr(module, short, None) is not value:
      continue
    docs = ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
    if ("", short) in docs:
      return list(docs[("", short)])
  return None


def process_docstring(
  app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
  """The defining module's docstring for constants; short attribute types."""
  del app, options
  if what == "data" and name.startswith(PACKAGE + "."):
    doc = defining_attribute_doc(name, obj)
    if doc is not None:
      lines[:] = doc
  lines[:] = [shorten(line) if ":type:" in line else line for line in lines]


def process_signature(
  app: Sphinx,
  what: str,
  name: str,
  obj: Any,
  options: Any,
  signature: str | None,
  return_annotation: str | None,
) -> tuple[str | None, str | None]:
  del app, what, name, obj, options
  return shorten(signature), shorten(return_annotation)


@functools.cache
def private_names(package: str = PACKAGE) -> frozenset[str]:
  """Every name defined in the package's modules, private ones included."""
  return frozenset(
    name
    for module in _modules(package, private=True)
    for name in vars(module)
    if not name.startswith("__")
  )


def private_reference(
  app: Sphinx, env: BuildEnvironment, node: Any, contnode: Any
) -> Any:
  """Shows a Python reference to a private name of the package as code."""
  del app, env
  if node.get("refdomain") != "py":
    return None
  target = node.get("reftarget", "")
  if target.startswith(PACKAGE + ".") or "." not in target:
    if target.rpartition(".")[2] in private_names():
      return contnode
  return None


def setup(app: Sphinx) -> dict[str, Any]:
  app.connect("env-check-consistency", check_coverage)
  app.connect("autodoc-process-docstring", process_docstring)
  app.connect("autodoc-process-signature", process_signature)
  app.connect("missing-reference", private_reference)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
