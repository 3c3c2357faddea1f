"""QA-LoRA's frozen base as the paper counts it (Xu et al., 2023, section 3.3): codes packed into one bit stream,
float16 scales and integer zero points, float32 zero points once a merge made them non-integer.

The layout round-trips at every bit width and at odd sizes, the packed dequantization equals the unpacked
formula bit for bit, the merge into the zero points stays exact and its undoing restores the stored arrays bit
for bit, checkpoints keep the layout (and read files with one byte per code), INT4 with groups of 32 holds
5 bits per weight, and the memory calculator's bytes equal what each method holds.
"""

import numpy as np
import pytest
from conftest import rel

from lora_from_scratch import checkpoint, memory
from lora_from_scratch.backend import asarray, to_numpy
from lora_from_scratch.files import with_checksum
from lora_from_scratch.lora import apply_lora, lora_layers, merge_and_unload
from lora_from_scratch.memory import paper
from lora_from_scratch.model import GPT, GPTConfig
from lora_from_scratch.nn import Linear
from lora_from_scratch.optim import AdamW
from lora_from_scratch.qalora import GroupwiseLinear, QALoRALinear, apply_qalora
from lora_from_scratch.qlora import apply_qlora
from lora_from_scratch.quant import GroupwiseLayout, dequantize_groupwise, pack_codes, quantize_groupwise, unpack_codes

SIX = ["q", "k", "v", "o", "fc", "proj"]
# (out, in, group_size): in not a multiple of 8 or of the codes per byte, odd group counts, one group, one row
ODD_SHAPES = [(5, 12, 4), (7, 9, 3), (3, 45, 15), (1, 7, 7), (11, 30, 2), (4, 64, 32)]
CFG = GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=3, n_embd=9)  # 9 x 9 at 3 bits: a padded last byte
IDX = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7))


def _weight(seed, shape, scale=0.05):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def _bit_stream(codes, bits):
    """The reference layout, written bit by bit: each code's bits, most significant first, then bytes from their
    most significant bit (``np.packbits``), the last byte padded with zeros."""
    bits_of = (codes.astype(np.int64)[:, None] >> np.arange(bits - 1, -1, -1)) & 1  # (n, bits)
    return np.packbits(bits_of.reshape(-1).astype(np.uint8))  # (ceil(n * bits / 8),)


