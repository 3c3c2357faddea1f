"""``hf_io.save_hf_gpt2`` against transformers, bitsandbytes and PEFT: float, merged, QLoRA and QA-LoRA models.

Tiny random GPT-2s only (nothing is downloaded). n_embd is 64: bitsandbytes 0.50.2's native CPU
``dequantize_4bit`` kernel is only right when a weight's row length (in_features) is a multiple of
the block size (64); with 32 or 96 input channels it scales every block of a row chunk by the
wrong constant (measured here: errors of the size of the weights). The file layout does not
depend on it; the comparisons of logits do.

Two facts about bitsandbytes' CPU ``Linear4bit`` that the float32 comparisons need:

- on CPUs with avx512_bf16, in eval mode without gradients it repacks the weight and computes in
  bfloat16 (absmax cast to bf16; about 3e-3 on these logits). ``float32_path`` turns that off with
  the module attribute ``support_avx512bf16_for_cpu = False``;
- PEFT adds its adapter into the base model object in place, so the base's own logits are
  measured before ``PeftModel.from_pretrained`` wraps it.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers", reason="the export is checked by loading it with transformers")
pytest.importorskip("peft", reason="adapters are checked by loading them with PEFT")
pytest.importorskip("bitsandbytes", reason="the 4-bit layout is checked against bitsandbytes")
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel  # noqa: E402

from lora_from_scratch import checkpoint, hf_io  # noqa: E402
from lora_from_scratch.backend import asarray, to_numpy  # noqa: E402
from lora_from_scratch.lora import apply_lora, disable_adapters, lora_layers, merge_and_unload, merge_lora  # noqa: E402
from lora_from_scratch.peft_io import load_peft_adapter, save_peft_adapter  # noqa: E402
from lora_from_scratch.qalora import apply_qalora  # noqa: E402
from lora_from_scratch.qlora import apply_qlora  # noqa: E402
from lora_from_scratch.quant import DYNAMIC_MAP  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
transformers.logging.set_verbosity_error()
C, N_HEAD, N_LAYER, V, P = 64, 4, 2, 64, 32
ALL = ["q", "k", "v", "o", "fc", "proj"]
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@pytest.fixture(scope="module")
def base_sd():
    """A random GPT-2 state dict (NumPy) with non-trivial biases and layer norms."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=P, n_embd=C, n_layer=N_LAYER, n_head=N_HEAD, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}


@pytest.fixture(scope="module")
def float_dir(base_sd, tmp_path_factory):
    """The float base model written by save_hf_gpt2 (what bitsandbytes quantizes for reference)."""
    path = tmp_path_factory.mktemp("float") / "gpt2"
    checkpoint.save_hf_gpt2(checkpoint.load_hf_gpt2(base_sd, N_HEAD), str(path))
    return str(path)


def ours_of(base_sd):
    return checkpoint.load_hf_gpt2(base_sd, N_HEAD)


def ids(seed=0, shape=(3, 12)):
    return np.random.default_rng(seed).integers(0, V, shape)


def logits_of(model, idx):
    if isinstance(model, (GPT2LMHeadModel, PeftModel)):
        with torch.no_grad():
            return model(torch.tensor(idx)).logits.numpy()
    return to_numpy(model(asarray(idx)))


def randomize_B(model, seed=1, scale=0.2):
    rng = np.random.default_rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(rng.standard_normal(layer.lora_B.shape) * scale, dtype=layer.lora_B.dtype)


