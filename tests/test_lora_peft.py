"""LoRA against Hugging Face PEFT: the layer, PiSSA, adapter files both ways, merging, bad files.

The base models are tiny random GPT-2s (no downloads): a ``GPT2LMHeadModel`` and our GPT built from its
state dict with ``checkpoint.load_hf_gpt2``, so both hold the same weights. The comparisons with PEFT are
``lora_from_scratch.verify``'s (``peft_layer``, ``peft_pissa``, ``ours_to_peft``, ``peft_to_ours``,
``peft_gradients``, ``peft_merge``), the same that ``python -m lora_from_scratch verify`` prints.
"""

import json
import os

import numpy as np
import pytest
from conftest import rel

pytest.importorskip("peft")

from lora_from_scratch import checkpoint, verify  # noqa: E402
from lora_from_scratch.backend import asarray, to_numpy  # noqa: E402
from lora_from_scratch.lora import apply_lora, lora_layers, merge_lora  # noqa: E402
from lora_from_scratch.model import GPT, GPTConfig  # noqa: E402
from lora_from_scratch.peft_io import load_peft_adapter, save_peft_adapter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
C, N_HEAD, N_LAYER = verify.PEFT_C, verify.PEFT_HEADS, verify.PEFT_LAYERS
V, P = verify.PEFT_VOCAB, verify.PEFT_POSITIONS
ALL = verify.ALL_TARGETS
ids = verify.peft_ids
make_hf = verify.peft_hf_model
hf_logits = verify.torch_logits
randomize_B = verify.randomize_B


@pytest.fixture(scope="module")
def base_sd():
    """A random GPT-2 state dict (NumPy) with non-trivial biases and layer norms."""
    return verify.peft_base_state()


# ----------------------------------------------------------------- one layer against peft.tuners.lora.Linear
@pytest.mark.parametrize("use_rslora,p", [(False, 0.0), (True, 0.0), (False, 0.3), (True, 0.3)])
def test_layer_matches_peft_layer(use_rslora, p):
    measured = verify.assert_ok(verify.peft_layer(use_rslora, p))
    assert [m.what for m in measured] == ["output", "dx", "dA", "dB"] and all(m.bound == 1e-12 for m in measured)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_matches_peft(use_rslora):
    verify.assert_ok(verify.peft_pissa(use_rslora))


# ----------------------------------------------------------------- our adapter -> PEFT files -> PeftModel
@pytest.mark.parametrize("targets,use_rslora,init", [
    (["q", "v"], False, "kaiming"),
    (ALL, False, "gaussian"),
    (ALL, True, "kaiming"),
    (["blocks.0.k", "blocks.1.q", "blocks.1.v", "o", "blocks.1.proj"], True, "kaiming"),
    (ALL, False, "pissa"),
])
def test_ours_to_peft(tmp_path, base_sd, targets, use_rslora, init):
    # PeftModel's logits within 1e-4 of ours (the adapters do change them), and back: our loader
    # restores the separate q/k/v ranks, so the logits are bit for bit the same
    measured = verify.assert_ok(verify.ours_to_peft(base_sd, str(tmp_path / "adapter"), targets, use_rslora, init))
    assert [m.what for m in measured] == ["PeftModel logits (max abs diff)", "reloaded into ours: mismatching logits"]
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folder left behind
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is use_rslora and cfg["fan_in_fan_out"] is True
    assert all(t.startswith("transformer.h.") for t in cfg["target_modules"])  # attn.c_proj vs mlp.c_proj


def test_mixed_ranks_and_scalings_round_trip(tmp_path, base_sd):
    """q, v and proj with different r, alpha and rsLoRA flags: still one config that PEFT reads exactly."""
    ours = checkpoint.load_hf_gpt2(base_sd, N_HEAD)
    apply_lora(ours, 4, 8, ["q"], seed=1)
    apply_lora(ours, 2, 8, ["v"], use_rslora=True, seed=2)
    apply_lora(ours, 3, 5, ["proj"], seed=3)
    randomize_B(ours)
    idx = ids(4)
    ref = to_numpy(ours(asarray(idx)))
    save_peft_adapter(ours, str(tmp_path))
    verify.assert_ok([verify.peft_load_error(str(tmp_path), make_hf(base_sd), idx, ref)])
    again = load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path))
    layers, orig = lora_layers(again), lora_layers(ours)
    assert {n: m.r for n, m in layers.items()} == {n: m.r for n, m in orig.items()}
    for n, m in layers.items():  # the same update s B A in every layer (v's scaling folded into its B)
        assert rel(m.delta_weight(), orig[n].delta_weight()) < 1e-6, n
    assert np.abs(to_numpy(again(asarray(idx))) - ref).max() < 1e-5


