"""Pure forward/backward pairs for every operation of a GPT-2 style transformer.

Each operation comes as two functions with no hidden state:

    y, cache = op_forward(x, ...)      # cache holds exactly what the backward needs
    dx, ...  = op_backward(dy, cache)  # gradients of a scalar loss w.r.t. every input

This is the "computational graph by hand" view of backpropagation (the chain
rule applied layer by layer, as in cs231n's layers.py). Weights use the paper
orientation of LoRA (Hu et al., 2021, section 4.1): a linear map has
W of shape (out, in) = (d, k) and computes y = x W^T + b.

The GPT-2 specifics implemented here (Radford et al., 2019; the GPT-2 code):
the tanh approximation of GELU, layer norm with eps = 1e-5, and causal
scaled dot-product attention (Vaswani et al., 2017, eq. 1) with the mask
applied before the softmax.

All functions take their array module from their inputs (``xp_of``), so
they run unchanged on NumPy or CuPy arrays.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from . import fast
from .backend import is_cupy_array, scatter_add, xp_of
from .checks import check_int

IGNORE_INDEX = -100
GELU_C = math.sqrt(2.0 / math.pi)  # the constant in GPT-2's tanh approximation of GELU


# --------------------------------------------------------------------- linear
def linear_forward(x, W, b=None):
    """y = x W^T + b for x of shape (..., in), W of shape (out, in), b of shape (out,)."""
    # flattening the leading axes makes this one 2-D matrix product (a single BLAS call)
    y = (x.reshape(-1, x.shape[-1]) @ W.T).reshape(*x.shape[:-1], W.shape[0])  # (..., in) -> (..., out)
    if b is not None:
        y = y + b  # (..., out) + (out,) -> (..., out)
    return y, (x, W, b is not None)


def linear_backward(dy, cache, need_dW=True, need_db=True):
    """Gradients of y = x W^T + b. Returns (dx, dW, db).

    ``need_dW=False`` is how a frozen weight saves work: the (out, in) weight
    gradient, a full matrix multiplication over every token, is never formed.
    That skipped product is where LoRA's compute savings come from.
    """
    x, W, has_bias = cache
    dy2 = dy.reshape(-1, dy.shape[-1])  # (..., out) -> (N, out)
    dx = (dy2 @ W).reshape(*dy.shape[:-1], W.shape[1])  # (N, out) @ (out, in) -> (..., in)
    dW = db = None
    if need_dW:
        x2 = x.reshape(-1, x.shape[-1])  # (..., in) -> (N, in)
        dW = dy2.T @ x2  # (out, N) @ (N, in) -> (out, in)
    if need_db and has_bias:
        db = dy2.sum(axis=0)  # (N, out) -> (out,)
    return dx, dW, db


# ------------------------------------------------------------------ embedding
def check_ids(ids, num_embeddings):
    """Raise ValueError naming an id outside [0, num_embeddings) (the smallest if negative, else the largest).

    CuPy does not raise on out-of-bounds indices (they wrap around), so the
    check must be explicit. It is the one host synchronization of a forward:
    two reductions on the device (min and max) and a single transfer of both.
    Call it once per batch (``GPT.forward`` does); ``embedding_forward`` does
    not call it unless asked, so that no lookup syncs.
    """
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size == 0:
        return
    xp = xp_of(ids)
    lo, hi = xp.stack((ids.min(), ids.max())).tolist()  # (...) -> (2,) -> two Python ints: the one transfer
    if lo < 0:
        raise ValueError(f"token id {lo} is negative; ids must lie in [0, {num_embeddings})")
    if hi >= num_embeddings:
        raise ValueError(f"token id {hi} is out of range for a vocabulary of size {num_embeddings}")


def embedding_forward(ids, W, check=False):
    """Row lookup: out[b, t] = W[ids[b, t]]; ids (B, T) integers, W (V, C).

    No host synchronization: the ids are not range-checked here unless
    ``check=True`` (``check_ids``, one sync). Out-of-range ids raise
    IndexError on NumPy only when too large; negative ones, and on CuPy all of
    them, wrap around silently, so check them once per batch before the lookup.
    """
    if ids.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if check:
        check_ids(ids, W.shape[0])
    out = W[ids]  # (B, T) -> (B, T, C)
    return out, (ids, W.shape)


def embedding_backward(dout, cache):
    """dW[v] = sum of dout over every position whose id is v (a scatter-add)."""
    ids, wshape = cache
    xp = xp_of(dout)
    dW = xp.zeros(wshape, dtype=dout.dtype)  # (V, C)
    scatter_add(dW, ids.reshape(-1), dout.reshape(-1, wshape[1]))  # (B*T, C) summed into (V, C)
    return dW


# ----------------------------------------------------------------- layer norm
def layernorm_forward(x, gamma, beta, eps=1e-5):
    """y = gamma * (x - mean) / sqrt(var + eps) + beta over the last axis (biased variance)."""
    mu = x.mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1)
    xc = x - mu  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1)
    rstd = 1.0 / (var + eps) ** 0.5  # (..., 1)
    xhat = xc * rstd  # (..., C)
    y = xhat * gamma + beta  # (..., C)
    return y, (xhat, rstd, gamma)


def layernorm_backward(dy, cache, need_params=True):
    """Returns (dx, dgamma, dbeta); dgamma and dbeta are None when ``need_params`` is False."""
    xhat, rstd, gamma = cache
    dxhat = dy * gamma  # (..., C)
    C = xhat.shape[-1]
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    m1 = dxhat.mean(axis=-1, keepdims=True)  # (..., 1)
    m2 = (dxhat * xhat).mean(axis=-1, keepdims=True)  # (..., 1)
    dx = rstd * (dxhat - m1 - xhat * m2)  # (..., C)
    dgamma = dbeta = None
    if need_params:
        dgamma = (dy * xhat).reshape(-1, C).sum(axis=0)  # (N, C) -> (C,)
        dbeta = dy.reshape(-1, C).sum(axis=0)  # (N, C) -> (C,)
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------- GELU
def _gelu_tanh(x):
    """t = tanh(sqrt(2/pi) (x + 0.044715 x^3)), the inner term of GELU, in one new array."""
    xp = xp_of(x)
    # in-place steps, so that only t itself is allocated
    t = x * x  # (...) x^2
    t *= GELU_C * 0.044715
    t += GELU_C
    t *= x  # (...) sqrt(2/pi) (x + 0.044715 x^3)
    xp.tanh(t, out=t)  # (...) t = tanh(...)
    return t


def _gelu(x):
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in one new array."""
    y = _gelu_tanh(x)  # (...) t
    y += 1.0
    y *= x
    y *= 0.5  # (...) 0.5 x (1 + t)
    return y


