"""LoRA against Hugging Face PEFT: the layer, PiSSA, adapter files both ways, merging, bad files.

The base models are tiny random GPT-2s (no downloads): a ``GPT2LMHeadModel`` and our GPT built from its
state dict with ``io.load_hf_gpt2``, so both hold the same weights.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch
from conftest import rel

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from lora_from_scratch import functional as F  # noqa: E402
from lora_from_scratch import io  # noqa: E402
from lora_from_scratch.backend import asarray, to_numpy  # noqa: E402
from lora_from_scratch.lora import LoRALinear, apply_lora, lora_layers, merge_lora  # noqa: E402
from lora_from_scratch.model import GPT, GPTConfig  # noqa: E402
from lora_from_scratch.nn import Linear  # noqa: E402
from lora_from_scratch.peft_io import load_peft_adapter, save_peft_adapter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
C, N_HEAD, N_LAYER, V, P = 32, 4, 2, 64, 32
ALL = ["q", "k", "v", "o", "fc", "proj"]


def hf_config():
    return GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=N_LAYER, n_head=N_HEAD, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def base_sd():
    """A random GPT-2 state dict (NumPy) with non-trivial biases and layer norms."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


def make_hf(sd, dtype=torch.float32):
    hf = GPT2LMHeadModel(hf_config())
    hf.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
    return hf.to(dtype).eval()


def ids(seed=0, shape=(3, 12)):
    return np.random.default_rng(seed).integers(0, V, shape)


def hf_logits(model, idx):
    with torch.no_grad():
        return model(torch.tensor(idx)).logits.numpy()


def randomize_B(model, seed=1, scale=0.2):
    """Non-zero B everywhere (as after training), so the adapters really change the logits."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(rng.standard_normal(layer.lora_B.shape) * scale, dtype=layer.lora_B.dtype)


def hf_state_of(model):
    """The GPT-2 state dict of our (possibly adapted) model's base weights (the residual ones for PiSSA)."""
    return io.to_hf_gpt2_state_dict(model)


# ----------------------------------------------------------------- one layer against peft.tuners.lora.Linear
class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(10, 6)

    def forward(self, x):
        return self.lin(x)


class FixedDropout(torch.nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, x):
        return x * self.keep