def test_fused_attention_adapter_layout(tmp_path, base_sd):
    from safetensors.numpy import load_file

    ours = apply_lora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 4, 12, ["q", "v", "fc"], seed=5)
    randomize_B(ours)
    save_peft_adapter(ours, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_{}.weight"
    A, B = t[key.format("A")], t[key.format("B")]
    q, v = lora_layers(ours)["blocks.0.attn.q"], lora_layers(ours)["blocks.0.attn.v"]
    assert A.shape == (8, C) and B.shape == (3 * C, 8)
    assert np.array_equal(A, np.concatenate([to_numpy(q.lora_A.data), to_numpy(v.lora_A.data)]))
    assert np.array_equal(B[:C, :4], to_numpy(q.lora_B.data))
    assert np.array_equal(B[2 * C:, 4:], to_numpy(v.lora_B.data))
    assert not B[:C, 4:].any() and not B[C:2 * C].any() and not B[2 * C:, :4].any()
    for i in range(N_LAYER):  # c_attn has rank 8, mlp.c_fc rank 4: one of them needs a pattern
        fused, fc = f"transformer.h.{i}.attn.c_attn", f"transformer.h.{i}.mlp.c_fc"
        assert cfg["rank_pattern"].get(fused, cfg["r"]) == 8 and cfg["rank_pattern"].get(fc, cfg["r"]) == 4
        assert cfg["alpha_pattern"].get(fused, cfg["lora_alpha"]) / 8 == q.scaling  # scaling unchanged
        assert cfg["alpha_pattern"].get(fc, cfg["lora_alpha"]) / 4 == q.scaling


# ----------------------------------------------------------------- PEFT-trained adapter -> our loader
@pytest.fixture(scope="module", params=[False, True], ids=["lora", "rslora"])
def peft_saved(request, base_sd, tmp_path_factory):
    """A PEFT adapter on c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj with random A and non-zero B, saved by PEFT."""
    use_rslora = request.param
    path = str(tmp_path_factory.mktemp("peft") / "adapter")
    return verify.peft_saved_adapter(base_sd, path, use_rslora), path, use_rslora


def test_peft_adapter_to_ours(peft_saved, base_sd):
    pm, path, use_rslora = peft_saved
    verify.assert_ok(verify.peft_to_ours(pm, path, base_sd))  # PeftModel's logits, float32 on both sides
    ours = load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), path)
    layers = lora_layers(ours)
    assert sorted(layers) == sorted(f"blocks.{i}.{m}" for i in range(N_LAYER)
                                    for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj"))
    assert layers["blocks.1.mlp.fc"].r == 2 and layers["blocks.0.attn.q"].r == 4
    assert all(layer.adapter.use_rslora is use_rslora for layer in layers.values())
    peft_layer = pm.base_model.model.transformer.h[0].attn.c_proj
    assert layers["blocks.0.attn.o"].scaling == peft_layer.scaling["default"]
    assert all(p.trainable == (".adapters." in n) for n, p in ours.named_parameters())


def test_gradients_match_peft(peft_saved, base_sd):
    """Same loss, float64: every adapter gradient of our GPT equals PEFT's (fused c_attn: A's gradient
    is the sum of q's, k's and v's, since each holds a copy of A; B's rows are theirs)."""
    pm, path, _ = peft_saved
    measured = verify.assert_ok(verify.peft_gradients(pm, path, base_sd))
    assert len(measured) == N_LAYER * (1 + 6 + 3)  # the summed qkv dA, six dB, three dA per block


def test_merge_matches_peft_merge(peft_saved, base_sd):
    """fan_in_fan_out: PEFT adds (B A)^T to GPT-2's (in, out) Conv1D weights; ours adds B A to (out, in)."""
    pm, path, _ = peft_saved
    measured = verify.assert_ok(verify.peft_merge(pm, path, base_sd))
    assert {m.what for m in measured} >= {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"}


# ----------------------------------------------------------------- bad files
def _saved_small(tmp_path, base_sd, r=4):
    ours = apply_lora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), r, 8, ALL, seed=0)
    save_peft_adapter(ours, str(tmp_path))
    return str(tmp_path)


