"""Text generation with a key-value cache: greedy decoding, temperature and top-k sampling.

A GPT-2 language model (Radford et al., 2019) writes one token at a time: it reads the sequence so
far, takes the logits of the last position, picks the next token, appends it and repeats.

Without a cache every new token runs the whole sequence through the model again, although the keys
and values of the earlier positions do not change: causal attention lets a position see only the
positions before it, so nothing about them depends on what comes later. A KV cache keeps, for every
block, the keys and values of the positions already read (``KVCache``: ``(B, H, capacity, hs)`` per
block). The prompt is read once (the "prefill", all its positions in one forward); after that each
new token costs one position's forward: its embedding, the block's layers on one row, and attention
of that one query over the cached keys and values (``cached_attention``). Only the last position's
logits are computed, never the (B, T, V) logits of the whole sequence.

The layers are the model's own modules (``block.attn.q``, ``block.mlp``, ...), so an adapted layer
of any kind (LoRA, QLoRA, QA-LoRA, merged or not) generates as it computes in training, and every
forward runs under ``no_grad()`` (nothing is kept for a backward) in eval mode (no dropout).

Picking the next token from the last logits z (V,):

- ``temperature == 0``: greedy, the argmax of z;
- otherwise sampling from softmax(z / temperature), after keeping only the ``top_k`` largest
  logits when ``top_k`` is given (the rest become -inf). Sampling is by inverse CDF with uniforms
  drawn from a host NumPy generator (``seed``), so a seed gives the same tokens on NumPy and CuPy.

At the context length it REFUSES: GPT-2's positions are learned embeddings for 0 .. block_size-1,
so a prompt of T tokens can take at most block_size - T new tokens. (Sliding the window instead
would give every cached key a new position, void the cache and make each further token cost a
forward of block_size positions.) ``generate`` raises a ValueError naming the numbers.
"""

from __future__ import annotations

import math
import numbers

from . import functional as F
from .backend import global_rng, xp_of
from .backend import rng as host_rng
from .nn import no_grad


class KVCache:
    """The keys and values of every position read so far, for every block of a model.

    ``k[layer]`` and ``v[layer]`` are ``(B, H, capacity, hs)`` arrays, allocated at the first
    ``append`` (in the dtype and on the backend of the keys); the first ``length`` positions are
    filled. ``append`` writes a forward's new positions after them.
    """

    def __init__(self, n_layer: int, capacity: int):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.capacity = capacity
        self.length = 0  # positions filled (in every block): advanced by ``forward_cached``

    def append(self, layer: int, kh, vh):
        """Store the new positions' keys and values (B, H, t, hs) of ``layer``; returns all of them, (B, H, S, hs)."""
        start, t = self.length, kh.shape[2]
        if start + t > self.capacity:
            raise ValueError(f"KV cache full: {start} + {t} positions exceed its capacity {self.capacity}")
        if self.k[layer] is None:
            B, H, _, hs = kh.shape
            xp = xp_of(kh)
            self.k[layer] = xp.empty((B, H, self.capacity, hs), dtype=kh.dtype)  # (B, H, S_max, hs)
            self.v[layer] = xp.empty((B, H, self.capacity, hs), dtype=vh.dtype)  # (B, H, S_max, hs)
        self.k[layer][:, :, start:start + t] = kh  # (B, H, t, hs) into the cache
        self.v[layer][:, :, start:start + t] = vh  # (B, H, t, hs)
        return self.k[layer][:, :, :start + t], self.v[layer][:, :, :start + t]  # 2 x (B, H, S, hs) views


def cached_attention(q, k, v, cache: KVCache, layer: int, n_head: int):
    """Causal attention of t new positions (at ``cache.length`` ..) over every position so far.

    q, k, v: (B, t, C), the new positions' projections. Their keys and values join the cache; query
    i (absolute position ``cache.length + i``) attends to the positions 0 .. ``cache.length + i``.
    Returns (B, t, C), the same numbers ``functional.causal_attention_forward`` gives for these rows.
    """
    xp = xp_of(q)
    B, t, C = q.shape
    hs = C // n_head
    start = cache.length
    qh = q.reshape(B, t, n_head, hs).transpose(0, 2, 1, 3)  # (B, t, C) -> (B, H, t, hs)
    kh = k.reshape(B, t, n_head, hs).transpose(0, 2, 1, 3)  # (B, t, C) -> (B, H, t, hs)
    vh = v.reshape(B, t, n_head, hs).transpose(0, 2, 1, 3)  # (B, t, C) -> (B, H, t, hs)
    K, V = cache.append(layer, kh, vh)  # 2 x (B, H, S, hs), S = start + t
    S = start + t
    att = (qh * (1.0 / math.sqrt(hs))) @ K.transpose(0, 1, 3, 2)  # (B, H, t, hs) @ (B, H, hs, S) -> (B, H, t, S)
    if t > 1:  # the prefill: new position i must not see the new positions after it
        att += xp.triu(xp.full((t, S), -xp.inf, dtype=att.dtype), k=start + 1)  # (t, S): -inf where j > start + i
    p, _ = F.softmax_forward(att, inplace=True)  # (B, H, t, S)
    y = p @ V  # (B, H, t, S) @ (B, H, S, hs) -> (B, H, t, hs)
    return y.transpose(0, 2, 1, 3).reshape(B, t, C)  # (B, H, t, hs) -> (B, t, C)


