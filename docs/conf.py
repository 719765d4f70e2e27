"""Sphinx configuration of the sam_optax documentation.

Build (see BUILD.md, "Documentation"):

  sphinx-build -W --keep-going -b html -d docs/_build/doctrees docs docs/_build/html
  sphinx-build -W -b doctest -d docs/_build/doctrees docs docs/_build/doctest

Everything here works offline: no intersphinx, no remote images, no notebook
execution. Formulas are rendered by MathJax in the reader's browser, from a
copy in the site (sphinx-mathjax-offline), so they render offline too.
"""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent

# XLA flags for the doctests, set before JAX starts; a flag already in
# XLA_FLAGS is kept. The examples of "Across devices" run on 4 devices, which
# JAX makes from host threads on a CPU. The examples compile about a thousand
# small programs and run each once or twice, so the CPU compiler's slower
# optimizations cost more than they save (the doctests take a quarter less),
# and so do its MLIR fusion emitters and split LLVM modules (the same flags
# as tests/conftest.py; no example prints a compiled cost).
_XLA_FLAGS = {
  "--xla_force_host_platform_device_count": "4",
  "--xla_backend_optimization_level": "0",
  "--xla_llvm_disable_expensive_passes": "true",
  "--xla_cpu_use_fusion_emitters": "false",
  "--xla_cpu_parallel_codegen_split_count": "1",
}
_xla_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_xla_flags]
  + [
    f"{flag}={value}"
    for flag, value in _XLA_FLAGS.items()
    if flag not in _xla_flags
  ]
).strip()

# The checkout's own package, whatever is installed; then docs/_ext.
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(DOCS / "_ext"))

import sam_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

# -- Project -------------------------------------------------------------------

project = "sam_optax"
author = "sam_optax contributors"
copyright = "sam_optax contributors"  # pylint: disable=redefined-builtin
release = sam_optax.__version__
version = release

# -- General -------------------------------------------------------------------

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.doctest",
  "sphinx.ext.mathjax",
  "sphinx-mathjax-offline",
  "sphinx.ext.napoleon",
  "myst_parser",
  "public_api",  # docs/_ext: every public name has an API entry, and more
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []

# Every cross reference must resolve: a :func:`name` that names nothing is a
# warning, so an error under -W. Types from other packages are not
# documented here (no intersphinx: the build is offline), so references into
# them are let through as plain text; so are references to sam_optax's
# private helpers (docs/_ext/public_api.py).
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|jaxlib|optax|numpy|np|flax|typing|collections)(\..*)?"),
  (
    r"py:.*",
    r"(Any|Callable|Hashable|Literal|NamedTuple|Protocol|Sequence"
    r"|ArrayLike|Array|ArrayTree|None|bool|int|float|str|tuple|list|dict)",
  ),
]

# -- autodoc, autosummary and napoleon -----------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autosummary_generate = False  # the API pages list their entries themselves
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- MyST ----------------------------------------------------------------------

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# -- doctest -------------------------------------------------------------------
# The `>>>` examples in docstrings (those the API pages include) run on the
# linear classifier of docs/_ext/docstring_problem.py: `params`, `loss_fn` and
# `batch` are defined before each page's examples. The guide's pages start
# with `from example_problem import *` instead (a hidden {testsetup}): a
# two-layer MLP on 32 random examples, docs/_ext/example_problem.py.

doctest_test_doctest_blocks = "default"
doctest_global_setup = """
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sam_optax
from docstring_problem import *
"""

# -- HTML ----------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = f"sam_optax {release}"
html_theme_options = {
  "show_toc_level": 2,
  "navigation_with_keys": False,
}
html_static_path = []
html_show_sourcelink = False
html_copy_source = False
