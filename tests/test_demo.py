"""The demo (``python -m lora_from_scratch demo``): its tables as JSON, the claims they make, bad input, Ctrl-C.

LoRA (Hu et al., 2021, sections 4.1-4.2), QLoRA (Dettmers et al., 2023, section 3), QA-LoRA (Xu et al.,
2023, section 3.3). One ``demo --quick`` run in a subprocess (the command a newcomer types) is shared by
the tests of its structure and of the claims that hold at that scale; every bad input is refused before
any training with one line and exit code 2; an interrupted run leaves no file behind.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lora_from_scratch import data, demo
from lora_from_scratch.checkpoint import BASE_CHECKPOINT, load_checkpoint, save_checkpoint
from lora_from_scratch.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["full", "lora", "qlora", "qalora"]


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("LFS_DEBUG", None)
    # one BLAS thread: the demo's small matrices gain little from a second one, and on a machine busy
    # with other work OpenBLAS's waiting threads slow every step down many times over
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def cli(*args, timeout=600):
    env = _env()
    return subprocess.run([sys.executable, "-m", "lora_from_scratch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``demo --quick --json --figures`` run: (result, stdout, its folder, wall seconds)."""
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    proc = cli("demo", "--quick", "--json", str(out / "demo.json"), "--figures", str(out / "figures"),
               "--no-progress")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return json.loads((out / "demo.json").read_text()), proc.stdout, out, seconds


def _by_method(result):
    return {r["method"]: r for r in result["table1"]}


# ------------------------------------------------------------------------------ structure
def test_quick_run_structure(quick):
    result, stdout, out, seconds = quick
    s = result["settings"]
    assert s["quick"] and s["methods"] == METHODS and s["bits"] == list(demo.QUICK["bits"])
    assert s["steps"] == demo.QUICK["steps"] and s["batch_size"] == demo.QUICK["batch_size"]
    by = _by_method(result)
    assert list(by) == METHODS
    # one run per (method, bit width): QA-LoRA's first width is table 1's row, the others are extra runs
    assert by["qalora"]["bits"] == s["bits"][0]
    assert [r["bits"] for r in result["extra_runs"]] == s["bits"][1:]
    assert [(r["method"], r["bits"]) for r in result["table2"]] == (
        [("QLoRA", b) for b in s["bits"]] + [("QA-LoRA", b) for b in s["bits"]])
    runs = result["table1"] + result["extra_runs"]
    for r in runs:
        assert len(r["loss"]) == s["steps"] and r["train_seconds"] > 0
        assert 0.0 <= r["desc"] <= 1.0 and set(r["pretrain"]) == set(data.PRETRAIN_TASKS)
        assert r["state_bytes"] == 12 * r["trainable"]  # float32 gradient + two AdamW moments
        assert r["task_bytes"] == 4 * r["trainable"]
    for r in result["table1"]:  # one step measured per method of table 1
        m = r["step_memory"]
        assert r["step_ms"] > 0 and r["step_cpu_ms"] > 0
        assert m["peak"] == m["weights"] + m["gradients"] + m["optimizer"] + m["activations"] + m["temporaries"]
        assert r["state_bytes"] == m["gradients"] + m["optimizer"]  # what training holds, measured twice
        assert r["weight_bytes"] == m["weights"]
    assert all(r["step_memory"] is None for r in result["extra_runs"])
    # each number appears once: table 2's "trained" is the run's score in table 1 (or its extra run)
    trained = {("QLoRA", b): by["qlora"]["desc"] for b in s["bits"]}
    trained.update({("QA-LoRA", r["bits"]): r["desc"] for r in runs if r["method"] == "qalora"})
    for row in result["table2"]:
        assert row["trained"] == trained[(row["method"], row["bits"])]
        assert row["difference"] == row["deployed"] - row["trained"]
        assert row["group_size"] == s["group_size"]
    # the printed tables show the JSON's numbers
    for r in result["table1"]:
        line = next(x for x in stdout.splitlines() if x.startswith(r["name"] + " "))
        assert f"{100 * r['desc']:.1f}%" in line and f"{r['trainable']:,}" in line
    assert "1. What each method trains" in stdout and "2. Deploying at" in stdout
    # the figures: complete PNGs, nothing temporary left
    figures = out / "figures"
    assert sorted(os.listdir(figures)) == sorted(demo.FIGURES)
    for name in demo.FIGURES:
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["demo.json", "figures"]
    print(f"demo --quick: {seconds:.1f} s wall in the subprocess, {result['seconds']['cpu']:.1f} s CPU in the run")


