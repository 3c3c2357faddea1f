"""Faster forms of a few operations of ``functional.py``, for large arrays on the CPU (a reader may skip this file).

Nothing here is needed to understand LoRA, QLoRA or QA-LoRA: each function computes what a plain
function of ``functional.py`` computes, and that plain form is what runs at the sizes of the
notebooks and the demo. These forms take over only above a size threshold (measured at GPT-2
small, 124M parameters, float32 on two cores), and only on NumPy arrays; on CuPy the plain form
always runs (a GPU parallelizes it already). The tests check each one against the plain form.

Two tricks, both standard in production kernels:

- **element-wise work on two threads** (``elementwise``): NumPy runs an element-wise operation on
  one core, but it releases Python's global lock inside the loop, so two threads that each take
  cache-sized pieces use both cores. The plain function itself runs on each piece (GELU's is written
  in place, so a piece allocates one array), so the numbers are the same, bit for bit.
- **causal attention by query blocks** (``causal_attention_heads``, ``causal_attention_heads_backward``):
  position t attends to positions 0..t only, so the scores above the diagonal are -inf and their
  probabilities 0. Cut the queries into blocks of ``ATTENTION_BLOCK`` rows; block [s, e) needs the
  keys 0..e-1 only. At T = 1,024 that skips 3/8 of the matrix products and of the exponentials
  (the idea of FlashAttention's causal tiling, Dao et al., 2022, without its fused kernel); the
  softmax of each block runs head by head on two threads. Each softmax row is summed over the
  positions it can see rather than over all T, so the numbers agree with the plain form to
  rounding (float32: about 1e-7 relative), not bit for bit.

Where the thresholds come from: on two cores, two threads pay only for arrays of a few hundred
thousand values (below that, starting a thread costs more than it saves); blocks of 256 queries
were faster than blocks of 128 or 64 at T = 512 and 1,024 (fewer, larger matrix products), and at
T = 256 one block is the whole matrix, so the plain form runs there. On cores that other programs
keep busy a second thread gains nothing and can wait on a descheduled partner: ``LFS_THREADS=1``
keeps everything on the calling thread (the same numbers).
"""

from __future__ import annotations

import itertools
import os
import threading
from functools import partial

from .backend import xp_of


def _threads_from_env() -> int:
    """``LFS_THREADS`` (a positive integer; 2 when unset): how many threads share the work here."""
    value = os.environ.get("LFS_THREADS", "2").strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LFS_THREADS must be a positive integer (the threads fast.py may use), got {value!r}")
    return int(value)


THREADS = _threads_from_env()  # the calling thread and THREADS - 1 more (LFS_THREADS=1 on a busy machine)
# values from which GELU runs in pieces on two threads: it pays from about 2^18, but the classroom's sizes
# (the demo's largest, 32 x 32 x 512 = 2^19) run the plain form; GPT-2 small's 4 x 128 x 3,072 take this one
ELEMENTWISE_MIN = 1 << 20
ELEMENTWISE_CHUNK = 1 << 14  # values per piece: a few arrays of it stay in a core's cache
ATTENTION_MIN_T = 512  # sequence length from which the blocked causal attention is faster (two blocks or more)
ATTENTION_BLOCK = 256  # query positions per block (128 measured slower at T = 512 and 1,024: more, smaller products)


