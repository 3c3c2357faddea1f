"""The whole GPT against Hugging Face ``transformers``' ``GPT2LMHeadModel`` (tiny random configurations
built in memory, nothing downloaded): logits, loss and every gradient.
"""

from __future__ import annotations

from .. import functional as F
from ..backend import asarray, rng, to_numpy
from ..gradcheck import rel_error
from .measure import Measurement, _max_abs, _norm, _rel, require
from .torch_layers import _is_key_bias

# ============================================================================ transformers' GPT-2
HF_CONFIGS = (
    dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50, n_positions=16),
    dict(n_layer=3, n_head=2, n_embd=24, vocab_size=37, n_positions=12),
)


def hf_model(cfg: dict, seed: int, attn: str = "eager"):
    """A ``GPT2LMHeadModel`` with every parameter randomized (float32, dropout off), built in memory."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    config = GPT2Config(**cfg, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, layer_norm_epsilon=1e-5,
                        activation_function="gelu_new")
    config._attn_implementation = attn
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=gen)  # shape of p
            if p.ndim == 2:
                fan_in = p.shape[1] if name.endswith(("wte.weight", "wpe.weight")) else p.shape[0]
                p.copy_(r / fan_in**0.5)  # Conv1D weights are (in, out); embeddings are (rows, C)
            elif ".ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            else:
                p.copy_(0.2 * r)
    return m


def hf_state(m) -> dict:
    """A torch model's state dict as host arrays."""
    return {k: v.detach().cpu().numpy().copy() for k, v in m.state_dict().items()}


def hf_batch(cfg: dict, seed: int, B: int = 3):
    """Token ids over the full context and labels with a few ignored (-100) positions: (B, T) each."""
    g = rng(seed)
    T = cfg["n_positions"]
    ids = g.integers(0, cfg["vocab_size"], size=(B, T))  # (B, T)
    ids[0, :3] = cfg["vocab_size"] - 1  # the last row of wte and repeated ids
    labels = ids.copy()  # (B, T)
    labels[0, 2] = labels[1, 5] = labels[2, T - 1] = -100
    return ids, labels


def our_lm_loss(model, ids, labels):
    """The LM loss as transformers computes it (logits at t predict the label at t + 1): logits, loss, dlogits."""
    logits = model(asarray(ids))  # (B, T, V)
    loss, dl = F.cross_entropy(logits[:, :-1], asarray(labels[:, 1:]))  # (), (B, T-1, V)
    dlogits = logits * 0  # (B, T, V); the last position predicts nothing
    dlogits[:, :-1] = dl
    return logits, loss, dlogits


def _torch_lm_loss(m, ids, labels):
    """transformers' logits and the shifted LM loss in the model's own dtype (its ``labels=`` loss
    upcasts to float32, so the float64 checks apply torch's cross_entropy themselves)."""
    import torch

    logits = m(torch.from_numpy(ids)).logits  # (B, T, V)
    V = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),  # (B (T-1), V)
                                             torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=-100)  # ()
    return logits, loss


