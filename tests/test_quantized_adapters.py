"""The findings of notebooks 8 and 9 at the experiments' "test" scale, and the helpers those notebooks use.

QLoRA (Dettmers et al., 2023), section 3 (eq. 5-6: NF4 storage, dequantized in the forward and the
backward) and section 4 (QLoRA matches 16-bit LoRA); QA-LoRA (Xu et al., 2023), section 3.3 (the
pooled adapter merges into the zero points) and Table 1 (QLoRA re-quantized vs QA-LoRA at 4/3/2 bits).
Each experiment is re-run at its "test" scale (a few seconds, seeded) and its finding asserted as a
relation with a stated tolerance, not as a number.
"""

import copy

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from lora_from_scratch import experiments, memory  # noqa: E402
from lora_from_scratch.experiments import qalora_bits, qalora_group_size  # noqa: E402
from lora_from_scratch.experiments import qlora_vs_lora as qvl  # noqa: E402
from lora_from_scratch.experiments.common import base_model  # noqa: E402
from lora_from_scratch.lora import lora_layers, merge_and_unload  # noqa: E402
from lora_from_scratch.methods import adapt  # noqa: E402
from lora_from_scratch.plots.qalora import plot_groupwise_row, plot_pooled_update  # noqa: E402
from lora_from_scratch.plots.qlora import plot_resident_memory  # noqa: E402


@pytest.fixture(scope="module")
def qvl_result():
    return experiments.run("qlora_vs_lora", scale="test", progress=False)


@pytest.fixture(scope="module")
def bits_result():
    return experiments.run("qalora_bits", scale="test", progress=False)


@pytest.fixture(scope="module")
def group_result():
    return experiments.run("qalora_group_size", scale="test", progress=False)


# ----------------------------------------------------------------- notebook 8: QLoRA
def test_qlora_learns_like_lora_and_holds_far_less(qvl_result):
    sm, s = qvl_result["summary"], qvl_result["settings"]
    gap = abs(sm["qlora"]["final_loss"]["mean"] - sm["lora"]["final_loss"]["mean"]) / sm["lora"]["final_loss"]["mean"]
    assert gap < 0.10  # the same learning curve within 10 % (the base's format is the only difference)
    assert sm["lora"]["resident_bytes"] / sm["qlora"]["resident_bytes"] > 4
    q = next(r for r in qvl_result["runs"] if r["method"] == "qlora")
    assert q["dequantizations_per_layer"] == [2 * s["steps"] + q["evaluation_forwards"]]  # 2 per step, 1 per eval
    assert q["breakdown"]["float W0"] == 0 and sum(q["breakdown"].values()) == q["resident_bytes"]


def test_qlora_float_merge_is_exact_and_requantizing_is_not(qvl_result):
    for d in qvl_result["deployments"]:
        assert d["float"]["exact_match"] == d["unmerged"]["exact_match"] and d["float"]["logits_rel"] < 1e-5
        assert d["requantized"]["logits_rel"] > 1000 * d["float"]["logits_rel"]
        assert 0.0 < d["lost"] < 1.5 and d["update"] > 0


def test_a_qlora_layer_caches_no_float_w0_and_dequantizes_twice_per_step():
    q = adapt(base_model(), "qlora", r=4, alpha=8, targets=["fc"], seed=0)
    lo = adapt(base_model(), "lora", r=4, alpha=8, targets=["fc"], seed=0)
    fq, fl = q.blocks[0].mlp.fc, lo.blocks[0].mlp.fc
    x = np.random.default_rng(0).standard_normal((5, 128)).astype(np.float32)  # (5, 128)
    yq, yl = fq(x), fl(x)  # (5, 512) each
    assert any(a is fl.base.weight.data for _, a in qvl.cached_arrays(fl))  # LoRA's Linear caches its own W0
    assert not any(tuple(a.shape) == (512, 128) for _, a in qvl.cached_arrays(fq))
    assert fq.base.dequantizations == 1
    fq.backward(np.ones_like(yq))  # (5, 512) -> (5, 128)
    assert fq.base.dequantizations == 2 and qvl.cached_arrays(fq) == []  # the backward consumed every cache
    assert yl.shape == yq.shape


def test_resident_breakdown_accounts_for_every_byte():
    for method in ("lora", "qlora", "qalora"):
        m = adapt(base_model(), method, r=4, alpha=8, seed=0)
        parts = qvl.resident_breakdown(m)
        assert sum(parts.values()) == memory.resident_bytes(m), method
        layer = m.blocks[1].attn.v
        assert sum(qvl.resident_breakdown(layer).values()) == memory.resident_bytes(layer), method
    assert qvl.resident_breakdown(adapt(base_model(), "lora", seed=0))["NF4 codes"] == 0


