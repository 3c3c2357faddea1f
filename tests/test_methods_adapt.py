"""``methods.adapt``: one target may be given as a string, as ``apply_lora`` and its siblings accept it."""

import pytest

from lora_from_scratch.adapter import lora_layers
from lora_from_scratch.methods import adapt, make_optimizer
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.train import TrainConfig

CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("method", ["lora", "qlora", "qalora"])
def test_a_single_target_string_is_one_target(method):
    model = adapt(GPT(CFG, seed=0), method, r=2, alpha=4, targets="fc")
    assert list(lora_layers(model)) == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    same = adapt(GPT(CFG, seed=0), method, r=2, alpha=4, targets=["fc"])
    assert list(lora_layers(same)) == list(lora_layers(model))


def test_make_optimizer_decays_matrices_only():
    model = adapt(GPT(CFG, seed=0), "full")
    opt = make_optimizer(model, TrainConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == TrainConfig().weight_decay and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.data.ndim == 2 for p in decay["params"])
    assert no_decay["params"] and all(p.data.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.parameters())
