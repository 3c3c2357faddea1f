"""A GPT-2-architecture transformer with a hand-written backward pass.

The layout is GPT-2's (Radford et al., 2019), so Hugging Face's
``GPT2LMHeadModel`` can check it number for number:

    x = wte[idx] + wpe[:T]                       token + position embeddings
    for each block (pre-LN):
        x = x + Wo( attention( Wq ln_1(x), Wk ln_1(x), Wv ln_1(x) ) )
        x = x + proj( gelu( fc( ln_2(x) ) ) )
    logits = ln_f(x) @ wte^T                     LM head tied to the token embedding

The attention projections are four separate ``Linear`` layers named
``q, k, v, o`` and the MLP's two matrices are ``fc`` (up) and ``proj``
(down): these are the six matrices that LoRA adapts (Hu et al., 2021,
section 4.2). GPT-2 itself stores q, k, v fused in one
``c_attn`` Conv1D; ``hf_io.load_hf_gpt2`` splits it.

Randomness: the weights of ``GPT(config, seed)`` are drawn from
``backend.rng(seed)`` alone, in definition order, exactly as without
dropout; every Dropout layer gets its own seed from a second generator
derived from the same seed (``_dropout_rng``), so masks are reproducible for
a seed, differ from layer to layer, and never shift the weights.

Host synchronization: ``GPT.forward`` checks the token ids once per batch
(one transfer, ``functional.check_ids``; ``check=False`` skips it for ids
already checked); nothing else in the forward or backward waits on the device.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

from . import functional as F
from . import generation
from .backend import global_rng, xp_of
from .backend import rng as host_rng
from .nn import (
    GELU,
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    Module,
    ModuleList,
    _need_cache,
    check_float_dtype,
    is_grad_enabled,
)


@dataclass
class GPTConfig:
    """Sizes of the model. ``n_embd`` must be divisible by ``n_head``."""

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


_DROPOUT_STREAM = 0x64726F70  # "drop": the tag that keeps the dropout seeds' stream apart from the weights'


def _dropout_rng(seed: int | None):
    """The host generator that seeds a GPT's Dropout layers: its own stream, never the weights' generator.

    ``seed`` given: ``rng((_DROPOUT_STREAM, seed, 0))``, three words of seed material, so it
    differs from the weights' ``rng(seed)`` (one or two words for any seed below 2**64).
    ``seed=None``: seeded by one draw from ``backend.global_rng()`` (reproducible after
    ``manual_seed``).
    """
    if seed is None:
        seed = int(global_rng().integers(0, 2**63 - 1))
    return host_rng((_DROPOUT_STREAM, seed, 0))


def _dropout(p: float, dropout_rng):
    """A Dropout layer seeded from ``dropout_rng`` (without one: from ``backend.global_rng()``, nn's default)."""
    return Dropout(p, seed=None if dropout_rng is None else int(dropout_rng.integers(0, 2**31 - 1)))


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with separate Wq, Wk, Wv, Wo (the four LoRA targets)."""

    def __init__(self, cfg: GPTConfig, rng=None, dtype="float32", dropout_rng=None):
        C, std = cfg.n_embd, 0.02
        self.n_head = cfg.n_head
        self.q = Linear(C, C, std=std, rng=rng, dtype=dtype)
        self.k = Linear(C, C, std=std, rng=rng, dtype=dtype)
        self.v = Linear(C, C, std=std, rng=rng, dtype=dtype)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init
        self.o = Linear(C, C, std=std / math.sqrt(2 * cfg.n_layer), rng=rng, dtype=dtype)
        self.attn_drop = _dropout(cfg.dropout, dropout_rng)
        self.resid_drop = _dropout(cfg.dropout, dropout_rng)
        self._cache = None

    def forward(self, x):
        q = self.q(x)  # (B, T, C) -> (B, T, C)
        k = self.k(x)  # (B, T, C) -> (B, T, C)
        v = self.v(x)  # (B, T, C) -> (B, T, C)
        y, self._cache = F.causal_attention_forward(q, k, v, self.n_head)  # (B, T, C)
        y = self.attn_drop(y)  # (B, T, C); dropout on the attention output
        return self.resid_drop(self.o(y))  # (B, T, C) -> (B, T, C)

    def backward(self, dy):
        dy = self.o.backward(self.resid_drop.backward(dy))  # (B, T, C)
        dy = self.attn_drop.backward(dy)  # (B, T, C)
        dq, dk, dv = F.causal_attention_backward(dy, self._cache)  # 3 x (B, T, C)
        self._cache = None
        return self.q.backward(dq) + self.k.backward(dk) + self.v.backward(dv)  # (B, T, C)


class MLP(Module):
    """The position-wise feed-forward network: fc (C -> 4C), GELU, proj (4C -> C)."""

    def __init__(self, cfg: GPTConfig, rng=None, dtype="float32", dropout_rng=None):
        C = cfg.n_embd
        self.fc = Linear(C, 4 * C, std=0.02, rng=rng, dtype=dtype)
        self.act = GELU()
        self.proj = Linear(4 * C, C, std=0.02 / math.sqrt(2 * cfg.n_layer), rng=rng, dtype=dtype)
        self.drop = _dropout(cfg.dropout, dropout_rng)

    def forward(self, x):
        h = self.act(self.fc(x))  # (B, T, C) -> (B, T, 4C)
        return self.drop(self.proj(h))  # (B, T, 4C) -> (B, T, C)

    def backward(self, dy):
        dh = self.proj.backward(self.drop.backward(dy))  # (B, T, C) -> (B, T, 4C)
        return self.fc.backward(self.act.backward(dh))  # (B, T, 4C) -> (B, T, C)


class Block(Module):
    """A pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig, rng=None, dtype="float32", dropout_rng=None):
        self.ln_1 = LayerNorm(cfg.n_embd, dtype=dtype)
        self.attn = CausalSelfAttention(cfg, rng=rng, dtype=dtype, dropout_rng=dropout_rng)
        self.ln_2 = LayerNorm(cfg.n_embd, dtype=dtype)
        self.mlp = MLP(cfg, rng=rng, dtype=dtype, dropout_rng=dropout_rng)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)

    def backward(self, dy):
        # the residual connection passes dy through unchanged and adds the branch's gradient
        dx = dy + self.ln_2.backward(self.mlp.backward(dy))  # (B, T, C)
        return dx + self.ln_1.backward(self.attn.backward(dx))  # (B, T, C)


