"""Exercises of notebook 07 (quantization and NF4): the code lookup, two codes per byte, double quantization's bits.

QLoRA (Dettmers et al., 2023), section 2 (block-wise absmax quantization, Eq. 1), section 3
("4-bit NormalFloat Quantization": the 16 levels; "Double Quantization": 8-bit block constants
with one float32 constant per 256 of them). The references are the library's own functions
(``quant.quantize_4bit``, ``quant.pack_nibbles``), which match bitsandbytes bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..quant import NF4_CODE, pack_nibbles, quantize_4bit, unpack_nibbles
from ..quant.tables import search_table
from . import Exercise, Mistake, Relation

_, _LEVELS, _MIDPOINTS = search_table(NF4_CODE)  # NF4 is stored in ascending order: code = sorted position


# ----------------------------------------------------------------- 07.nf4_code
def _nf4_codes(block):
    """The NF4 code of each value of one block (the library's quantizer, one block of the whole input)."""
    block = np.asarray(block, dtype=np.float32).reshape(-1)  # (n,)
    q = quantize_4bit(block, blocksize=block.size, quant_type="nf4")
    return unpack_nibbles(q.packed, block.size)  # (n,) uint8 codes


def _codes_of_scaled(v, side="left"):
    """Sorted position of the nearest NF4 level: the number of midpoints below v (ties down; "right": ties up)."""
    return np.searchsorted(_MIDPOINTS, np.asarray(v, dtype=np.float32), side=side).astype(np.uint8)  # (n,)


def _codes_max_not_absmax(block):
    block = np.asarray(block, dtype=np.float32)  # (n,)
    return _codes_of_scaled(block / block.max())  # (n,) scaled by the largest value, not magnitude


def _codes_unscaled(block):
    return _codes_of_scaled(np.asarray(block, dtype=np.float32))  # (n,) not divided at all


def _codes_mean(block):
    block = np.asarray(block, dtype=np.float32)  # (n,)
    return _codes_of_scaled(block / np.abs(block).mean())  # (n,) scaled by the mean magnitude


def _codes_ties_up(block):
    block = np.asarray(block, dtype=np.float32)  # (n,)
    return _codes_of_scaled(block / np.abs(block).max(), side="right")  # (n,) a tie goes to the upper level


def _tie_block():
    """A block of 16 whose absmax is 1 (so x / absmax = x exactly) holding values exactly halfway between levels.

    The midpoints next to 0 are exact halves of a level, in any precision: l[8] / 2 lies halfway
    between the levels 0 and l[8], l[6] / 2 halfway between l[6] and 0.
    """
    l6, l8 = float(NF4_CODE[6]), float(NF4_CODE[8])
    values = [1.0, l8 / 2, l6 / 2, -0.5, 0.3, l8 / 2, -0.95, 0.0, 0.62, l6 / 2, -0.2, 0.05, 0.41, -0.33, 0.7, 0.12]
    return np.array(values, dtype=np.float32)  # (16,)


def _nf4_cases():
    rng = np.random.default_rng(7)
    gauss16 = rng.standard_normal(16).astype(np.float32)  # (16,)
    gauss16[3] = -np.abs(gauss16).max() * 1.5  # the largest magnitude is negative: max != absmax
    gauss64 = (0.02 * rng.standard_normal(64)).astype(np.float32)  # (64,) weight-sized values
    return [(gauss16,), (gauss64,), (_tie_block(),)]


# ----------------------------------------------------------------- 07.pack_nibbles
def _pack_wrong_order(codes):
    codes = np.asarray(codes, dtype=np.uint8)  # (n,)
    return (codes[1::2] << 4) | codes[0::2]  # (n/2,) second element in the high nibble


def _pack_halves(codes):
    codes = np.asarray(codes, dtype=np.uint8)  # (n,)
    half = codes.size // 2
    return (codes[:half] << 4) | codes[half:]  # (n/2,) element k with element k + n/2


def _pack_added(codes):
    codes = np.asarray(codes, dtype=np.uint8)  # (n,)
    return codes[0::2] + codes[1::2]  # (n/2,) added, not placed in two nibbles


def _pack_times_8(codes):
    codes = np.asarray(codes, dtype=np.uint8)  # (n,)
    return (codes[0::2] << 3) | codes[1::2]  # (n/2,) shifted by 3 bits, not 4


def _pack_cases():
    rng = np.random.default_rng(11)
    return [(np.array([1, 2, 15, 0], dtype=np.uint8),),
            (rng.integers(0, 16, 16).astype(np.uint8),),
            (rng.integers(0, 16, 64).astype(np.uint8),)]


# ----------------------------------------------------------------- 07.dq_bits
# The 512 x 128 up-projection of a block, blocksize 64, double quantization (second-level blocks of 256):
_N = 512 * 128
_BLOCKS = _N // 64  # 1024 first-level constants, 8 bits each
_BLOCKS2 = -(-_BLOCKS // 256)  # 4 second-level float32 constants
_DQ_BITS = (4 * _N + 8 * _BLOCKS + 32 * _BLOCKS2 + 32) / _N  # + one float32 offset: 4.12744140625
_NO_ABSMAX2 = (4 * _N + 8 * _BLOCKS + 32) / _N
_FIRST_256 = (4 * _N + 8 * (_N // 256) + 32 * -(-(_N // 256) // 256) + 32) / _N
_NO_OFFSET = (4 * _N + 8 * _BLOCKS + 32 * _BLOCKS2) / _N


EXERCISES = [
    Exercise(
        id="07.nf4_code",
        title="the NF4 code lookup",
        task=("write nf4_codes(block): the NF4 code (0..15) of each value of a 1-D block: the index of the level of "
              "quant.NF4_CODE nearest to x / absmax, absmax = max |x| over the block; a value exactly halfway "
              "between two levels takes the lower one"),
        reference=_nf4_codes,
        cases=_nf4_cases,
        relations=(
            Relation("levels, not codes", lambda want, args: NF4_CODE[np.asarray(want, dtype=np.int64)],
                     "your result holds the levels themselves (values in [-1, 1]); the task asks for their codes, "
                     "the positions 0..15 in the table"),
            Relation("dequantized values", lambda want, args: NF4_CODE[np.asarray(want, dtype=np.int64)]
                     * np.abs(args[0]).max(),
                     "your result holds the dequantized values (level times absmax); the task asks for the codes, "
                     "the positions 0..15 in the table"),
        ),
        mistakes=(
            Mistake("max instead of absmax", _codes_max_not_absmax,
                    "the block is divided by max(x), not by the absmax max(|x|): a block whose largest magnitude "
                    "is negative then leaves [-1, 1]"),
            Mistake("not scaled", _codes_unscaled,
                    "the block was not divided by its absmax: the levels lie in [-1, 1], and a block of other "
                    "magnitudes lands on the wrong ones"),
            Mistake("divided by the mean", _codes_mean,
                    "the block is divided by the mean |x|; QLoRA's constant is the absmax max(|x|), which maps "
                    "the block exactly into [-1, 1]"),
            Mistake("ties rounded up", _codes_ties_up,
                    "a value exactly halfway between two levels went to the upper level; the rule (bitsandbytes', "
                    "and quant's) sends it to the lower one: count the midpoints strictly below x / absmax"),
        ),
    ),
    Exercise(
        id="07.pack_nibbles",
        title="two 4-bit codes per byte",
        task=("write pack(codes): (n,) uint8 codes < 16, n even -> (n/2,) uint8 bytes; byte k holds code 2k in its "
              "high nibble (bits 7-4) and code 2k + 1 in its low nibble (bits 3-0)"),
        reference=pack_nibbles,
        cases=_pack_cases,
        mistakes=(
            Mistake("nibbles in the wrong order", _pack_wrong_order,
                    "the nibbles are in the wrong order: in each byte the two codes of a pair sit in each other's "
                    "place"),
            Mistake("added", _pack_added,
                    "the two codes are added: a sum of two codes cannot be taken apart again; each code needs its "
                    "own four bits of the byte"),
            Mistake("shift by 3", _pack_times_8,
                    "the high code was shifted by 3 bits: a nibble is 4 bits wide, so the high code overlaps the "
                    "low one"),
            Mistake("one code per byte", lambda codes: np.asarray(codes, dtype=np.uint8)[0::2] << 4,
                    "only one code per byte: the second code of each pair is missing from the low nibble"),
            Mistake("halves paired", _pack_halves,
                    "codes k and k + n/2 share a byte: the task pairs neighbours, not the two halves"),
        ),
    ),
    Exercise(
        id="07.dq_bits",
        title="the bits of double quantization",
        task=("the bits per weight of the 512 x 128 fc matrix in NF4, blocksize 64, double quantization: 4-bit "
              "codes, 8-bit block constants, one float32 scale per 256 constants, one float32 offset (their mean) "
              "for the matrix; count every stored bit and divide by 512 * 128"),
        reference=_DQ_BITS,
        rtol=1e-9,
        min_decimals=3,
        factors={"64 (the blocksize)": 64.0, "256": 256.0, "512 * 128": float(_N)},
        mistakes=(
            Mistake("second-level scale forgotten", _NO_ABSMAX2,
                    "the second-level scales are missing: the 8-bit constants need float32 scales of their own"),
            Mistake("blocksize 256 for the first level", _FIRST_256,
                    "the weights' blocks are 64 long; 256 is the block size of the second level (the constants)"),
            Mistake("no double quantization", (4 * _N + 32 * _BLOCKS) / _N,
                    "that counts float32 block constants, QLoRA without double quantization; the task's constants "
                    "are 8-bit"),
            Mistake("offset forgotten", _NO_OFFSET,
                    "the offset is missing: the constants are centred on their mean before the 8-bit "
                    "quantization, and that mean is stored too (one float32 per matrix)"),
        ),
    ),
]
