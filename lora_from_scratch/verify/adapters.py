"""LoRA, QLoRA and QA-LoRA layers against the same layer written in torch ops, and against central
differences (Hu et al., 2021, section 4.1; Dettmers et al., 2023, eq. 5-6; Xu et al., 2023, section 3.3).
"""

from __future__ import annotations

from ..backend import asarray, rng, to_numpy
from .torch_layers import _close, adapter_gradients

# ============================================================================ adapter layers against torch
ADAPTER_SHAPES = {"lora": (7, 5, 3), "qlora": (42, 24, 3), "qalora": (12, 5, 2)}  # (in, out, r) of each kind


def make_adapter_layer(kind: str, dtype: str = "float64", seed: int = 0, dropout: float = 0.0, bits: int = 4,
                       use_rslora: bool = False, *, init: str = "kaiming", alpha: float = 6.0,
                       in_features: int | None = None, out_features: int | None = None, r: int | None = None,
                       group_size: int = 4, blocksize: int = 64, double_quant: bool = True,
                       randomize_B: bool | None = None, lead: tuple = (2, 3)):
    """A small adapted layer of ``kind`` over a random Linear with a random bias, B random (as after
    training; ``randomize_B``, default: unless PiSSA, whose B is already non-zero), an input of shape
    ``(*lead, in)`` and (with dropout) a fixed mask of that shape: ``(layer, x, mask)``.

    The sizes default to ``ADAPTER_SHAPES[kind]``; ``bits`` and ``group_size`` are QA-LoRA's,
    ``blocksize`` and ``double_quant`` QLoRA's. The tests build their layers here too.
    """
    from ..lora import LoRALinear
    from ..nn import Linear
    from ..qalora import QALoRALinear
    from ..qlora import QLoRALinear

    if kind not in ADAPTER_SHAPES:
        raise ValueError(f"unknown adapter kind {kind!r}; kinds: {list(ADAPTER_SHAPES)}")
    g = rng(seed)
    default_in, default_out, default_r = ADAPTER_SHAPES[kind]
    in_f = default_in if in_features is None else in_features
    out_f = default_out if out_features is None else out_features
    r = default_r if r is None else r
    base = Linear(in_f, out_f, rng=g, dtype=dtype)
    base.bias.data = asarray(g.standard_normal(out_f), dtype=dtype)  # (out,)
    common = {"dropout": dropout, "init": init, "use_rslora": use_rslora, "rng": g}
    if kind == "lora":
        layer = LoRALinear(base, r, alpha, **common)
    elif kind == "qlora":
        layer = QLoRALinear(base, r, alpha, blocksize=blocksize, double_quant=double_quant, **common)
    else:
        layer = QALoRALinear(base, r, alpha, bits=bits, group_size=group_size, **common)
    if randomize_B is None:
        randomize_B = init != "pissa"
    if randomize_B:  # B = 0 at init would make dA identically zero: give B values to check dA
        layer.lora_B.data = asarray(g.standard_normal((out_f, r)) * 0.5, dtype=dtype)  # (out, r)
    x = asarray(g.standard_normal((*lead, in_f)), dtype=dtype)  # (*lead, in)
    mask = asarray(g.random((*lead, in_f)) >= dropout) if dropout > 0 else None  # (*lead, in) fixed mask
    return layer, x, mask


def _torch_weight(layer, td):
    """The frozen W0 (out, in) as torch computes with it: the float weight, the NF4 values (our
    dequantization, float32, then cast), or the group-wise codes dequantized by torch itself."""
    import torch

    base = layer.base
    if hasattr(base, "codes"):  # group-wise INT-N: (q - zero) * scale, groups of group_size channels
        gs, bits, n = layer.group_size, base.bits, base.weight_count
        packed = torch.tensor(to_numpy(base.packed.data), dtype=torch.int64)  # (nbytes,) the stored bit stream
        shifts = torch.arange(7, -1, -1)  # (8,) each byte's bits, the high bit first
        stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: n * bits].reshape(n, bits)  # (n, bits) bit by bit
        codes = (stream << torch.arange(bits - 1, -1, -1)).sum(dim=1).reshape(base.codes.shape)  # (out, in) ints
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
