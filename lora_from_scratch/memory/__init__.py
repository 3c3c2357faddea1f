"""Memory accounting: what a model really holds and needs, and the LoRA paper's GPT-3 numbers on paper.

Two halves, one module each; every public name of both is importable from here
(``from lora_from_scratch.memory import format_bytes, resident_bytes, PRESETS``):

- ``memory.measured``: the bytes of the arrays a model and an optimizer hold (parameters,
  buffers, gradients, optimizer state: ``resident_bytes``, ``memory_report``), and what a
  computation allocates while it runs, traced on the host (``traced_peak``, ``step_memory``:
  the activations and the peak of a training step).
- ``memory.paper``: the paper-scale calculator (nothing allocated): parameter counts of a
  GPT-2-architecture transformer (``TransformerSize``, ``PRESETS``, ``full_parameters``,
  ``lora_trainable_parameters``), the bytes of a training run's state (``training_memory``),
  checkpoints (``checkpoint_bytes``), bits per weight of NF4 and group-wise storage, and the
  comparison with what the LoRA paper reports for GPT-3 175B (``gpt3_comparison``).
"""

from .measured import (
    buffer_bytes,
    format_bytes,
    format_report,
    gradient_bytes,
    memory_report,
    optimizer_state_bytes,
    parameter_bytes,
    parameter_count,
    resident_bytes,
    step_memory,
    traced_peak,
    trainable_state_bytes,
)
from .paper import (
    PAPER_GPT3,
    PRESETS,
    QLORA_BITS_PER_PARAMETER,
    MemoryEstimate,
    TransformerSize,
    activation_bytes,
    checkpoint_bytes,
    full_parameters,
    gpt3_comparison,
    groupwise_bits_per_parameter,
    linear_parameters,
    lora_trainable_parameters,
    nf4_bits_per_parameter,
    preset,
    step_transient_bytes,
    target_shapes,
    training_memory,
)

__all__ = [
    # measured
    "buffer_bytes",
    "format_bytes",
    "format_report",
    "gradient_bytes",
    "memory_report",
    "optimizer_state_bytes",
    "parameter_bytes",
    "parameter_count",
    "resident_bytes",
    "step_memory",
    "traced_peak",
    "trainable_state_bytes",
    # paper
    "PAPER_GPT3",
    "PRESETS",
    "QLORA_BITS_PER_PARAMETER",
    "MemoryEstimate",
    "TransformerSize",
    "activation_bytes",
    "checkpoint_bytes",
    "full_parameters",
    "gpt3_comparison",
    "groupwise_bits_per_parameter",
    "linear_parameters",
    "lora_trainable_parameters",
    "nf4_bits_per_parameter",
    "preset",
    "step_transient_bytes",
    "target_shapes",
    "training_memory",
]
