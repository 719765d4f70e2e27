"""The guide has one home (docs/guide/) and every snippet one runner.

- The variants tables of docs/guide/variants.md and README.md have one row per
  transform of ``sam_optax`` (a public function whose first argument is
  ``rho`` and that returns an optax transform), no more, no fewer: a new
  variant is a new row in each. docs/index.md includes the guide's table.
- Each fenced python block of a guide page names the test that runs it
  (``<!-- ... run by tests/test_x.py -->``), and that test reads it from that
  page; the other examples are ``{testcode}``/``{doctest}`` blocks, which the
  documentation's doctest builder runs. So no snippet runs twice, and none is
  left untested.
- README.md's one example is a ``{testcode}`` block of docs/guide/use.md,
  character for character (it runs there), and its relative links resolve.
"""

import inspect
import pathlib
import re
import tomllib

import optax
import pytest

import sam_optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide"
TABLE_START = (
  "<!-- variants table: one row per transform of sam_optax"
  " (tests/test_guide.py checks) -->"
)
TABLE_END = "<!-- end of the variants table -->"


# Whole optimizers, which end the chain, take the learning rate first.
WHOLE_OPTIMIZERS = {"bsam"}


def package_variants() -> set[str]:
  """The transforms in ``sam_optax.__all__``: functions of ``rho`` first
  that return an optax ``GradientTransformation``, and the whole optimizers."""
  names = set()
  for name in sam_optax.__all__:
    value = getattr(sam_optax, name)
    if not inspect.isfunction(value):
      continue
    signature = inspect.signature(value)
    parameters = list(signature.parameters)
    returns = signature.return_annotation
    if (
      (parameters[:1] == ["rho"] or name in WHOLE_OPTIMIZERS)
      and inspect.isclass(returns)
      and issubclass(returns, optax.GradientTransformation)
    ):
      names.add(name)
  return names


def table_rows(path: pathlib.Path) -> list[str]:
  """The rows of the variants table of ``path``, between its two markers."""
  text = path.read_text(encoding="utf-8")
  assert TABLE_START in text, f"{path.name} lost the variants table's marker"
  table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
  lines = [line for line in table.strip().splitlines() if line.strip()]
  assert lines[1].startswith("|---"), lines[:2]
  return lines[2:]


def row_names(rows: list[str]) -> list[str]:
  """The transform each row names: ``{func}`sam(rho) <sam_optax.sam>``` in
  the guide, ```sam(rho)``` in the README."""
  names = []
  for row in rows:
    first = row.split("|")[1]
    match = re.search(r"<sam_optax\.(\w+)>", first) or re.search(
      r"`(\w+)\(", first
    )
    assert match, f"no transform named in the row {row!r}"
    names.append(match.group(1))
  return names


def test_the_package_has_transforms():
  assert {"sam", "m_sam", "rw_sam", "momentum_sam"} <= package_variants()
  assert "sharpness_aware" not in package_variants()  # a building block


@pytest.mark.parametrize("path", ["docs/guide/variants.md", "README.md"])
def test_variants_table_has_one_row_per_transform(path):
  names = row_names(table_rows(ROOT / path))
  assert len(names) == len(set(names)), f"a transform twice in {path}"
  missing = package_variants() - set(names)
  extra = set(names) - package_variants()
  assert not missing, f"{path}: add a row to the variants table for {missing}"
  assert not extra, f"{path}: rows for what sam_optax does not export: {extra}"


def test_the_two_tables_list_the_transforms_in_one_order():
  assert row_names(table_rows(ROOT / "README.md")) == row_names(
    table_rows(GUIDE / "variants.md")
  )


def test_docs_index_includes_the_guides_table():
  text = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
  include = re.search(
    r"```\{include\} guide/variants\.md\n(.*?)```", text, re.S
  )
  assert include, "docs/index.md should include guide/variants.md's table"
  options = include.group(1)
  assert f":start-after: {TABLE_START}" in options
  assert f":end-before: {TABLE_END}" in options


def fenced_python_blocks(text: str) -> list[tuple[str, str]]:
  """``(what precedes, code)`` for each ```python block of a page."""
  blocks = []
  for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
    before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
    blocks.append((before, match.group(1)))
  return blocks


@pytest.mark.parametrize("page", sorted(p.name for p in GUIDE.glob("*.md")))
def test_every_python_block_of_the_guide_names_its_test(page):
  text = (GUIDE / page).read_text(encoding="utf-8")
  for before, code in fenced_python_blocks(text):
    marker = re.fullmatch(r"<!-- .*run by (tests/\w+\.py) -->", before)
    assert marker, (
      f"docs/guide/{page}: a ```python block without a marker naming the"
      " test that runs it (or make it a {testcode} block):\n" + code[:200]
    )
    test = ROOT / marker.group(1)
    assert test.exists(), f"{page}: {marker.group(1)} does not exist"
    runner = test.read_text(encoding="utf-8")
    helpers = [
      (ROOT / "tests" / f"{name}.py").read_text(encoding="utf-8")
      for name in re.findall(r"^(?:from|import) (_\w+)", runner, re.M)
    ]
    assert any(page in t for t in (runner, *helpers)), (
      f"{marker.group(1)} does not read docs/guide/{page}"
    )


def test_readme_example_runs_on_the_use_page():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  examples = [code for _, code in fenced_python_blocks(readme)]
  assert len(examples) == 1, "the README has one example"
  use = (GUIDE / "use.md").read_text(encoding="utf-8")
  testcode = re.findall(r"^```\{testcode\}\n(.*?)^```", use, re.S | re.M)
  assert examples[0] in testcode, (
    "README.md's example must be a {testcode} block of docs/guide/use.md,"
    " character for character"
  )


def test_readme_links_resolve():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
  local = [link for link in links if "://" not in link]
  assert local
  for link in local:
    assert (ROOT / link).exists(), f"README.md links to a missing {link}"


def test_version_is_one_and_in_the_changelog():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
  assert pyproject["project"]["version"] == sam_optax.__version__
  changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
  assert f"## [{sam_optax.__version__}]" in changelog