def load(directory, **kwargs):
    model, info = GPT2LMHeadModel.from_pretrained(directory, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def float32_path(model):
    """Keep bitsandbytes' CPU Linear4bit on its float32 path (no bfloat16 repacking)."""
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def safetensors_layout(path):
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return {k: (str(f.get_tensor(k).dtype), tuple(f.get_tensor(k).shape)) for k in f.keys()}, f.metadata()


# ----------------------------------------------------------------- float models
def test_plain_model_round_trip(tmp_path, base_sd):
    ours = ours_of(base_sd)
    checkpoint.save_hf_gpt2(ours, str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["n_positions"], cfg["vocab_size"]) == (C, N_HEAD,
                                                                                                     N_LAYER, P, V)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    hf = load(str(tmp_path / "m"))
    idx = ids()
    assert np.abs(logits_of(hf, idx) - logits_of(ours, idx)).max() < 1e-4
    checkpoint.save_hf_gpt2(ours, str(tmp_path / "m"))  # over an existing folder


@pytest.mark.parametrize("how", ["merge_lora", "merge_and_unload"])
def test_merged_lora_round_trip(tmp_path, base_sd, how):
    ours = apply_lora(ours_of(base_sd), 4, 8, ALL, seed=3)
    randomize_B(ours)
    idx = ids(1)
    ref = logits_of(ours, idx)
    with disable_adapters(ours):
        base = logits_of(ours, idx)
    (merge_lora if how == "merge_lora" else merge_and_unload)(ours)
    checkpoint.save_hf_gpt2(ours, str(tmp_path))
    got = logits_of(load(str(tmp_path)), idx)
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(base - ref).max() > 1e-2  # the merged update is really in the file


def test_unmerged_adapters_need_base_only(tmp_path, base_sd):
    ours = apply_lora(ours_of(base_sd), 4, 8, ["q", "fc"], seed=3)
    randomize_B(ours)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q has unmerged adapters.*base_only=True"):
        checkpoint.save_hf_gpt2(ours, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
    checkpoint.save_hf_gpt2(ours, str(tmp_path / "x"), base_only=True)
    idx = ids(2)
    with disable_adapters(ours):
        base = logits_of(ours, idx)
    assert np.abs(logits_of(load(str(tmp_path / "x")), idx) - base).max() < 1e-4


def test_existing_file_is_refused(tmp_path, base_sd):
    (tmp_path / "f").write_text("not a folder")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        checkpoint.save_hf_gpt2(ours_of(base_sd), str(tmp_path / "f"))
    assert (tmp_path / "f").read_text() == "not a folder" and sorted(os.listdir(tmp_path)) == ["f"]


# ----------------------------------------------------------------- QLoRA: bitsandbytes' 4-bit layout
@pytest.fixture(scope="module", params=[False, True], ids=["nf4", "nf4-double-quant"])
def qlora_case(request, base_sd, float_dir, tmp_path_factory):
    """Our QLoRA model (all six targets) with trained-looking B, its exported 4-bit base, and bitsandbytes' own."""
    dq = request.param
    ours = ours_of(base_sd)
    idx = ids(3)
    float_logits = logits_of(ours, idx)
    apply_qlora(ours, 4, 8, ALL, double_quant=dq, seed=2)
    quant_logits = logits_of(ours, idx)  # B = 0: the quantized base alone
    randomize_B(ours, scale=0.1)
    root = tmp_path_factory.mktemp("qlora")
    checkpoint.save_hf_gpt2(ours, str(root / "base"), base_only=True)
    save_peft_adapter(ours, str(root / "adapter"))
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq)
    theirs = load(float_dir, quantization_config=bnb_cfg)
    theirs.save_pretrained(str(root / "theirs"))
    return dict(dq=dq, ours=ours, idx=idx, float_logits=float_logits, quant_logits=quant_logits, root=root,
                theirs=theirs)


def test_qlora_file_has_bitsandbytes_layout(qlora_case):
    root = qlora_case["root"]
    ours_layout, meta = safetensors_layout(str(root / "base"))
    theirs_layout, _ = safetensors_layout(str(root / "theirs"))
    state_key = "quant_state.bitsandbytes__nf4"  # JSON bytes: their length depends on the offset's digits
    assert {k: v if state_key not in k else v[0] for k, v in ours_layout.items()} == {
        k: v if state_key not in k else v[0] for k, v in theirs_layout.items()}  # the same keys, dtypes and shapes
    assert meta == {"format": "pt"}
    cfg = json.loads((root / "base" / "config.json").read_text())
    their_cfg = json.loads((root / "theirs" / "config.json").read_text())
    assert cfg["quantization_config"] == their_cfg["quantization_config"]
    with safe_open(str(root / "base" / "model.safetensors"), framework="numpy") as f:
        state = json.loads(bytes(f.get_tensor("transformer.h.0.attn.c_attn.weight.quant_state.bitsandbytes__nf4")))
    assert state["shape"] == [3 * C, C] and state["blocksize"] == 64 and state["quant_type"] == "nf4"
    assert ("nested_offset" in state) is qlora_case["dq"]


def test_qlora_base_loads_as_linear4bit_with_bitsandbytes_codes(qlora_case):
    dq, theirs = qlora_case["dq"], qlora_case["theirs"]
    hf = load(str(qlora_case["root"] / "base"))
    assert float32_path(hf) == 4 * N_LAYER
    step = float(np.diff(DYNAMIC_MAP.astype(np.float64)).max())  # the widest gap of the 8-bit map
    for i in range(N_LAYER):
        for name in MODULES:
            mod, ref = hf.get_submodule(f"transformer.h.{i}.{name}"), theirs.get_submodule(f"transformer.h.{i}.{name}")
            assert isinstance(mod, bnb.nn.Linear4bit)
            assert torch.equal(mod.weight.data, ref.weight.data), name  # the packed NF4 codes
            qs, rs = mod.weight.quant_state, ref.weight.quant_state
            if not dq:
                assert torch.equal(qs.absmax, rs.absmax), name
                continue
            # Nested constants. bitsandbytes' CPU 8-bit quantizer rounds values within ~1e-5 of a
            # midpoint to the farther level, ours to the nearest: codes may differ by one step. For
            # c_attn ours are also re-quantized over the fused q|k|v vector from q's, k's and v's own
            # 8-bit constants (two roundings). Either way the dequantized constants differ by at most
            # two of the widest steps of the map times the block scale.
            a = (bnbF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).numpy()
            b = (bnbF.dequantize_blockwise(rs.absmax, rs.state2) + rs.offset).numpy()
            scale = max(float(qs.state2.absmax.max()), float(rs.state2.absmax.max()))
            assert np.abs(a - b).max() <= 2 * step * scale, name
            if name != "attn.c_attn":  # exported as stored: the same 8-bit codes up to that one step
                diff = np.abs(qs.absmax.numpy().astype(int) - rs.absmax.numpy().astype(int))
                assert diff.max() <= 1 and diff.mean() < 0.05, name
    assert np.abs(logits_of(hf, qlora_case["idx"]) - logits_of(theirs, qlora_case["idx"])).max() < 0.1


def test_qlora_adapter_over_the_4bit_base_in_peft(qlora_case):
    ours, idx = qlora_case["ours"], qlora_case["idx"]
    ref = logits_of(ours, idx)
    hf = load(str(qlora_case["root"] / "base"))
    float32_path(hf)
    base_logits = logits_of(hf, idx)  # before PEFT adds the adapter into these modules
    pm = PeftModel.from_pretrained(hf, str(qlora_case["root"] / "adapter")).eval()
    float32_path(pm)
    got = logits_of(pm, idx)
    quant_effect = np.abs(qlora_case["quant_logits"] - qlora_case["float_logits"]).max()
    diff, base_diff = np.abs(got - ref).max(), np.abs(base_logits - qlora_case["quant_logits"]).max()
    print(f"double_quant={qlora_case['dq']}: PEFT vs ours {diff:.3g}, 4-bit base vs ours {base_diff:.3g}, "
          f"4-bit quantization effect {quant_effect:.3g}")
    assert quant_effect > 1e-3
    assert np.abs(base_logits - ref).max() > 1e-2  # the adapter matters
    if qlora_case["dq"]:  # c_attn's nested constants were re-quantized over the fused vector
        assert diff < 0.1 * quant_effect and base_diff < 0.1 * quant_effect
    else:
        assert diff < 1e-4 and base_diff < 1e-4


def test_qlora_adapter_reads_back_into_qlora(qlora_case, base_sd):
    ours, idx = qlora_case["ours"], qlora_case["idx"]
    fresh = apply_qlora(ours_of(base_sd), 4, 8, ALL, double_quant=qlora_case["dq"], seed=11)  # B = 0, same bases
    load_peft_adapter(fresh, str(qlora_case["root"] / "adapter"))
    assert all(type(m).__name__ == "QLoRALinear" for m in lora_layers(fresh).values())
    assert np.array_equal(logits_of(fresh, idx), logits_of(ours, idx))


def test_partial_qlora_quantizes_the_float_layers_as_bitsandbytes(tmp_path, base_sd, float_dir):
    ours = apply_qlora(ours_of(base_sd), 4, 8, ["q", "v"], double_quant=False, seed=2)
    checkpoint.save_hf_gpt2(ours, str(tmp_path), base_only=True)
    hf = load(str(tmp_path))
    theirs = load(float_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    for name in MODULES:  # c_attn is q (NF4), k (float, quantized on export), v (NF4); c_proj etc. float
        mod, ref = hf.get_submodule(f"transformer.h.1.{name}"), theirs.get_submodule(f"transformer.h.1.{name}")
        assert torch.equal(mod.weight.data, ref.weight.data) and torch.equal(mod.weight.quant_state.absmax,
                                                                            ref.weight.quant_state.absmax)


def test_requantized_merge_exports_4bit(tmp_path, base_sd):
    ours = apply_qlora(ours_of(base_sd), 4, 8, ALL, double_quant=False, seed=2)
    randomize_B(ours, scale=0.1)
    merge_and_unload(ours, requantize=True)
    checkpoint.save_hf_gpt2(ours, str(tmp_path))  # no adapters left: no base_only needed
    hf = load(str(tmp_path))
    assert float32_path(hf) == 4 * N_LAYER
    idx = ids(4)
    assert np.abs(logits_of(hf, idx) - logits_of(ours, idx)).max() < 1e-4


# ----------------------------------------------------------------- QA-LoRA
def test_qalora_to_peft_over_the_dequantized_base(tmp_path, base_sd):
    ours = apply_qalora(ours_of(base_sd), 4, 8, ALL, bits=4, group_size=16, seed=4)
    randomize_B(ours)
    idx = ids(5)
    ref = logits_of(ours, idx)
    with pytest.raises(ValueError, match=r"group-wise quantized.*dequantize=True"):
        checkpoint.save_hf_gpt2(ours, str(tmp_path / "base"), base_only=True)
    with pytest.raises(ValueError, match="unmerged adapters"):
        checkpoint.save_hf_gpt2(ours, str(tmp_path / "base"), dequantize=True)
    checkpoint.save_hf_gpt2(ours, str(tmp_path / "base"), base_only=True, dequantize=True)
    save_peft_adapter(ours, str(tmp_path / "adapter"))
    hf = load(str(tmp_path / "base"))
    with disable_adapters(ours):
        assert np.abs(logits_of(hf, idx) - logits_of(ours, idx)).max() < 1e-4  # the dequantized base
    pm = PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    assert np.abs(logits_of(pm, idx) - ref).max() < 1e-4
    # and back: the expanded factors fold into a QA-LoRA model with the same bases, bit for bit
    fresh = apply_qalora(ours_of(base_sd), 4, 8, ALL, bits=4, group_size=16, seed=9)
    load_peft_adapter(fresh, str(tmp_path / "adapter"))
    assert np.array_equal(logits_of(fresh, idx), ref)
    merge_lora(ours)  # merged QA-LoRA (zero points moved): still group-wise, still needs dequantize
    with pytest.raises(ValueError, match="group-wise"):
        checkpoint.save_hf_gpt2(ours, str(tmp_path / "merged"))
    checkpoint.save_hf_gpt2(ours, str(tmp_path / "merged"), dequantize=True)
    assert np.abs(logits_of(load(str(tmp_path / "merged")), idx) - ref).max() < 1e-4


# ----------------------------------------------------------------- the float state dict, and what cannot be written
def test_state_dict_dequantizes_quantized_bases(base_sd):
    ours = apply_qlora(ours_of(base_sd), 4, 8, ["q", "proj"], seed=2)
    sd = hf_io.to_hf_gpt2_state_dict(ours)  # NF4 bases: dequantized (what they compute with)
    q = lora_layers(ours)["blocks.0.attn.q"].base.dequantized_weight()  # (C, C)
    assert np.array_equal(sd["transformer.h.0.attn.c_attn.weight"][:, :C], to_numpy(q).T)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q is a NF4Linear with no float weight.*dequantize=True"):
        hf_io.to_hf_gpt2_state_dict(ours, dequantize=False)


def test_fused_blocks_that_straddle_q_k_v_are_refused(tmp_path):
    from lora_from_scratch.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=V, block_size=P, n_layer=1, n_head=4, n_embd=20), seed=0)
    apply_qlora(model, 2, 4, ["q", "k", "v"], seed=0)  # 20 * 20 = 400 weights: not whole blocks of 64
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn: a part of 400 weights does not fill"):
        checkpoint.save_hf_gpt2(model, str(tmp_path / "x"), base_only=True)
    assert not os.path.exists(tmp_path / "x")
