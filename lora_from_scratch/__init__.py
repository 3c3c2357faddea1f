"""lora_from_scratch: LoRA, QLoRA and QA-LoRA written from scratch in NumPy (and CuPy).

Start with ``python -m lora_from_scratch demo`` or the notebooks in ``notebooks/``.
Modules: backend, functional, nn, model, optim, gradcheck, rank, lora, quant,
qlora, qalora, memory, data, train, io, plots.
"""

__version__ = "0.1.0"