@pytest.mark.parametrize("use_rslora,p", [(False, 0.0), (True, 0.0), (False, 0.3), (True, 0.3)])
def test_layer_matches_peft_layer(use_rslora, p):
    rng = np.random.default_rng(0)
    base = Linear(10, 6, rng=rng, dtype="float64")
    base.bias.data = asarray(rng.standard_normal(6))  # (6,)
    ours = LoRALinear(base, 3, 5, dropout=p, use_rslora=use_rslora, rng=rng)
    ours.lora_B.data = asarray(rng.standard_normal((6, 3)))  # (6, 3)
    pm = get_peft_model(Tiny().double(), LoraConfig(r=3, lora_alpha=5, target_modules=["lin"],
                                                    use_rslora=use_rslora, lora_dropout=p))
    layer = pm.base_model.model.lin
    assert layer.scaling["default"] == ours.scaling
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor(to_numpy(base.weight.data)))
        layer.base_layer.bias.copy_(torch.tensor(to_numpy(base.bias.data)))
        layer.lora_A["default"].weight.copy_(torch.tensor(to_numpy(ours.lora_A.data)))
        layer.lora_B["default"].weight.copy_(torch.tensor(to_numpy(ours.lora_B.data)))
    x = rng.standard_normal((4, 5, 10))  # (4, 5, 10)
    mask = rng.random(x.shape) >= p  # fixed dropout mask
    if p > 0:
        layer.lora_dropout["default"] = FixedDropout(torch.tensor(mask / (1 - p)))
    G = rng.standard_normal((4, 5, 6))  # (4, 5, 6) upstream gradient
    tx = torch.tensor(x, requires_grad=True)
    ty = pm(tx)
    ty.backward(torch.tensor(G))
    y = ours(asarray(x), dropout_mask=asarray(mask) if p > 0 else None)
    dx = ours.backward(asarray(G))
    assert rel(y, ty.detach().numpy()) < 1e-12
    assert rel(dx, tx.grad.numpy()) < 1e-12
    assert rel(ours.lora_A.grad, layer.lora_A["default"].weight.grad.numpy()) < 1e-12
    assert rel(ours.lora_B.grad, layer.lora_B["default"].weight.grad.numpy()) < 1e-12
    assert layer.base_layer.weight.grad is None and ours.base.weight.grad is None  # both freeze W0


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_matches_peft(use_rslora):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 10)).astype("float32")  # (6, 10)
    base = Linear(10, 6, rng=rng, dtype="float32")
    base.weight.data = asarray(W)
    ours = LoRALinear(base, 3, 5, init="pissa", use_rslora=use_rslora)
    tiny = Tiny()
    with torch.no_grad():
        tiny.lin.weight.copy_(torch.tensor(W))
    pm = get_peft_model(tiny, LoraConfig(r=3, lora_alpha=5, target_modules=["lin"], use_rslora=use_rslora,
                                         init_lora_weights="pissa"))
    layer = pm.base_model.model.lin
    A, B = layer.lora_A["default"].weight.detach().numpy(), layer.lora_B["default"].weight.detach().numpy()
    s = layer.scaling["default"]
    assert s == ours.scaling
    # singular vectors are defined up to sign, so compare the products and the residual weights
    assert rel(ours.scaling * to_numpy(ours.lora_B.data) @ to_numpy(ours.lora_A.data), s * B @ A) < 1e-5
    assert rel(ours.base.weight.data, layer.base_layer.weight.detach().numpy()) < 1e-5
    assert rel(np.abs(to_numpy(ours.lora_A.data)), np.abs(A)) < 1e-5


# ----------------------------------------------------------------- our adapter -> PEFT files -> PeftModel
@pytest.mark.parametrize("targets,use_rslora,init", [
    (["q", "v"], False, "kaiming"),
    (ALL, False, "gaussian"),
    (ALL, True, "kaiming"),
    (["blocks.0.k", "blocks.1.q", "blocks.1.v", "o", "blocks.1.proj"], True, "kaiming"),
    (ALL, False, "pissa"),
])
def test_ours_to_peft(tmp_path, base_sd, targets, use_rslora, init):
    ours = apply_lora(io.load_hf_gpt2(base_sd, N_HEAD), 4, 12, targets, init=init, use_rslora=use_rslora, seed=5)
    randomize_B(ours)
    idx = ids()
    ref = to_numpy(ours(asarray(idx)))
    save_peft_adapter(ours, str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folder left behind
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is use_rslora and cfg["fan_in_fan_out"] is True
    assert all(t.startswith("transformer.h.") for t in cfg["target_modules"])  # attn.c_proj vs mlp.c_proj
    base_hf = make_hf(hf_state_of(ours))  # for PiSSA: the residual weights
    base_logits = hf_logits(base_hf, idx)
    pm = PeftModel.from_pretrained(base_hf, str(tmp_path / "adapter")).eval()
    got = hf_logits(pm, idx)
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(base_logits - ref).max() > 1e-2  # the adapters matter: the test is not vacuous
    # and back: our loader restores the separate q/k/v ranks, so the logits are bit for bit the same
    again = load_peft_adapter(GPT(ours.config, seed=9), str(tmp_path / "adapter"))
    again.load_state_dict({k: v for k, v in ours.state_dict().items() if ".adapters." not in k}, strict=False)
    assert sorted(lora_layers(again)) == sorted(lora_layers(ours))
    assert all(lora_layers(again)[n].r == 4 for n in lora_layers(ours))
    assert np.array_equal(to_numpy(again(asarray(idx))), ref)


def test_mixed_ranks_and_scalings_round_trip(tmp_path, base_sd):
    """q, v and proj with different r, alpha and rsLoRA flags: still one config that PEFT reads exactly."""
    ours = io.load_hf_gpt2(base_sd, N_HEAD)
    apply_lora(ours, 4, 8, ["q"], seed=1)
    apply_lora(ours, 2, 8, ["v"], use_rslora=True, seed=2)
    apply_lora(ours, 3, 5, ["proj"], seed=3)
    randomize_B(ours)
    idx = ids(4)
    ref = to_numpy(ours(asarray(idx)))
    save_peft_adapter(ours, str(tmp_path))
    pm = PeftModel.from_pretrained(make_hf(base_sd), str(tmp_path)).eval()
    assert np.abs(hf_logits(pm, idx) - ref).max() < 1e-4
    again = load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path))
    layers, orig = lora_layers(again), lora_layers(ours)
    assert {n: m.r for n, m in layers.items()} == {n: m.r for n, m in orig.items()}
    for n, m in layers.items():  # the same update s B A in every layer (v's scaling folded into its B)
        assert rel(m.delta_weight(), orig[n].delta_weight()) < 1e-6, n
    assert np.abs(to_numpy(again(asarray(idx))) - ref).max() < 1e-5


