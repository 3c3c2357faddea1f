"""The paper-scale calculator: parameter counts and training-state bytes of a transformer, on paper.

Hu et al., 2021 (LoRA, arXiv 2106.09685), section 4.2 "Practical
Benefits and Limitations" and section 7.1; Dettmers et al., 2023 (QLoRA, arXiv 2305.14314),
section 3 (double quantization: 4.127 bits per parameter).

Nothing is allocated here: the parameter counts of a GPT-2-architecture transformer follow from
its sizes, and the memory a training run needs for its *state* (weights, gradients, optimizer
moments) follows from a stated number of bytes per value. The matrices LoRA can adapt, and their
shapes, come from ``adapter.TARGET_TABLE`` (the table the model, ``lora`` and the checkpoint
code read too); its MLP width 4 * n_embd stands for ``TransformerSize.d_ff``, so a model with
another MLP width is counted right.

The LoRA paper reports for GPT-3 175B with r = 4 on Wq and Wv: trainable parameters cut "by
10,000 times", training VRAM 1.2 TB -> 350 GB ("by 3 times"), checkpoints 350 GB -> 35 MB. The
calculator reproduces the parameter ratio from the formula alone (about 9,250x) and the memory
numbers to within the accuracy the accounting allows; see ``training_memory`` for the bytes per
value and for what it leaves out. A quantized base is counted from the layout its layer stores:
NF4 with double quantization byte for byte (``nf4_bytes``: QLoRA, section 3), group-wise INT-N
from ``quant.GroupwiseLayout`` (QA-LoRA, Xu et al., 2023, section 3.3: packed codes, a float16
scale and zero point per group), so that at GPT-2 small what ``memory.measured`` finds held equals
the calculation to the byte for full fine-tuning, LoRA, QLoRA and QA-LoRA. Sizes in bytes are
decimal (1 GB = 10**9 B) where compared with the paper, whose "350GB" is 175e9 parameters x 2
bytes. What a model of ours *really* holds is measured by ``memory.measured``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from ..adapter import TARGET_TABLE, TARGETS
from ..functional import lm_head_chunk_rows
from ..quant.groupwise import GroupwiseLayout, check_group_size

# ----------------------------------------------------------------------------------------------
# sizes and parameter counts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerSize:
    """The sizes of a GPT-2-architecture decoder (pre-LN, learned positions, LM head tied to wte).

    ``d_ff`` (the MLP's hidden width) defaults to 4 * d_model, as in GPT-2 and GPT-3.
    """

    name: str
    n_layer: int
    d_model: int
    n_head: int
    vocab_size: int
    n_ctx: int
    d_ff: int | None = None

    def __post_init__(self):
        for field in ("n_layer", "d_model", "n_head", "vocab_size", "n_ctx"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"TransformerSize.{field} must be a positive integer; got {v!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        elif isinstance(self.d_ff, bool) or not isinstance(self.d_ff, int) or self.d_ff <= 0:
            raise ValueError(f"TransformerSize.d_ff must be a positive integer or None; got {self.d_ff!r}")

    @classmethod
    def from_config(cls, config, name: str = "GPT") -> TransformerSize:
        """The sizes of one of our ``GPTConfig`` models."""
        return cls(name, config.n_layer, config.n_embd, config.n_head, config.vocab_size, config.block_size)

    def to_dict(self) -> dict:
        return asdict(self)


# Facts: GPT-2 (Radford et al., 2019, table 2 and the released configs: 12/768 "124M" and 48/1600 "1.5B",
# vocabulary 50257, context 1024); GPT-3 175B (Brown et al., 2020, table 2.1: 96 layers, d_model 12288,
# 96 heads of 128, context 2048, the same 50257-token BPE as GPT-2, d_ff = 4 d_model).
PRESETS = {
    "gpt2": TransformerSize("GPT-2 small (124M)", 12, 768, 12, 50257, 1024),
    "gpt2-medium": TransformerSize("GPT-2 medium (355M)", 24, 1024, 16, 50257, 1024),
    "gpt2-xl": TransformerSize("GPT-2 XL (1.5B)", 48, 1600, 25, 50257, 1024),
    "gpt3-175b": TransformerSize("GPT-3 175B", 96, 12288, 96, 50257, 2048),
    # the package's own base model (__main__.BASE_CONFIG, vocabulary data.VOCAB_SIZE)
    "lfs-base": TransformerSize("our base model", 4, 128, 4, 56, 32),
}


def preset(name: str) -> TransformerSize:
    """One of ``PRESETS`` by key."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {list(PRESETS)}")
    return PRESETS[name]


