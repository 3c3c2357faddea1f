"""The ``generate`` and ``finetune`` commands on a tiny random GPT-2 folder with a trained vocabulary.

The folder is what transformers' ``save_pretrained`` writes (``tiny_gpt2.tiny_gpt2_folder``: a
random ``GPT2LMHeadModel`` and a byte-level BPE vocabulary trained by the ``tokenizers`` package).
Each method fine-tunes for a few steps; then the files it wrote must give back the trained model:
the held-out loss recomputed over the base with the adapter put back equals the one ``finetune``
measured (rel < 1e-6), and ``generate`` with the adapter prints exactly the sample ``finetune``
printed after training. PEFT loads the LoRA and QLoRA adapter folders over transformers' GPT-2 and
its logits match ours (max abs diff < 1e-5). Bad input exits 2 with one line, before any work.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny_gpt2 import CORPUS, tiny_gpt2_folder

from lora_from_scratch import gpt2_cli
from lora_from_scratch.__main__ import main
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.finetune import attach_adapter, decode_known, held_out_blocks, split_tokens, text_loss
from lora_from_scratch.hf_io import load_hf_gpt2
from lora_from_scratch.lora import lora_layers
from lora_from_scratch.methods import adapt
from lora_from_scratch.tokenizer import BPETokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_gpt2_folder(str(tmp_path_factory.mktemp("tiny") / "gpt2"))


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(CORPUS * 4, encoding="utf-8")
    return str(path)


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``python -m lora_from_scratch ARGV`` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def finetune(capsys, folder, text, out, method, *extra):
    return run(capsys, "finetune", "--model", folder, "--text", text, "--method", method, "--steps", 4,
               "--block-size", BLOCK, "--batch-size", 2, "--rank", 4, "--out", out, "--no-progress", *extra)


@pytest.fixture(scope="module")
def finetuned(folder, text, tmp_path_factory):
    """method -> the folder ``finetune`` wrote (one run per method, shared by the tests below)."""
    results = {}
    for method in ("full", "lora", "qlora", "qalora"):
        out = str(tmp_path_factory.mktemp("out") / method)
        assert main(["finetune", "--model", folder, "--text", text, "--method", method, "--steps", "4",
                     "--block-size", str(BLOCK), "--batch-size", "2", "--rank", "4", "--out", out,
                     "--no-progress"]) == 0
        results[method] = out
    return results


def held_out(folder, text):
    ids = BPETokenizer.from_pretrained(folder).encode(open(text, encoding="utf-8").read())
    return held_out_blocks(split_tokens(ids, BLOCK)[1], BLOCK)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "qalora"])
def test_finetune_writes_what_gives_the_trained_model_back(finetuned, folder, text, method, capsys):
    out = finetuned[method]
    files = sorted(os.listdir(out))
    expected = {"full": ["config.json", "finetune.json", "merges.txt", "model.safetensors", "vocab.json"],
                "lora": ["adapter.safetensors", "finetune.json", "peft"],
                "qlora": ["adapter.safetensors", "finetune.json", "peft"],
                "qalora": ["adapter.safetensors", "finetune.json"]}[method]
    assert files == expected
    summary = json.load(open(os.path.join(out, "finetune.json")))
    assert summary["method"] == method and len(summary["train_loss"]) == 4
    before, after = summary["before"], summary["after"]
    assert np.isfinite([before["held_out_loss"], after["held_out_loss"]]).all()
    assert before["held_out_loss"] != after["held_out_loss"]  # training changed the model
    assert after["perplexity"] == pytest.approx(np.exp(after["held_out_loss"]), rel=1e-12)

    if method == "full":
        model = load_hf_gpt2(out)
    else:
        model = load_hf_gpt2(folder)
        assert attach_adapter(model, out) == method
        kinds = {layer.kind for layer in lora_layers(model).values()}
        assert kinds == {method} and len(lora_layers(model)) == 6 * model.config.n_layer
    blocks = held_out(folder, text)
    assert abs(text_loss(model, blocks) - after["held_out_loss"]) <= 1e-6 * abs(after["held_out_loss"])
    untrained = adapt(load_hf_gpt2(folder), method, r=4, alpha=16)  # B = 0: the (quantized) base's own loss
    assert abs(text_loss(untrained, blocks) - before["held_out_loss"]) <= 1e-6 * abs(before["held_out_loss"])

    model_dir, adapter = (out, []) if method == "full" else (folder, ["--adapter", out])
    code, printed, err = run(capsys, "generate", "--model", model_dir, "--prompt", summary["prompt"],
                             "--max-new-tokens", 24, *adapter)
    assert code == 0, err
    assert printed == after["sample"] + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_peft_loads_the_adapter_folder_over_transformers(finetuned, folder, method):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    peft_dir = os.path.join(finetuned[method], "peft")
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(folder), peft_dir).eval()
    ours = load_hf_gpt2(folder)
    assert attach_adapter(ours, peft_dir) == "lora"
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, size=(2, 20))
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)).logits.numpy()  # (2, 20, V)
    got = to_numpy(ours(asarray(ids)))
    assert np.abs(got - expected).max() < 1e-5
    base = to_numpy(load_hf_gpt2(folder)(asarray(ids)))
    assert np.abs(got - base).max() > 1e-4  # the adapter is not a no-op
    if method == "lora":  # our adapter file and the PEFT folder hold the same adapter
        again = load_hf_gpt2(folder)
        attach_adapter(again, finetuned[method])
        assert np.abs(to_numpy(again(asarray(ids))) - got).max() < 1e-6


def test_generate_samples_with_a_seed(folder, capsys):
    argv = ["generate", "--model", folder, "--prompt", "The quick brown", "--max-new-tokens", 12,
            "--temperature", 1.5, "--top-k", 20]
    a, b, c = (run(capsys, *argv, "--seed", s) for s in (1, 1, 2))
    assert a[0] == b[0] == c[0] == 0
    assert a[1] == b[1] and a[1] != c[1]


def one_line_error(capsys, *argv, match: str):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err, err
    return err


def test_bad_input_exits_2_with_one_line_before_any_work(folder, text, finetuned, tmp_path, capsys, monkeypatch):
    from lora_from_scratch import hf_io

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(hf_io, "load_hf_gpt2", no_load)
    out = str(tmp_path / "new")
    base = ["--model", folder, "--text", text, "--out", out]
    cases = [
        (["--method", "lora", "--model", str(tmp_path / "none")], "no model folder"),
        (["--method", "dora"], "unknown method 'dora'"),
        (["--method", "lora", "--steps", "0"], "--steps must be at least 1"),
        (["--method", "lora", "--steps", "ten"], "argument --steps: invalid int value"),
        (["--method", "lora", "--alpha", "nan"], "--alpha must be a finite number > 0"),
        (["--method", "lora", "--lr", "-1"], "--lr must be a finite number > 0"),
        (["--method", "lora", "--block-size", "65"], "--block-size must be from 1 to 64"),
        (["--method", "lora", "--rank", "33"], "--rank must be from 1 to 32"),
        (["--method", "lora", "--out", finetuned["lora"]], "exists; give a new folder"),
        (["--method", "lora", "--text", str(tmp_path / "none.txt")], "no text file"),
    ]
    for extra, match in cases:
        one_line_error(capsys, "finetune", *base, *extra, match=match)
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox.", encoding="utf-8")
    one_line_error(capsys, "finetune", *base, "--method", "lora", "--text", short,
                   match="the text is 10 tokens long; block size 64 needs at least 130")
    one_line_error(capsys, "finetune", *base, "--method", match="argument --method: expected one argument")
    assert not os.path.exists(out)

    prompt = ["--model", folder, "--prompt"]
    one_line_error(capsys, "generate", *prompt, CORPUS, match="the model's context is 64 tokens")
    one_line_error(capsys, "generate", *prompt, "The", "--max-new-tokens", 64, match="exceed the model's context")
    one_line_error(capsys, "generate", *prompt, "", match="--prompt is empty")
    one_line_error(capsys, "generate", *prompt, "The", "--top-k", 0, match="--top-k must be from 1 to")
    one_line_error(capsys, "generate", *prompt, "The", "--temperature", "-1", match="--temperature must be")
    one_line_error(capsys, "generate", *prompt, "The", "--adapter", tmp_path / "none", match="no adapter at")
    one_line_error(capsys, "generate", *prompt, "The", "--adapter", finetuned["full"],
                   match="holds a whole model (full fine-tuning), not an adapter: pass it as --model")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes(open(os.path.join(folder, name), "rb").read())
    one_line_error(capsys, "generate", "--model", bare, "--prompt", "The", match="has no vocab.json or merges.txt")


def test_the_commands_run_from_the_shell(folder):
    proc = subprocess.run([sys.executable, "-m", "lora_from_scratch", "generate", "--model", folder, "--prompt",
                           "The lazy dog", "--max-new-tokens", "3"], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.strip()
    proc = subprocess.run([sys.executable, "-m", "lora_from_scratch", "finetune", "--model", folder, "--text",
                           "missing.txt", "--method", "lora", "--out", "x"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr == "error: no text file missing.txt\n"
    assert "generate" in gpt2_cli.COMMANDS


def test_ids_beyond_the_vocabulary_show_as_replacement_characters(folder):
    tok = BPETokenizer.from_pretrained(folder)
    ids = tok.encode("The lazy dog")
    beyond = tok.vocab_size + 7  # a model's row that the tokenizer has no symbol for
    assert decode_known(tok, ids) == "The lazy dog"
    assert decode_known(tok, [beyond, *ids, beyond, beyond]) == "\ufffdThe lazy dog\ufffd\ufffd"
    assert decode_known(tok, []) == ""
