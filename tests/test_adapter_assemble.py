"""``AdaptedLinear.assemble``: a layer from parts read from a file is checked before it is built.

The subclasses (LoRA, QLoRA, QA-LoRA) make their adapter from the base itself; ``assemble`` is where
parts come from outside (checkpoints), so that is where the base's kind and every adapter's shape
are checked, each adapter by name.
"""

import numpy as np
import pytest

from lora_from_scratch.adapter import LoRALinear, LowRankAdapter
from lora_from_scratch.nn import LayerNorm, Linear
from lora_from_scratch.qalora import GroupwiseLinear, QALoRALinear


def _adapter(r, k, d):
    rng = np.random.default_rng(0)
    return LowRankAdapter(rng.standard_normal((r, k)).astype(np.float32),
                          rng.standard_normal((d, r)).astype(np.float32), 8.0)


def test_assemble_builds_a_layer_that_computes_like_the_parts():
    base = Linear(16, 24, rng=np.random.default_rng(1))
    a, b = _adapter(4, 16, 24), _adapter(2, 16, 24)
    layer = LoRALinear.assemble(base, {"one": a, "two": b}, active="two")
    assert layer.adapters.keys() == ["one", "two"] and layer.active == "two" and not layer.merged
    x = np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)
    expected = x @ base.weight.data.T + base.bias.data + b.scaling * (x @ b.A.data.T) @ b.B.data.T
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert not base.weight.trainable  # the base is frozen


def test_assemble_refuses_a_base_that_is_not_a_linear_layer():
    with pytest.raises(ValueError, match="base must be an nn.Linear or a quantized linear layer, got LayerNorm"):
        LoRALinear.assemble(LayerNorm(16), {"default": _adapter(4, 16, 16)}, active="default")


@pytest.mark.parametrize("which", ["first", "second"])
def test_assemble_refuses_an_adapter_that_does_not_fit_and_names_it(which):
    base = Linear(16, 24, rng=np.random.default_rng(1))
    good, bad = _adapter(4, 16, 24), _adapter(4, 12, 24)  # bad: A has 12 columns, the base 16 inputs
    adapters = {"a": bad, "b": good} if which == "first" else {"a": good, "b": bad}
    name = "a" if which == "first" else "b"
    with pytest.raises(ValueError, match=rf"adapter '{name}': shapes A \(4, 12\).*A needs 16 columns"):
        LoRALinear.assemble(base, adapters, active="a")
    with pytest.raises(ValueError, match=r"adapter 'a'.*B \(20, 4\)"):
        LoRALinear.assemble(base, {"a": _adapter(4, 16, 20)}, active="a")  # B has 20 rows, the base 24 outputs


def test_assemble_checks_a_pooled_adapter_against_the_group_count():
    base = GroupwiseLinear.from_linear(Linear(64, 8, rng=np.random.default_rng(1)), 4, 32)  # 2 groups
    QALoRALinear.assemble(base, {"default": _adapter(2, 2, 8)}, active="default")  # A (r, in / group_size)
    with pytest.raises(ValueError, match="A needs 2 columns"):
        QALoRALinear.assemble(base, {"default": _adapter(2, 64, 8)}, active="default")


def test_assemble_needs_an_adapter():
    with pytest.raises(ValueError, match="at least one adapter"):
        LoRALinear.assemble(Linear(4, 4), {}, active=None)
