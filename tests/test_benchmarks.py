"""Each benchmark script runs to the end in its --quick mode and prints its ratios.

The timings themselves are not asserted here (speed targets live in the scripts, measured side by
side); this only keeps the scripts working as the library changes under them. Each script also
asserts its own correctness checks (merged = unmerged outputs, codes unchanged, ...) before timing.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> a line fragment its report must contain
REPORTS = {
    "train_step.py": "ratio ours/torch",
    "lora_step.py": "ours LoRA / PyTorch + PEFT",
    "nf4.py": "ratio ours/bitsandbytes",
    "qalora.py": "ratio QA-LoRA / LoRA",
    "file_checks.py": "ratio with/without",
    "reading_path.py": "import cycles (all imports)",
    "hf_load.py": "loader peak / model bytes",
    "tokenizer.py": "ratio ours/transformers (tokenizer)",
    "generate.py": "ratio ours/transformers tokens/s (base)",
    "gpt2_scale.py": "QLoRA NF4+DQ, ours / PEFT over bitsandbytes",
}


HELPERS = {"timing.py"}  # imported by the scripts, not run on its own


def test_every_benchmark_is_listed():
    assert sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")) == sorted(set(REPORTS) | HELPERS)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(REPORTS))
def test_benchmark_runs_quick(script):
    pytest.importorskip("torch")  # the references: PyTorch, PEFT, bitsandbytes (test dependencies)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-3000:]}"
    assert REPORTS[script] in proc.stdout, f"{script} printed no '{REPORTS[script]}' line:\n{proc.stdout}"