def _gelu_grad(dy, x):
    """dy times d/dx GELU = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2).

    In place, so that at most three (..., 4C) arrays exist at once (t, d and t^2 - 1).
    """
    t = _gelu_tanh(x)  # (...) recomputed from x
    d = x * x  # (...) x^2
    d *= GELU_C * 3 * 0.044715
    d += GELU_C  # (...) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    d *= x
    s = t * t  # (...) t^2
    s -= 1.0
    d *= s  # (...) -x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)
    del s
    d -= t
    d -= 1.0  # (...) -(1 + t) - x (1 - t^2) ...
    d *= -0.5  # (...) the derivative
    d *= dy  # (...) chain rule
    return d


def gelu_forward(x):
    """GPT-2's GELU; the cache is x alone.

    The backward recomputes the tanh (one cheap elementwise pass) instead of keeping a second
    (..., 4C) array per block alive from the forward to the backward.
    """
    if x.size >= fast.ELEMENTWISE_MIN and not is_cupy_array(x):  # a large host array: two cores, same numbers
        return fast.elementwise(_gelu, x), x
    return _gelu(x), x


def gelu_backward(dy, cache):
    """d/dx GELU times the upstream gradient dy (``_gelu_grad``)."""
    if dy.size >= fast.ELEMENTWISE_MIN and not is_cupy_array(dy):  # a large host array: two cores, same numbers
        return fast.elementwise(_gelu_grad, dy, cache)
    return _gelu_grad(dy, cache)


