"""LoRA adapters against Hugging Face PEFT (Hu et al., 2021, section 4.1): one layer, PiSSA's start,
adapter files both ways, gradients, merging.
"""

from __future__ import annotations

from .. import functional as F
from ..backend import asarray, rng, to_numpy
from ..gradcheck import rel_error
from .hf import hf_state
from .measure import Measurement, _host_array, _max_abs, _rel, require

# ============================================================================ PEFT
PEFT_C, PEFT_HEADS, PEFT_LAYERS, PEFT_VOCAB, PEFT_POSITIONS = 32, 4, 2, 64, 32
ALL_TARGETS = ["q", "k", "v", "o", "fc", "proj"]


def peft_hf_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=PEFT_VOCAB, n_positions=PEFT_POSITIONS, n_embd=PEFT_C, n_layer=PEFT_LAYERS,
                      n_head=PEFT_HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                      eos_token_id=0)


def peft_base_state() -> dict:
    """A random GPT-2 state dict (host arrays) with non-trivial biases and layer norms."""
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(peft_hf_config())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf_state(hf)


def peft_hf_model(sd: dict, dtype=None):
    """A ``GPT2LMHeadModel`` holding the state dict ``sd`` (float32 unless ``dtype``), eval mode."""
    import torch
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel(peft_hf_config())
    hf.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)  # every tensor's own shape
    return hf.to(torch.float32 if dtype is None else dtype).eval()


def peft_ids(seed: int = 0, shape=(3, 12)):
    return rng(seed).integers(0, PEFT_VOCAB, shape)  # shape, host int64


def torch_logits(model, idx):
    """A torch model's logits for host ids, as a host array."""
    import torch

    with torch.no_grad():
        return model(torch.tensor(idx)).logits.numpy()


def randomize_B(model, seed: int = 1, scale: float = 0.2) -> None:
    """Non-zero B everywhere (as after training), so that the adapters really change the logits."""
    from ..lora import lora_layers

    g = rng(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(g.standard_normal(layer.lora_B.shape) * scale, dtype=layer.lora_B.dtype)  # (out, r)


def _tiny_torch_model():
    """A torch model holding one ``torch.nn.Linear(10, 6)`` named ``lin`` (what PEFT adapts)."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(10, 6)

        def forward(self, x):
            return self.lin(x)

    return Tiny()


def peft_layer(use_rslora: bool, p: float) -> list:
    """``LoRALinear`` against ``peft.tuners.lora.Linear`` (float64, the same fixed dropout mask)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..lora import LoRALinear
    from ..nn import Linear

    class FixedDropout(torch.nn.Module):
        def __init__(self, keep):
            super().__init__()
            self.keep = keep

        def forward(self, x):
            return x * self.keep

    g = rng(0)
    base = Linear(10, 6, rng=g, dtype="float64")
    base.bias.data = asarray(g.standard_normal(6))  # (6,)
    ours = LoRALinear(base, 3, 5, dropout=p, use_rslora=use_rslora, rng=g)
    ours.lora_B.data = asarray(g.standard_normal((6, 3)))  # (6, 3)
    pm = get_peft_model(_tiny_torch_model().double(), LoraConfig(r=3, lora_alpha=5, target_modules=["lin"],
                                                    use_rslora=use_rslora, lora_dropout=p))
    layer = pm.base_model.model.lin
    require(layer.scaling["default"] == ours.scaling, f"scaling {ours.scaling} vs PEFT's {layer.scaling['default']}")
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor(to_numpy(base.weight.data)))  # (6, 10)
        layer.base_layer.bias.copy_(torch.tensor(to_numpy(base.bias.data)))  # (6,)
        layer.lora_A["default"].weight.copy_(torch.tensor(to_numpy(ours.lora_A.data)))  # (3, 10)
        layer.lora_B["default"].weight.copy_(torch.tensor(to_numpy(ours.lora_B.data)))  # (6, 3)
    x = g.standard_normal((4, 5, 10))  # (4, 5, 10)
    mask = g.random(x.shape) >= p  # (4, 5, 10) fixed dropout mask
    if p > 0:
        layer.lora_dropout["default"] = FixedDropout(torch.tensor(mask / (1 - p)))  # (4, 5, 10) kept / (1 - p)
    G = g.standard_normal((4, 5, 6))  # (4, 5, 6) upstream gradient
    tx = torch.tensor(x, requires_grad=True)  # (4, 5, 10)
    ty = pm(tx)  # (4, 5, 6)
    ty.backward(torch.tensor(G))
    y = ours(asarray(x), dropout_mask=asarray(mask) if p > 0 else None)  # (4, 5, 6)
    dx = ours.backward(asarray(G))  # (4, 5, 10)
    require(layer.base_layer.weight.grad is None and ours.base.weight.grad is None, "W0 got a gradient")
    return [_rel("output", y, ty, 1e-12), _rel("dx", dx, tx.grad, 1e-12),
            _rel("dA", ours.lora_A.grad, layer.lora_A["default"].weight.grad, 1e-12),
            _rel("dB", ours.lora_B.grad, layer.lora_B["default"].weight.grad, 1e-12)]