_MLP_MULT = 4  # TARGET_TABLE writes the MLP width as 4 * n_embd: here it is the model's d_ff


def _width(cfg: TransformerSize, mult: int) -> int:
    """A width of TARGET_TABLE (in units of n_embd) for ``cfg``: 1 -> d_model, 4 (the MLP) -> d_ff."""
    if mult == 1:
        return cfg.d_model
    if mult == _MLP_MULT:
        return cfg.d_ff
    raise ValueError(f"adapter.TARGET_TABLE has a width of {mult} * n_embd, which TransformerSize does not know")


def target_shapes(cfg: TransformerSize) -> dict:
    """(d_out, d_in) of each adaptable matrix in one block, in the paper's orientation W0: (d, k).

    From ``adapter.TARGET_TABLE``: q, k, v, o are (d, d), fc is (d_ff, d), proj is (d, d_ff).
    """
    return {name: (_width(cfg, t.out_mult), _width(cfg, t.in_mult)) for name, t in TARGET_TABLE.items()}


def _check_targets(targets) -> tuple:
    if isinstance(targets, str):
        raise ValueError(f"targets must be a sequence of names such as ({targets!r},), not a single string")
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"targets must name at least one matrix; valid targets: {list(TARGETS)}")
    bad = [t for t in targets if t not in TARGET_TABLE]
    if bad:
        raise ValueError(f"unknown target {bad[0]!r}; valid targets: {list(TARGETS)}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets repeat a name: {targets}")
    return targets


def _check_rank(r) -> int:
    from ..checks import check_int

    return check_int("the LoRA rank r", r, 1)


def lora_trainable_parameters(cfg: TransformerSize, r: int, targets=("q", "v"), group_size: int | None = None) -> int:
    """Number of LoRA parameters: n_layer * sum over targets of r * (d_in + d_out).

    Each adapted matrix W0 (d_out x d_in) gets B (d_out x r) and A (r x d_in).
    GPT-3 175B, r = 4 on Wq and Wv: 96 * 2 * 4 * (12288 + 12288) = 18,874,368
    (the paper's "parameter budget of 18M", section 7.1). With ``group_size`` (QA-LoRA) A sees
    the group means, A (r x d_in / group_size), and r may exceed d_in / group_size.
    """
    r = _check_rank(r)
    shapes = target_shapes(cfg)
    per_layer = 0
    for t in _check_targets(targets):
        d_out, d_in = shapes[t]
        if group_size is not None:
            d_in = _groups(d_in, group_size, t)
        elif r > min(d_out, d_in):
            raise ValueError(f"r={r} exceeds min(d_out, d_in)={min(d_out, d_in)} of target {t!r}")
        per_layer += r * (d_in + d_out)
    return cfg.n_layer * per_layer


def _groups(d_in: int, group_size, target: str) -> int:
    """d_in / group_size, the groups of one target's input (``quant.check_group_size``'s rule, the target named)."""
    try:
        return d_in // check_group_size(group_size, d_in)
    except ValueError as e:
        raise ValueError(f"target {target!r}: {e}") from None


def linear_parameters(cfg: TransformerSize) -> int:
    """Weights of the six matrices of every block: n_layer * (4 d^2 + 2 d d_ff) (= 12 n_layer d^2)."""
    return cfg.n_layer * sum(d_out * d_in for d_out, d_in in target_shapes(cfg).values())


