"""The calculator's activation term against a training step's traced memory (small models, seconds)."""

import numpy as np
import pytest

from lora_from_scratch.lora import apply_lora
from lora_from_scratch.memory import step_memory
from lora_from_scratch.memory.paper import TransformerSize, activation_bytes, step_transient_bytes
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.optim import AdamW
from lora_from_scratch.qalora import apply_qalora


@pytest.mark.parametrize("sizes", [(2, 128, 4, 256, 2, 64), (2, 128, 8, 256, 2, 128), (3, 192, 6, 3000, 1, 256)])
@pytest.mark.parametrize("method", ["full", "lora", "qalora"])
def test_activation_term_predicts_the_traced_step(sizes, method):
    L, C, H, V, B, T = sizes
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C)
    model = GPT(cfg, seed=0)
    if method == "lora":
        apply_lora(model, 8, 16, ["q", "k", "v", "o", "fc", "proj"], seed=1)
    elif method == "qalora":  # pooled adapters over quantized bases: the matrices' inputs are not kept
        apply_qalora(model, 8, 16, ["q", "k", "v", "o", "fc", "proj"], bits=4, group_size=32, seed=1)
    opt = AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=0.0)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    step_memory(model, opt, batch)  # the AdamW moments exist from here on
    measured = step_memory(model, opt, batch)
    size = TransformerSize.from_config(cfg)
    act = activation_bytes(size, B, T, embedding_trains=method == "full", group_size=32 if method == "qalora" else None)
    assert abs(measured["activations"] / act - 1) < 0.10
    peak = measured["held_before"] + act + step_transient_bytes(size, B, T)
    assert abs(measured["peak"] / peak - 1) < 0.15
    # the unchunked loss would hold the logits and their gradient besides
    assert activation_bytes(size, B, T, logits=True) - activation_bytes(size, B, T) == 2 * B * T * V * 4