# -------------------------------------------------------------------- dropout
def dropout_forward(x, p, mask=None, rng=None):
    """Inverted dropout: keep each element with probability 1 - p and scale it by 1 / (1 - p).

    ``mask`` (same shape as x, values in {0, 1}) may be given, which makes the
    operation deterministic for gradient checks; otherwise it is drawn from
    ``rng`` (a generator of x's backend, e.g. ``xp.random.default_rng(seed)``).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0:
        return x, None
    if mask is None:
        if rng is None:
            raise ValueError("dropout with p > 0 needs a mask or a random generator")
        mask = rng.random(x.shape, dtype=x.dtype) >= p  # (...) booleans, kept with prob 1 - p
    scale = 1.0 / (1.0 - p)
    keep = mask.astype(x.dtype) * scale  # (...)
    return x * keep, keep


def dropout_backward(dy, cache):
    """The same mask (and scale) applied to the upstream gradient."""
    return dy if cache is None else dy * cache


# -------------------------------------------------------------------- softmax
def softmax_forward(x, inplace=False):
    """Softmax over the last axis, shifted by the row max for stability (``inplace`` reuses x's memory)."""
    xp = xp_of(x)
    e = x if inplace else x.copy()  # (..., N)
    e -= e.max(axis=-1, keepdims=True)  # (..., N), every row's max is now 0
    xp.exp(e, out=e)  # (..., N) in place
    e /= e.sum(axis=-1, keepdims=True)  # (..., N) rows sum to 1
    return e, e


def softmax_backward(dy, cache, inplace=False):
    """dx = y * (dy - sum(dy * y)) : the Jacobian-vector product of the softmax (``inplace`` reuses dy)."""
    y = cache
    row = (dy * y).sum(axis=-1, keepdims=True)  # (..., 1)
    dx = dy if inplace else dy.copy()  # (..., N)
    dx -= row  # (..., N)
    dx *= y  # (..., N)
    return dx


# ----------------------------------------------------------- causal attention
class AttentionCache(NamedTuple):
    """What the attention backward needs: the per-head q, k, v (B, H, T, hs), the probabilities
    ``probs`` (B, H, T, T) (row t: the weights position t puts on positions 0..t) and 1/sqrt(hs)."""

    q: object
    k: object
    v: object
    probs: object
    scale: float


def causal_attention_forward(q, k, v, n_head):
    """Multi-head causal scaled dot-product attention on already projected q, k, v.

    q, k, v: (B, T, C) with C = n_head * hs. Each head computes
    softmax(q k^T / sqrt(hs) + mask) v, where the mask is -inf above the
    diagonal so that position t attends only to positions <= t.
    The projections Wq, Wk, Wv, Wo are separate Linear layers around this
    function (that is where LoRA attaches); this is the parameter-free core.
    """
    xp = xp_of(q, k, v)
    B, T, C = q.shape
    if C % n_head:
        raise ValueError(f"embedding width {C} is not divisible by n_head={n_head}")
    hs = C // n_head
    # contiguous copies per head: NumPy's stacked matmul is fast only when the right operand's
    # matrices are C-contiguous, so K is also laid out pre-transposed for q k^T
    qh = xp.ascontiguousarray(q.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))  # (B, T, C) -> (B, H, T, hs)
    kh = xp.ascontiguousarray(k.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))  # (B, T, C) -> (B, H, T, hs)
    vh = xp.ascontiguousarray(v.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3))  # (B, T, C) -> (B, H, T, hs)
    kt = xp.ascontiguousarray(kh.transpose(0, 1, 3, 2))  # (B, H, T, hs) -> (B, H, hs, T)
    scale = 1.0 / math.sqrt(hs)
    if T >= fast.ATTENTION_MIN_T and not is_cupy_array(q):  # long sequences on the CPU: the masked scores skipped
        yh, p = fast.causal_attention_heads(qh * scale, kt, vh)
    else:
        att = (qh * scale) @ kt  # (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T): q k^T / sqrt(hs)
        mask = xp.triu(xp.full((T, T), -xp.inf, dtype=att.dtype), k=1)  # (T, T): -inf above the diagonal, else 0
        att += mask  # (B, H, T, T), broadcast: position t sees only positions <= t
        p, _ = softmax_forward(att, inplace=True)  # (B, H, T, T), overwriting the scores
        yh = p @ vh  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
    y = yh.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, H, T, hs) -> (B, T, C)
    return y, AttentionCache(qh, kh, vh, p, scale)


