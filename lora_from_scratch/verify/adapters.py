"""LoRA, QLoRA and QA-LoRA layers against the same layer written in torch ops, and against central
differences (Hu et al., 2021, section 4.1; Dettmers et al., 2023, eq. 5-6; Xu et al., 2023, section 3.3).
"""

from __future__ import annotations

from ..backend import asarray, rng, to_numpy
from .torch_layers import _close, adapter_gradients


# ============================================================================ adapter layers against torch
def make_adapter_layer(kind: str, dtype: str = "float64", seed: int = 0, dropout: float = 0.0, bits: int = 4,
                       use_rslora: bool = False):
    """A small adapted layer of ``kind`` over a random Linear with a random bias, B random (as after
    training), an input and (with dropout) a fixed mask: ``(layer, x, mask)``."""
    from ..lora import LoRALinear
    from ..nn import Linear
    from ..qalora import QALoRALinear
    from ..qlora import QLoRALinear

    g = rng(seed)
    in_f, out_f, r = {"lora": (7, 5, 3), "qlora": (42, 24, 3), "qalora": (12, 5, 2)}[kind]
    base = Linear(in_f, out_f, rng=g, dtype=dtype)
    base.bias.data = asarray(g.standard_normal(out_f), dtype=dtype)  # (out,)
    if kind == "lora":
        layer = LoRALinear(base, r, 6.0, dropout=dropout, use_rslora=use_rslora, rng=g)
    elif kind == "qlora":
        layer = QLoRALinear(base, r, 6.0, dropout=dropout, use_rslora=use_rslora, rng=g)
    else:
        layer = QALoRALinear(base, r, 6.0, bits=bits, group_size=4, dropout=dropout, use_rslora=use_rslora, rng=g)
    layer.lora_B.data = asarray(g.standard_normal((out_f, r)) * 0.5, dtype=dtype)  # (out, r)
    x = asarray(g.standard_normal((2, 3, in_f)), dtype=dtype)  # (2, 3, in)
    mask = asarray(g.random((2, 3, in_f)) >= dropout) if dropout > 0 else None  # (2, 3, in) fixed mask
    return layer, x, mask


def _torch_weight(layer, td):
    """The frozen W0 (out, in) as torch computes with it: the float weight, the NF4 values (our
    dequantization, float32, then cast), or the group-wise codes dequantized by torch itself."""
    import torch

    base = layer.base
    if hasattr(base, "codes"):  # group-wise INT-N: (q - zero) * scale, groups of group_size channels
        gs = layer.group_size
        codes = torch.tensor(to_numpy(base.codes.data).astype("int64"))  # (out, in)
        scales = torch.tensor(to_numpy(base.scales.data), dtype=td)  # (out, L)
        zeros = torch.tensor(to_numpy(base.zeros.data), dtype=td)  # (out, L)
        return (codes.to(td) - zeros.repeat_interleave(gs, dim=1)) * scales.repeat_interleave(gs, dim=1)  # (out, in)
    if hasattr(base, "dequantized_weight"):  # NF4
        return torch.tensor(to_numpy(base.dequantized_weight()), dtype=td)  # (out, in)
    return torch.tensor(to_numpy(base.weight.data), dtype=td)  # (out, in)


def adapter_vs_torch(layer, x, G, dtype: str, mask=None) -> list:
    """An adapted layer's output and dx, dA, dB against the same layer in torch ops (autograd).

    LoRA / QLoRA: y = x W0^T + b + s (dropout(x) A^T) B^T; QA-LoRA: the adapter sees
    ``avg_pool1d`` of x over groups of ``group_size`` channels.
    """
    import torch

    td = getattr(torch, dtype)
    W = _torch_weight(layer, td)  # (out, in)
    b = torch.tensor(to_numpy(layer.base.bias.data), dtype=td)  # (out,)
    A = torch.tensor(to_numpy(layer.lora_A.data), dtype=td, requires_grad=True)  # (r, k')
    B = torch.tensor(to_numpy(layer.lora_B.data), dtype=td, requires_grad=True)  # (out, r)
    tx = torch.tensor(to_numpy(x), dtype=td, requires_grad=True)  # (..., in)
    xd = tx
    if mask is not None:
        xd = tx * torch.tensor(to_numpy(mask), dtype=td) / (1.0 - layer.dropout.p)  # (..., in)
    if hasattr(layer, "group_size") and hasattr(layer.base, "codes"):
        lead = xd.shape[:-1]
        xd = torch.nn.functional.avg_pool1d(xd.reshape(-1, 1, xd.shape[-1]), layer.group_size).reshape(
            *lead, -1)  # (..., in) -> (N, 1, in) -> (N, 1, L) -> (..., L)
    ty = tx @ W.T + b + layer.scaling * (xd @ A.T) @ B.T  # (..., out)
    ty.backward(torch.tensor(to_numpy(G), dtype=td))
    y = layer(x, dropout_mask=mask) if mask is not None else layer(x)  # (..., out)
    dx = layer.backward(G)  # (..., in)
    return [_close(y, ty, dtype, "output"), _close(dx, tx.grad, dtype, "dx"),
            _close(layer.lora_A.grad, A.grad, dtype, "dA"), _close(layer.lora_B.grad, B.grad, dtype, "dB")]


def adapter_layer_vs_torch(kind: str, dtype: str, dropout: float = 0.0, bits: int = 4,
                           use_rslora: bool = False) -> list:
    layer, x, mask = make_adapter_layer(kind, dtype, seed=bits, dropout=dropout, bits=bits, use_rslora=use_rslora)
    G = asarray(rng(5).standard_normal((*x.shape[:-1], layer.out_features)), dtype=dtype)  # (2, 3, out)
    return adapter_vs_torch(layer, x, G, dtype, mask=mask)


def adapter_layer_gradients(kind: str, dropout: float = 0.0, bits: int = 4) -> list:
    layer, x, mask = make_adapter_layer(kind, "float64", dropout=dropout, bits=bits)
    return adapter_gradients(layer, x, **({"dropout_mask": mask} if mask is not None else {}))