def test_fused_attention_adapter_layout(tmp_path, base_sd):
    from safetensors.numpy import load_file

    ours = apply_lora(io.load_hf_gpt2(base_sd, N_HEAD), 4, 12, ["q", "v", "fc"], seed=5)
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
    """A PEFT adapter on c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj with random A and non-zero B, saved."""
    use_rslora = request.param
    torch.manual_seed(3)
    hf = make_hf(base_sd, torch.float64)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                       rank_pattern={"transformer.h.1.mlp.c_fc": 2},
                                       alpha_pattern={"transformer.h.0.attn.c_proj": 3},
                                       use_rslora=use_rslora, fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("peft") / "adapter"
    pm.save_pretrained(str(path))
    return pm.eval(), str(path), use_rslora


def test_peft_adapter_to_ours(peft_saved, base_sd):
    pm, path, use_rslora = peft_saved
    ours = load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), path)
    layers = lora_layers(ours)
    assert sorted(layers) == sorted(f"blocks.{i}.{m}" for i in range(N_LAYER)
                                    for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj"))
    assert layers["blocks.1.mlp.fc"].r == 2 and layers["blocks.0.attn.q"].r == 4
    assert all(layer.adapter.use_rslora is use_rslora for layer in layers.values())
    peft_layer = pm.base_model.model.transformer.h[0].attn.c_proj
    assert layers["blocks.0.attn.o"].scaling == peft_layer.scaling["default"]
    idx = ids(1)
    expected = hf_logits(copy.deepcopy(pm).float(), idx)  # float32 on both sides
    assert np.abs(to_numpy(ours(asarray(idx))) - expected).max() < 1e-4
    assert all(p.trainable == (".adapters." in n) for n, p in ours.named_parameters())


def test_gradients_match_peft(peft_saved, base_sd):
    """Same loss, float64: every adapter gradient of our GPT equals PEFT's (fused c_attn: A's gradient
    is the sum of q's, k's and v's, since each holds a copy of A; B's rows are theirs)."""
    pm, path, _ = peft_saved
    ours = load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD, dtype="float64"), path)
    idx, tgt = ids(2, (2, 10)), ids(3, (2, 10))
    pm.zero_grad()
    out = pm(torch.tensor(idx)).logits
    torch.nn.functional.cross_entropy(out.reshape(-1, V), torch.tensor(tgt).reshape(-1)).backward()
    loss, dlogits = F.cross_entropy(ours(asarray(idx)), asarray(tgt))
    ours.backward(dlogits)
    layers = lora_layers(ours)
    for i in range(N_LAYER):
        h = pm.base_model.model.transformer.h[i]
        grads = {n: (h.attn.c_attn.lora_A["default"].weight.grad.numpy(),
                     h.attn.c_attn.lora_B["default"].weight.grad.numpy()[j * C:(j + 1) * C])
                 for j, n in enumerate(("attn.q", "attn.k", "attn.v"))}
        for n, mod in (("attn.o", h.attn.c_proj), ("mlp.fc", h.mlp.c_fc), ("mlp.proj", h.mlp.c_proj)):
            grads[n] = (mod.lora_A["default"].weight.grad.numpy(), mod.lora_B["default"].weight.grad.numpy())
        dA_qkv = sum(to_numpy(layers[f"blocks.{i}.{n}"].lora_A.grad) for n in ("attn.q", "attn.k", "attn.v"))
        assert rel(dA_qkv, grads["attn.q"][0]) < 1e-10
        for n, (dA, dB) in grads.items():
            layer = layers[f"blocks.{i}.{n}"]
            assert rel(layer.lora_B.grad, dB) < 1e-10, n
            if n not in ("attn.q", "attn.k", "attn.v"):
                assert rel(layer.lora_A.grad, dA) < 1e-10, n