def forward_cached(model, idx, cache: KVCache):
    """Logits of the LAST position (B, V) after reading the new tokens ``idx`` (B, t) with ``cache``.

    The GPT's forward on positions ``cache.length`` .. ``cache.length + t - 1``, in eval mode (no
    dropout): the same embeddings, layer norms, projections and MLP modules as ``GPT.forward``, only
    attention reads the cache. Advances ``cache.length`` by t.
    """
    xp = xp_of(model.wte.weight.data)
    t = idx.shape[1]
    tok = model.wte(idx)  # (B, t) -> (B, t, C); the ids were checked by ``generate``
    pos = model.wpe(xp.arange(cache.length, cache.length + t)[None, :])  # (1, t) -> (1, t, C)
    x = tok + pos  # (B, t, C)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        h = block.ln_1(x)  # (B, t, C)
        y = cached_attention(attn.q(h), attn.k(h), attn.v(h), cache, layer, attn.n_head)  # (B, t, C)
        x = x + attn.o(y)  # (B, t, C)
        x = x + block.mlp(block.ln_2(x))  # (B, t, C)
    cache.length += t
    x = model.ln_f(x[:, -1])  # (B, C): the last position only
    logits, _ = F.linear_forward(x, model.wte.weight.data)  # (B, C) @ (C, V) -> (B, V), the tied head
    return logits


def next_token(logits, temperature: float, top_k: int | None, rng):
    """The next token of each row of ``logits`` (B, V): argmax at temperature 0, else a sample. (B,) ints."""
    xp = xp_of(logits)
    if temperature == 0:
        return xp.argmax(logits, axis=-1)  # (B, V) -> (B,)
    z = logits.astype(xp.float64) / temperature  # (B, V), float64 so that the CDF sums exactly enough
    V = z.shape[-1]
    if top_k is not None and top_k < V:
        kth = xp.partition(z, V - top_k, axis=-1)[:, V - top_k][:, None]  # (B, 1): the k-th largest logit
        z = xp.where(z < kth, -xp.inf, z)  # (B, V): all but the top k (ties at the k-th included) are out
    p, _ = F.softmax_forward(z, inplace=True)  # (B, V)
    cdf = xp.cumsum(p, axis=-1)  # (B, V), nondecreasing, last entry ~1
    u = xp.asarray(rng.random(z.shape[0])) * cdf[:, -1]  # (B,) uniforms from the host generator, in [0, total)
    chosen = (cdf <= u[:, None]).sum(axis=-1)  # (B,): the first index whose CDF exceeds u (a 0-probability token never)
    return xp.minimum(chosen, V - 1)  # (B,); guards a u that rounding put at the total


def _check_args(model, idx, max_new_tokens, temperature, top_k, seed):
    if idx.ndim != 2:
        raise ValueError(f"generate expects token ids of shape (B, T), got shape {tuple(idx.shape)}")
    if idx.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {idx.dtype}")
    T = idx.shape[1]
    if T == 0:
        raise ValueError("generate needs a prompt of at least one token, got T = 0")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    block = model.config.block_size
    if T + max_new_tokens > block:
        raise ValueError(f"a prompt of {T} tokens + {max_new_tokens} new tokens = {T + max_new_tokens} positions "
                         f"exceeds the model's context of {block} (its positions are learned embeddings 0.."
                         f"{block - 1}; generation refuses rather than slides): ask for at most "
                         f"{max(block - T, 0)} new tokens or shorten the prompt")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    V = model.config.vocab_size
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or not 1 <= top_k <= V):
        raise ValueError(f"top_k must be None or an integer in [1, {V}] (the vocabulary size), got {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
    F.check_ids(idx, V)  # once, for the prompt: the tokens generated are in range by construction


def generate(model, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, use_cache: bool = True):
    """``idx`` (B, T) followed by ``max_new_tokens`` generated tokens: (B, T + max_new_tokens), idx's dtype.

    ``temperature`` 0 is greedy decoding; above 0, sampling from softmax(logits / temperature),
    restricted to the ``top_k`` most likely tokens when given; ``seed`` fixes the samples (without
    one, they come from ``backend.global_rng()``). ``use_cache=False`` runs the whole sequence
    through ``model`` for every new token instead (the same tokens, up to float rounding; for study
    and tests). Refuses (ValueError) to go past the context length. The model is left in the mode
    it was in; nothing is kept for a backward.
    """
    xp = xp_of(model.wte.weight.data)
    idx = xp.asarray(idx)  # (B, T) on the model's backend (a nested list of ids is taken too)
    _check_args(model, idx, max_new_tokens, temperature, top_k, seed)
    rng = host_rng(seed) if seed is not None else global_rng()
    tokens = [idx]
    cache = KVCache(model.config.n_layer, idx.shape[1] + max_new_tokens) if use_cache else None

    def step(new):
        """Read the new tokens (B, t); the logits of the last position (B, V)."""
        if cache is not None:
            return forward_cached(model, new, cache)  # t positions through the model
        return model(xp.concatenate(tokens, axis=1), check=False)[:, -1]  # the whole sequence again

    modes = [(m, m.training) for _, m in model.named_modules()]
    model.eval()
    try:
        with no_grad():
            logits = step(idx) if max_new_tokens else None  # the prefill: (B, T) -> (B, V)
            for n in range(max_new_tokens):
                new = next_token(logits, temperature, top_k, rng).astype(idx.dtype)[:, None]  # (B, 1)
                tokens.append(new)
                if n + 1 < max_new_tokens:
                    logits = step(new)  # (B, 1) -> (B, V)
    finally:
        for m, training in modes:
            m.training = training
    return xp.concatenate(tokens, axis=1)  # (B, T + max_new_tokens)
