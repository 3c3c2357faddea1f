"""The six matrices LoRA can adapt in each block, Wq, Wk, Wv, Wo, MLP up and down, and where each lives.

LoRA (Hu et al., 2021), section 4.2. The table (``TARGET_TABLE`` of ``Target``: the parent module in
our GPT, the GPT-2 module, the third of the fused ``c_attn``, the widths) and ``resolve_targets`` are
defined in ``adapter.py``, beside ``replace_targets``, which puts the adapters on them. The file
formats, the GPT-2 import and the memory calculator read them from here.
"""

from __future__ import annotations

from .adapter import FUSED, HF_MODULES, TARGET_TABLE, TARGETS, Target, parse_path, resolve_targets

__all__ = ["FUSED", "HF_MODULES", "TARGETS", "TARGET_TABLE", "Target", "parse_path", "resolve_targets"]