def test_merge_matches_peft_merge(peft_saved, base_sd):
    """fan_in_fan_out: PEFT adds (B A)^T to GPT-2's (in, out) Conv1D weights; ours adds B A to (out, in)."""
    pm, path, _ = peft_saved
    ours = merge_lora(load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD, dtype="float64"), path))
    torch.manual_seed(0)
    pm2 = get_peft_model(make_hf(base_sd, torch.float64), LoraConfig(**{
        k: getattr(pm.peft_config["default"], k) for k in
        ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out")}))
    pm2.load_state_dict(pm.state_dict())
    merged = {k: v.detach().numpy() for k, v in pm2.merge_and_unload().state_dict().items()}
    for k, v in hf_state_of(ours).items():
        assert rel(v, merged[k]) < 1e-12, k


# ----------------------------------------------------------------- bad files
def _saved_small(tmp_path, base_sd, r=4):
    ours = apply_lora(io.load_hf_gpt2(base_sd, N_HEAD), r, 8, ALL, seed=0)
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
    model = apply_lora(io.load_hf_gpt2(base_sd, N_HEAD), 2, 8, ["o"], seed=0)
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
        load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), path)
    cfg["r"], cfg["use_dora"] = 4, True
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), path)


def test_unknown_key_is_refused(tmp_path, base_sd):
    from safetensors.numpy import load_file, save_file

    path = _saved_small(tmp_path, base_sd)
    wpath = os.path.join(path, "adapter_model.safetensors")
    t = load_file(wpath)
    t["base_model.model.transformer.wte.lora_A.weight"] = np.zeros((4, V), dtype="float32")
    save_file(t, wpath)
    with pytest.raises(ValueError, match=r"transformer\.wte\.lora_A\.weight"):
        load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), path)


def test_save_replaces_files_and_io_reexports(tmp_path, base_sd):
    (tmp_path / "notes.txt").write_text("kept")
    ours = apply_lora(io.load_hf_gpt2(base_sd, N_HEAD), 2, 4, ["q"], seed=0)
    randomize_B(ours)
    io.save_peft_adapter(ours, str(tmp_path))
    io.save_peft_adapter(ours, str(tmp_path))  # over an existing adapter
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    again = io.load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path))
    idx = asarray(ids())
    assert np.array_equal(to_numpy(again(idx)), to_numpy(ours(idx)))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path / "x"))