def peft_pissa(use_rslora: bool) -> list:
    """PiSSA's start (top-r singular triplets, W0 replaced by the residual) against PEFT's (float32).

    Singular vectors are defined up to sign, so the products s B A, the residual weights and |A|
    are compared.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from ..lora import LoRALinear
    from ..nn import Linear

    g = rng(1)
    W = g.standard_normal((6, 10)).astype("float32")  # (6, 10)
    base = Linear(10, 6, rng=g, dtype="float32")
    base.weight.data = asarray(W)  # (6, 10)
    ours = LoRALinear(base, 3, 5, init="pissa", use_rslora=use_rslora)
    tiny = _tiny_torch_model()
    with torch.no_grad():
        tiny.lin.weight.copy_(torch.tensor(W))  # (6, 10)
    pm = get_peft_model(tiny, LoraConfig(r=3, lora_alpha=5, target_modules=["lin"], use_rslora=use_rslora,
                                         init_lora_weights="pissa"))
    layer = pm.base_model.model.lin
    A, B = _host_array(layer.lora_A["default"].weight), _host_array(layer.lora_B["default"].weight)  # (3, 10), (6, 3)
    s = layer.scaling["default"]
    require(s == ours.scaling, f"scaling {ours.scaling} vs PEFT's {s}")
    ours_update = ours.scaling * to_numpy(ours.lora_B.data) @ to_numpy(ours.lora_A.data)  # (6, 10)
    return [Measurement("s B A", rel_error(ours_update, s * B @ A), 1e-5),
            _rel("residual W0 - s B A", ours.base.weight.data, layer.base_layer.weight, 1e-5),
            Measurement("|A|", rel_error(abs(to_numpy(ours.lora_A.data)), abs(A)), 1e-5)]


def peft_load_error(directory: str, hf_base, idx, expected) -> Measurement:
    """``PeftModel.from_pretrained(hf_base, directory)``'s logits against ours (max abs diff, float32)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(hf_base, directory).eval()
    return Measurement("PeftModel logits (max abs diff)", _max_abs(torch_logits(pm, idx), expected), 1e-4)


def ours_to_peft(base_sd: dict, directory: str, targets, use_rslora: bool = False, init: str = "kaiming") -> list:
    """Our adapter (r 4, alpha 12) -> PEFT files -> PeftModel: the same logits; and back into our GPT, bit for bit.

    For PiSSA the base PEFT loads is our residual weights. The adapters must change the logits
    (else the check is vacuous).
    """
    from ..hf_io import load_hf_gpt2, to_hf_gpt2_state_dict
    from ..lora import apply_lora, lora_layers
    from ..model import GPT
    from ..peft_io import load_peft_adapter, save_peft_adapter

    ours = apply_lora(load_hf_gpt2(base_sd, PEFT_HEADS), 4, 12, targets, init=init, use_rslora=use_rslora, seed=5)
    randomize_B(ours)
    idx = peft_ids()  # (3, 12)
    ref = to_numpy(ours(asarray(idx)))  # (3, 12, V)
    save_peft_adapter(ours, directory)
    base_hf = peft_hf_model(to_hf_gpt2_state_dict(ours))  # for PiSSA: the residual weights
    require(_max_abs(torch_logits(base_hf, idx), ref) > 1e-2, "the adapters do not change the logits: vacuous check")
    out = [peft_load_error(directory, base_hf, idx, ref)]
    again = load_peft_adapter(GPT(ours.config, seed=9), directory)
    again.load_state_dict({k: v for k, v in ours.state_dict().items() if ".adapters." not in k}, strict=False)
    require(sorted(lora_layers(again)) == sorted(lora_layers(ours)), "the reloaded model adapts other layers")
    require(all(lora_layers(again)[n].r == 4 for n in lora_layers(ours)), "the reloaded ranks differ")
    back = to_numpy(again(asarray(idx)))  # (3, 12, V)
    out.append(Measurement("reloaded into ours: mismatching logits", int((back != ref).sum()), 0))
    return out


