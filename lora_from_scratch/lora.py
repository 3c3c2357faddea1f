"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al., 2021).

The paper's equation (3), section 4.1: for a pretrained weight W0 of shape
(d, k) = (out, in),

    h = W0 x + dW x = W0 x + B A x,      B (d, r), A (r, k), r << min(d, k),

with W0 frozen ("does not receive gradient updates") and only A and B
trained. Written for a batch of row vectors x (..., k) as in ``functional``:

    h = x W0^T + b + s * dropout(x) A^T B^T

The pieces, each visible in ``LoRALinear`` below:

- Scaling s (section 4.1): "we then scale dW x by alpha / r". rsLoRA
  (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning
  with LoRA") uses s = alpha / sqrt(r) instead, so the update's size does not
  shrink as r grows.
- Initialization (section 4.1): "random Gaussian initialization for A and zero
  for B, so dW = B A is zero at the beginning of training". Three options:
  ``"kaiming"``: A ~ U(-1/sqrt(k), 1/sqrt(k)), B = 0 (what PEFT and Microsoft's
  loralib actually do: ``kaiming_uniform_(a=sqrt(5))``);
  ``"gaussian"``: A ~ N(0, (1/r)^2), B = 0 (PEFT's reading of the paper);
  ``"pissa"``: PiSSA (Meng et al., 2024, section 3): with W0 = U S V^T, the
  adapter starts on the top-r singular triplets, A = sqrt(S_r / s) V_r^T and
  B = U_r sqrt(S_r / s) (so s B A = U_r S_r V_r^T, PEFT's split), and W0 is
  replaced by the residual W0 - s B A, so the output is unchanged at step 0.
- Dropout (PEFT's ``lora_dropout``): applied to the input of the adapter
  branch only; the frozen path sees x unchanged.
- Backward: dx, dA, dB by hand. The frozen W0 (and its bias) gets no
  gradient: the (out, in) product dy^T x, the most expensive part of a
  linear layer's backward, is never formed. That skipped product and the
  missing optimizer state are LoRA's savings.
- Merge (section 4.1, "No Additional Inference Latency"): W = W0 + s B A
  folds the update into the weight, so inference costs what the base model
  costs; ``unmerge`` subtracts it again.

``apply_lora`` puts adapters on the GPT's attention projections Wq, Wk, Wv,
Wo and the MLP's up/down projections (section 4.2 and 7.1 study which of
these to adapt), and freezes everything else.
"""

from __future__ import annotations

import math
import re

from . import functional as F
from .backend import global_rng, like, xp_of
from .backend import rng as host_rng
from .nn import Dropout, Linear, Module, Parameter

INITS = ("kaiming", "gaussian", "pissa")
TARGETS = ("q", "k", "v", "o", "fc", "proj")
_PARENT = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "fc": "mlp", "proj": "mlp"}


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r (LoRA), or alpha / sqrt(r) (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_lora_args(r, alpha, dropout, init, in_features: int, out_features: int) -> None:
    """Raise ValueError naming the first bad hyperparameter for a (out, in) weight."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"LoRA rank r must be an integer, got {r!r}")
    limit = min(in_features, out_features)
    if not 1 <= r <= limit:
        raise ValueError(
            f"LoRA rank r={r} must satisfy 1 <= r <= min(in, out) = {limit} "
            f"for a weight of shape ({out_features}, {in_features})"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"unknown LoRA init {init!r}; valid inits: {list(INITS)}")


class LowRankAdapter(Module):
    """What every adapter layer here shares (LoRA, QLoRA, QA-LoRA): trainable ``lora_A`` (r, k),
    ``lora_B`` (out, r), rank ``r``, ``alpha`` and the scaling s = alpha / r (alpha / sqrt(r) with rsLoRA)."""

    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scaling(self.r, self.alpha, getattr(self, "use_rslora", False))

    def delta_weight(self):
        """dW = s B A, the update as a full matrix in the adapter's dtype."""
        return (self.lora_B.data @ self.lora_A.data) * self.scaling  # (out, r) @ (r, k) -> (out, k)

    def num_adapter_parameters(self) -> int:
        """The size of A plus B: r * (in + out) for LoRA."""
        return self.lora_A.size + self.lora_B.size

    def _random_factors(self, W0, rng):
        """A random (kaiming or gaussian), B = 0 (LoRA section 4.1), in W0's dtype and on W0's backend.

        "kaiming": A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))); "gaussian": std 1/r.
        """
        r, k, d = self.r, self.in_features, self.out_features
        if self.init == "kaiming":  # kaiming_uniform_(a=sqrt(5)) gives the bound 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(k)
            host = rng.uniform(-bound, bound, size=(r, k))  # (r, in) on the host
        else:  # "gaussian"
            host = rng.standard_normal((r, k)) * (1.0 / r)  # (r, in), std 1/r
        A = like(W0, host).astype(W0.dtype)  # (r, in) on W0's backend
        B = xp_of(W0).zeros((d, r), dtype=W0.dtype)  # (out, r): B A = 0, the layer starts unchanged
        return A, B

    def _make_adapter(self, A, B, dropout, dropout_seed, rng):
        """The trainable A, B and the dropout on the adapter's input (each layer its own mask stream)."""
        self.lora_A = Parameter(A)  # (r, in)
        self.lora_B = Parameter(B)  # (out, r)
        if dropout > 0.0 and dropout_seed is None:
            dropout_seed = int(rng.integers(0, 2**31 - 1))
        self.dropout = Dropout(dropout, seed=dropout_seed)

    def _adapter_backward(self, dy, us, xd):
        """Accumulate dB = dy^T (s u) and dA = g^T xd, where u = xd A^T and g = s dy B; return g (N, r).

        ``xd`` is the adapter's input (dropout(x) for LoRA / QLoRA), ``us`` = s u from the forward.
        """
        dy2 = dy.reshape(-1, self.lora_B.shape[0])  # (..., out) -> (N, out)
        us2 = us.reshape(-1, self.r)  # (..., r) -> (N, r)
        g = (dy2 @ self.lora_B.data) * self.scaling  # (N, out) @ (out, r) -> (N, r)
        if self.lora_B.trainable:
            self.lora_B.accumulate((us2.T @ dy2).T)  # ((r, N) @ (N, out)).T -> (out, r); = dy^T (s u)
        if self.lora_A.trainable:
            self.lora_A.accumulate(g.T @ xd.reshape(-1, self.lora_A.shape[1]))  # (r, N) @ (N, in) -> (r, in)
        return g


class LoRALinear(LowRankAdapter):
    """A frozen ``Linear`` (``.base``) plus the trainable update s * B A.

    ``LoRALinear(base, r, alpha, dropout=0.0, init="kaiming", use_rslora=False, rng=None)``
    freezes ``base.weight`` and ``base.bias`` and creates ``lora_A`` (r, in) and
    ``lora_B`` (out, r). ``rng`` is a host NumPy generator for A (default
    ``backend.global_rng()``). Parameter names below a model read e.g.
    ``blocks.0.attn.q.base.weight``, ``blocks.0.attn.q.lora_A``.

    Training while merged is refused: after ``merge()`` the forward uses the
    merged weight alone (plain inference, no dropout, no adapter branch) and
    ``backward`` raises RuntimeError; call ``unmerge()`` to train again.
    """

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                 use_rslora: bool = False, *, rng=None, dropout_seed: int | None = None):
        if not isinstance(base, Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_lora_args(r, alpha, dropout, init, base.in_features, base.out_features)
        rng = global_rng() if rng is None else rng
        self.base = base
        # W0 and its bias are frozen: no gradient is ever computed for them, no optimizer state
        base.weight.trainable = False
        if base.bias is not None:
            base.bias.trainable = False
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora, self.init = r, float(alpha), bool(use_rslora), init
        A, B = self._pissa_factors() if init == "pissa" else self._random_factors(base.weight.data, rng)
        self._make_adapter(A, B, dropout, dropout_seed, rng)
        self.merged = False
        self._merged_with = None  # (A, B, s) used by the last merge, so unmerge subtracts exactly that
        self._cache = None

    # ------------------------------------------------------------ initialization
    def _pissa_factors(self):
        """Top-r singular triplets of W0 into A and B; W0 becomes the residual (computed in float64)."""
        W = self.base.weight.data  # (out, in)
        xp = xp_of(W)
        r, s = self.r, self.scaling
        W64 = W.astype("float64")  # (out, in)
        U, S, Vh = xp.linalg.svd(W64, full_matrices=False)  # (out, K), (K,), (K, in); K = min(out, in)
        root = xp.sqrt(S[:r] / s)  # (r,): sqrt(S_r / s), so that s B A = U_r S_r V_r^T
        A = (root[:, None] * Vh[:r]).astype(W.dtype)  # (r, 1) * (r, in) -> (r, in)
        B = (U[:, :r] * root[None, :]).astype(W.dtype)  # (out, r) * (1, r) -> (out, r)
        # residual from the rounded factors, so that W_res + s B A reproduces W0 as closely as possible
        residual = W64 - s * (B.astype("float64") @ A.astype("float64"))  # (out, r) @ (r, in) -> (out, in)
        self.base.weight.data = residual.astype(W.dtype)  # (out, in)
        return A, B

    # ------------------------------------------------------------ forward / backward
    def forward(self, x, dropout_mask=None):
        """h = x W0^T + b + s * dropout(x) A^T B^T.

        ``dropout_mask`` (x's shape, 0/1) fixes the dropout (for gradient checks); it is unused
        when dropout is inactive (p = 0 or eval mode).

        Two evaluation orders of the same h:
        - dropout active (training with p > 0): the frozen path x W0^T + b, plus the adapter
          branch on the dropped-out input, dropout(x) A^T -> (..., r) -> B^T -> (..., out);
        - otherwise both terms see the same x, so h = x (W0 + s B A)^T + b: the (out, in) sum is
          formed (out * in * r multiply-adds, a temporary; W0 itself is not changed) and one wide
          matrix product replaces two thin ones here and in the backward's dx. u = x A^T is still
          computed, for dB.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LoRALinear expects inputs with last dimension {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        base = self.base
        W0 = base.weight.data  # (out, in)
        b = base.bias.data if base.bias is not None else None
        if self.merged:  # W0 already holds W0 + s B A: plain inference through one matrix
            y, _ = F.linear_forward(x, W0, b)  # (..., in) -> (..., out)
            self._cache = "merged"
            return y
        A, B, s = self.lora_A.data, self.lora_B.data, self.scaling  # (r, in), (out, r)
        dropout_active = self.dropout.training and self.dropout.p > 0.0
        if dropout_active:
            y, lin_cache = F.linear_forward(x, W0, b)  # (..., in) -> (..., out), the frozen path
            xd = self.dropout(x, mask=dropout_mask)  # (..., in), dropout on the adapter's input only
            us = (xd @ A.T) * s  # (..., in) @ (in, r) -> (..., r), scaled while narrow
            y += us @ B.T  # (..., r) @ (r, out) -> (..., out)
        else:
            W = W0 + (B @ A) * s  # (out, r) @ (r, in) -> (out, in): W0 + s B A, a temporary
            y, lin_cache = F.linear_forward(x, W, b)  # (..., in) -> (..., out)
            xd = x  # (..., in)
            us = (x @ A.T) * s  # (..., in) @ (in, r) -> (..., r), kept for dB
        self._cache = (lin_cache, xd, us, dropout_active)
        return y

    def backward(self, dy):
        """Returns dx; accumulates dA into ``lora_A.grad`` and dB into ``lora_B.grad``.

        With u = dropout(x) A^T and h = x W0^T + b + s u B^T:
            dB = s dy^T u                       (out, r)
            g  = s dy B                         (..., r)
            dA = g^T dropout(x)                 (r, in)
            dx = dy W0 + dropout_backward(g A)  (..., in)
        Without dropout the last line is dy (W0 + s B A), one product with the forward's sum.
        """
        cache, self._cache = self._cache, None
        if cache is None:
            raise RuntimeError("LoRALinear.backward called without a forward (or twice for one forward)")
        if self.merged or cache == "merged":
            raise RuntimeError("LoRALinear is merged (W0 holds W0 + s B A): call unmerge() before training")
        lin_cache, xd, us, dropout_active = cache
        base = self.base
        # The frozen path: only dx. With base.weight.trainable False (always, unless a user unfreezes
        # it) need_dW is False and the (out, N) @ (N, in) weight gradient is never formed.
        dx, dW0, db0 = F.linear_backward(
            dy, lin_cache,
            need_dW=base.weight.trainable,
            need_db=base.bias is not None and base.bias.trainable,
        )  # dx (..., in): dy W0 with dropout, dy (W0 + s B A) without
        if dW0 is not None:  # d/dW0 of x (W0 + s B A)^T is the same product dy^T x
            base.weight.accumulate(dW0)
        if db0 is not None:
            base.bias.accumulate(db0)
        g = self._adapter_backward(dy, us, xd)  # (N, r); dA and dB accumulated
        A = self.lora_A.data  # (r, in)
        if dropout_active:
            dxd = (g @ A).reshape(dx.shape)  # (N, r) @ (r, in) -> (N, in) -> (..., in)
            dx += self.dropout.backward(dxd)  # (..., in): the adapter branch's share of the input gradient
        return dx

    # ------------------------------------------------------------ merge / unmerge
    def _merged_weight(self):
        """W0 + s B A, checked to be finite (raises ValueError otherwise; nothing changes)."""
        W0 = self.base.weight.data  # (out, in)
        W = W0 + self.delta_weight().astype(W0.dtype)  # (out, in)
        if not bool(xp_of(W).isfinite(W).all()):
            raise ValueError("merge refused: W0 + s B A has NaN or inf entries; W0 is left unchanged")
        return W

    def merge(self):
        """W0 <- W0 + s B A (refuses a non-finite result, leaving W0 untouched). A no-op when merged."""
        if not self.merged:
            self._commit_merge(self._merged_weight())
        return self

    def _commit_merge(self, W):
        self.base.weight.data = W  # (out, in), a new array: the old W0 is not modified in place
        self._merged_with = (self.lora_A.data.copy(), self.lora_B.data.copy(), self.scaling)
        self.merged, self._cache = True, None

    def unmerge(self):
        """W0 <- W0 - s B A with the A, B and s of the merge. A no-op when not merged."""
        if self.merged:
            A, B, s = self._merged_with  # (r, in), (out, r)
            W = self.base.weight.data  # (out, in)
            self.base.weight.data = W - ((B @ A) * s).astype(W.dtype)  # (out, in)
            self.merged, self._merged_with, self._cache = False, None, None
        return self

    def __repr__(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        m = ", merged" if self.merged else ""
        return (f"LoRALinear(in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"alpha={self.alpha:g}, scaling={self.scaling:g}{rs}{m})")


# ---------------------------------------------------------------- model level
_BLOCK_TARGET = re.compile(r"^blocks\.(\d+)\.([a-z]+)$")


def _unknown(target) -> ValueError:
    return ValueError(f"unknown target {target!r}; valid targets: {list(TARGETS)}")


def resolve_targets(model, targets) -> list[tuple[int, str]]:
    """(block index, short name) pairs for ``targets`` ('q', ... or 'blocks.{i}.q', ...), in model order."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError(f"apply_lora needs at least one target; valid targets: {list(TARGETS)}")
    n_layer = len(model.blocks)
    chosen = set()
    for t in targets:
        if not isinstance(t, str):
            raise _unknown(t)
        if t in TARGETS:
            chosen.update((i, t) for i in range(n_layer))
            continue
        m = _BLOCK_TARGET.match(t)
        if m is None or m.group(2) not in TARGETS:
            raise _unknown(t)
        i = int(m.group(1))
        if i >= n_layer:
            raise ValueError(f"target {t!r} names block {i}, but the model has {n_layer} blocks (0..{n_layer - 1})")
        chosen.add((i, m.group(2)))
    return sorted(chosen, key=lambda it: (it[0], TARGETS.index(it[1])))


def _layer_path(i: int, name: str) -> str:
    return f"blocks.{i}.{_PARENT[name]}.{name}"


def lora_layers(model) -> dict:
    """dotted name -> LoRALinear, for every adapted layer of ``model`` (e.g. ``blocks.0.attn.q``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_adapter(module) -> bool:
    """True for any adapter layer of this package (LoRA, QLoRA, QA-LoRA): it owns ``lora_A`` and ``lora_B``."""
    return isinstance(getattr(module, "lora_A", None), Parameter) and isinstance(getattr(module, "lora_B", None),
                                                                                  Parameter)


def mark_only_lora_as_trainable(model):
    """Freeze every parameter except the adapters' A and B (embeddings, layer norms, biases, W0 included).

    Works for every adapter kind (LoRA, QLoRA, QA-LoRA layers alike)."""
    keep = set()
    for _, layer in model.named_modules():
        if is_adapter(layer):
            keep.update((id(layer.lora_A), id(layer.lora_B)))
    for p in model.parameters():
        p.trainable = id(p) in keep
    return model


def replace_targets(model, targets, check, make, seed: int | None = None, rng=None):
    """Swap each targeted ``Linear`` of a GPT for ``make(linear, rng)``, then freeze all but the adapters.

    The shared part of ``apply_lora``, ``qlora.apply_qlora`` and ``qalora.apply_qalora``:
    targets are resolved (``resolve_targets``), each layer is checked with
    ``check(linear)`` *before* the model changes, and the new layers are made in model order
    from ``rng``, or a generator seeded with ``seed``, or ``backend.global_rng()``.
    """
    found = []
    for i, name in resolve_targets(model, targets):
        parent = getattr(model.blocks[i], _PARENT[name])
        lin, path = getattr(parent, name), _layer_path(i, name)
        if is_adapter(lin):
            raise ValueError(f"{path} already has an adapter ({type(lin).__name__})")
        if not isinstance(lin, Linear):
            raise ValueError(f"{path} is a {type(lin).__name__}, not a Linear layer")
        try:
            check(lin)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        found.append((parent, name, lin))
    if rng is None:
        rng = host_rng(seed) if seed is not None else global_rng()
    for parent, name, lin in found:
        setattr(parent, name, make(lin, rng))
    return mark_only_lora_as_trainable(model)


def apply_lora(model, r: int, alpha: float, targets, dropout: float = 0.0, init: str = "kaiming",
               use_rslora: bool = False, seed: int | None = None, rng=None):
    """Replace the targeted Linear layers of a GPT by LoRALinear, in place; freeze all the rest.

    ``targets``: short names from ['q', 'k', 'v', 'o', 'fc', 'proj'] (that matrix in every
    block: Wq, Wk, Wv, Wo, MLP up, MLP down) or 'blocks.{i}.{name}' (one block).
    Adapters are initialized in model order from ``rng`` (a host NumPy generator),
    or from a new generator seeded with ``seed``, or else ``backend.global_rng()``.
    Everything is checked before the model changes. Returns the model.
    """
    return replace_targets(
        model, targets,
        check=lambda lin: check_lora_args(r, alpha, dropout, init, lin.in_features, lin.out_features),
        make=lambda lin, g: LoRALinear(lin, r, alpha, dropout=dropout, init=init, use_rslora=use_rslora, rng=g),
        seed=seed, rng=rng)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; the total includes the frozen base weights."""
    params = model.parameters()
    return sum(p.size for p in params if p.trainable), sum(p.size for p in params)


def merge_lora(model):
    """Merge every adapter into its W0. All merged weights are checked first: on a non-finite
    result a ValueError names the layer and no W0 changes."""
    pending = []
    for name, layer in lora_layers(model).items():
        if layer.merged:
            continue
        try:
            pending.append((layer, layer._merged_weight()))
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    for layer, W in pending:
        layer._commit_merge(W)
    return model


def unmerge_lora(model):
    """Undo ``merge_lora`` on every adapted layer."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def lora_state_dict(model) -> dict:
    """Only the adapters: ``{"blocks.0.attn.q.lora_A": A, ...}`` (the live arrays)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.data  # (r, in)
        out[f"{name}.lora_B"] = layer.lora_B.data  # (out, r)
    return out


def load_lora_state_dict(model, state: dict) -> None:
    """Copy adapter arrays (as made by ``lora_state_dict``) into the model's LoRA layers.

    Every key and shape is checked before anything is copied.
    """
    params = {}
    for name, layer in lora_layers(model).items():
        params[f"{name}.lora_A"] = layer.lora_A
        params[f"{name}.lora_B"] = layer.lora_B
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA state dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
    for k, p in params.items():
        if tuple(state[k].shape) != p.shape:
            raise ValueError(f"shape mismatch for {k!r}: state dict has {tuple(state[k].shape)}, "
                             f"model expects {p.shape}")
    for k, p in params.items():
        p.data = like(p.data, state[k]).astype(p.dtype)  # a copy on the parameter's backend