def run_threads(task, n: int) -> None:
    """Call ``task(i)`` for every i in range(n) on ``THREADS`` threads (the caller's included).

    Each thread takes the next i not yet taken, so a thread slowed by other work on its core
    simply does fewer. An exception in any thread is raised here after all have stopped.
    """
    todo = itertools.count()  # next() on it is atomic under the global lock
    errors = []

    def worker():
        try:
            for i in iter(lambda: next(todo), None):
                if i >= n:
                    return
                task(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(e)

    helpers = [threading.Thread(target=worker) for _ in range(min(THREADS, n) - 1)]
    for h in helpers:
        h.start()
    worker()
    for h in helpers:
        h.join()
    if errors:
        raise errors[0]


def elementwise(fn, *arrays):
    """``fn(*arrays)`` for an element-wise ``fn``, computed in cache-sized pieces on two threads.

    The arrays have one shape (if not, ``fn`` runs on them whole); ``fn`` takes pieces of them and
    returns one array of that shape, each element computed from the same elements of the inputs
    alone (GELU, its derivative). The pieces are flat runs of ``ELEMENTWISE_CHUNK`` values: every
    temporary ``fn`` makes stays in a core's cache, and the result is ``fn(*arrays)``, bit for bit.
    """
    np = xp_of(*arrays)  # NumPy: only host arrays come here
    if any(a.shape != arrays[0].shape for a in arrays):  # broadcasting: no pieces to cut alike
        return fn(*arrays)
    flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]  # (n,) each, views when contiguous
    n, step = flat[0].size, ELEMENTWISE_CHUNK
    first = fn(*(a[:step] for a in flat))  # (step,): the first piece also gives the result's dtype
    out = np.empty(n, dtype=first.dtype)  # (n,)
    out[:step] = first

    def piece(i):
        s = (i + 1) * step
        out[s : s + step] = fn(*(a[s : s + step] for a in flat))  # (step,)

    run_threads(piece, -(-n // step) - 1)
    return out.reshape(arrays[0].shape)  # (n,) -> the arrays' shape


def _each_head(fn, *arrays) -> None:
    """``fn`` on every head's slice ``a[b, h]`` of the (B, H, ...) ``arrays``, the heads shared by two threads."""
    B, H = arrays[0].shape[:2]
    run_threads(lambda i: fn(*(a[i // H, i % H] for a in arrays)), B * H)


def _masked_softmax(scores, s: int, mask) -> None:
    """The causal softmax of one head's block of queries s.. (n, e), in place (as functional.softmax_forward).

    The keys s..e-1 are the diagonal block, masked by ``mask`` (-inf above its diagonal).
    """
    np = xp_of(scores)  # NumPy
    n = scores.shape[0]
    scores[:, s:] += mask[:n, :n]  # (n, n): position t sees only positions <= t
    scores -= scores.max(axis=-1, keepdims=True)  # (n, e), every row's max is now 0
    np.exp(scores, out=scores)  # (n, e)
    scores /= scores.sum(axis=-1, keepdims=True)  # (n, e) rows sum to 1


def _softmax_backward_rows(dp, p) -> None:
    """d(scores) = p (dp - sum(dp p)) of one head's block, in place over dp (as functional.softmax_backward)."""
    dp -= (dp * p).sum(axis=-1, keepdims=True)  # (n, e)
    dp *= p  # (n, e)


def causal_attention_heads(qs, kt, vh):
    """softmax(qs kt + causal mask) vh, the query positions in blocks: ``(yh, probs)``.

    qs (B, H, T, hs) are the queries already multiplied by 1/sqrt(hs); kt (B, H, hs, T) the keys,
    transposed; vh (B, H, T, hs) the values. Returns yh (B, H, T, hs) and the probabilities
    (B, H, T, T), zero above the diagonal, as ``functional.causal_attention_forward`` computes them.
    """
    np = xp_of(qs)  # NumPy: only host arrays come here
    B, H, T, hs = qs.shape
    probs = np.zeros((B, H, T, T), dtype=qs.dtype)  # (B, H, T, T); the part above the diagonal is never written
    yh = np.empty_like(qs)  # (B, H, T, hs)
    n = ATTENTION_BLOCK
    mask = np.triu(np.full((n, n), -np.inf, dtype=qs.dtype), k=1)  # (n, n): -inf above the diagonal
    for s in range(0, T, n):
        e = min(T, s + n)
        scores = probs[:, :, s:e, :e]  # (B, H, e - s, e), a view: queries s..e-1, the keys they can see
        np.matmul(qs[:, :, s:e], kt[..., :e], out=scores)  # (B, H, e - s, hs) @ (B, H, hs, e)
        _each_head(partial(_masked_softmax, s=s, mask=mask), scores)  # (B, H, e - s, e) probabilities, in place
        np.matmul(scores, vh[:, :, :e], out=yh[:, :, s:e])  # (B, H, e - s, e) @ (B, H, e, hs)
    return yh, probs


def causal_attention_heads_backward(dyh, qh, kh, vt, probs, scale: float):
    """The gradients of ``causal_attention_heads`` by query blocks: ``(dqh, dkh, dvh)``, each (B, H, T, hs).

    dyh (B, H, T, hs) is the upstream gradient, qh and kh the unscaled queries and keys, vt the
    values transposed (B, H, hs, T), probs the forward's (B, H, T, T) and scale 1/sqrt(hs).
    Per block of queries [s, e) only the keys 0..e-1 take part, as in the forward.
    """
    np = xp_of(dyh)  # NumPy: only host arrays come here
    B, H, T, hs = qh.shape
    dqh = np.empty_like(qh)  # (B, H, T, hs)
    dkh = np.zeros_like(kh)  # (B, H, T, hs), summed over the blocks of queries
    dvh = np.zeros_like(kh)  # (B, H, T, hs), summed over the blocks of queries
    n = ATTENTION_BLOCK
    buf = np.empty((B, H, n, T), dtype=qh.dtype)  # (B, H, n, T) scratch for d(probs) of one block
    for s in range(0, T, n):
        e = min(T, s + n)
        p = probs[:, :, s:e, :e]  # (B, H, e - s, e)
        dy = dyh[:, :, s:e]  # (B, H, e - s, hs)
        dvh[:, :, :e] += p.transpose(0, 1, 3, 2) @ dy  # (B, H, e, e - s) @ (B, H, e - s, hs)
        dp = buf[:, :, : e - s, :e]  # (B, H, e - s, e)
        np.matmul(dy, vt[..., :e], out=dp)  # (B, H, e - s, hs) @ (B, H, hs, e)
        _each_head(_softmax_backward_rows, dp, p)  # (B, H, e - s, e): d(scores), in place
        np.matmul(dp, kh[:, :, :e], out=dqh[:, :, s:e])  # (B, H, e - s, e) @ (B, H, e, hs)
        dkh[:, :, :e] += dp.transpose(0, 1, 3, 2) @ qh[:, :, s:e]  # (B, H, e, e - s) @ (B, H, e - s, hs)
    dqh *= scale  # (B, H, T, hs)
    dkh *= scale  # (B, H, T, hs)
    return dqh, dkh, dvh