def causal_attention_backward(dy, cache):
    """Returns (dq, dk, dv), each (B, T, C)."""
    xp = xp_of(dy)
    qh, kh, vh, p, scale = cache
    B, H, T, hs = qh.shape
    dyh = xp.ascontiguousarray(dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3))  # (B, T, C) -> (B, H, T, hs)
    vt = xp.ascontiguousarray(vh.transpose(0, 1, 3, 2))  # (B, H, T, hs) -> (B, H, hs, T)
    if T >= fast.ATTENTION_MIN_T and not is_cupy_array(dy):  # long sequences on the CPU: the masked scores skipped
        dqh, dkh, dvh = fast.causal_attention_heads_backward(dyh, qh, kh, vt, p, scale)
    else:
        dp = dyh @ vt  # (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T)
        dvh = p.transpose(0, 1, 3, 2) @ dyh  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
        datt = softmax_backward(dp, p, inplace=True)  # (B, H, T, T); masked entries have p = 0, so 0 here
        dqh = datt @ kh  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
        dqh *= scale  # (B, H, T, hs): the 1/sqrt(hs) of the scores, applied on the smaller array
        dkh = datt.transpose(0, 1, 3, 2) @ qh  # (B, H, T, T) @ (B, H, T, hs) -> (B, H, T, hs)
        dkh *= scale  # (B, H, T, hs)

    def merge(a):
        return a.transpose(0, 2, 1, 3).reshape(B, T, H * hs)  # (B, H, T, hs) -> (B, T, C)

    return merge(dqh), merge(dkh), merge(dvh)


# -------------------------------------------------------------- cross-entropy
def check_targets(targets, n_classes, ignore_index=IGNORE_INDEX):
    """Raise ValueError unless every target is ``ignore_index`` or lies in [0, n_classes), and one is not ignored.

    A batch whose targets are all ``ignore_index`` has no mean loss (0 / 0);
    an out-of-range target has no class (the message names the first such
    one, in reading order). One host synchronization: a few reductions on the
    device and a single transfer. The training loop calls it once per batch;
    ``cross_entropy(..., check=True)`` calls it too.
    """
    if targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integers, got dtype {targets.dtype}")
    if targets.size == 0:
        raise ValueError("cross_entropy: there are no targets (an empty batch); the mean loss is undefined")
    xp = xp_of(targets)
    tg = targets.reshape(-1)  # (...) -> (N,)
    valid = tg != ignore_index  # (N,)
    bad = valid & ((tg < 0) | (tg >= n_classes))  # (N,)
    first_bad = xp.take(tg, xp.argmax(bad))  # (N,) -> (): the first bad target (tg[0] if there is none)
    summary = xp.stack((valid.sum(), bad.any(), first_bad)).astype("int64")  # (3,)
    n_valid, any_bad, first = summary.tolist()  # the one transfer
    if n_valid == 0:
        raise ValueError(f"cross_entropy: every target equals ignore_index ({ignore_index}); "
                         "the mean loss is undefined")
    if any_bad:
        raise ValueError(f"target id {first} is out of range for {n_classes} classes")


