"""Quantization for QLoRA and QA-LoRA.

QLoRA (Dettmers et al., 2023), Sections 2-3: blockwise 4-bit NF4 / FP4 quantization and double
quantization of the block constants (``tables.py``, ``blockwise.py``). QA-LoRA (Xu et al., 2023),
Section 3: group-wise asymmetric INT-N quantization (``groupwise.py``).
"""

from lora_from_scratch.quant.blockwise import (
    QUANT_TYPES,
    Quantized4bit,
    bits_per_parameter,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    offset_mean,
    pack_nibbles,
    quantize_4bit,
    quantize_blockwise_8bit,
    unpack_nibbles,
)
from lora_from_scratch.quant.groupwise import (
    GroupwiseLayout,
    GroupwiseQuantized,
    dequantize_groupwise,
    groupwise_bits_per_parameter,
    pack_codes,
    quantize_groupwise,
    unpack_codes,
)
from lora_from_scratch.quant.tables import (
    DYNAMIC_MAP,
    FP4_CODE,
    INT4_CODE,
    NF4_CODE,
    dynamic_map,
    float32_linspace,
    fp4_code,
    int4_code,
    nf4_code,
    normal_quantile,
)

__all__ = [
    "DYNAMIC_MAP",
    "FP4_CODE",
    "INT4_CODE",
    "NF4_CODE",
    "QUANT_TYPES",
    "GroupwiseLayout",
    "GroupwiseQuantized",
    "Quantized4bit",
    "bits_per_parameter",
    "dequantize_4bit",
    "dequantize_blockwise_8bit",
    "dequantize_groupwise",
    "dynamic_map",
    "float32_linspace",
    "fp4_code",
    "groupwise_bits_per_parameter",
    "int4_code",
    "nf4_code",
    "normal_quantile",
    "offset_mean",
    "pack_codes",
    "pack_nibbles",
    "quantize_4bit",
    "quantize_blockwise_8bit",
    "quantize_groupwise",
    "unpack_codes",
    "unpack_nibbles",
]
