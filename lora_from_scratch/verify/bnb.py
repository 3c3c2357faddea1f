"""NF4 and FP4 blockwise quantization (Dettmers et al., 2023, sections 2-3) against bitsandbytes, bit for
bit: the measured error is the number of mismatching bytes (or float bit patterns), bound 0.
"""

from __future__ import annotations

from ..backend import asarray, rng, to_numpy
from .measure import Measurement, require


# ============================================================================ bitsandbytes
def bnb_quantize(x, quant_type: str, double_quant: bool = False, blocksize: int = 64):
    """bitsandbytes' CPU ``quantize_4bit`` / ``dequantize_4bit`` of a host float32 array:
    (packed bytes, flat; the quant state; the dequantized values in x's shape)."""
    import bitsandbytes.functional as bnbf
    import torch

    # bitsandbytes wraps part of its CPU path in torch.compile, which spends seconds compiling for
    # each new odd shape; run it eagerly (the same operations) to keep this fast.
    with torch._dynamo.config.patch(disable=True):
        packed, state = bnbf.quantize_4bit(torch.from_numpy(x), blocksize=blocksize, compress_statistics=double_quant,
                                           quant_type=quant_type)
        # the CPU path returns packed bytes of shape (ceil(n/2), 1) and, for a 1-D input, a
        # dequantized tensor of shape (1, n): compare flattened / reshaped
        dequantized = bnbf.dequantize_4bit(packed, state).numpy().reshape(x.shape)  # x's shape
    return packed.numpy().reshape(-1), state, dequantized  # (ceil(n / 2),) uint8, state, x's shape


def float_bits(a):
    """Raw float32 bit patterns (uint32): equal bits means equal to the last bit, the sign of zero included."""
    return to_numpy(a).astype("float32", order="C").view("uint32")  # same shape, uint32


def mismatching_floats(ours, ref) -> int:
    """How many float32 values differ in their bits, 0.0 and -0.0 counted as equal.

    bitsandbytes' own CPU kernels disagree on the sign of the zero that FP4 code 8 ("minus zero")
    dequantizes to: +0.0 when the length is a multiple of the block size, -0.0 otherwise.
    """
    a, b = to_numpy(ours).astype("float32"), to_numpy(ref).astype("float32")  # same shape, float32 each
    require(a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}")
    zero = a.dtype.type(0)  # a float32 zero: x + 0 turns -0.0 into +0.0 and changes nothing else
    return int((float_bits(a + zero) != float_bits(b + zero)).sum())


def bnb_4bit_mismatches(x, quant_type: str, blocksize: int = 64, dequantized: bool = True) -> list:
    """Our 4-bit quantization of the host float32 array ``x`` against bitsandbytes', bit for bit:
    mismatching packed bytes, absmax bit patterns and (``dequantized``) dequantized values."""
    from ..quant import dequantize_4bit, quantize_4bit

    q = quantize_4bit(asarray(x), blocksize=blocksize, quant_type=quant_type)  # x -> packed (ceil(n / 2),), absmax
    packed_ref, state, dequantized_ref = bnb_quantize(x, quant_type, blocksize=blocksize)
    packed = to_numpy(q.packed)  # (ceil(n / 2),) uint8
    require(packed.shape == packed_ref.shape, f"packed shapes differ: {packed.shape} vs {packed_ref.shape}")
    absmax, absmax_ref = float_bits(q.absmax), float_bits(state.absmax.numpy())  # (nblocks,) uint32 each
    require(absmax.shape == absmax_ref.shape, f"absmax shapes differ: {absmax.shape} vs {absmax_ref.shape}")
    out = [Measurement("packed bytes mismatching", int((packed != packed_ref).sum()), 0),
           Measurement("absmax values mismatching", int((absmax != absmax_ref).sum()), 0)]
    if dequantized:
        back = dequantize_4bit(q)  # x's shape, float32
        require(tuple(back.shape) == tuple(x.shape) and str(back.dtype) == "float32",
                f"dequantized {tuple(back.shape)} {back.dtype}, expected {tuple(x.shape)} float32")
        out.append(Measurement("dequantized values mismatching", mismatching_floats(back, dequantized_ref), 0))
    return out


PARITY_SHAPES = ((1,), (7,), (64,), (65,), (1000,), (4097,), (5, 37), (128, 64), (33, 64), (3, 2, 64), (2, 1000))


def parity_input(shape):
    """The test input of a parity shape: N(0, 0.02^2) float32, seeded by the shape (host)."""
    return (rng(sum(shape)).standard_normal(shape) * 0.02).astype("float32")  # shape


def bnb_parity(quant_type: str) -> list:
    """Every shape of ``PARITY_SHAPES`` (odd lengths, short last blocks, 1-D to 3-D), block size 64."""
    out = []
    for shape in PARITY_SHAPES:
        out += [m._replace(what=f"{shape}: {m.what}") for m in bnb_4bit_mismatches(parity_input(shape), quant_type)]
    return out


BLOCKSIZES = (32, 128, 256, 4096)


def bnb_blocksizes() -> list:
    """NF4 at block sizes 32 to 4096 on 5000 values."""
    out = []
    for blocksize in BLOCKSIZES:
        x = rng(blocksize).standard_normal(5000).astype("float32")  # (5000,)
        out += [m._replace(what=f"blocksize {blocksize}: {m.what}") for m in bnb_4bit_mismatches(x, "nf4", blocksize)]
    return out


def bnb_double_quant_codes(quant_type: str = "nf4") -> list:
    """Double quantization bit for bit: packed codes, 8-bit block constants, nested absmax and offset.

    bitsandbytes' offset is torch's float32 mean, whose rounding depends on torch's thread count
    above 32,768 block constants (``quant.offset_mean`` follows two or more threads); this
    512 x 512 matrix has 4,096.
    """
    from ..quant import quantize_4bit

    x = rng(11).standard_normal((512, 512)).astype("float32")  # (512, 512)
    q = quantize_4bit(asarray(x), quant_type=quant_type, double_quant=True)  # (512, 512) -> packed (131072,)
    packed_ref, state, _ = bnb_quantize(x, quant_type, double_quant=True)
    pairs = (("packed bytes", q.packed, packed_ref), ("8-bit block constants", q.qabsmax, state.absmax.numpy()),
             ("nested absmax", float_bits(q.absmax2), float_bits(state.state2.absmax.numpy())),
             ("offset", float_bits(q.offset), float_bits(state.offset.numpy().reshape(1))))
    return [Measurement(f"{what} mismatching", int((to_numpy(ours).reshape(-1) != ref.reshape(-1)).sum()), 0)
            for what, ours, ref in pairs]