def _scored_targets(tg, n_classes: int, ignore_index, dtype):
    """``(valid, n_valid, safe_t)`` of flat targets tg (N,): the positions that are scored (N,) bool, their count
    () in ``dtype`` and the targets with every unscored one replaced by class 0 (N,), safe to index with.

    n_valid stays on the device, at least 1 (an all-ignored batch: never 0 / 0), and is NaN when a target is
    neither ``ignore_index`` nor a class, which then poisons the loss and every gradient entry.
    """
    xp = xp_of(tg)
    valid = tg != ignore_index  # (N,)
    bad = valid & ((tg < 0) | (tg >= n_classes))  # (N,): neither ignored nor a class
    valid &= ~bad  # (N,): an out-of-range target is never used as an index
    n_valid = xp.where(bad.any(), math.nan, xp.maximum(valid.sum(), 1)).astype(dtype)  # ()
    return valid, n_valid, xp.where(valid, tg, 0)


def cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, check=True):
    """Mean cross-entropy over the positions whose target is not ``ignore_index``.

    logits: (B, T, V) (or (N, V)); targets: integer array of the leading shape.
    Returns (loss, dlogits) where loss is a 0-d array on the logits' backend and
    dlogits = (softmax(logits) - onehot(target)) / n_valid at valid positions,
    0 elsewhere.

    By default the targets are validated first (``check_targets``: one host
    sync, and a ValueError for an all-ignored batch or an out-of-range target).
    ``check=False`` makes no host synchronization at all (the number of valid
    positions stays on the device): the training loop checks each batch once on
    the host and then calls it that way. Unchecked, an
    all-ignored batch gives loss 0 and a zero gradient (the division is guarded,
    never 0 / 0), and an out-of-range target makes the loss and every gradient
    entry NaN: never a silently wrong finite number.
    """
    xp = xp_of(logits, targets)
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits {tuple(logits.shape)}")
    if check:
        check_targets(targets, V, ignore_index)
    lg = logits.reshape(-1, V)  # (..., V) -> (N, V)
    valid, n_valid, safe_t = _scored_targets(targets.reshape(-1), V, ignore_index, lg.dtype)  # (N,), (), (N,)
    rows = xp.arange(lg.shape[0])  # (N,)
    shifted = lg - lg.max(axis=-1, keepdims=True)  # (N, V)
    e = xp.exp(shifted)  # (N, V)
    s = e.sum(axis=-1, keepdims=True)  # (N, 1)
    logp_t = shifted[rows, safe_t] - xp.log(s[:, 0])  # (N,)
    loss = -(logp_t * valid).sum() / n_valid  # ()
    dl = e / s  # (N, V) softmax
    dl[rows, safe_t] -= 1.0  # (N, V) minus one-hot
    dl *= (valid.astype(lg.dtype) / n_valid)[:, None]  # (N, V), zero rows where ignored
    return loss, dl.reshape(logits.shape)


def lm_head_cross_entropy(x, W, targets, ignore_index=IGNORE_INDEX, need_dW=True, rows=None):
    """The LM head and the mean cross-entropy together: ``(loss, dx, dW)``, what GPT-2's last step computes.

    logits = x W^T (the tied embedding as the head), the mean cross-entropy over the scored targets,
    and the gradients dx = dlogits W, dW = dlogits^T x with dlogits = (softmax - onehot) / n_valid:
    ``linear_forward``, ``cross_entropy`` and ``linear_backward``, one after the other.

    x (..., C), W (V, C), targets (...) integers. ``need_dW=False`` skips dW (a frozen embedding).
    Targets are not checked (``check_targets`` does that once per batch); as in ``cross_entropy``
    an out-of-range target makes the loss and the gradients NaN, and an all-ignored batch gives 0.

    Above ``_WHOLE_LOGITS`` logits (a GPT-2 vocabulary of 50,257 classes), or when ``rows`` is given,
    the same numbers come from ``_lm_head_cross_entropy_chunked``, which never holds the (N, V)
    logits whole.
    """
    if rows is not None or targets.size * W.shape[0] > _WHOLE_LOGITS:
        return _lm_head_cross_entropy_chunked(x, W, targets, ignore_index, need_dW, rows)
    logits, cache = linear_forward(x, W)  # (..., C) @ (C, V) -> (..., V)
    loss, dlogits = cross_entropy(logits, targets, ignore_index, check=False)  # (), (..., V)
    dx, dW, _ = linear_backward(dlogits, cache, need_dW=need_dW, need_db=False)  # (..., C), (V, C) or None
    return loss, dx, dW