class _HeadGradients(NamedTuple):
    """What ``GPT.loss`` leaves for ``GPT.backward``: dx (B, T, C) below the LM head and the head's dW (V, C)."""

    dx: object
    dW: object


class GPT(Module):
    """The language model: ``logits = model(idx)`` then ``model.backward(dlogits)``.

    ``named_parameters()`` lists the token embedding once, as ``wte.weight``;
    the LM head reuses it (weight tying, as GPT-2), and its two gradients
    (from the lookup and from the head) add up in ``wte.weight.grad``.
    """

    def __init__(self, config: GPTConfig, seed: int | None = None, dtype="float32"):
        dtype = check_float_dtype(dtype)  # before anything is drawn: an integer dtype would make all zeros
        self.config = config
        drng = _dropout_rng(seed)  # the Dropout layers' seeds: a stream apart from the weights'
        rng = global_rng() if seed is None else host_rng(seed)  # the weights
        self.wte = Embedding(config.vocab_size, config.n_embd, std=0.02, rng=rng, dtype=dtype)
        self.wpe = Embedding(config.block_size, config.n_embd, std=0.01, rng=rng, dtype=dtype)
        self.drop = _dropout(config.dropout, drng)
        self.blocks = ModuleList([Block(config, rng=rng, dtype=dtype, dropout_rng=drng)
                                  for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, dtype=dtype)
        self._cache = None

    def forward(self, idx, check: bool = True):
        """Logits (B, T, V) for token ids ``idx`` (B, T); ``backward(dlogits)`` then fills the gradients."""
        x = self.hidden(idx, check)  # (B, T) -> (B, T, C)
        logits, head_cache = F.linear_forward(x, self.wte.weight.data)  # (B, T, C) @ (C, V) -> (B, T, V)
        self._cache = head_cache
        return logits

    def loss(self, idx, targets, check: bool = True):
        """The mean next-token cross-entropy for ids ``idx`` (B, T) and ``targets`` (B, T): a 0-d array.

        The training step's form of ``cross_entropy(self(idx), targets)``: the LM head and the loss
        run together (``functional.lm_head_cross_entropy``; at a GPT-2 vocabulary in chunks of
        positions, so the (B, T, V) logits and their gradient never exist whole); the head's
        gradients are computed here and kept for ``backward()`` (called without an argument).
        ``check=False`` skips the checks of the ids and the targets (the training loop checks each
        batch once on the host).
        """
        if check:
            F.check_targets(targets, self.config.vocab_size)
        x = self.hidden(idx, check)  # (B, T) -> (B, T, C)
        wte = self.wte.weight
        loss, dx, dW = F.lm_head_cross_entropy(x, wte.data, targets, need_dW=wte.trainable)  # (), (B, T, C), (V, C)
        self._cache = _HeadGradients(dx, dW)
        return loss

    def hidden(self, idx, check: bool = True):
        """The last hidden states ln_f(x) (B, T, C) for token ids ``idx`` (B, T), before the LM head.

        The ids are range-checked once per batch (the lookup calls ``functional.check_ids``: one host
        transfer, a ValueError naming a bad id); ``check=False`` skips that for ids
        already checked, leaving a forward without any host synchronization. The
        positions ``arange(T)`` need no check: T is checked against ``block_size``
        from the shape alone.
        """
        if idx.ndim != 2:
            raise ValueError(f"GPT expects token ids of shape (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        xp = xp_of(self.wte.weight.data)
        tok = self.wte(idx, check)  # (B, T) -> (B, T, C); integer ids, in range when checked
        pos = self.wpe(xp.arange(T)[None, :])  # (1, T) -> (1, T, C)
        x = self.drop(tok + pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)  # (B, T, C) -> (B, T, C)
        return self.ln_f(x)  # (B, T, C)

    def backward(self, dlogits=None):
        """Fills ``.grad`` of every trainable parameter: with no argument after ``loss`` (whose head gradients
        are already computed), or from d(loss)/d(logits) (B, T, V) after ``forward``."""
        cache = _need_cache(self._cache, "GPT")
        if dlogits is not None or not isinstance(cache, _HeadGradients):
            cache = self._head_gradients(cache, dlogits)  # after forward: the LM head's backward first
        dx, dW_head = cache  # (B, T, C) below the head; (V, C) when the embedding trains, else None
        self._cache = None
        if dW_head is not None:
            self.wte.weight.accumulate(dW_head)
        dx = self.ln_f.backward(dx)  # (B, T, C)
        for block in reversed(list(self.blocks)):
            dx = block.backward(dx)  # (B, T, C)
        dx = self.drop.backward(dx)  # (B, T, C)
        self.wpe.backward(dx.sum(axis=0, keepdims=True))  # (B, T, C) -> (1, T, C)
        self.wte.backward(dx)  # scatter-add into (V, C)

    def _head_gradients(self, cache, dlogits) -> _HeadGradients:
        """The LM head's backward after ``forward``: dx = dlogits wte (B, T, C) and dW = dlogits^T x (V, C)."""
        if isinstance(cache, _HeadGradients):
            raise ValueError("after GPT.loss call backward() without dlogits: the loss's gradient is already in")
        if dlogits is None:
            raise ValueError("GPT.backward needs dlogits (B, T, V) after a forward; only GPT.loss needs none")
        dx, dW, _ = F.linear_backward(dlogits, cache, need_dW=self.wte.weight.trainable, need_db=False)
        return _HeadGradients(dx, dW)  # (B, T, V) -> (B, T, C); dW (V, C) or None

    def generate(self, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None, use_cache: bool = True):
        """``idx`` (B, T) and ``max_new_tokens`` new tokens after it, (B, T + max_new_tokens), with a KV cache.

        Greedy at ``temperature`` 0, else sampled (optionally from the ``top_k`` most likely), ``seed``ed;
        refuses to go past ``block_size``. See ``generation.generate``.
        """
        return generation.generate(self, idx, max_new_tokens, temperature, top_k, seed, use_cache)

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def attention_probabilities(self, idx, layer: int = 0):
        """The attention probabilities of every head of block ``layer`` for ``idx``: (B, H, T, T) on the backend.

        Runs a forward in eval mode (dropout off) and reads ``probs`` from the block's
        ``functional.AttentionCache``; row t holds the weights position t puts on positions 0..t.
        The forward replaces every layer's cache: do not call this between a training forward and
        its backward.
        """
        n_layer = len(self.blocks)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layer <= layer < n_layer:
            raise ValueError(f"layer {layer!r} out of range for a model with {n_layer} blocks")
        if not is_grad_enabled():
            raise RuntimeError("attention_probabilities reads the attention cache of a forward, which no_grad() "
                               "does not keep: call it outside no_grad()")
        was_training = self.training
        self.eval()
        try:
            self(idx)  # (B, T) -> (B, T, V); fills the caches
            cache = self.blocks[layer].attn._cache
        finally:
            self.train(was_training)
        self._drop_caches()  # nothing of this forward may be taken for a training step's cache
        return cache.probs  # (B, H, T, T)