def _hf_grads_by_our_name(m, n_layer: int, C: int) -> dict:
    """transformers' gradients renamed and reshaped to ours (Conv1D (in, out) -> (out, in), c_attn split)."""
    g = {k: p.grad.detach().numpy() for k, p in m.named_parameters()}
    out = {"wte.weight": g["transformer.wte.weight"], "wpe.weight": g["transformer.wpe.weight"],
           "ln_f.weight": g["transformer.ln_f.weight"], "ln_f.bias": g["transformer.ln_f.bias"]}
    for i in range(n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[b + ln + ".weight"] = g[h + ln + ".weight"]
            out[b + ln + ".bias"] = g[h + ln + ".bias"]
        for j, n in enumerate("qkv"):
            out[b + f"attn.{n}.weight"] = g[h + "attn.c_attn.weight"][:, j * C:(j + 1) * C].T  # (C, C)
            out[b + f"attn.{n}.bias"] = g[h + "attn.c_attn.bias"][j * C:(j + 1) * C]  # (C,)
        for ours, theirs in (("attn.o", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[b + ours + ".weight"] = g[h + theirs + ".weight"].T  # (out, in)
            out[b + ours + ".bias"] = g[h + theirs + ".bias"]  # (out,)
    return out


def hf_gpt_float32(cfg: dict, attn: str = "eager") -> list:
    """Our GPT holding a GPT2LMHeadModel's weights: float32 logits (max abs diff) and the LM loss."""
    import torch

    from ..hf_io import load_hf_gpt2

    m = hf_model(cfg, seed=1, attn=attn)
    model = load_hf_gpt2(hf_state(m), cfg["n_head"])
    ids, labels = hf_batch(cfg, seed=2)
    with torch.no_grad():
        out = m(torch.from_numpy(ids), labels=torch.from_numpy(labels))
    logits, loss, _ = our_lm_loss(model, ids, labels)
    require(str(to_numpy(logits).dtype) == "float32", f"logits dtype {to_numpy(logits).dtype}, expected float32")
    ref = out.logits.numpy()  # (B, T, V)
    require(float(abs(ref).max()) > 1.0, "the reference logits are near zero: the comparison would be vacuous")
    return [Measurement("logits (max abs diff)", _max_abs(logits, ref), 1e-4),
            _rel("loss", loss, out.loss, 1e-5)]


def hf_gpt_float64(cfg: dict) -> list:
    """float64: logits, the loss and every parameter's gradient by name against transformers' autograd."""
    from ..hf_io import load_hf_gpt2

    m = hf_model(cfg, seed=3)
    model = load_hf_gpt2(hf_state(m), cfg["n_head"]).astype("float64")  # same values, cast exactly
    m = m.double()
    ids, labels = hf_batch(cfg, seed=4)
    ref_logits, ref_loss = _torch_lm_loss(m, ids, labels)
    ref_loss.backward()
    logits, loss, dlogits = our_lm_loss(model, ids, labels)
    require(str(to_numpy(logits).dtype) == "float64", f"logits dtype {to_numpy(logits).dtype}, expected float64")
    out = [_rel("logits", logits, ref_logits, 1e-12), _rel("loss", loss, ref_loss, 1e-12)]
    model.zero_grad()
    model.backward(dlogits)
    ref = _hf_grads_by_our_name(m, cfg["n_layer"], cfg["n_embd"])
    params = dict(model.named_parameters())
    require(set(params) == set(ref), f"parameter names differ: {sorted(set(params) ^ set(ref))}")
    for name, p in params.items():
        if _is_key_bias(name):  # exactly 0: q.(k + b) shifts a softmax row by a constant
            scale = _norm(ref[name.replace("bias", "weight")])
            out.append(Measurement(f"grad {name} (ours) / grad of its weight, exactly 0", _norm(p.grad) / scale, 1e-12))
            out.append(Measurement(f"grad {name} (transformers) / grad of its weight, exactly 0",
                                   _norm(ref[name]) / scale, 1e-12))
        else:
            out.append(_rel(f"grad {name}", p.grad, ref[name], 1e-8))
    return out


def hf_tied_head(cfg: dict) -> list:
    """wte's gradient has both parts, the lookup and the tied head (dlogits^T @ ln_f output), as transformers'."""
    import torch

    from ..hf_io import load_hf_gpt2

    m = hf_model(cfg, seed=5).double()
    model = load_hf_gpt2(hf_state(m), cfg["n_head"], dtype="float64")
    ids, labels = hf_batch(cfg, seed=6)
    logits, loss = _torch_lm_loss(m, ids, labels)
    hidden = m.transformer(torch.from_numpy(ids)).last_hidden_state  # (B, T, C), after ln_f
    dlogits_t = torch.autograd.grad(loss, logits, retain_graph=True)[0]  # (B, T, V)
    V = logits.shape[-1]
    head_part = (dlogits_t.reshape(-1, V).T @ hidden.reshape(-1, hidden.shape[-1])).detach().numpy()  # (V, C)
    full = torch.autograd.grad(loss, m.transformer.wte.weight)[0].numpy()  # (V, C), both uses of wte
    require(rel_error(head_part, full) > 1e-2, "the lookup part of wte's gradient is negligible: vacuous check")
    _, _, dlogits = our_lm_loss(model, ids, labels)
    model.zero_grad()
    model.backward(dlogits)
    return [_rel("grad wte.weight (lookup + head)", model.wte.weight.grad, full, 1e-8)]