# ---------------------------------------------------------------- the same loss, in chunks of positions
# (a reader may skip this part: it computes exactly what the plain form above computes)
# At GPT-2's vocabulary the logits of a batch are large (1,024 positions x 50,257 classes = 206 MB
# in float32), and the plain form holds them, their exponentials and their gradient at once.
_WHOLE_LOGITS = 1 << 14  # up to this many logits (a character vocabulary, a classroom batch) the plain form runs


def lm_head_chunk_rows(vocab_size: int) -> int:
    """Positions per chunk of the chunked LM-head loss: 512, or more while a chunk stays under 2**22 logits."""
    return max(512, (1 << 22) // vocab_size)


def _lm_head_cross_entropy_chunked(x, W, targets, ignore_index, need_dW, rows=None):
    """``lm_head_cross_entropy`` in chunks of ``rows`` positions: the (N, V) logits never exist whole.

    Each chunk makes its logits (rows, V), turns them in place into their gradient
    (softmax - onehot) / n_valid, adds its share to dx (rows, C) and dW (V, C), and is dropped.
    The gradient overwrites the logits in place, so a chunk holds one (rows, V) array where the plain
    form holds the logits, their exponentials and their gradient. Chunks are 512 positions at
    GPT-2's vocabulary (``lm_head_chunk_rows``): smaller ones measured slower on two cores (the
    head's dW is accumulated once per chunk and narrower products use BLAS less well). With one
    chunk the values are the plain form's bit for bit; with several, up to the order of dW's sums.
    """
    xp = xp_of(x, W)
    V, C = W.shape
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match x {tuple(x.shape)}")
    x2 = x.reshape(-1, C)  # (..., C) -> (N, C)
    tg = targets.reshape(-1)  # (...) -> (N,)
    N = x2.shape[0]
    rows = rows or lm_head_chunk_rows(V)  # (rows, V) logits per chunk
    valid, n_valid, safe_t = _scored_targets(tg, V, ignore_index, x2.dtype)  # (N,), (): >= 1, or NaN (poison), (N,)
    weight = valid.astype(x2.dtype) / n_valid  # (N,) each position's share of the mean
    dx = xp.empty_like(x2)  # (N, C)
    dW = xp.zeros_like(W) if need_dW else None  # (V, C)
    buf = xp.empty((min(rows, N), V), dtype=xp.result_type(x2, W))  # (rows, V), reused by every chunk
    total = xp.zeros((), dtype=x2.dtype)  # ()
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        xc, n = x2[start:stop], stop - start  # (n, C)
        lg = buf[:n]  # (n, V)
        xp.matmul(xc, W.T, out=lg)  # (n, C) @ (C, V) -> (n, V) logits
        lg -= lg.max(axis=1, keepdims=True)  # (n, V) shifted: each row's max is 0
        r = xp.arange(n)  # (n,)
        logit_t = lg[r, safe_t[start:stop]]  # (n,) the target's shifted logit (a copy)
        xp.exp(lg, out=lg)  # (n, V)
        sums = lg.sum(axis=1)  # (n,)
        total = total - ((logit_t - xp.log(sums)) * valid[start:stop]).sum()  # () sum of -log p(target)
        lg /= sums[:, None]  # (n, V) softmax
        lg[r, safe_t[start:stop]] -= 1.0  # (n, V) minus one-hot
        lg *= weight[start:stop, None]  # (n, V) d(mean loss) / d(logits); zero rows where ignored
        dx[start:stop] = lg @ W  # (n, V) @ (V, C) -> (n, C)
        if need_dW:
            dW += lg.T @ xc  # (V, n) @ (n, C) -> (V, C)
    loss = total / n_valid  # ()
    return loss, dx.reshape(x.shape), dW


# ------------------------------------------------------------ the low-rank adapter
def lowrank_forward(xa, A, B, scaling: float):
    """The adapter's path of LoRA (Hu et al., 2021, eq. 3): y = s * (xa A^T) B^T, narrow first.

    xa (..., k) is what the adapter sees (x, dropout(x), or the group means of x for QA-LoRA),
    A (r, k), B (d, r), s = alpha / r. The product runs through the rank-r bottleneck,
    u = xa A^T of shape (..., r), so no (d, k) matrix B A is ever formed.
    """
    k, d = A.shape[1], B.shape[0]
    if xa.shape[-1] != k:
        raise ValueError(f"the adapter's A has shape {tuple(A.shape)} but its input has last dimension "
                         f"{xa.shape[-1]}")
    x2 = xa.reshape(-1, k)  # (..., k) -> (N, k)
    us = x2 @ A.T  # (N, k) @ (k, r) -> (N, r): u = xa A^T
    us *= scaling  # (N, r): s u, scaled while narrow
    y = (us @ B.T).reshape(*xa.shape[:-1], d)  # (N, r) @ (r, d) -> (N, d) -> (..., d)
    return y, (x2, us, A, B, scaling, xa.shape)


def lowrank_backward(dy, cache, need_dA: bool = True, need_dB: bool = True):
    """Gradients of y = s (xa A^T) B^T. Returns (dxa, dA, dB); dA / dB are None when not needed.

        dB = dy^T (s u)     (d, r)         g   = s dy B    (N, r)
        dA = g^T xa         (r, k)         dxa = g A       (..., k)
    """
    x2, us, A, B, scaling, shape = cache
    dy2 = dy.reshape(-1, B.shape[0])  # (..., d) -> (N, d)
    g = dy2 @ B  # (N, d) @ (d, r) -> (N, r)
    g *= scaling  # (N, r): g = s dy B
    dB = dy2.T @ us if need_dB else None  # (d, N) @ (N, r) -> (d, r)
    dA = g.T @ x2 if need_dA else None  # (r, N) @ (N, k) -> (r, k)
    dxa = (g @ A).reshape(shape)  # (N, r) @ (r, k) -> (N, k) -> (..., k)
    return dxa, dA, dB


def group_mean_forward(x, group_size: int):
    """QA-LoRA's pooling (Xu et al., 2023, section 3.3): the mean of each group of ``group_size`` input channels.

    x (..., in) -> p (..., in / group_size); the cache is the group size.
    """
    in_features = int(x.shape[-1])
    group_size = check_int("group_size", group_size, 1)  # Python or NumPy integers, as qalora.check_group_size
    if in_features % group_size:
        raise ValueError(f"in_features {in_features} is not divisible by group_size {group_size}")
    L = in_features // group_size
    p = x.reshape(*x.shape[:-1], L, group_size).mean(axis=-1)  # (..., in) -> (..., L, gs) -> (..., L)
    return p, group_size


def group_mean_backward(dp, group_size: int):
    """dx[..., i] = dp[..., g(i)] / group_size: every channel of a group gets an equal share. (..., L) -> (..., in).

    ``group_size`` is the cache of ``group_mean_forward``.
    """
    return xp_of(dp).repeat(dp * (1.0 / group_size), group_size, axis=-1)  # (..., L) -> (..., L * group_size)
