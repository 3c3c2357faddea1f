"""Checks on the stored notebooks themselves (no execution; the notebooks are run by ``pytest --nbmake``).

The tutorial's rule ("notebooks are executed by the test suite"; pitfalls: notebooks that
"test" by printing, helper code copied between notebooks) made concrete for every tutorial notebook
``notebooks/NN_*.ipynb`` (the student copies in ``notebooks/student/`` are generated from them and
checked in ``test_exercises.py``):

- the saved outputs come from one clean top-to-bottom run: the code cells' execution counts are
  1, 2, ..., n with none missing, and no cell holds an error output;
- at least one code cell asserts something (a claim checked on measured values, not only printed);
- the code comes from the package: some code cell imports ``lora_from_scratch`` and no code cell
  defines a class;
- at least one plot (a PNG among the stored outputs), and every notebook is listed in the README.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
IDS = [str(p.relative_to(NOTEBOOK_DIR)) for p in NOTEBOOKS]

ASSERT = re.compile(r"^\s*assert\b", re.MULTILINE)
CLASS = re.compile(r"^\s*class\s+\w+", re.MULTILINE)
IMPORT = re.compile(r"^\s*(from\s+lora_from_scratch[\s.]|import\s+lora_from_scratch\b)", re.MULTILINE)


def code_cells(path: Path) -> list[dict]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_notebooks_found():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 11)], [p.name for p in NOTEBOOKS]
    assert not (NOTEBOOK_DIR / "solutions").exists(), "the solutions live in the tutorial notebooks now"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_at_least_one_plot(path):
    pngs = [o for c in code_cells(path) for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert pngs, f"{path.name} shows no plot"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_outputs_from_one_clean_run(path):
    cells = code_cells(path)
    assert cells, f"{path.name} has no code cells"
    counts = [c.get("execution_count") for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}; re-run it top to bottom "
        f"(jupyter nbconvert --to notebook --execute --inplace {path.name})"
    )
    errors = [o.get("ename") for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} holds error outputs: {errors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_asserts_and_imports_from_package(path):
    sources = [source(c) for c in code_cells(path)]
    assert any(ASSERT.search(s) for s in sources), f"{path.name} asserts nothing"
    assert any(IMPORT.search(s) for s in sources), f"{path.name} does not import lora_from_scratch"
    classes = [m.group(0).strip() for s in sources for m in CLASS.finditer(s)]
    assert not classes, f"{path.name} defines classes in code cells ({classes}); put them in the package"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_listed_in_readme(path):
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    assert path.name in readme, f"{path.name} is missing from notebooks/README.md"