def test_adapter_for_another_base_is_refused(tmp_path, base_sd):
    path = _saved_small(tmp_path, base_sd)
    small = GPT(GPTConfig(vocab_size=V, block_size=P, n_layer=N_LAYER, n_head=N_HEAD, n_embd=16), seed=0)
    with pytest.raises(ValueError) as e:
        load_peft_adapter(small, path)
    msg = str(e.value)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in msg
    assert "(12, 32)" in msg and "(12, 16)" in msg
    assert not lora_layers(small)  # nothing changed
    shallow = GPT(GPTConfig(vocab_size=V, block_size=P, n_layer=1, n_head=N_HEAD, n_embd=C), seed=0)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\..*block 1"):
        load_peft_adapter(shallow, path)


def test_rank_mismatch_with_existing_adapter_is_refused(tmp_path, base_sd):
    path = _saved_small(tmp_path, base_sd, r=4)
    model = apply_lora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 2, 8, ["o"], seed=0)
    with pytest.raises(ValueError) as e:
        load_peft_adapter(model, path)
    msg = str(e.value)
    assert "attn.c_proj.lora_A.weight" in msg and "(4, 32)" in msg and "(2, 32)" in msg
    assert sorted(lora_layers(model)) == ["blocks.0.attn.o", "blocks.1.attn.o"]


def test_config_and_tensors_must_agree(tmp_path, base_sd):
    path = _saved_small(tmp_path, base_sd, r=4)
    cfg_path = os.path.join(path, "adapter_config.json")
    cfg = json.loads(open(cfg_path).read())
    cfg["r"] = 3  # the files say rank 4
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"attn\.c_proj\.lora_A\.weight.*\(4, 32\).*\(3, 32\)"):
        load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), path)
    cfg["r"], cfg["use_dora"] = 4, True
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), path)


def test_unknown_key_is_refused(tmp_path, base_sd):
    from safetensors.numpy import load_file, save_file

    path = _saved_small(tmp_path, base_sd)
    wpath = os.path.join(path, "adapter_model.safetensors")
    t = load_file(wpath)
    t["base_model.model.transformer.wte.lora_A.weight"] = np.zeros((4, V), dtype="float32")
    save_file(t, wpath)
    with pytest.raises(ValueError, match=r"transformer\.wte\.lora_A\.weight"):
        load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), path)


def test_save_replaces_files_and_io_reexports(tmp_path, base_sd):
    (tmp_path / "notes.txt").write_text("kept")
    ours = apply_lora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 2, 4, ["q"], seed=0)
    randomize_B(ours)
    checkpoint.save_peft_adapter(ours, str(tmp_path))
    checkpoint.save_peft_adapter(ours, str(tmp_path))  # over an existing adapter
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    again = checkpoint.load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path))
    idx = asarray(ids())
    assert np.array_equal(to_numpy(again(idx)), to_numpy(ours(idx)))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path / "x"))


# ----------------------------------------------------------------- layers the loader creates, merged layers, QA-LoRA
def test_created_layers_draw_their_own_dropout_masks(tmp_path, base_sd):
    """Every layer load_peft_adapter creates gets its own dropout seed (q, k and v once shared one)."""
    src = apply_lora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 4, 8, ALL, dropout=0.25, seed=0)
    save_peft_adapter(src, str(tmp_path))
    model = load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path), seed=7)
    layers = lora_layers(model)
    seeds = [layer.dropout.seed for layer in layers.values()]
    assert all(layer.dropout.p == 0.25 for layer in layers.values())
    assert len(set(seeds)) == len(seeds), seeds
    x = asarray(np.ones((2, 5, C), dtype="float32"))  # (2, 5, C)
    q, k = layers["blocks.0.attn.q"].dropout.train(), layers["blocks.0.attn.k"].dropout.train()
    assert not np.array_equal(to_numpy(q(x)), to_numpy(k(x)))  # different masks for the same input
    again = load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path), seed=7)
    assert [layer.dropout.seed for layer in lora_layers(again).values()] == seeds  # reproducible from seed


