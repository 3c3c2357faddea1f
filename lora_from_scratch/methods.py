"""The four ways to adapt a pre-trained model, by name: full fine-tuning, LoRA, QLoRA, QA-LoRA.

- ``"full"``: every parameter trains (the baseline of Hu et al., 2021, section 2);
- ``"lora"``: W0 frozen in float, adapters s B A (Hu et al., 2021, section 4.1);
- ``"qlora"``: W0 frozen in 4-bit NF4 with double quantization, the same adapters
  (Dettmers et al., 2023, section 3);
- ``"qalora"``: W0 frozen in group-wise INT-N, adapters that see the group means of the input
  (Xu et al., 2023, section 3.3).

``adapt(model, method, ...)`` applies one of them in place, so the demo, the experiments and the
notebooks all make a method's model the same way.
"""

from __future__ import annotations

from .adapter import apply_lora
from .qalora import apply_qalora
from .qlora import apply_qlora
from .targets import TARGETS

METHODS = ("full", "lora", "qlora", "qalora")
NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "qalora": "QA-LoRA"}


def check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    return method


def adapt(model, method: str, r: int = 8, alpha: float = 16, targets=TARGETS, *, seed: int | None = 0,
          dropout: float = 0.0, init: str = "kaiming", use_rslora: bool = False, bits: int = 4,
          group_size: int = 32, blocksize: int = 64, double_quant: bool = True):
    """Prepare ``model`` for ``method`` in place and return it (``"full"`` leaves every parameter trainable).

    ``bits`` and ``group_size`` are QA-LoRA's; ``blocksize`` and ``double_quant`` QLoRA's. The
    adapters are drawn from a generator seeded with ``seed`` (LoRA and QLoRA get the same draws).
    """
    check_method(method)
    targets = list(targets)
    if method == "full":
        model.unfreeze()
        return model
    if method == "lora":
        return apply_lora(model, r, alpha, targets, dropout=dropout, init=init, use_rslora=use_rslora, seed=seed)
    if method == "qlora":
        return apply_qlora(model, r, alpha, targets, blocksize=blocksize, double_quant=double_quant,
                           dropout=dropout, init=init, use_rslora=use_rslora, seed=seed)
    return apply_qalora(model, r, alpha, targets, bits=bits, group_size=group_size, dropout=dropout,
                        init=init, use_rslora=use_rslora, seed=seed)