def peft_saved_adapter(base_sd: dict, directory: str, use_rslora: bool = False):
    """A PEFT adapter on c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj (a rank and an alpha pattern, random A,
    non-zero B, float64) saved to ``directory`` by PEFT itself; returns the PeftModel (eval mode)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    hf = peft_hf_model(base_sd, torch.float64)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                       rank_pattern={"transformer.h.1.mlp.c_fc": 2},
                                       alpha_pattern={"transformer.h.0.attn.c_proj": 3},
                                       use_rslora=use_rslora, fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
    pm.save_pretrained(directory)
    return pm.eval()


def peft_to_ours(pm, directory: str, base_sd: dict) -> list:
    """A PEFT-saved adapter loaded into our GPT: the logits of PeftModel (float32 on both sides)."""
    import copy

    from ..hf_io import load_hf_gpt2
    from ..peft_io import load_peft_adapter

    ours = load_peft_adapter(load_hf_gpt2(base_sd, PEFT_HEADS), directory)
    idx = peft_ids(1)  # (3, 12)
    expected = torch_logits(copy.deepcopy(pm).float(), idx)  # (3, 12, V)
    return [Measurement("logits (max abs diff)", _max_abs(ours(asarray(idx)), expected), 1e-4)]


def peft_gradients(pm, directory: str, base_sd: dict) -> list:
    """The same loss in float64: every adapter gradient of our GPT against PEFT's (fused c_attn: A's
    gradient is the sum of q's, k's and v's, since each holds a copy of A; B's rows are theirs)."""
    import torch

    from ..hf_io import load_hf_gpt2
    from ..lora import lora_layers
    from ..peft_io import load_peft_adapter

    ours = load_peft_adapter(load_hf_gpt2(base_sd, PEFT_HEADS, dtype="float64"), directory)
    idx, tgt = peft_ids(2, (2, 10)), peft_ids(3, (2, 10))  # (2, 10) each
    pm.zero_grad()
    logits_t = pm(torch.tensor(idx)).logits  # (2, 10, V)
    torch.nn.functional.cross_entropy(logits_t.reshape(-1, PEFT_VOCAB), torch.tensor(tgt).reshape(-1)).backward()  # ()
    loss, dlogits = F.cross_entropy(ours(asarray(idx)), asarray(tgt))  # (), (2, 10, V)
    ours.backward(dlogits)
    layers = lora_layers(ours)
    C = PEFT_C
    out = []
    for i in range(PEFT_LAYERS):
        h = pm.base_model.model.transformer.h[i]
        grads = {n: (h.attn.c_attn.lora_A["default"].weight.grad.numpy(),
                     h.attn.c_attn.lora_B["default"].weight.grad.numpy()[j * C:(j + 1) * C])
                 for j, n in enumerate(("attn.q", "attn.k", "attn.v"))}
        for n, mod in (("attn.o", h.attn.c_proj), ("mlp.fc", h.mlp.c_fc), ("mlp.proj", h.mlp.c_proj)):
            grads[n] = (mod.lora_A["default"].weight.grad.numpy(), mod.lora_B["default"].weight.grad.numpy())
        dA_qkv = sum(to_numpy(layers[f"blocks.{i}.{n}"].lora_A.grad) for n in ("attn.q", "attn.k", "attn.v"))  # (R, C)
        out.append(Measurement(f"blocks.{i}.attn.qkv dA (summed)", rel_error(dA_qkv, grads["attn.q"][0]), 1e-10))
        for n, (dA, dB) in grads.items():
            layer = layers[f"blocks.{i}.{n}"]
            out.append(_rel(f"blocks.{i}.{n} dB", layer.lora_B.grad, dB, 1e-10))
            if n not in ("attn.q", "attn.k", "attn.v"):
                out.append(_rel(f"blocks.{i}.{n} dA", layer.lora_A.grad, dA, 1e-10))
    return out


def peft_merge(pm, directory: str, base_sd: dict) -> list:
    """Our merge (W0 + s B A, (out, in)) against PEFT's ``merge_and_unload`` (fan_in_fan_out: (B A)^T added
    to GPT-2's (in, out) Conv1D weights), float64, every tensor of the GPT-2 state dict."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..hf_io import load_hf_gpt2, to_hf_gpt2_state_dict
    from ..lora import merge_lora
    from ..peft_io import load_peft_adapter

    ours = merge_lora(load_peft_adapter(load_hf_gpt2(base_sd, PEFT_HEADS, dtype="float64"), directory))
    torch.manual_seed(0)
    config = pm.peft_config["default"]
    pm2 = get_peft_model(peft_hf_model(base_sd, torch.float64), LoraConfig(**{
        k: getattr(config, k) for k in
        ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out")}))
    pm2.load_state_dict(pm.state_dict())
    merged = {k: v.detach().numpy() for k, v in pm2.merge_and_unload().state_dict().items()}
    return [Measurement(k, rel_error(v, merged[k]), 1e-12) for k, v in to_hf_gpt2_state_dict(ours).items()]
