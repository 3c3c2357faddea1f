"""The six matrices LoRA can adapt in each block, and where each lives, in one table.

LoRA (Hu et al., 2021), section 4.2: "we only consider the four projection matrices of the
self-attention module (Wq, Wk, Wv, Wo) and ... the two in the MLP module". Our GPT keeps all
six as separate ``Linear`` layers; GPT-2 (and therefore Hugging Face ``transformers`` and PEFT)
fuses Wq, Wk, Wv into one ``c_attn`` of width 3C and names the attention output projection and
the MLP's down projection both ``c_proj``. This table says, for each of our names:

- ``parent``: the module of a block that holds it (``attn`` or ``mlp``), so its path is
  ``blocks.{i}.{parent}.{name}``;
- ``hf_module``: the GPT-2 module it belongs to (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``,
  ``mlp.c_proj``), below ``transformer.h.{i}.``;
- ``fused_index``: for q, k, v, which third of ``c_attn``'s 3C outputs it is (0, 1, 2); None otherwise;
- ``in_mult``, ``out_mult``: its (in, out) widths in units of n_embd (fc: C -> 4C, proj: 4C -> C).

Every module that needs any of this (lora, memory, io, peft_io) reads it from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    parent: str
    hf_module: str
    fused_index: int | None
    in_mult: int
    out_mult: int

    def path(self, block: int) -> str:
        """Our dotted path in a GPT: ``blocks.{block}.{parent}.{name}``."""
        return f"blocks.{block}.{self.parent}.{self.name}"

    def hf_path(self, block: int) -> str:
        """The GPT-2 module path: ``transformer.h.{block}.{hf_module}``."""
        return f"transformer.h.{block}.{self.hf_module}"

    def shape(self, n_embd: int) -> tuple[int, int]:
        """(out, in) of the weight, the paper's (d, k) orientation."""
        return self.out_mult * n_embd, self.in_mult * n_embd


TARGET_TABLE = {
    "q": Target("q", "attn", "attn.c_attn", 0, 1, 1),
    "k": Target("k", "attn", "attn.c_attn", 1, 1, 1),
    "v": Target("v", "attn", "attn.c_attn", 2, 1, 1),
    "o": Target("o", "attn", "attn.c_proj", None, 1, 1),
    "fc": Target("fc", "mlp", "mlp.c_fc", None, 1, 4),
    "proj": Target("proj", "mlp", "mlp.c_proj", None, 4, 1),
}
TARGETS = tuple(TARGET_TABLE)  # ("q", "k", "v", "o", "fc", "proj")
FUSED = ("q", "k", "v")  # the three thirds of GPT-2's c_attn, in order
HF_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

_PATH = re.compile(r"^blocks\.(\d+)\.(attn|mlp)\.([a-z]+)$")
_BLOCK_TARGET = re.compile(r"^blocks\.(\d+)\.([a-z]+)$")


def parse_path(path: str) -> tuple[int, Target]:
    """(block index, Target) of a dotted path such as ``blocks.2.attn.q``; ValueError otherwise."""
    m = _PATH.match(path)
    if m is None or m.group(3) not in TARGET_TABLE or TARGET_TABLE[m.group(3)].parent != m.group(2):
        raise ValueError(f"{path!r} is not the path of an adaptable matrix (blocks.<i>.attn.q|k|v|o or "
                         f"blocks.<i>.mlp.fc|proj)")
    return int(m.group(1)), TARGET_TABLE[m.group(3)]


def resolve_targets(n_layer: int, targets) -> list[tuple[int, Target]]:
    """(block, Target) pairs for ``targets``, in model order.

    ``targets``: short names from ``TARGETS`` (that matrix in every block) or ``"blocks.{i}.{name}"``
    (one block), or one such string. Raises ValueError naming an unknown target or a missing block.
    """
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError(f"at least one target is needed; valid targets: {list(TARGETS)}")
    chosen = set()
    for t in targets:
        if isinstance(t, str) and t in TARGET_TABLE:
            chosen.update((i, t) for i in range(n_layer))
            continue
        m = _BLOCK_TARGET.match(t) if isinstance(t, str) else None
        if m is None or m.group(2) not in TARGET_TABLE:
            raise ValueError(f"unknown target {t!r}; valid targets: {list(TARGETS)} or 'blocks.<i>.<name>'")
        i = int(m.group(1))
        if i >= n_layer:
            raise ValueError(f"target {t!r} names block {i}, but the model has {n_layer} blocks (0..{n_layer - 1})")
        chosen.add((i, m.group(2)))
    return [(i, TARGET_TABLE[n]) for i, n in sorted(chosen, key=lambda it: (it[0], TARGETS.index(it[1])))]
