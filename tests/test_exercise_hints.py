"""Each exercise answered with its typical mistakes: every one gets a specific hint, and no hint gives the answer away.

A "specific hint" names the mistake (a factor, a transposition, an axis, an input changed in place, ...)
instead of the generic "does not match". The mistakes here are the ones students make, written as a
student would write them; most are not on the exercise's own list (``Exercise.mistakes``) and are named
by the checker's diagnosis of properties (shape, a constant factor, off by one, integer division, ...).
No hint may contain the expected value or a line of the solution's code (from the teacher's notebook).
"""

import json
import math
import re

import numpy as np
import pytest

from lora_from_scratch.exercises import ExerciseError, check, get
from lora_from_scratch.exercises import students as st
from lora_from_scratch.quant import NF4_CODE

svd = np.linalg.svd


def _vt(A):
    return svd(A, full_matrices=False)[2]  # (r, k)


# ----------------------------------------------------------------- 02
def _phi(A1, A2, i, j, f=lambda V1, V2, i, j: np.sum((V1[:i] @ V2[:j].T) ** 2) / min(i, j)):
    return float(f(_vt(A1), _vt(A2), i, j))


def _err(f):
    return lambda W, r: float(f(svd(W, compute_uv=False), r))


# ----------------------------------------------------------------- 03
def _bw(dA, dB):
    def backward(x, dy, A, B, s):
        return dA(x, dy, A, B, s), dB(x, dy, A, B, s)
    return backward


def _dA(x, dy, A, B, s):
    return (s * dy @ B).T @ x  # (r, k)


def _dB(x, dy, A, B, s):
    return s * dy.T @ (x @ A.T)  # (d, r)


def _merge_in_place(W0, A, B, alpha):
    W0 += (alpha / A.shape[0]) * (B @ A)
    return W0


# ----------------------------------------------------------------- 04
def _init(fa, fb):
    return lambda d, k, r, rng: (fa(d, k, r, rng), fb(d, k, r))


def _pissa(fa=None, fb=None, fres=None, top=slice(None)):
    def pissa(W, r, s):
        U, S, Vt = svd(W, full_matrices=False)
        root = np.sqrt(S[:r] / s)
        A = root[:, None] * Vt[:r] if fa is None else fa(U, S, Vt, r, s)
        B = U[:, :r] * root if fb is None else fb(U, S, Vt, r, s)
        return A, B, (W - s * B @ A) if fres is None else fres(W, A, B, s)
    return pissa


# ----------------------------------------------------------------- 07
def _codes(scale=lambda b: np.abs(b).max(), levels=None, axis=1):
    def nf4_codes(block):
        v = block / scale(block)
        d = np.abs(v[:, None] - NF4_CODE[None, :])
        return d.argmin(axis=axis) if levels is None else levels(d)
    return nf4_codes


# ----------------------------------------------------------------- 08
def _bytes(codes=lambda n: n // 2, consts=lambda n: -(-n // 64), scales=lambda b: 4 * -(-b // 256), offset=4,
           bias_bytes=4, adapter_bytes=4):
    def layer_bytes(out_features, in_features, r, bias=True):
        n = out_features * in_features
        blocks = consts(n)
        return (codes(n) + blocks + scales(blocks) + offset + bias_bytes * out_features * bias
                + adapter_bytes * r * (in_features + out_features))
    return layer_bytes


# ----------------------------------------------------------------- 09
def _zeros(f):
    return lambda zeros, scales, A, B, alpha, group_size: f(zeros, scales, A, B, alpha, A.shape[0], group_size)


def _zeros_in_place(zeros, scales, A, B, alpha, group_size):
    zeros -= (alpha / A.shape[0]) * (B @ A) / (group_size * scales)
    return zeros


SHAPES9 = [(128, 128)] * 4 + [(512, 128), (128, 512)]

