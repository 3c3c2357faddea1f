"""Training loop, checkpoints and the shipped base model.

- training reduces the loss from a fixed seed, reproducibly (same seed, same losses);
- a NaN loss stops training with a clear message and keeps the last good checkpoint;
- checkpoints are safetensors, written atomically, and loading checks every key and shape;
- the base model shipped in the package loads and scores as its metadata says.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import rel

from lora_from_scratch import checkpoint, data
from lora_from_scratch.__main__ import BASE_CHECKPOINT, BASE_CONFIG
from lora_from_scratch.backend import to_numpy
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.train import TrainConfig, TrainingDiverged, evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0):
    return GPT(GPTConfig(vocab_size=data.VOCAB_SIZE, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=seed)


def tiny_cfg(**kw):
    base = dict(steps=80, batch_size=16, lr=1e-2, warmup_steps=3, eval_every=0, eval_per_task=8, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_the_loss_reproducibly():
    h1 = train(tiny_model(), tiny_cfg(), progress=False)
    h2 = train(tiny_model(), tiny_cfg(), progress=False)
    assert h1["loss"] == h2["loss"]  # bit-identical: same seed, same batches, same arithmetic
    first, last = np.mean(h1["loss"][:5]), np.mean(h1["loss"][-5:])
    assert last < 0.8 * first, (first, last)
    h3 = train(tiny_model(), tiny_cfg(seed=4), progress=False)
    assert h3["loss"] != h1["loss"]  # another seed, other batches


def test_schedule_and_evaluation_are_recorded():
    h = train(tiny_model(), tiny_cfg(steps=12, eval_every=6, warmup_steps=2, lr=1e-3), progress=False)
    assert [s for s, _ in h["eval"]] == [6, 12]
    assert set(h["eval"][-1][1]) == set(data.PRETRAIN_TASKS)
    assert h["lr"][0] == pytest.approx(5e-4)  # warm-up: (0 + 1) / 2 of the base
    assert h["lr"][-1] == pytest.approx(1e-4)  # the floor, 10 % of the base, at the last step


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    path = str(tmp_path / "run.safetensors")
    model = tiny_model()
    saved = {}

    def poison(step, scores):
        # the checkpoint of this step is on disk; now break the model so the next loss is NaN
        saved["state"] = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
        saved["step"] = step
        model.wte.weight.data[:] = np.nan

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 10 .*last good checkpoint \(step 10\)"):
        train(model, tiny_cfg(steps=30, eval_every=10, checkpoint=path), progress=False, on_eval=poison)
    back = checkpoint.load_checkpoint(path)
    assert checkpoint.checkpoint_metadata(path)["step"] == saved["step"] == 10
    for k, v in back.state_dict().items():
        assert np.array_equal(to_numpy(v), saved["state"][k]), k
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_checkpoint_round_trip_and_metadata(tmp_path):
    m = tiny_model(seed=5)
    path = str(tmp_path / "m.safetensors")
    checkpoint.save_checkpoint(m, path, metadata={"note": "hello", "scores": {"copy": 0.5}})
    back = checkpoint.load_checkpoint(path)
    assert back.config == m.config
    for (k, p), (k2, p2) in zip(m.named_parameters(), back.named_parameters()):
        assert k == k2 and np.array_equal(to_numpy(p.data), to_numpy(p2.data))
    meta = checkpoint.checkpoint_metadata(path)
    assert meta["note"] == "hello" and meta["scores"] == {"copy": 0.5}
    with open(path, "rb") as f:  # a safetensors file: 8-byte little-endian header length, then JSON
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert "wte.weight" in header and header["wte.weight"]["dtype"] == "F32"


def test_a_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    import safetensors.numpy

    path = str(tmp_path / "m.safetensors")
    checkpoint.save_checkpoint(tiny_model(seed=1), path)
    before = open(path, "rb").read()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tiny_model(seed=2), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_saving_nan_weights_is_refused(tmp_path):
    m = tiny_model()
    m.blocks[0].mlp.fc.weight.data[0, 0] = np.inf
    with pytest.raises(ValueError, match="blocks.0.mlp.fc.weight"):
        checkpoint.save_checkpoint(m, str(tmp_path / "x.safetensors"))
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_loading_a_checkpoint_with_a_missing_key_or_wrong_shape(tmp_path):
    from safetensors.numpy import save_file

    m = tiny_model()
    tensors = {k: to_numpy(v) for k, v in m.state_dict().items()}
    meta = {"format": checkpoint.FORMAT, "config": json.dumps(m.config.to_dict())}
    missing = dict(tensors)
    del missing["blocks.0.attn.k.bias"]
    save_file(missing, str(tmp_path / "a.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"a\.safetensors.*missing keys \['blocks\.0\.attn\.k\.bias'\]"):
        checkpoint.load_checkpoint(str(tmp_path / "a.safetensors"))
    wrong = dict(tensors)
    wrong["ln_f.weight"] = np.ones(17, dtype=np.float32)
    save_file(wrong, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"'ln_f.weight'.*\(17,\).*\(16,\)"):
        checkpoint.load_checkpoint(str(tmp_path / "b.safetensors"))
    save_file(tensors, str(tmp_path / "c.safetensors"))  # no metadata: not one of ours
    with pytest.raises(ValueError, match="not a lora_from_scratch GPT checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path / "c.safetensors"))


def test_hf_state_dict_with_a_missing_key_or_wrong_shape():
    sd = checkpoint.to_hf_gpt2_state_dict(tiny_model())
    ok = checkpoint.load_hf_gpt2(sd, n_head=2)
    assert rel(ok.blocks[0].attn.v.weight.data, tiny_model().blocks[0].attn.v.weight.data) == 0.0
    bad = dict(sd)
    del bad["transformer.h.0.mlp.c_fc.bias"]
    with pytest.raises(KeyError, match="transformer.h.0.mlp.c_fc.bias"):
        checkpoint.load_hf_gpt2(bad, n_head=2)
    bad = dict(sd)
    bad["transformer.h.0.attn.c_attn.weight"] = np.zeros((16, 47), np.float32)
    with pytest.raises(ValueError, match=r"'transformer.h.0.attn.c_attn.weight'.*\(16, 47\).*\(16, 48\)"):
        checkpoint.load_hf_gpt2(bad, n_head=2)


def test_the_shipped_base_model_scores_as_documented():
    meta = checkpoint.checkpoint_metadata(BASE_CHECKPOINT)
    model = checkpoint.load_checkpoint(BASE_CHECKPOINT)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == tuple(
        BASE_CONFIG[k] for k in ("n_layer", "n_head", "n_embd", "block_size"))
    assert 0.79e6 < model.num_parameters() < 0.83e6
    assert meta["seed"] == 0 and meta["command"].startswith("python -m lora_from_scratch pretrain")
    # the same evaluation the training loop ran at its last step (eval_set with the run's seed)
    tcfg = meta["train"]
    sets = data.eval_set(tuple(tcfg["tasks"]), tcfg["eval_per_task"], seed=tcfg["seed"], block_size=cfg.block_size)
    scores = evaluate(model, sets)
    assert scores == pytest.approx(meta["exact_match"], abs=1e-12)
    assert min(scores.values()) >= 0.98, scores  # the recipe's 99-100 % on all four tasks
    desc = evaluate(model, data.eval_set((data.FINETUNE_TASK,), 256, seed=1, block_size=cfg.block_size))
    assert desc[data.FINETUNE_TASK] == 0.0  # the fine-tuning task is new to it


def test_pretrain_command_runs_and_saves(tmp_path):
    out = tmp_path / "base.safetensors"
    cmd = [sys.executable, "-m", "lora_from_scratch", "pretrain", "--steps", "4", "--batch-size", "8",
           "--seed", "7", "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "exact match" in res.stdout
    meta = checkpoint.checkpoint_metadata(str(out))
    assert meta["seed"] == 7 and meta["steps"] == 4 and "--seed 7" in meta["command"]