def test_parameter_counts_from_the_config(quick):
    result, _, _, _ = quick
    by = _by_method(result)
    cfg = load_checkpoint(BASE_CHECKPOINT).config
    C, L, r, gs = cfg.n_embd, cfg.n_layer, result["settings"]["r"], result["settings"]["group_size"]
    # r (in + out) per adapted matrix: q, k, v, o are C x C, fc is C -> 4C, proj 4C -> C
    lora = L * r * (4 * 2 * C + 2 * (C + 4 * C))
    # QA-LoRA's A sees in / group_size pooled features: r (in / gs + out) per matrix
    qalora = L * r * (4 * (C // gs + C) + (C // gs + 4 * C) + (4 * C // gs + C))
    assert by["full"]["trainable"] == result["base"]["total"]
    assert by["lora"]["trainable"] == by["qlora"]["trainable"] == lora
    assert by["qalora"]["trainable"] == qalora
    assert result["base"]["desc"] == 0.0  # the new task is new


# ------------------------------------------------------------------------------ claims at quick scale
def test_lora_holds_far_less_state_and_peaks_lower(quick):
    by = _by_method(quick[0])
    # LoRA's gradients and moments are those of its adapters: the fraction r (d + k) / (d k) of the weights
    assert by["lora"]["state_bytes"] / by["full"]["state_bytes"] == by["lora"]["trainable"] / by["full"]["trainable"]
    assert by["lora"]["state_bytes"] < by["full"]["state_bytes"] / 5
    # one step's traced peak: the frozen weights save their gradients and moments, the activations remain
    full_m, lora_m = by["full"]["step_memory"], by["lora"]["step_memory"]
    assert lora_m["peak"] < full_m["peak"]
    assert lora_m["gradients"] + lora_m["optimizer"] < (full_m["gradients"] + full_m["optimizer"]) / 5
    assert lora_m["activations"] >= 0.5 * full_m["activations"]  # the gradient still flows through every layer


def test_qlora_holds_its_frozen_weights_in_4_bits(quick):
    by = _by_method(quick[0])
    assert by["qlora"]["weight_bytes"] < by["lora"]["weight_bytes"] / 4
    assert by["qlora"]["step_memory"]["peak"] < by["lora"]["step_memory"]["peak"]


def test_qalora_deploys_exactly_what_it_trained(quick):
    result = quick[0]
    for row in result["table2"]:
        if row["method"] == "QA-LoRA":
            assert row["deployed"] == row["trained"] and row["difference"] == 0.0, row
            assert row["pretrain_deployed"] == row["pretrain_trained"], row
            assert row["logits_rel"] < 1e-5, row
        else:  # QLoRA's re-quantization changes the model
            assert row["logits_rel"] > 1e-4, row


def test_pretrain_tasks_come_back_with_the_adapter_off(quick):
    result = quick[0]
    by = _by_method(result)
    base = result["base"]
    assert base["pretrain_mean"] > 0.9
    for method in ("lora", "qlora", "qalora"):
        r = by[method]
        assert r["adapter_off_is_frozen_base"] is True, method  # logits bit for bit the frozen base's
        assert r["pretrain_adapter_off"] == r["pretrain_frozen_base"], method
        assert r["pretrain_adapter_off_mean"] > r["pretrain_mean"] + 0.5, method  # tuned on desc, they were lost
    assert by["lora"]["pretrain_adapter_off"] == base["pretrain"]  # LoRA's frozen base is the base model
    full = by["full"]
    assert full["pretrain_adapter_off"] is None and full["adapter_off_is_frozen_base"] is None
    assert full["pretrain_mean"] < base["pretrain_mean"] - 0.5  # and full fine-tuning cannot go back
    assert "n/a" in next(x for x in quick[1].splitlines() if x.startswith("full fine-tuning "))


# ------------------------------------------------------------------------------ bad input
def _other_vocab(tmp_path):
    path = tmp_path / "other.safetensors"
    save_checkpoint(GPT(GPTConfig(vocab_size=60, block_size=32, n_layer=1, n_head=2, n_embd=32), seed=0), str(path))
    return ["--base", str(path)], "vocabulary of 60 tokens"


def _short_block(tmp_path):
    path = tmp_path / "short.safetensors"
    cfg = GPTConfig(vocab_size=data.VOCAB_SIZE, block_size=8, n_layer=1, n_head=2, n_embd=32)
    save_checkpoint(GPT(cfg, seed=0), str(path))
    return ["--base", str(path)], "block_size=8 is too small"


def _corrupt(tmp_path):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(Path(BASE_CHECKPOINT).read_bytes()[:5000])  # a truncated copy
    return ["--base", str(path)], "not a readable safetensors file"


def _unwritable_json(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return ["--json", str(tmp_path / "a-file" / "out.json")], "--json"


BAD = {
    "unknown method": lambda t: (["--methods", "lora", "dora"], "unknown method 'dora'"),
    "rank 0": lambda t: (["--rank", "0"], "--rank must be a positive integer"),
    "rank not a number": lambda t: (["--rank", "eight"], "--rank must be an integer"),
    "bits 9": lambda t: (["--bits", "4", "9"], "--bits must be an integer between 2 and 8, got 9"),
    "bits 1": lambda t: (["--bits", "1"], "--bits must be an integer between 2 and 8, got 1"),
    "missing base": lambda t: (["--base", str(t / "nowhere.safetensors")], "no checkpoint at"),
    "corrupt base": _corrupt,
    "other vocabulary": _other_vocab,
    "other block size": _short_block,
    "unwritable json": _unwritable_json,
    "json is a folder": lambda t: (["--json", str(t)], "is a folder"),
    "alpha 0": lambda t: (["--alpha", "0"], "--alpha must be a finite number > 0.0, got 0.0"),
    "steps 0": lambda t: (["--steps", "0"], "--steps must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, case):
    args, words = BAD[case](tmp_path)
    before = sorted(os.listdir(tmp_path))
    proc = cli("demo", "--quick", "--no-progress", *args, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert words in lines[0], lines[0]
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def _sigint_default():
    """In the child: Ctrl-C's default action, even where the test runs with SIGINT ignored (a background job),
    so that Python turns it into KeyboardInterrupt as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_leaves_no_file_behind(tmp_path):
    env = _env()
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lora_from_scratch", "demo", "--quick", "--no-progress",
                             "--json", str(out / "demo.json"), "--figures", str(out / "figures")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_default)
    try:
        first = proc.stdout.readline()  # printed once every input was checked and the base model loaded
        assert first.startswith("lora_from_scratch demo"), first
        time.sleep(1.0)  # into the first fine-tune
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    leftovers = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


# ------------------------------------------------------------------------------ in process
def test_backend_option_before_or_after_demo():
    from lora_from_scratch.__main__ import _parser

    parser = _parser()
    assert parser.parse_args(["--backend", "cupy", "demo"]).backend == "cupy"
    assert parser.parse_args(["demo", "--backend", "cupy"]).backend == "cupy"
    assert parser.parse_args(["demo"]).backend is None


def test_run_demo_checks_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        demo.run_demo(methods=("lora", "dora"), progress=False)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        demo.run_demo(r=0, progress=False)
    with pytest.raises(ValueError, match="between 2 and 8, got 9"):
        demo.run_demo(bits=(4, 9), progress=False)
    with pytest.raises(ValueError, match="rank"):  # r above the smallest dimension of a targeted matrix
        demo.run_demo(r=10_000, methods=("lora",), progress=False)
    with pytest.raises(ValueError, match="QA-LoRA INT4 r=8: .*divisible"):
        demo.run_demo(methods=("qalora",), group_size=48, progress=False)
    adapted = tmp_path / "adapted.safetensors"
    from lora_from_scratch.lora import apply_lora

    save_checkpoint(apply_lora(load_checkpoint(BASE_CHECKPOINT), 4, 8, ["q"], seed=0), str(adapted))
    with pytest.raises(ValueError, match="needs a plain base model"):
        demo.run_demo(base=str(adapted), progress=False)


def test_check_output_path(tmp_path):
    assert demo.check_output_path(str(tmp_path / "new" / "deeper" / "x.json"), "--json")  # folders made later
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="is a folder"):
        demo.check_output_path(str(tmp_path), "--json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        demo.check_output_path(str(tmp_path / "f"), "--figures", folder=True)
    assert os.listdir(tmp_path) == ["f"]  # the probe file is gone


def test_tiny_run_in_process():
    """Two methods, a few steps: the row fields and the tables' text, without a subprocess."""
    result = demo.run_demo(methods=("lora", "qalora"), steps=3, bits=(3,), eval_per_task=8, progress=False,
                           say=lambda *_: None)
    by = _by_method(result)
    assert list(by) == ["lora", "qalora"] and by["qalora"]["name"] == "QA-LoRA INT3 r=8"
    assert result["extra_runs"] == [] and [r["method"] for r in result["table2"]] == ["QA-LoRA"]
    text = demo.format_result(result)
    assert "QA-LoRA INT3 r=8" in text and "base model" in text and "2. Deploying at 3 bits" in text
    json.dumps(result)  # JSON-able as it is
    only_full = demo.run_demo(methods=("full",), steps=2, eval_per_task=8, progress=False, say=lambda *_: None)
    assert only_full["table2"] == [] and "skipped" in demo.format_result(only_full)
    assert np.isfinite(only_full["table1"][0]["final_loss"])