# ----------------------------------------------------------------- notebook 9: QA-LoRA
def test_qalora_deploys_exactly_and_qlora_requantized_moves_more_at_two_bits(bits_result):
    rows = bits_result["rows"]
    qa = [r for r in rows if r["method"] == "qalora"]
    ql = {r["bits"]: r for r in rows if r["method"] == "qlora"}
    assert qa and all(r["same_codes"] and r["deployed"]["exact_match"] == r["trained"]["exact_match"] for r in qa)
    assert max(r["deployed"]["logits_rel"] for r in qa) < 1e-5 < min(r["deployed"]["logits_rel"] for r in ql.values())
    assert ql[2]["deployed"]["logits_rel"] > ql[4]["deployed"]["logits_rel"]  # fewer bits, a larger change
    assert {b: r["deployed"]["deployed_bits"] for b, r in ql.items()} == {4: 5.0, 2: 3.0}  # codes + fp16 scale, zero


def test_float16_zero_points_change_the_deployed_model_very_little(bits_result):
    for r in (r for r in bits_result["rows"] if r["method"] == "qalora"):
        f = r["float16_zeros"]
        assert not f["integer_zeros"]  # merged zeros are fractional
        assert f["max_shift"] <= 2.0**-11 * 64  # half a float16 spacing below |zero| = 64
        assert f["weight_rel"] < 1e-2 and f["logits_rel"] < 1e-2


def test_float16_zero_points_move_by_at_most_half_a_float16_spacing():
    m = adapt(base_model(), "qalora", r=4, alpha=8, bits=4, group_size=32, seed=0)
    rng = np.random.default_rng(3)
    for layer in lora_layers(m).values():
        layer.lora_B.data = rng.standard_normal(layer.lora_B.shape).astype(np.float32)  # (out, r) a large update
    deployed = merge_and_unload(m)
    zeros = np.concatenate([layer.zeros.data.ravel() for _, layer in deployed.named_modules()
                            if hasattr(layer, "zeros")])  # (all groups,)
    _, stats = qalora_bits.with_float16_zeros(deployed)
    assert not stats["integer_zeros"] and stats["max_shift"] > 0
    assert stats["max_shift"] <= float(np.spacing(np.float16(np.abs(zeros).max()))) / 2


def test_float16_of_integer_zero_points_is_exact():
    m = adapt(base_model(), "qalora", r=4, alpha=8, bits=3, group_size=32, seed=0)
    deployed = merge_and_unload(copy.deepcopy(m))  # B = 0: the zeros stay integers
    _, stats = qalora_bits.with_float16_zeros(deployed)
    assert stats == {"max_shift": 0.0, "weight_rel": 0.0, "integer_zeros": True}
    assert qalora_bits.deployed_bits(deployed) == 3 + 32 / 32


def test_smaller_groups_make_qlora_requantization_gentler(group_result):
    rows = group_result["rows"]
    rel = {r["group_size"]: r["deployed"]["logits_rel"] for r in rows if r["method"] == "qlora"}
    assert rel[8] < rel[64]
    assert all(r["deployed"]["exact_match"] == r["trained"]["exact_match"] for r in rows if r["method"] == "qalora")
    bits = {r["group_size"]: r["deployed"]["deployed_bits"] for r in rows if r["method"] == "qalora"}
    assert bits == {8: 2 + 32 / 8, 64: 2 + 32 / 64}


def test_the_learning_rate_sweep_picks_the_lowest_final_loss():
    s = {**qalora_bits.SCALES["test"], "r": 2, "alpha": 4}
    sweep = {"steps": 3, "batch_size": 4, "bits": 4, "seed": 0, "qlora": [1e-3, 1e-2], "qalora": [1e-3, 1e-1]}
    evals = qvl.all_eval_sets(8, 4)
    out = qalora_bits.lr_sweep(sweep, s, evals)
    for m in ("qlora", "qalora"):
        assert [r["lr"] for r in out["runs"][m]] == sweep[m]
        assert out["best"][m] == min(out["runs"][m], key=lambda r: r["final_loss"])["lr"]


def test_the_figures_draw(qvl_result, bits_result, group_result):
    import matplotlib.pyplot as plt

    m = adapt(base_model(), "qalora", r=4, alpha=8, seed=0)
    layer = lora_layers(m)["blocks.0.attn.q"]
    figs = [experiments.get("qlora_vs_lora").plot(qvl_result), qalora_bits.plot(bits_result),
            qalora_group_size.plot(group_result),
            plot_resident_memory({"a layer": {"x": qvl.resident_breakdown(layer)}}),
            plot_groupwise_row(layer.base.dequantized_weight()[0, :16], bits=2, group_size=4),
            plot_pooled_update(layer.delta_weight(), layer.delta_weight(), group_size=32)]
    for fig in figs:
        assert fig.axes
        plt.close(fig)
    with pytest.raises(ValueError, match="panels"):
        plot_resident_memory({})