# ----------------------------------------------------------------- the bit stream
@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_and_unpack_round_trip_every_bit_width_at_odd_sizes(bits):
    rng = np.random.default_rng(bits)
    for n in (0, 1, 2, 3, 5, 7, 8, 9, 13, 24, 1001, 4097):
        codes = rng.integers(0, 2**bits, n).astype(np.uint8)
        packed = to_numpy(pack_codes(asarray(codes), bits))
        np.testing.assert_array_equal(packed, _bit_stream(codes, bits))  # the stated layout, byte for byte
        assert packed.shape == (-(-n * bits // 8),)
        np.testing.assert_array_equal(to_numpy(unpack_codes(asarray(packed), bits, n)), codes)


def test_three_bit_codes_run_across_byte_boundaries():
    # 0..7 at 3 bits: 000 001 01|0 011 100 1|01 110 111 -> 0x05 0x39 0x77; the third and sixth codes cross bytes
    assert to_numpy(pack_codes(asarray(np.arange(8, dtype=np.uint8)), 3)).tolist() == [0x05, 0x39, 0x77]
    assert to_numpy(pack_codes(asarray(np.array([7], np.uint8)), 3)).tolist() == [0b11100000]  # padded with zeros
    assert to_numpy(pack_codes(asarray(np.array([1, 15, 3], np.uint8)), 4)).tolist() == [0x1F, 0x30]
    assert to_numpy(pack_codes(asarray(np.array([3, 0, 1, 2, 1], np.uint8)), 2)).tolist() == [0b11000110, 0b01000000]


# ----------------------------------------------------------------- the layer
@pytest.mark.parametrize("bits", range(2, 9))
def test_layer_stores_the_packed_layout_and_dequantizes_as_the_formula(bits):
    for k, (fout, fin, gs) in enumerate(ODD_SHAPES):
        w = _weight(10 * bits + k, (fout, fin))
        layer = GroupwiseLinear.from_weight(asarray(w), None, bits, gs)
        q = quantize_groupwise(asarray(w), bits, gs, scale_dtype="float16")  # the unpacked arrays of the formulas
        assert layer.packed.dtype == np.uint8 and layer.packed.shape == (-(-fout * fin * bits // 8),)
        np.testing.assert_array_equal(to_numpy(layer.packed.data), _bit_stream(to_numpy(q.codes).reshape(-1), bits))
        np.testing.assert_array_equal(to_numpy(layer.codes), to_numpy(q.codes))
        assert layer.scales.dtype == np.float16 and layer.zeros.dtype == np.float16
        W = to_numpy(layer.dequantized_weight())  # unpacked on the fly
        assert W.dtype == np.float32 and W.shape == (fout, fin)
        np.testing.assert_array_equal(W, to_numpy(dequantize_groupwise(q)))  # bit for bit the unpacked reference
        # the float16 scale is rounded up before the codes are made: still within half a step of every weight
        step = np.repeat(to_numpy(q.scales).astype(np.float32), gs, axis=1)  # (out, in)
        assert np.all(np.abs(W - w) <= step * (0.5 + 1e-5))
        assert np.all(to_numpy(q.scales).astype(np.float64) * (2**bits - 1) >=
                      np.ptp(np.concatenate([w.reshape(fout, -1, gs), np.zeros((fout, fin // gs, 1))], 2), axis=2))


def test_float16_scales_refuse_a_range_they_cannot_hold():
    with pytest.raises(ValueError, match="too wide for float16 scales"):
        GroupwiseLinear.from_weight(asarray(_weight(0, (2, 8)) * 1e7), None, 4, 4)
    q = quantize_groupwise(asarray(_weight(0, (2, 8)) * 1e7), 4, 4)  # float32 scales: held as given
    assert GroupwiseLinear(q).scales.dtype == np.float32


def test_int4_g32_holds_5_bits_per_weight_and_the_calculator_reads_the_same_layout():
    layer = GroupwiseLinear.from_weight(asarray(_weight(1, (768, 768))), None, 4, 32)
    bits = 8 * layer.storage_bytes() / layer.weight_count  # from the arrays' nbytes
    assert bits == 5.0 <= 5.1
    assert layer.layout == GroupwiseLayout(4, 32, 2, 2) and layer.layout.bits_per_weight() == bits
    assert paper.groupwise_bits_per_parameter(4, 32) == bits
    assert layer.layout.nbytes(768, 768) == layer.storage_bytes()
    for fout, fin, gs in ODD_SHAPES:  # the padded last byte included
        odd = GroupwiseLinear.from_weight(asarray(_weight(2, (fout, fin))), None, 3, gs)
        assert odd.layout.nbytes(fout, fin) == odd.storage_bytes()


# ----------------------------------------------------------------- the merge
def _trained_layer(bits, fout, fin, gs, dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    base = Linear(fin, fout, rng=rng, dtype=dtype)
    layer = QALoRALinear(base, 4, 8.0, bits=bits, group_size=gs, rng=rng)
    layer.lora_A.data = asarray(rng.standard_normal((4, fin // gs)), dtype=dtype)  # (r, L)
    layer.lora_B.data = asarray(rng.standard_normal((fout, 4)) * 0.2, dtype=dtype)  # (out, r): as after training
    return layer, asarray(rng.standard_normal((3, fin)), dtype=dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_merge_into_float32_zero_points_is_exact_and_unmerge_restores_every_stored_bit(bits):
    for k, (fout, fin, gs) in enumerate(ODD_SHAPES):
        layer, x = _trained_layer(bits, fout, fin, gs, seed=k)
        stored = {n: to_numpy(b.data).copy() for n, b in layer.base.named_buffers()}
        y = layer(x)
        layer.merge()
        assert layer.zeros.dtype == np.float32 and layer.scales.dtype == np.float16  # merged: non-integer zeros
        assert layer.base.layout.zero_bytes == 4  # 4 + 16/gs + 32/gs bits per weight while merged
        np.testing.assert_array_equal(to_numpy(layer.base.packed.data), stored["packed"])
        assert rel(layer(x), y) < 1e-5  # the tolerance of test_qalora's merge in float32
        layer.unmerge()
        for n, b in layer.base.named_buffers():  # packed codes, float16 scales, float16 integer zero points
            assert b.dtype == stored[n].dtype and np.array_equal(to_numpy(b.data), stored[n]), n
        assert np.array_equal(to_numpy(layer(x)), to_numpy(y))


def test_float16_would_not_hold_the_merged_zero_points():
    """Why merged zero points are float32: rounded to float16 they move the output far beyond the merge's tolerance."""
    layer, x = _trained_layer(4, 16, 64, 32)
    y = layer(x)
    merged = layer.merged_base()
    as16 = merged.with_zeros(merged.zeros.data)  # (out, L) a copy of the merged layer
    as16.zeros.data = merged.zeros.data.astype(np.float16)  # what a float16 merged base would hold
    assert rel(merged(x), y) < 1e-5 < rel(as16(x), y)


def test_merge_and_unload_keeps_the_packed_codes(tmp_path):
    model = apply_qalora(GPT(CFG, seed=0), 4, 8, SIX, bits=3, group_size=3, seed=1)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(np.random.default_rng(3).standard_normal(layer.lora_B.shape) * 0.1,
                                    dtype="float32")
    packed = {n: to_numpy(m.base.packed.data).copy() for n, m in lora_layers(model).items()}
    logits = to_numpy(model(IDX))
    merge_and_unload(model)
    for n, p in packed.items():
        deployed = model.get_submodule(n)
        assert isinstance(deployed, GroupwiseLinear) and np.array_equal(to_numpy(deployed.packed.data), p)
    assert rel(model(IDX), logits) < 1e-5


# ----------------------------------------------------------------- files and backends


def _qalora_model(merged=False):
    model = apply_qalora(GPT(CFG, seed=0), 4, 8, SIX, bits=3, group_size=3, seed=1)
    rng = np.random.default_rng(2)
    for layer in lora_layers(model).values():
        layer.lora_B.data = asarray(rng.standard_normal(layer.lora_B.shape) * 0.1, dtype="float32")
        if merged:
            layer.merge()
    return model


@pytest.mark.parametrize("merged", [False, True])
def test_checkpoint_round_trip_keeps_the_layout_and_the_logits(tmp_path, merged):
    model = _qalora_model(merged)
    path = str(tmp_path / "qalora.safetensors")
    checkpoint.save_checkpoint(model, path)
    loaded = checkpoint.load_checkpoint(path)
    for (n, a), (n2, b) in zip(model.named_buffers(), loaded.named_buffers(), strict=True):
        assert n == n2 and a.dtype == b.dtype and np.array_equal(to_numpy(a.data), to_numpy(b.data)), n
    assert {str(m.zeros.dtype) for m in lora_layers(loaded).values()} == {"float32" if merged else "float16"}
    assert np.array_equal(to_numpy(loaded(IDX)), to_numpy(model(IDX)))
    if merged:
        for layer in lora_layers(loaded).values():
            layer.unmerge()
        assert {str(m.zeros.dtype) for m in lora_layers(loaded).values()} == {"float16"}


def _as_one_byte_per_code(path, out, plant=None):
    """``path`` rewritten in the layout of files written before the packed one: codes (out, in) one byte each,
    float32 scales and zeros, the layer spec without scale_dtype and zero_dtype."""
    import json

    from safetensors.numpy import save_file

    tensors, meta = checkpoint.read_checkpoint(path)
    specs = json.loads(meta["layers"])
    for p, spec in specs.items():
        base = spec["base"]
        n, bits = base["out"] * base["in"], base["bits"]
        packed = tensors.pop(f"{p}.base.packed")
        tensors[f"{p}.base.codes"] = to_numpy(unpack_codes(packed, bits, n)).reshape(base["out"], base["in"])
        for b in ("scales", "zeros"):
            tensors[f"{p}.base.{b}"] = tensors[f"{p}.base.{b}"].astype(np.float32)
        del base["scale_dtype"], base["zero_dtype"]
        base["dtype"] = "float32"
    if plant is not None:
        plant(tensors)
    meta["layers"] = json.dumps(specs)
    save_file(tensors, str(out), metadata=with_checksum(tensors, meta))
    return str(out)


def test_a_file_with_one_byte_per_code_still_loads_and_bad_codes_are_refused(tmp_path):
    model = _qalora_model()
    path = str(tmp_path / "new.safetensors")
    checkpoint.save_checkpoint(model, path)
    old = checkpoint.load_checkpoint(_as_one_byte_per_code(path, tmp_path / "old.safetensors"))
    assert np.array_equal(to_numpy(old(IDX)), to_numpy(model(IDX)))  # float16 values held exactly in float32
    for n, layer in lora_layers(old).items():
        assert layer.scales.dtype == np.float32  # as the file holds them
        new = lora_layers(model)[n].base
        np.testing.assert_array_equal(to_numpy(layer.base.packed.data), to_numpy(new.packed.data))
    key = "blocks.0.attn.q.base.codes"

    def plant(t):
        t[key][1, 2] = 9

    bad = _as_one_byte_per_code(path, tmp_path / "codes.safetensors", plant)
    with pytest.raises(ValueError, match=rf"codes\.safetensors: tensor '{key}': holds the code 9, beyond the 8 levels "
                                         "of 3-bit codes"):
        checkpoint.load_checkpoint(bad)


def test_padding_bits_after_the_last_code_are_refused(tmp_path):
    path = str(tmp_path / "m.safetensors")
    checkpoint.save_checkpoint(_qalora_model(), path)
    tensors, meta = checkpoint.read_checkpoint(path)
    key = "blocks.1.attn.o.base.packed"
    assert tensors[key].size == 31  # 81 codes x 3 bits = 243 bits: 5 zero bits pad the last byte
    tensors[key][-1] |= 1
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp_path / "pad.safetensors"), metadata=with_checksum(tensors, meta))
    with pytest.raises(ValueError, match=rf"pad\.safetensors: tensor '{key}': holds bits after its last code"):
        checkpoint.load_checkpoint(str(tmp_path / "pad.safetensors"))


def test_scales_stored_in_another_dtype_than_the_structure_says_are_refused(tmp_path):
    path = str(tmp_path / "m.safetensors")
    checkpoint.save_checkpoint(_qalora_model(), path)
    tensors, meta = checkpoint.read_checkpoint(path)
    key = "blocks.0.mlp.fc.base.scales"
    tensors[key] = tensors[key].astype(np.float32)
    from safetensors.numpy import save_file

    save_file(tensors, str(tmp_path / "dt.safetensors"), metadata=with_checksum(tensors, meta))
    with pytest.raises(ValueError, match=rf"dt\.safetensors: tensor '{key}': holds float32; the layer's structure "
                                         "says float16"):
        checkpoint.load_checkpoint(str(tmp_path / "dt.safetensors"))


def test_to_numpy_keeps_the_packed_layout():
    model = _qalora_model(merged=True)
    before = {n: (to_numpy(b.data).copy(), b.dtype) for n, b in model.named_buffers()}
    logits = to_numpy(model(IDX))
    model.to("numpy")
    for n, b in model.named_buffers():
        assert b.dtype == before[n][1] and np.array_equal(to_numpy(b.data), before[n][0]), n
    assert np.array_equal(to_numpy(model(IDX)), logits)


# ----------------------------------------------------------------- memory: measured = calculated
@pytest.mark.parametrize("kind", ["full", "lora", "qlora", "qalora"])
def test_held_bytes_equal_the_calculator_per_method(kind):
    cfg = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg, seed=0)
    if kind == "lora":
        apply_lora(model, 8, 16, SIX, seed=1)
    elif kind == "qlora":
        apply_qlora(model, 8, 16, SIX, seed=1)
    elif kind == "qalora":
        apply_qalora(model, 8, 16, SIX, bits=4, group_size=32, seed=1)
    opt = AdamW(model.trainable_parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    step = memory.step_memory(model, opt, (rng.integers(0, 61, (2, 16)), rng.integers(0, 61, (2, 16))))
    held = step["weights"] + step["gradients"] + step["optimizer"]
    calc = paper.training_memory(paper.TransformerSize.from_config(cfg), kind, r=8, targets=SIX, weight_bytes=4,
                                 bits=4, group_size=32)
    assert held == calc.total and step["weights"] == calc.weights
