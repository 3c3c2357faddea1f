"""Exercises of notebook 8 (QLoRA): the bytes a QLoRA layer holds, and how often it dequantizes W0.

QLoRA (Dettmers et al., 2023), section 3, eq. 5-6: W0 is stored in NF4 (4-bit codes, two per
byte, one 8-bit constant per block of 64 weights, one float32 constant per 256 of those and one
float32 offset: double quantization) and dequantized to the computation type in the forward *and*
in the backward; the bias and the adapters A, B stay in float32.

1. ``08.layer_bytes``: a function giving the bytes a QLoRA layer of a given shape holds
   (the reference builds the layer with the library and asks ``memory.resident_bytes``).
2. ``08.dequantizations``: predict how many times the 24 QLoRA layers of the base model
   dequantize W0 in three training steps and one evaluation; the notebook then counts them.
"""

from __future__ import annotations

import math

import numpy as np

from ..memory import resident_bytes
from ..nn import Linear
from ..qlora import QLoRALinear
from . import Exercise, Mistake

BLOCKSIZE, BLOCKSIZE2 = 64, 256  # QLoRA's first-level blocks (weights) and second-level blocks (constants)


# ----------------------------------------------------------------- 08.layer_bytes
def _layer_bytes(out_features: int, in_features: int, r: int, bias: bool = True) -> int:
    """What the library's QLoRA layer of this shape holds (NF4, blocksize 64, double quantization, float32)."""
    lin = Linear(in_features, out_features, bias=bias, rng=np.random.default_rng(0))
    layer = QLoRALinear(lin, r, alpha=2 * r, rng=np.random.default_rng(1))
    return resident_bytes(layer)


def _adapter_bytes(out_features, in_features, r):
    return 4 * r * (in_features + out_features)  # A (r, in) and B (out, r), float32


def _nf4_bytes(out_features, in_features):
    n = out_features * in_features
    blocks = math.ceil(n / BLOCKSIZE)
    return n // 2 + blocks + 4 * math.ceil(blocks / BLOCKSIZE2) + 4  # codes, 8-bit constants, float32 scales, offset


def _w0_float32(out_features, in_features, r, bias=True):
    return 4 * out_features * in_features + 4 * out_features * bias + _adapter_bytes(out_features, in_features, r)


def _no_bias(out_features, in_features, r, bias=True):
    return _nf4_bytes(out_features, in_features) + _adapter_bytes(out_features, in_features, r)


def _no_adapters(out_features, in_features, r, bias=True):
    return _nf4_bytes(out_features, in_features) + 4 * out_features * bias


def _float32_constants(out_features, in_features, r, bias=True):
    n = out_features * in_features
    return (n // 2 + 4 * math.ceil(n / BLOCKSIZE) + 4 * out_features * bias
            + _adapter_bytes(out_features, in_features, r))


def _floor_scales(out_features, in_features, r, bias=True):
    n = out_features * in_features
    blocks = n // BLOCKSIZE
    return (n // 2 + blocks + 4 * (blocks // BLOCKSIZE2) + 4 + 4 * out_features * bias
            + _adapter_bytes(out_features, in_features, r))  # the partial second-level block dropped


def _codes_one_per_byte(out_features, in_features, r, bias=True):
    return _layer_bytes(out_features, in_features, r, bias) + out_features * in_features // 2  # a byte per code


def _layer_cases():
    # (out, in, r, bias): the base model's attention and MLP shapes, and one whose 300 blocks leave a partial
    # second-level block (ceil(300 / 256) = 2 float32 scales)
    return [(128, 128, 8, True), (512, 128, 8, True), (128, 512, 16, False), (96, 200, 4, True)]


# ----------------------------------------------------------------- 08.dequantizations
N_LAYERS, N_STEPS, N_EVAL_TASKS = 24, 3, 5  # the base model's 24 adapted matrices; 3 steps; 5 tasks, one forward each
DEQUANTIZATIONS = N_LAYERS * (2 * N_STEPS + N_EVAL_TASKS)  # 2 per step (forward, backward) + 1 per evaluation forward


EXERCISES = [
    Exercise(
        id="08.layer_bytes",
        title="the bytes of a QLoRA layer",
        task=("write layer_bytes(out_features, in_features, r, bias=True): the bytes a QLoRA layer holds. W0 "
              "(out, in) in NF4: two 4-bit codes per byte, one uint8 constant per block of 64 weights, one float32 "
              "scale per 256 constants (round up), one float32 offset; the bias (out,) and A (r, in), B (out, r) "
              "in float32"),
        reference=_layer_bytes,
        cases=_layer_cases,
        factors=lambda out_features, in_features, r, bias=True: {"4 (bytes per float32)": 4.0},
        mistakes=(
            Mistake("W0 in float32", _w0_float32,
                    "W0 was counted in float32 (4 bytes a weight, what LoRA holds); a QLoRA layer keeps only its "
                    "NF4 form: half a byte a weight plus the block constants"),
            Mistake("bias forgotten", _no_bias,
                    "the bias is missing: it is not quantized and stays in the layer as out float32 values"),
            Mistake("adapters forgotten", _no_adapters,
                    "the adapters are missing: A (r, in) and B (out, r) are held in float32 beside the 4-bit W0"),
            Mistake("scales rounded down", _floor_scales,
                    "a partial block was dropped: a division rounded down (//) where the last, partial block of "
                    "constants still needs its own float32 scale"),
            Mistake("a byte per code", _codes_one_per_byte,
                    "one byte per 4-bit code: two codes share a byte"),
            Mistake("constants in float32", _float32_constants,
                    "the block constants were counted as float32 (4.5 bits a weight, no double quantization); "
                    "with double quantization they are 8-bit, plus one float32 scale per 256 and one offset"),
        ),
    ),
    Exercise(
        id="08.dequantizations",
        title="how often W0 is dequantized",
        task=(f"predict: the base model with QLoRA on its {N_LAYERS} matrices trains {N_STEPS} steps (forward + "
              f"backward each), then is evaluated on {N_EVAL_TASKS} tasks (one forward each). How many times is a "
              "W0 dequantized, summed over all layers? (an integer)"),
        reference=DEQUANTIZATIONS,
        factors={f"{N_LAYERS} (the layers)": float(N_LAYERS)},
        mistakes=(
            Mistake("forward only", N_LAYERS * (N_STEPS + N_EVAL_TASKS),
                    "only the forwards were counted: the backward needs W0 again for dx, and no float copy was kept"),
            Mistake("kept once", N_LAYERS,
                    "one dequantization per layer would mean a float W0 kept in memory after it; QLoRA keeps only "
                    "the NF4 codes and dequantizes whenever W0 is needed"),
            Mistake("evaluation forgotten", N_LAYERS * 2 * N_STEPS,
                    "the evaluation is missing: its forwards need W0 too"),
            Mistake("one layer", 2 * N_STEPS + N_EVAL_TASKS,
                    f"that is the count of one layer; each of the {N_LAYERS} QLoRA layers dequantizes its own W0"),
        ),
    ),
]