# ----------------------------------------------------------------- layers the loader creates, merged layers, QA-LoRA
def test_created_layers_draw_their_own_dropout_masks(tmp_path, base_sd):
    """Every layer load_peft_adapter creates gets its own dropout seed (q, k and v once shared one)."""
    src = apply_lora(io.load_hf_gpt2(base_sd, N_HEAD), 4, 8, ALL, dropout=0.25, seed=0)
    save_peft_adapter(src, str(tmp_path))
    model = load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path), seed=7)
    layers = lora_layers(model)
    seeds = [layer.dropout.seed for layer in layers.values()]
    assert all(layer.dropout.p == 0.25 for layer in layers.values())
    assert len(set(seeds)) == len(seeds), seeds
    x = asarray(np.ones((2, 5, C), dtype="float32"))  # (2, 5, C)
    q, k = layers["blocks.0.attn.q"].dropout.train(), layers["blocks.0.attn.k"].dropout.train()
    assert not np.array_equal(to_numpy(q(x)), to_numpy(k(x)))  # different masks for the same input
    again = load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path), seed=7)
    assert [layer.dropout.seed for layer in lora_layers(again).values()] == seeds  # reproducible from seed


def test_loading_into_a_merged_layer_is_refused_and_unmerge_restores_W0(tmp_path, base_sd):
    from lora_from_scratch.lora import unmerge_lora

    path = _saved_small(tmp_path, base_sd, r=4)
    model = apply_lora(io.load_hf_gpt2(base_sd, N_HEAD), 4, 8, ALL, seed=1)
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

    ours = apply_qlora(io.load_hf_gpt2(base_sd, N_HEAD), 4, 8, ["q", "v", "proj"], seed=2)
    randomize_B(ours)
    save_peft_adapter(ours, str(tmp_path))
    plain = load_peft_adapter(io.load_hf_gpt2(base_sd, N_HEAD), str(tmp_path))  # float bases: LoRA layers made
    assert {type(m).__name__ for m in lora_layers(plain).values()} == {"LoRALinear"}
    for n, m in lora_layers(ours).items():
        assert rel(lora_layers(plain)[n].delta_weight(), m.delta_weight()) < 1e-7, n
    idx = asarray(ids(6))
    fresh = apply_qlora(io.load_hf_gpt2(base_sd, N_HEAD), 4, 8, ["q", "v", "proj"], seed=3)
    load_peft_adapter(fresh, str(tmp_path))
    assert np.array_equal(to_numpy(fresh(idx)), to_numpy(ours(idx)))


def test_qalora_factors_expand_and_fold(tmp_path, base_sd, peft_saved):
    from safetensors.numpy import load_file

    from lora_from_scratch.qalora import apply_qalora

    ours = apply_qalora(io.load_hf_gpt2(base_sd, N_HEAD), 3, 6, ["v", "fc"], group_size=8, seed=4)
    randomize_B(ours)
    save_peft_adapter(ours, str(tmp_path))
    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    A_fc = t["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"]
    pooled = to_numpy(lora_layers(ours)["blocks.0.mlp.fc"].lora_A.data)  # (3, C / 8)
    assert A_fc.shape == (3, C) and np.array_equal(A_fc, np.repeat(pooled / 8, 8, axis=1))
    x = np.random.default_rng(0).standard_normal((5, C)).astype("float32")  # (5, C)
    assert rel(x @ A_fc.T, x.reshape(5, C // 8, 8).mean(axis=2) @ pooled.T) < 1e-6  # x A_full^T = pool(x) A^T
    fresh = apply_qalora(io.load_hf_gpt2(base_sd, N_HEAD), 3, 6, ["v", "fc"], group_size=8, seed=5)
    load_peft_adapter(fresh, str(tmp_path))
    idx = asarray(ids(7))
    assert np.array_equal(to_numpy(fresh(idx)), to_numpy(ours(idx)))
    # a PEFT-trained A varies within groups: no pooled adapter computes it
    _, path, _ = peft_saved
    target = apply_qalora(io.load_hf_gpt2(base_sd, N_HEAD), 4, 16, ALL, group_size=8, seed=5)
    before = {n: to_numpy(m.lora_A.data).copy() for n, m in lora_layers(target).items()}
    with pytest.raises(ValueError, match=r"lora_A\.weight: this A varies within groups of 8"):
        load_peft_adapter(target, path)
    assert all(np.array_equal(to_numpy(m.lora_A.data), before[n]) for n, m in lora_layers(target).items())