# exercise id -> [(what the student did, answer, the hint must match this regex)]
MISTAKES = {
    "02.update_rank": [
        ("min(d, k) for B A", (128, 128), r"columns of B"),
        ("r for both", (8, 8), r"not low rank"),
        ("ranks added", (8, 136), r"upper bound"),
        ("d for the merged", (8, 512), r"more independent rows"),
        ("swapped", (128, 8), r"wrong order"),
        ("off by one", (8, 127), r"off by one"),
        ("one number", 8, r"tuple of 2"),
    ],
    "02.approx_error": [
        ("kept values", _err(lambda s, r: np.sum(s[:r])), r"kept"),
        ("not squared", _err(lambda s, r: np.sum(s[r:])), r"not squared"),
        ("no root", _err(lambda s, r: np.sum(s[r:] ** 2)), r"square root"),
        ("spectral", _err(lambda s, r: s[r]), r"spectral"),
        ("s[r+1:]", _err(lambda s, r: np.sqrt(np.sum(s[r + 1:] ** 2))), r"off by one.*r \+ 1"),
        ("s[r-1:]", _err(lambda s, r: np.sqrt(np.sum(s[r - 1:] ** 2))), r"off by one.*r - 1"),
        ("r**1/2", _err(lambda s, r: np.sum(s[r:] ** 2) ** 1 / 2), r"."),  # named below: not proportional
        ("kept, squared", _err(lambda s, r: np.sqrt(np.sum(s[:r] ** 2))), r"."),
        ("halved", _err(lambda s, r: np.sqrt(np.sum(s[r:] ** 2)) / 2), r"divided by 2"),
    ],
    "02.subspace_similarity": [
        ("left vectors", lambda A1, A2, i, j: float(np.sum((svd(A1)[0][:, :i].T @ svd(A2)[0][:, :j]) ** 2)
                                                    / min(i, j)), r"left-singular"),
        ("not squared", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.linalg.norm(
            V1[:i] @ V2[:j].T) / min(i, j)), r"not squared"),
        ("max", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.sum((V1[:i] @ V2[:j].T) ** 2)
                                          / max(i, j)), r"max\(i, j\)"),
        ("no division", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.sum(
            (V1[:i] @ V2[:j].T) ** 2)), r"not normalized"),
        ("columns of Vt", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.sum(
            (V1[:, :i].T @ V2[:, :j]) ** 2) / min(i, j)), r"columns of Vt"),
        ("i+1 vectors", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.sum(
            (V1[:i + 1] @ V2[:j].T) ** 2) / min(i, j)), r"."),
        ("divided by i", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.sum(
            (V1[:i] @ V2[:j].T) ** 2) / i), r"."),
    ],
    "03.adapter_backward": [
        ("dA transposed", _bw(lambda x, dy, A, B, s: _dA(x, dy, A, B, s).T, _dB), r"dA.*transposed"),
        ("no s", _bw(lambda *a: _dA(*a) / a[4], lambda *a: _dB(*a) / a[4]), r"scaling s"),
        ("dB without s", _bw(_dA, lambda *a: _dB(*a) / a[4]), r"dB misses the scaling"),
        ("dA without s", _bw(lambda *a: _dA(*a) / a[4], _dB), r"dA: .*divided by s"),
        ("swapped", lambda *a: _bw(_dA, _dB)(*a)[::-1], r"wrong order"),
        ("dA with s twice", _bw(lambda *a: _dA(*a) * a[4], _dB), r"dA: .*s times"),
        ("dB sign", _bw(_dA, lambda *a: -_dB(*a)), r"dB: .*sign"),
        ("dB averaged over N", _bw(_dA, lambda *a: _dB(*a) / a[0].shape[0]), r"dB: .*divided by N"),
        ("dB transposed", _bw(_dA, lambda *a: _dB(*a).T), r"dB: .*transpose"),
    ],
    "03.trainable_parameters": [
        ("r d k", (4 * 128 * 128, 4 * 128 * 128, 4 * 512 * 128, 4 * 4 * (2 * 128 * 128 + 512 * 128)), r"r \* d \* k"),
        ("A only", (512, 512, 512, 4 * 1536), r"A only"),
        ("B only", (512, 512, 2048, 4 * 3072), r"B only"),
        ("fc as 128x128", (1024, 1024, 1024, 4 * 3072), r"square"),
        ("one block", (1024, 1024, 2560, 4608), r"one block"),
        ("d k", (128 * 128, 128 * 128, 512 * 128, 4 * (2 * 128 * 128 + 512 * 128)), r"size of W0"),
        ("r = 8 read for r = 4", (2048, 2048, 5120, 36864), r"2 times"),
        ("total for 3 blocks", (1024, 1024, 2560, 3 * 4608), r"the total: "),
        ("total missing", (1024, 1024, 2560), r"tuple of 4"),
    ],
    "03.merged_weight": [
        ("alpha", lambda W0, A, B, alpha: W0 + alpha * B @ A, r"alpha alone"),
        ("no scaling", lambda W0, A, B, alpha: W0 + B @ A, r"not scaled"),
        ("A^T B^T", lambda W0, A, B, alpha: W0 + alpha / A.shape[0] * A.T @ B.T, r"transposed"),
        ("minus", lambda W0, A, B, alpha: W0 - alpha / A.shape[0] * B @ A, r"subtracted"),
        ("in place", _merge_in_place, r"changed its input W0 in place"),
        ("r / alpha", lambda W0, A, B, alpha: W0 + A.shape[0] / alpha * B @ A, r"."),
        ("alpha / sqrt(r)", lambda W0, A, B, alpha: W0 + alpha / np.sqrt(A.shape[0]) * B @ A, r"sqrt\(r\) times"),
        ("the update only", lambda W0, A, B, alpha: alpha / A.shape[0] * B @ A, r"."),
        ("alpha // r", lambda W0, A, B, alpha: W0 + (alpha // A.shape[0]) * B @ A, r"integer division"),
    ],
    "04.nonzero_gradients": [
        ("A and B", 8 * (128 + 512), r"not every adapter number"),
        ("A", 8 * 512, r"other factor"),
        ("none", 0, r"not none"),
        ("W0", 128 * 512, r"W0 is frozen"),
        ("B of fc (d, k swapped)", 512 * 8, r"other factor"),
        ("r", 8, r"divided by d"),
        ("B minus one", 128 * 8 - 1, r"off by one"),
    ],
    "04.gaussian_init": [
        ("B random", _init(lambda d, k, r, rng: rng.standard_normal((r, k)) / r,
                           lambda d, k, r: np.random.default_rng(5).standard_normal((d, r))), r"B is not zero"),
        ("A zero", _init(lambda d, k, r, rng: np.zeros((r, k)), lambda d, k, r: np.zeros((d, r))), r"A zero"),
        ("std 1/sqrt(r)", _init(lambda d, k, r, rng: rng.standard_normal((r, k)) / np.sqrt(r),
                                lambda d, k, r: np.zeros((d, r))), r"sqrt\(r\)"),
        ("A (k, r)", _init(lambda d, k, r, rng: rng.standard_normal((k, r)) / r, lambda d, k, r: np.zeros((d, r))),
         r"A.*transposed"),
        ("std 1", _init(lambda d, k, r, rng: rng.standard_normal((r, k)), lambda d, k, r: np.zeros((d, r))),
         r"A: .*r times"),
        ("variance 1/r", _init(lambda d, k, r, rng: rng.standard_normal((r, k)) * r, lambda d, k, r: np.zeros((d, r))),
         r"A: .*r squared"),
        ("B (r, d)", _init(lambda d, k, r, rng: rng.standard_normal((r, k)) / r, lambda d, k, r: np.zeros((r, d))),
         r"B: .*transpose"),
        ("swapped", lambda d, k, r, rng: (np.zeros((d, r)), rng.standard_normal((r, k)) / r), r"wrong order"),
    ],
    "04.pissa_factors": [
        ("no s", _pissa(fa=lambda U, S, Vt, r, s: np.sqrt(S[:r])[:, None] * Vt[:r],
                        fb=lambda U, S, Vt, r, s: U[:, :r] * np.sqrt(S[:r])), r"forgets s"),
        ("bottom r", _pissa(fa=lambda U, S, Vt, r, s: np.sqrt(S[-r:] / s)[:, None] * Vt[-r:],
                            fb=lambda U, S, Vt, r, s: U[:, -r:] * np.sqrt(S[-r:] / s)), r"bottom"),
        ("one factor", _pissa(fa=lambda U, S, Vt, r, s: Vt[:r], fb=lambda U, S, Vt, r, s: U[:, :r] * S[:r] / s),
         r"one factor"),
        ("no residual", _pissa(fres=lambda W, A, B, s: W), r"W itself"),
        ("residual plus", _pissa(fres=lambda W, A, B, s: W + s * B @ A), r"W_res: "),
        ("A without the root", _pissa(fa=lambda U, S, Vt, r, s: (S[:r] / s)[:, None] * Vt[:r]), r"A: "),
        ("residual without s", _pissa(fres=lambda W, A, B, s: W - B @ A), r"W_res: "),
    ],
    "05.scaling": [
        ("alpha", lambda r, alpha, rslora=False: alpha, r"alpha alone"),
        ("always sqrt", lambda r, alpha, rslora=False: alpha / math.sqrt(r), r"rsLoRA's factor also"),
        ("never sqrt", lambda r, alpha, rslora=False: alpha / r, r"LoRA's factor also"),
        ("inverted", lambda r, alpha, rslora=False: (math.sqrt(r) if rslora else r) / alpha, r"upside down"),
        ("r**1/2", lambda r, alpha, rslora=False: alpha / r ** 1 / 2 if rslora else alpha / r, r"binds tighter"),
        ("r**1/2 written alpha / (r**1/2)",
         lambda r, alpha, rslora=False: alpha / (r ** 1 / 2) if rslora else alpha / r, r"binds tighter"),
        ("swapped", lambda r, alpha, rslora=False: alpha / r if rslora else alpha / math.sqrt(r), r"."),
        ("integer division", lambda r, alpha, rslora=False: alpha / math.sqrt(r) if rslora else alpha // r,
         r"integer division"),
    ],
    "05.doubling": [
        ("grows like r", (1.0, math.sqrt(2), 2.0), r"grows like r"),
        ("constant", (0.5, 1 / math.sqrt(2), 1.0), r"does not change"),
        ("swapped ends", (math.sqrt(2), 1.0, 1 / math.sqrt(2)), r"wrong order"),
        ("all 1", (1.0, 1.0, 1.0), r"."),
        ("halves", (0.5, 1.0, 2.0), r"."),
        ("too few", (0.71, 1.41), r"tuple of 3"),
    ],
    "05.rslora_alpha": [
        ("s r", 64.0, r"LoRA's factor"),
        ("same alpha", 16.0, r"the same alpha"),
        ("s / sqrt(r)", 2 / math.sqrt(32), r"upside down"),
        ("r**1/2", 2 * 32 ** 1 / 2, r"binds tighter"),
        ("sqrt(r) alone", math.sqrt(32), r"divided by 2"),
        ("integer", 11, r"integer division"),
        ("rounded to 1 decimal", 11.3, r"."),
    ],
    "06.budget_rank": [
        ("budget / d", lambda b, shapes, n: b / shapes[0][1], r"one width"),
        ("only A", lambda b, shapes, n: b / (n * sum(i for _, i in shapes)), r"only A"),
        ("one matrix", lambda b, shapes, n: b / (n * sum(shapes[0])), r"first matrix"),
        ("no n_layer", lambda b, shapes, n: b / sum(o + i for o, i in shapes), r"n_layer times"),
        ("integer division", lambda b, shapes, n: b // (n * sum(o + i for o, i in shapes)), r"integer division"),
        ("halved", lambda b, shapes, n: b / (2 * n * sum(o + i for o, i in shapes)), r"divided by 2"),
        ("r d k", lambda b, shapes, n: b / (n * sum(o * i for o, i in shapes)), r"."),
    ],
    "06.subspace_similarity": [
        ("left vectors", lambda A1, A2, i, j: float(np.sum((svd(A1)[0][:, :i].T @ svd(A2)[0][:, :j]) ** 2)
                                                    / min(i, j)), r"left-singular"),
        ("columns of Vt", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.sum(
            (V1[:, :i].T @ V2[:, :j]) ** 2) / min(i, j)), r"columns of Vt"),
        ("no division", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.sum(
            (V1[:i] @ V2[:j].T) ** 2)), r"not normalized"),
        ("not squared", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.linalg.norm(
            V1[:i] @ V2[:j].T) / min(i, j)), r"not squared"),
        ("max", lambda A1, A2, i, j: _phi(A1, A2, i, j, lambda V1, V2, i, j: np.sum((V1[:i] @ V2[:j].T) ** 2)
                                          / max(i, j)), r"max\(i, j\)"),
    ],
    "06.amplification": [
        ("over ||W||", lambda W, dW, r: float(np.linalg.norm(dW) / np.linalg.norm(W)), r"all of W"),
        ("W's own directions", lambda W, dW, r: float(np.linalg.norm(dW) / np.linalg.norm(
            svd(W)[0][:, :r].T @ W @ svd(W)[2][:r].T)), r"W's own SVD"),
        ("columns of Vt", lambda W, dW, r: float(np.linalg.norm(dW) / np.linalg.norm(
            svd(dW)[0][:, :r].T @ W @ svd(dW)[2][:, :r])), r"columns of Vt"),
        ("inverted", lambda W, dW, r: float(np.linalg.norm(svd(dW)[0][:, :r].T @ W @ svd(dW)[2][:r].T)
                                            / np.linalg.norm(dW)), r"."),
        ("squared norms", lambda W, dW, r: float(np.linalg.norm(dW) ** 2 / np.linalg.norm(
            svd(dW)[0][:, :r].T @ W @ svd(dW)[2][:r].T) ** 2), r"."),
        ("divided by r", lambda W, dW, r: float(np.linalg.norm(dW) / np.linalg.norm(
            svd(dW)[0][:, :r].T @ W @ svd(dW)[2][:r].T)) / r, r"divided by r"),
    ],
    "07.nf4_code": [
        ("max, not absmax", _codes(scale=lambda b: b.max()), r"max\(x\)"),
        ("mean", _codes(scale=lambda b: np.abs(b).mean()), r"mean"),
        ("ties up", lambda b: np.searchsorted((NF4_CODE[1:] + NF4_CODE[:-1]) / 2, b / np.abs(b).max(), side="right"),
         r"halfway"),
        ("levels, not codes", _codes(levels=lambda d: NF4_CODE[d.argmin(axis=1)]), r"levels themselves"),
        ("dequantized", lambda b: NF4_CODE[_codes()(b)] * np.abs(b).max(), r"dequantized"),
        ("wrong axis", _codes(axis=0), r"shape"),
        ("no scaling", _codes(scale=lambda b: 1.0), r"."),
    ],
    "07.pack_nibbles": [
        ("wrong order", lambda c: (c[1::2] << 4) | c[0::2], r"wrong order"),
        ("halves", lambda c: (c[: c.size // 2] << 4) | c[c.size // 2:], r"two halves"),
        ("added", lambda c: c[0::2] + c[1::2], r"added"),
        ("shift 3", lambda c: (c[0::2] << 3) | c[1::2], r"3 bits"),
        ("not packed", lambda c: c, r"shape"),
        ("high nibble only", lambda c: c[0::2] << 4, r"one code per byte"),
    ],
    "07.dq_bits": [
        ("no second level", (4 * 65536 + 8 * 1024 + 32) / 65536, r"second-level"),
        ("first level 256", (4 * 65536 + 8 * 256 + 32 + 32) / 65536, r"256 is the block size"),
        ("no offset", (4 * 65536 + 8 * 1024 + 32 * 4) / 65536, r"offset"),
        ("bytes", (4 * 65536 + 8 * 1024 + 32 * 4 + 32) / 65536 / 8, r"bytes where bits"),
        ("total bits", 4 * 65536 + 8 * 1024 + 32 * 4 + 32, r"512 \* 128 times"),
        ("no DQ", 4.5, r"."),
        ("integer division", (4 * 65536 + 8 * 1024 + 32 * 4 + 32) // 65536, r"integer division"),
    ],
    "08.layer_bytes": [
        ("W0 float32", _bytes(codes=lambda n: 4 * n, consts=lambda n: 0, scales=lambda b: 0, offset=0),
         r"float32"),
        ("no bias", _bytes(bias_bytes=0), r"bias"),
        ("no adapters", _bytes(adapter_bytes=0), r"adapters"),
        ("float32 constants", _bytes(consts=lambda n: 4 * -(-n // 64), scales=lambda b: 0, offset=0),
         r"float32"),
        ("scales rounded down", _bytes(scales=lambda b: 4 * (b // 256)), r"rounded down"),
        ("a byte per code", _bytes(codes=lambda n: n), r"two codes share a byte"),
        ("bits", lambda *a, **k: 8 * _bytes()(*a, **k), r"bits where bytes"),
        ("adapters in float16", _bytes(adapter_bytes=2), r"."),
    ],
    "08.dequantizations": [
        ("forward only", 24 * (3 + 5), r"only the forwards"),
        ("kept once", 24, r"one dequantization per layer"),
        ("one layer", 2 * 3 + 5, r"count of one layer"),
        ("no evaluation", 24 * 2 * 3, r"."),
        ("a merge counted too", 24 * (2 * 3 + 5) + 24, r"off by exactly 24"),
    ],
    "09.zero_merge": [
        ("no 1/group_size", _zeros(lambda z, sc, A, B, alpha, r, gs: z - alpha / r * (B @ A) / sc),
         r"group_size times"),
        ("added", _zeros(lambda z, sc, A, B, alpha, r, gs: z + alpha / r * (B @ A) / (gs * sc)), r"added"),
        ("no scale", _zeros(lambda z, sc, A, B, alpha, r, gs: z - alpha / r * (B @ A) / gs), r"scale was forgotten"),
        ("alpha", _zeros(lambda z, sc, A, B, alpha, r, gs: z - alpha * (B @ A) / (gs * sc)), r"alpha alone"),
        ("in place", _zeros_in_place, r"changed its input zeros in place"),
        ("times the scale", _zeros(lambda z, sc, A, B, alpha, r, gs: z - alpha / r * (B @ A) * sc / gs), r"."),
        ("no scaling", _zeros(lambda z, sc, A, B, alpha, r, gs: z - (B @ A) / (gs * sc)), r"."),
        ("group_size twice", _zeros(lambda z, sc, A, B, alpha, r, gs: z - alpha / r * (B @ A) / (gs * gs * sc)),
         r"divided by group_size"),
    ],
    "09.pool_backward": [
        ("no division", lambda dp, gs: np.repeat(dp, gs, axis=-1), r"not divided by group_size"),
        ("tile", lambda dp, gs: np.tile(dp, (1,) * (dp.ndim - 1) + (gs,)) / gs, r"interleaved"),
        ("divided by L", lambda dp, gs: np.repeat(dp, gs, axis=-1) / dp.shape[-1], r"number of groups"),
        ("axis 0", lambda dp, gs: np.repeat(dp / gs, gs, axis=0), r"wrong axis"),
        ("times group_size", lambda dp, gs: np.repeat(dp * gs, gs, axis=-1), r"group_size squared"),
        ("divided by the row", lambda dp, gs: np.repeat(dp, gs, axis=-1) / (dp.shape[-1] * gs), r"divided by L"),
        ("in place", lambda dp, gs: np.repeat(np.divide(dp, gs, out=dp), gs, axis=-1), r"changed its input dp"),
    ],
    "09.adapter_size": [
        ("LoRA's count", tuple(8 * (i + o) for o, i in SHAPES9), r"LoRA's count"),
        ("A (r, gs)", tuple(8 * (32 + o) for o, i in SHAPES9), r"group_size columns"),
        ("B forgotten", tuple(8 * (i // 32) for o, i in SHAPES9), r"B is missing"),
        ("output side", tuple(8 * (i + o // 32) for o, i in SHAPES9), r"output side"),
        ("all blocks", tuple(4 * 8 * (i // 32 + o) for o, i in SHAPES9), r"for the 4 blocks"),
        ("total only", 4 * sum(8 * (i // 32 + o) for o, i in SHAPES9), r"tuple of 6"),
        ("group size 64", tuple(8 * (i // 64 + o) for o, i in SHAPES9), r"fc: "),
        ("r = 4", tuple(4 * (i // 32 + o) for o, i in SHAPES9), r"divided by 2"),
    ],
}
# The mistakes that must get a hint naming them; those with the pattern "." are counted, and need a hint
# other than the generic "does not match".
GENERIC = "it is none of the typical mistakes"


def _solution_lines() -> dict:
    """Exercise id -> the code lines of its solution in the teacher's notebook (comments removed)."""
    found = {}
    for path in st.teacher_notebooks():
        nb = json.load(open(path))
        cells = nb["cells"]
        for k, cell in enumerate(cells):
            src = "".join(cell["source"])
            if cell["cell_type"] != "code" or st.BEGIN not in src:
                continue
            block = src.split(st.BEGIN)[1].split(st.END)[0]
            lines = []
            for ln in block.splitlines():  # a line, and its expression alone (after return, or after =)
                code = ln.split("#")[0].strip()
                lines += [code, code.removeprefix("return ").strip(), code.split("=", 1)[-1].strip()]
            following = "".join("".join(c["source"]) for c in cells[k:k + 3] if c["cell_type"] == "code")
            for m in re.finditer(r"check\(\s*\"([0-9a-z_.]+)\"", following):
                found.setdefault(m.group(1), sorted({ln for ln in lines if len(ln) >= 10}))
                break
    return found


SOLUTIONS = _solution_lines()


def _numbers(value) -> list:
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in _numbers(v)]
    return [float(value)] if isinstance(value, (int, float, np.integer, np.floating)) else []


def _leaks(ex, message: str) -> list:
    """What in ``message`` gives the answer away: a number of the reference, or a line of the solution."""
    found = [ln for ln in SOLUTIONS.get(ex.id, []) if ln.replace(" ", "") in message.replace(" ", "")]
    if not ex.is_function:
        for v in _numbers(ex.reference):
            forms = {f"{v:g}", f"{v:.2f}", f"{v:.3f}", f"{v:.4f}", f"{v:,.0f}", repr(v)}
            found += [f for f in forms if len(f.replace(".", "").replace(",", "")) >= 3
                      and re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", message)]
    return found


def test_every_exercise_has_typical_mistakes_and_a_solution_found():
    from lora_from_scratch.exercises import exercises

    assert set(MISTAKES) == set(exercises())
    assert set(SOLUTIONS) == set(exercises())
    for ex_id, mistakes in MISTAKES.items():
        assert len(mistakes) >= 5, ex_id


def _message(ex_id, answer) -> str:
    with pytest.raises(ExerciseError) as err:
        check(ex_id, answer, quiet=True)
    return str(err.value)


@pytest.mark.parametrize("ex_id", list(MISTAKES))
def test_typical_mistakes_get_a_specific_hint_and_no_leak(ex_id):
    ex = get(ex_id)
    for what, answer, pattern in MISTAKES[ex_id]:
        message = _message(ex_id, answer)
        assert GENERIC not in message, (ex_id, what, message)
        assert re.search(pattern, message), (ex_id, what, message)
        assert not _leaks(ex, message), (ex_id, what, message, _leaks(ex, message))


def test_the_count_of_typical_mistakes():
    counts = {ex_id: len(m) for ex_id, m in MISTAKES.items()}
    assert sum(counts.values()) >= 150, counts


@pytest.mark.parametrize("ex_id", list(MISTAKES))
def test_a_mistake_list_answer_hint_never_leaks(ex_id):
    ex = get(ex_id)
    for m in ex.mistakes:
        assert not _leaks(ex, m.hint), (ex_id, m.name, _leaks(ex, m.hint))
    assert not _leaks(ex, ex.title), (ex_id, "the title, shown by progress() before the exercise is solved")


# ----------------------------------------------------------------- accepted forms, predictions, progress
@pytest.mark.parametrize("ex_id, answer", [
    ("07.dq_bits", 4.127), ("07.dq_bits", 4.1274), ("07.dq_bits", np.float32(4.12744140625)),
    ("05.doubling", (0.71, 1, 1.41)), ("05.doubling", np.array([2 ** -0.5, 1.0, 2 ** 0.5])),
    ("05.doubling", [0.707, 1.0, 1.414]), ("05.rslora_alpha", 11.314), ("05.rslora_alpha", 11.3137),
    ("05.rslora_alpha", np.float64(2 * np.sqrt(32))), ("03.trainable_parameters", [1024, 1024, 2560, 18432]),
    ("09.adapter_size", np.array([1056, 1056, 1056, 1056, 4128, 1152])),
])
def test_answers_at_the_printed_precision_and_in_any_form_are_accepted(ex_id, answer, capsys):
    check(ex_id, answer)
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("ex_id, answer", [("07.dq_bits", 4.13), ("07.dq_bits", 4.1), ("05.rslora_alpha", 11.31),
                                           ("05.doubling", (0.7, 1, 1.4))])
def test_too_coarse_an_answer_is_named_as_such(ex_id, answer):
    assert "rounded too coarsely" in _message(ex_id, answer)


def test_an_accepted_rslora_alpha_passes_the_next_cells_assert():
    """The cell after 05.rslora_alpha asserts |s(alpha) / s_tuned - 1| < 1e-4 with the student's own alpha."""
    from lora_from_scratch.exercises.nb05 import NEW_R, TUNED_S

    ex = get("05.rslora_alpha")
    for alpha in (11.314, 11.3137, 11.31371, ex.reference):
        assert ex.agrees(alpha, ex.reference)
        assert abs(alpha / math.sqrt(NEW_R) / TUNED_S - 1) < 1e-4
    for alpha in (11.31, 11.32):  # what fails the next cell is refused by the check
        assert not ex.agrees(alpha, ex.reference) and abs(alpha / math.sqrt(NEW_R) / TUNED_S - 1) > 1e-4


def test_a_prediction_is_recorded_verified_and_shown_in_progress(capsys):
    from lora_from_scratch.exercises import predict, progress, reset_progress, verify_prediction

    reset_progress()
    with pytest.raises(ExerciseError, match="no prediction recorded"):
        verify_prediction("06.amplification_side", "above")
    with pytest.raises(ExerciseError, match="must be one of"):
        predict("06.amplification_side", "higher")
    predict("06.amplification_side", "below")
    assert "predicted 'below'" in str(progress("06"))
    with pytest.raises(ExerciseError, match="your prediction was 'below'"):
        verify_prediction("06.amplification_side", "above")
    assert "predicted wrong" in str(progress("06"))
    predict("06.amplification_side", "above")
    verify_prediction("06.amplification_side", "above")
    assert "predicted right" in str(progress("06"))


def test_progress_is_a_table_of_this_sessions_exercises(capsys):
    from lora_from_scratch.exercises import progress, reset_progress

    reset_progress()
    table = progress("03")
    assert [row[0] for row in table] == ["03.adapter_backward", "03.trainable_parameters", "03.merged_weight"]
    assert all(row[2] == "not tried" for row in table)
    with pytest.raises(ExerciseError):
        check("03.merged_weight", lambda W0, A, B, alpha: W0)
    check("03.trainable_parameters", get("03.trainable_parameters").reference)
    status = {row[0]: row[2] for row in progress("03")}
    assert status == {"03.adapter_backward": "not tried", "03.trainable_parameters": "solved",
                      "03.merged_weight": "not yet (1 tries)"}
    text = str(progress())
    assert "1 of 24 done this session" in text
    assert "| 03.trainable_parameters | solved |" in progress()._repr_markdown_()
    reset_progress()
