"""``python -m lora_from_scratch verify``: the table a student reads without pytest, and its no-torch message.

Every layer and model against PyTorch autograd, transformers' GPT-2, PEFT and bitsandbytes (LoRA, Hu et
al., 2021; QLoRA, Dettmers et al., 2023; QA-LoRA, Xu et al., 2023), with the bounds the test suite
uses: the table must come out with every row ok. Without torch, verify still runs the central-difference
checks, names what is missing and the command that installs it, and exits with code 1.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_from_scratch import verify

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _rows(stdout: str) -> list:
    """The table's rows: the lines with five '|'-separated cells, the header left out."""
    rows = [[c.strip() for c in line.split("|")] for line in stdout.splitlines() if line.count("|") == 4]
    return [r for r in rows if r[0] != "component"]


def test_measurement_rules():
    assert verify.Measurement("x", 1e-11, 1e-10).ok and not verify.Measurement("x", 1e-10, 1e-10).ok
    assert verify.Measurement("bytes", 0, 0).ok and not verify.Measurement("bytes", 1, 0).ok
    assert not verify.Measurement("x", float("nan"), 1.0).ok
    worst = verify.worst([verify.Measurement("a", 1e-12, 1e-10), verify.Measurement("b", 1e-6, 1e-5)])
    assert worst.what == "b"  # the closest to its bound, not the largest error
    with pytest.raises(AssertionError, match="b: 2.000e-05 not below 1e-05"):
        verify.assert_ok([verify.Measurement("a", 0.0, 1.0), verify.Measurement("b", 2e-5, 1e-5)])
    with pytest.raises(verify.Mismatch, match="no measurement"):
        verify.assert_ok([])


def test_every_reference_row_is_listed():
    rows = verify.checks()
    references = {lib for c in rows for lib in c.needs}
    assert references == set(verify.REFERENCES)
    assert len({(c.component, c.reference) for c in rows}) == len(rows)  # no row twice
    assert {c.reference for c in rows if not c.needs} == {"central differences"}
    for word in ("Linear", "Embedding", "LayerNorm", "GELU", "softmax", "dropout", "cross-entropy",
                 "CausalSelfAttention", "MLP", "Block", "LoRALinear", "QLoRALinear", "QALoRALinear", "GPT",
                 "NF4", "FP4", "PEFT"):
        assert any(word in c.component for c in rows), word


def test_the_table_every_row_ok():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    proc = _python("import sys; from lora_from_scratch.__main__ import main; sys.exit(main(['verify']))")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert len(rows) == len(verify.checks())
    assert all(r[4] == "ok" for r in rows), [r for r in rows if r[4] != "ok"]
    for component, _, error, bound, _ in rows:
        assert bound == "= 0" or bound.startswith("< "), (component, bound)
        if bound == "= 0":  # a count of mismatching bytes or values
            assert error == "0", (component, error)
        else:
            assert float(error) < float(bound[2:]), (component, error, bound)
    assert "failed" in proc.stdout and " 0 failed" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_without_torch_it_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lora_from_scratch.__main__ import main\n"
            "sys.exit(main(['verify']))")
    proc = _python(code)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert verify.INSTALL in proc.stdout and "torch" in proc.stdout and "not installed" in proc.stdout
    rows = _rows(proc.stdout)
    # what needs no reference library still ran: the central-difference checks, every one ok
    assert rows and all(r[1] == "central differences" and r[4] == "ok" for r in rows)
    assert len(rows) == len([c for c in verify.checks() if not c.needs])
    assert "Traceback" not in proc.stderr


def test_package_imports_without_the_references():
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'peft', 'bitsandbytes'): sys.modules[name] = None\n"
            "import lora_from_scratch.verify, lora_from_scratch.demo, lora_from_scratch.qlora_vs_qalora\n"
            "print(lora_from_scratch.verify.missing_references())")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['torch', 'transformers', 'peft', 'bitsandbytes']"
