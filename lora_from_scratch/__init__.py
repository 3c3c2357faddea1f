"""lora_from_scratch: LoRA, QLoRA and QA-LoRA written from scratch in NumPy (and CuPy).

Start with ``python -m lora_from_scratch demo`` or the notebooks in ``notebooks/``.

Modules, in the order the tutorial meets them: backend, functional, nn, model, optim,
gradcheck, data, train, checkpoint (and hf_io, peft_io), rank, lora, memory, quant, qlora, qalora,
qlora_vs_qalora, plots, demo; for real text: tokenizer (GPT-2's byte-level BPE), generation.
"""

from .nn import no_grad

__all__ = ["no_grad"]
__version__ = "0.1.0"
