"""benchmarks/reading_path.py: the lines one training step runs, and the package's import cycles.

The counter is checked on a source whose code lines are known by construction, the cycle finder on
a package written here with a planted cycle, and the real measurement (a tiny model) for sanity:
every method's path holds the files it must, the union is at least each path and at most their sum.
"""

import importlib.util
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reading_path", ROOT / "benchmarks" / "reading_path.py")
reading_path = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reading_path)


def test_code_lines_skip_docstrings_comments_and_blank_lines():
    source = textwrap.dedent('''\
        """Module docstring,
        on two lines."""
        import os  # a comment after code counts as code

        # a comment line


        class A:
            """Class docstring."""

            x = 1

            def f(self, y):
                """Function docstring."""
                s = """a string that is not a docstring
        spans two lines"""
                return [
                    y,  # inside brackets
                ]
        ''')
    assert reading_path.code_lines(source) == {3, 8, 11, 13, 15, 16, 17, 18, 19}


def test_count_lines_maps_comprehensions_to_their_function(tmp_path):
    """A traced comprehension counts as the function holding it; a class body and module code do not count."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    path = pkg / "m.py"
    path.write_text("def f(x):\n    return [i for i in x]\n\n\ndef g():\n    pass\n")

    class Code:
        def __init__(self, name, line):
            self.co_filename, self.co_name, self.co_firstlineno = str(path), name, line

    old = reading_path.PACKAGE_DIR
    reading_path.PACKAGE_DIR = str(pkg)
    try:
        counted = reading_path.count_lines([Code("<listcomp>", 2), Code("<module>", 1)])
    finally:
        reading_path.PACKAGE_DIR = old
    assert counted == {"m.py": {1, 2}}


def _package(tmp_path, files: dict) -> str:
    root = tmp_path / "toy"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return str(root)


def test_import_cycles_found_and_told_apart(tmp_path):
    """A cycle of module-level imports, and one closed only by an import inside a function."""
    package = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "from .a import thing\n",
        "c.py": "def f():\n    from .sub.d import g\n",
        "sub/__init__.py": "",
        "sub/d.py": "from ..c import f\n",
        "e.py": "import os\nfrom .sub import d\n",  # no cycle: e -> sub.d -> c only
    })
    found = reading_path.import_cycles(package)
    assert found["module_level"] == [["a", "b"]]
    assert found["all_imports"] == [["a", "b"], ["c", "sub.d"]]


def test_no_import_cycles_through_plots_or_experiments():
    """Module-level imports have no cycle anywhere; plots and experiments are in no cycle even counting late imports."""
    found = reading_path.import_cycles()
    assert found["module_level"] == []
    tangled = [g for g in found["all_imports"] if any(m.split(".")[0] in ("plots", "experiments") for m in g)]
    assert tangled == []


@pytest.fixture(scope="module")
def measured():
    return reading_path.reading_path("quick")


def test_reading_path_is_sane(measured):
    for method in reading_path.METHODS:
        path = measured[method]
        assert path["lines"] == sum(path["by_file"].values()) > 0
        assert path["files"] == len(path["by_file"])
        for name in ("functional.py", "nn.py", "adapter.py", "model.py", "optim.py", "methods.py"):
            assert path["by_file"].get(name, 0) > 0, f"{method}: {name} is not on the path"
        assert not any(name.startswith(("plots/", "experiments/", "verify/")) for name in path["by_file"])
    assert measured["qlora"]["by_file"]["quant/blockwise.py"] > 0
    assert measured["qalora"]["by_file"]["quant/groupwise.py"] > 0
    assert "quant/blockwise.py" not in measured["lora"]["by_file"]
    both = measured["all"]
    assert max(measured[m]["lines"] for m in reading_path.METHODS) <= both["lines"]
    assert both["lines"] <= sum(measured[m]["lines"] for m in reading_path.METHODS)
    assert set(both["by_file"]) == set().union(*(measured[m]["by_file"] for m in reading_path.METHODS))


def test_reading_order_covers_the_qlora_path(measured):
    """Every file one QLoRA step runs is in the README's reading order, and the table gives its measured count."""
    table = reading_path.reading_order_table(measured)
    assert "not in the reading order" not in table
    for name, count in measured["qlora"]["by_file"].items():
        assert f"| `{name}` | {count} |" in table
    on_path = {**measured["batch"]["by_file"], **measured["qlora"]["by_file"]}
    for name, _ in reading_path.READING_ORDER:  # a file the step does not run keeps its row, marked "import"
        assert (ROOT / reading_path.PACKAGE / name).is_file(), name
        if name not in on_path:
            assert f"| `{name}` | import |" in table
    assert "| `quant/tables.py` | import |" in table  # its tables are data, made when it is imported


def test_readme_reading_order_is_the_measured_table(measured):
    """The README's table is the script's output, not typed by hand: regenerate it with --reading-order."""
    readme = (ROOT / "README.md").read_text()
    table = reading_path.reading_order_table(measured)
    missing = [row for row in table.splitlines() if row not in readme]
    assert not missing, "README's reading order is stale; run python benchmarks/reading_path.py --reading-order:\n" + \
        "\n".join(missing)