def full_parameters(cfg: TransformerSize) -> int:
    """All parameters of the model, counted exactly for our (GPT-2) architecture.

    Leading terms: 12 * n_layer * d^2 (the six matrices) + (vocab + n_ctx) * d
    (token and position embeddings; the LM head is tied to the token
    embedding). The rest is small: per block the biases of the six matrices
    (one per output: 4d + d_ff + d) and two LayerNorms (4d); a final LayerNorm (2d).
    GPT-2 small gives 124,439,808 (the published "124M"); GPT-3 175B gives
    174.6e9 (the paper's Table 4 lists 175,255.8M, the GPT-3 paper "175.0B";
    GPT-3's exact layout differs in small terms).
    """
    d = cfg.d_model
    biases = sum(d_out for d_out, _ in target_shapes(cfg).values())  # q, k, v, o, fc, proj
    per_block_small = biases + 4 * d  # + ln_1, ln_2 (gain, bias)
    embeddings = (cfg.vocab_size + cfg.n_ctx) * d
    return linear_parameters(cfg) + cfg.n_layer * per_block_small + embeddings + 2 * d


# ----------------------------------------------------------------------------------------------
# bytes
# ----------------------------------------------------------------------------------------------


def nf4_bits_per_parameter(block_size: int = 64, double_quant: bool = True, second_block_size: int = 256) -> float:
    """Bits per weight of QLoRA's NF4 storage (Dettmers et al., 2023, section 3).

    4 bits per code plus one absmax scale per block of ``block_size``
    weights: a float32 scale costs 32 / 64 = 0.5 bits per weight. Double
    quantization stores those scales as 8-bit codes with one float32 scale per
    ``second_block_size`` of them: 8 / 64 + 32 / (64 * 256) = 0.127 bits,
    4.127 bits in all.
    """
    for name, v in (("block_size", block_size), ("second_block_size", second_block_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if double_quant:
        return 4.0 + 8.0 / block_size + 32.0 / (block_size * second_block_size)
    return 4.0 + 32.0 / block_size


def groupwise_bits_per_parameter(bits: int = 4, group_size: int = 32, scale_bits: int = 16,
                                 zero_bits: int = 16) -> float:
    """Bits per weight of group-wise INT-N storage (QA-LoRA): codes plus a scale and a zero per group.

    ``quant.GroupwiseLayout.bits_per_weight``, the layout ``qalora.GroupwiseLinear`` stores (float16
    scale and zero: 4 + 16/32 + 16/32 = 5 bits at INT4 with groups of 32).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [1, 8]; got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer; got {group_size!r}")
    return GroupwiseLayout(bits, group_size, scale_bits / 8, zero_bits / 8).bits_per_weight()


def nf4_bytes(n_weights: int, block_size: int = 64, double_quant: bool = True, second_block_size: int = 256) -> int:
    """Bytes ``qlora.NF4Linear`` stores for ``n_weights`` weights (``nf4_bits_per_parameter`` counted exactly).

    Two codes per byte; per block of ``block_size`` a float32 absmax, or with double quantization an
    8-bit absmax code per block, a float32 scale per ``second_block_size`` of those and one float32
    offset per matrix.
    """
    blocks = -(-n_weights // block_size)
    if double_quant:
        return -(-n_weights // 2) + blocks + 4 * -(-blocks // second_block_size) + 4
    return -(-n_weights // 2) + 4 * blocks


def base_bytes(cfg: TransformerSize, method: str, bits: int = 4, group_size: int = 32) -> int:
    """Bytes of the six block matrices of every layer as ``method``'s frozen base stores them.

    ``"qlora"``: NF4 with double quantization (``nf4_bytes``); ``"qalora"``: group-wise INT-``bits``
    (``quant.GroupwiseLayout``: packed codes, float16 scale and zero per group); otherwise 0 (a float
    base is counted with the other parameters).
    """
    layout = GroupwiseLayout(bits, group_size)
    per_layer = 0
    for t, (d_out, d_in) in target_shapes(cfg).items():
        if method == "qlora":
            per_layer += nf4_bytes(d_out * d_in)
        elif method == "qalora":
            _groups(d_in, group_size, t)
            per_layer += layout.nbytes(d_out, d_in)
    return cfg.n_layer * per_layer


QLORA_BITS_PER_PARAMETER = nf4_bits_per_parameter()  # 4.127 (4 + 0.125 + 0.00195)

_MOMENTS = {"adam": 2, "adamw": 2, "sgd": 0, "momentum": 1}
_METHODS = ("full", "lora", "qlora", "qalora")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of a training run's state, by kind. ``total`` is their sum."""

    method: str
    trainable_parameters: int
    frozen_parameters: int
    weights: float
    gradients: float
    optimizer: float
    master_weights: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.master_weights

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _check_method(method) -> str:
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {list(_METHODS)}")
    return method


def _check_bytes(name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number of bytes >= 0; got {v!r}")
    return float(v)


def training_memory(cfg: TransformerSize, method: str = "full", r: int = 4, targets=("q", "v"),
                    weight_bytes: float = 2, optimizer: str = "adam", grad_bytes: float | None = None,
                    moment_bytes: float | None = None, master_bytes: float = 0,
                    keep_gradients: bool = True, bits: int = 4, group_size: int = 32) -> MemoryEstimate:
    """Bytes of the *state* of a training run: weights, gradients, optimizer moments (no activations).

    The accounting, in bytes per parameter value:

    - weight: ``weight_bytes`` (2: fp16) for every value, trainable or frozen
      (QLoRA: ``QLORA_BITS_PER_PARAMETER / 8`` for the frozen block matrices);
    - gradient: ``grad_bytes`` (default: the weight's) for trainable values
      only; a frozen weight's gradient is never computed;
    - optimizer moments: n_moments x ``moment_bytes`` (default: the weight's;
      Adam keeps 2) for trainable values only;
    - fp32 master copy: ``master_bytes`` (default 0) for trainable values only.

    Default: everything in fp16, so 8 bytes per trainable and 2 per frozen
    value. For GPT-3 175B that gives 1.40 TB for full fine-tuning and 0.35 TB
    for LoRA (r = 4, Wq and Wv): a 4.0x reduction. The paper reports 1.2 TB ->
    350 GB (3.4x; "3 times" in its abstract). The LoRA side matches, since
    it is the fp16 weights (175e9 x 2 B) plus next to nothing. The full side
    depends on what a run keeps at once, which the paper does not spell out.
    Its own explanation ("up to 2/3 ... as we do not need to store the
    optimizer states for the frozen parameters") counts weights plus two
    moments, 6 bytes per value, which is ``keep_gradients=False``: 1.05 TB and
    3.0x. The reported 1.2 TB lies between the two accountings. Not counted
    at all: activations (they grow with batch and sequence length, and LoRA
    still needs most of them, to pass gradients down through the frozen
    layers), temporary buffers and fragmentation. They add about the same to
    both methods and so pull the measured ratio below the state-only one.
    Modern mixed precision (fp32 master weights and fp32 moments:
    ``master_bytes=4, moment_bytes=4``) needs 16 bytes per trainable value,
    2.8 TB, far above the reported figure.

    ``method``: ``"full"`` (every parameter trainable), ``"lora"`` (only A and
    B of the ``targets`` in every block trainable, the model frozen),
    ``"qlora"`` (as LoRA, with the six block matrices stored in NF4 with
    double quantization, ``QLORA_BITS_PER_PARAMETER`` bits each, counted
    exactly by ``nf4_bytes``) or ``"qalora"`` (the six block matrices stored
    group-wise INT-``bits`` with groups of ``group_size``, ``quant.GroupwiseLayout``
    as ``qalora.GroupwiseLinear`` holds it; A sees group means, so it is
    (r, d_in / group_size)); embeddings, biases and LayerNorms stay at
    ``weight_bytes``. ``optimizer``: ``"adam"`` / ``"adamw"`` (2 moments),
    ``"momentum"`` (1), ``"sgd"`` (0).
    """
    method = _check_method(method)
    if optimizer not in _MOMENTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers: {list(_MOMENTS)}")
    weight_bytes = _check_bytes("weight_bytes", weight_bytes)
    grad_bytes = weight_bytes if grad_bytes is None else _check_bytes("grad_bytes", grad_bytes)
    moment_bytes = weight_bytes if moment_bytes is None else _check_bytes("moment_bytes", moment_bytes)
    master_bytes = _check_bytes("master_bytes", master_bytes)

    n_full = full_parameters(cfg)
    if method == "full":
        n_train, n_frozen = n_full, 0
        frozen_weight_bytes = 0.0
    else:
        pooled = group_size if method == "qalora" else None
        n_train, n_frozen = lora_trainable_parameters(cfg, r, targets, pooled), n_full
        if method == "lora":
            frozen_weight_bytes = n_frozen * weight_bytes
        else:
            n_quant = linear_parameters(cfg)
            frozen_weight_bytes = base_bytes(cfg, method, bits, group_size) + (n_frozen - n_quant) * weight_bytes
    return MemoryEstimate(
        method=method,
        trainable_parameters=n_train,
        frozen_parameters=n_frozen,
        weights=frozen_weight_bytes + n_train * weight_bytes,
        gradients=n_train * grad_bytes if keep_gradients else 0.0,
        optimizer=n_train * _MOMENTS[optimizer] * moment_bytes,
        master_weights=n_train * master_bytes,
    )


def checkpoint_bytes(cfg: TransformerSize, method: str = "full", r: int = 4, targets=("q", "v"),
                     weight_bytes: float = 2, group_size: int = 32) -> float:
    """Bytes of what must be saved per task: the whole model (full) or only the adapter (LoRA, QLoRA).

    GPT-3 175B in fp16: 174.6e9 x 2 B = 349 GB (paper: 350 GB); the r = 4
    Wq, Wv adapter: 18,874,368 x 2 B = 37.7 MB = 36.0 MiB (paper: "35MB",
    from its rounded 18M parameter budget).
    """
    method = _check_method(method)
    weight_bytes = _check_bytes("weight_bytes", weight_bytes)
    if method == "full":
        return full_parameters(cfg) * weight_bytes
    return lora_trainable_parameters(cfg, r, targets, group_size if method == "qalora" else None) * weight_bytes


# What Hu et al. (2021) report for GPT-3 175B (abstract, section 4.2, section 7.1, Table 4).
PAPER_GPT3 = {
    "trainable_reduction": 10_000,  # "reduce the number of trainable parameters by 10,000 times"
    "full_parameters": 175_255.8e6,  # Table 4, fine-tuning row
    "lora_parameters": 18e6,  # section 7.1: "a parameter budget of 18M" = r 4 on two matrices x 96 layers
    "vram_full": 1.2e12,  # section 4.2: "from 1.2TB to 350GB"
    "vram_lora": 350e9,
    "checkpoint_full": 350e9,  # section 4.2: "from 350GB to 35MB"
    "checkpoint_lora": 35e6,
    "vram_reduction": 3,  # abstract: "the GPU memory requirement by 3 times"
}


def gpt3_comparison(r: int = 4, targets=("q", "v"), **memory_kwargs) -> dict:
    """Our calculator next to the paper for GPT-3 175B: ``{quantity: (ours, paper)}``.

    Quantities: full and LoRA trainable parameters, their ratio, training
    state memory (full, LoRA) and checkpoint size (full, LoRA) in bytes.
    ``memory_kwargs`` go to ``training_memory`` (e.g. ``keep_gradients=False``).
    """
    cfg = PRESETS["gpt3-175b"]
    n_full = full_parameters(cfg)
    n_lora = lora_trainable_parameters(cfg, r, targets)
    full = training_memory(cfg, "full", r, targets, **memory_kwargs)
    lora = training_memory(cfg, "lora", r, targets, **memory_kwargs)
    p = PAPER_GPT3
    return {
        "full_parameters": (n_full, p["full_parameters"]),
        "lora_parameters": (n_lora, p["lora_parameters"]),
        "trainable_reduction": (n_full / n_lora, p["trainable_reduction"]),
        "vram_full": (full.total, p["vram_full"]),
        "vram_lora": (lora.total, p["vram_lora"]),
        "vram_reduction": (full.total / lora.total, p["vram_full"] / p["vram_lora"]),
        "checkpoint_full": (checkpoint_bytes(cfg, "full", r, targets), p["checkpoint_full"]),
        "checkpoint_lora": (checkpoint_bytes(cfg, "lora", r, targets), p["checkpoint_lora"]),
    }


# ----------------------------------------------------------------------------------------------
# activations: what a training step keeps from its forward for its backward
# ----------------------------------------------------------------------------------------------

# Values each block keeps per token for its backward, in units of the width d (our caches, read
# off the code): ln_1's input and normalized output (2), q, k, v per head (3), the attention output
# (1), the residual sum and ln_2's output (2), the MLP's 4d-wide input to GELU, its tanh and its
# output (12), and the block output (1): 21 d - 4 d shared between caches = 17 d; plus the attention
# probabilities, n_head values per earlier position (n_head * T per token).
BLOCK_VALUES_PER_TOKEN = 17


def activation_bytes(cfg: TransformerSize, batch: int, seq: int, value_bytes: float = 4,
                     logits: bool = False, embedding_trains: bool = False, group_size: int | None = None,
                     targets=TARGETS) -> float:
    """Bytes a training step keeps from its forward for its backward (the activations), for any method.

    Per block and token ``17 d + n_head * seq`` values (``BLOCK_VALUES_PER_TOKEN``; LoRA's rank-r
    caches add r values per adapted matrix, negligible), outside the blocks 3 d per token (the
    embedding sum, ln_f's output, the gradient below the LM head). ``logits=True`` adds the
    (tokens, vocab) logits and their gradient, which an unchunked cross-entropy holds at once
    (ours runs the head in chunks, ``functional.lm_head_cross_entropy``, so by default they are
    not counted); ``embedding_trains`` adds the LM head's (vocab, d) gradient, formed with the
    loss (full fine-tuning).

    ``group_size`` (QA-LoRA, on the matrices ``targets``): a quantized base keeps no input (only its
    shape) and the pooled adapter keeps only the group means of its input, so the inputs that only
    the adapted matrices kept are gone (``_kept_inputs``: ln_1's output once all of q, k, v are
    adapted, the attention output, ln_2's output, the 4 d GELU output: 7 d with all six) and
    d_in / group_size values per adapted matrix come instead. (QLoRA's adapter keeps its full
    input, like LoRA's.)
    """
    tokens = batch * seq
    d = cfg.d_model
    per_block = BLOCK_VALUES_PER_TOKEN * d + cfg.n_head * seq
    if group_size is not None:
        shapes = target_shapes(cfg)
        targets = _check_targets(targets)
        per_block += sum(_groups(shapes[t][1], group_size, t) for t in targets) - _kept_inputs(cfg, targets)
    values = tokens * cfg.n_layer * per_block + 3 * tokens * d
    if logits:
        values += 2 * tokens * cfg.vocab_size
    if embedding_trains:
        values += cfg.vocab_size * d
    return values * value_bytes


def _kept_inputs(cfg: TransformerSize, pooled) -> int:
    """Values per token of the matrix inputs only the ``pooled`` matrices' caches kept (``activation_bytes``)."""
    inputs = {("q", "k", "v"): cfg.d_model, ("o",): cfg.d_model, ("fc",): cfg.d_model, ("proj",): cfg.d_ff}
    return sum(width for users, width in inputs.items() if set(users) <= set(pooled))


def step_transient_bytes(cfg: TransformerSize, batch: int, seq: int, value_bytes: float = 4) -> float:
    """The largest temporaries of a step on top of the activations: in the backward one (B, n_head, T, T)
    attention array and two (tokens, 4 d) MLP arrays, or in the loss one chunk of logits
    (``functional.lm_head_cross_entropy``: ``lm_head_chunk_rows`` x vocab, at most tokens x vocab)."""
    tokens = batch * seq
    backward = batch * cfg.n_head * seq * seq + 2 * tokens * cfg.d_ff
    rows = lm_head_chunk_rows(cfg.vocab_size)
    loss = min(rows, tokens) * cfg.vocab_size
    return value_bytes * max(backward, loss)