def test_loading_into_a_merged_layer_is_refused_and_unmerge_restores_W0(tmp_path, base_sd):
    from lora_from_scratch.lora import unmerge_lora

    path = _saved_small(tmp_path, base_sd, r=4)
    model = apply_lora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 4, 8, ALL, seed=1)
    randomize_B(model)
    W0 = {n: to_numpy(m.base.weight.data).copy() for n, m in lora_layers(model).items()}
    AB = {n: (to_numpy(m.lora_A.data).copy(), to_numpy(m.lora_B.data).copy()) for n, m in lora_layers(model).items()}
    merge_lora(model)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.\w+ is merged.*unmerge_lora"):
        load_peft_adapter(model, path)
    with pytest.raises(ValueError, match="merged"):
        save_peft_adapter(model, str(tmp_path / "merged"))
    unmerge_lora(model)
    for n, m in lora_layers(model).items():
        assert np.array_equal(to_numpy(m.lora_A.data), AB[n][0]) and np.array_equal(to_numpy(m.lora_B.data), AB[n][1])
        assert np.abs(to_numpy(m.base.weight.data) - W0[n]).max() < 1e-6, n


def test_qlora_adapter_is_a_lora_adapter(tmp_path, base_sd):
    from lora_from_scratch.qlora import apply_qlora

    ours = apply_qlora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 4, 8, ["q", "v", "proj"], seed=2)
    randomize_B(ours)
    save_peft_adapter(ours, str(tmp_path))
    plain = load_peft_adapter(checkpoint.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path))  # float bases: LoRA layers made
    assert {type(m).__name__ for m in lora_layers(plain).values()} == {"LoRALinear"}
    for n, m in lora_layers(ours).items():
        assert rel(lora_layers(plain)[n].delta_weight(), m.delta_weight()) < 1e-7, n
    idx = asarray(ids(6))
    fresh = apply_qlora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 4, 8, ["q", "v", "proj"], seed=3)
    load_peft_adapter(fresh, str(tmp_path))
    assert np.array_equal(to_numpy(fresh(idx)), to_numpy(ours(idx)))


def test_qalora_factors_expand_and_fold(tmp_path, base_sd, peft_saved):
    from safetensors.numpy import load_file

    from lora_from_scratch.qalora import apply_qalora

    ours = apply_qalora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 3, 6, ["v", "fc"], group_size=8, seed=4)
    randomize_B(ours)
    save_peft_adapter(ours, str(tmp_path))
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    A_fc = t["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"]
    pooled = to_numpy(lora_layers(ours)["blocks.0.mlp.fc"].lora_A.data)  # (3, C / 8)
    assert A_fc.shape == (3, C) and np.array_equal(A_fc, np.repeat(pooled / 8, 8, axis=1))
    x = np.random.default_rng(0).standard_normal((5, C)).astype("float32")  # (5, C)
    assert rel(x @ A_fc.T, x.reshape(5, C // 8, 8).mean(axis=2) @ pooled.T) < 1e-6  # x A_full^T = pool(x) A^T
    fresh = apply_qalora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 3, 6, ["v", "fc"], group_size=8, seed=5)
    load_peft_adapter(fresh, str(tmp_path))
    idx = asarray(ids(7))
    assert np.array_equal(to_numpy(fresh(idx)), to_numpy(ours(idx)))
    # a PEFT-trained A varies within groups: no pooled adapter computes it
    _, path, _ = peft_saved
    target = apply_qalora(checkpoint.load_hf_gpt2(base_sd, N_HEAD), 4, 16, ALL, group_size=8, seed=5)
    before = {n: to_numpy(m.lora_A.data).copy() for n, m in lora_layers(target).items()}
    with pytest.raises(ValueError, match=r"lora_A\.weight: this A varies within groups of 8"):
        load_peft_adapter(target, path)
    assert all(np.array_equal(to_numpy(m.lora_A.data), before[n]) for n, m in lora_layers(target).items())
