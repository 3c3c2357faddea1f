"""The base model in 4 bits: NF4 vs FP4 vs INT4 at equal bits (QLoRA Table 2 and Figure 3, at our scale).

QLoRA (Dettmers et al., 2023), section 3 ("4-bit NormalFloat Quantization", "Double
Quantization") and its comparison of data types by *model quality at equal bits*: Table 2 (mean
Pile Common Crawl perplexity of OPT, BLOOM, LLaMA and Pythia models from 125M to 13B: Int4 34.34,
Float4 (E2M1) 31.07, Float4 (E3M0) 29.48, NFloat4 + DQ 27.41) and Figure 3 (mean zero-shot
accuracy of LLaMA models against their total bits). QA-LoRA (Xu et al., 2023), section 3.3: the
group-wise asymmetric INT4 format, as a fourth point of comparison.

Here the six block matrices (q, k, v, o, fc, proj of all four blocks: 24 matrices, 0.79M weights)
of the shipped base model are quantized each way, and the model is measured on held-out rows of
its four pre-training tasks:

- ``bits``: the storage per weight, from the bytes actually stored (codes, block constants, and
  with double quantization the 8-bit constants, their float32 scales and the offset);
- ``weight_rel_mse``: sum (W - W~)^2 / sum W^2 over the 24 matrices;
- ``loss``: the mean cross-entropy per answer token (the model's perplexity is exp of it), and
  ``loss_delta``, its change from float32, with the standard error of that change over rows (the
  rows are the same for every format, so the comparison is paired);
- ``kl``: the mean KL divergence KL(p_float32 || p_quantized) of the next-token distributions at
  the answer positions, with its standard error over rows: how far the predictions move; for FP4
  and INT4 also ``kl_minus_nf4``, the paired difference to NF4 at the same blocksize and DQ;
- ``exact_match``: the share of rows answered exactly right, per task and on average, and
  ``flips``: how many rows changed from right to wrong or back.

A format is ``{"kind": "blockwise", "quant_type", "blocksize", "double_quant"}`` (QLoRA's
``quant.quantize_4bit``, the base of ``qlora.NF4Linear``) or ``{"kind": "groupwise", "bits",
"group_size"}`` (QA-LoRA's ``quant.quantize_groupwise``, the base of ``qalora.GroupwiseLinear``).
"""

from __future__ import annotations

import math

import numpy as np

from .. import data
from ..adapter import TARGETS, resolve_targets
from ..backend import to_numpy
from ..qalora import GroupwiseLinear
from ..qlora import NF4Linear
from .common import base_model, eval_sets, progress_bar

TITLE = "The base model in 4 bits: NF4 vs FP4 vs INT4 at equal bits"
PAPER = ("QLoRA (Dettmers et al., 2023), section 3, Table 2 and Figure 3 (4-bit data types at equal bits); "
         "QA-LoRA (Xu et al., 2023), section 3.3 (group-wise INT4)")

SCALES = {
    "full": {"quant_types": ["nf4", "fp4", "int4"], "blocksizes": [32, 64, 128, 256], "double_quant": [False, True],
             "group_sizes": [32, 64, 128], "n_per_task": 2048, "eval_seed": 0},
    "slice": {"quant_types": ["nf4", "fp4", "int4"], "blocksizes": [64], "double_quant": [True], "group_sizes": [],
              "n_per_task": 256, "eval_seed": 0},
    "test": {"quant_types": ["nf4", "fp4", "int4"], "blocksizes": [64], "double_quant": [True], "group_sizes": [32],
             "n_per_task": 96, "eval_seed": 0},
}

NAMES = {"nf4": "NF4", "fp4": "FP4", "int4": "INT4"}


def formats(settings: dict) -> list[dict]:
    """Every format of a scale's settings: blockwise (type x blocksize x double quantization), then group-wise."""
    out = [{"kind": "blockwise", "quant_type": qt, "blocksize": bs, "double_quant": dq}
           for qt in settings["quant_types"] for bs in settings["blocksizes"] for dq in settings["double_quant"]]
    out += [{"kind": "groupwise", "bits": 4, "group_size": g} for g in settings["group_sizes"]]
    return out


def label(fmt: dict) -> str:
    """A short name: "NF4 b64 +DQ", "INT4 b256", "INT4 g32 (QA-LoRA)"."""
    if fmt["kind"] == "groupwise":
        return f"INT{fmt['bits']} g{fmt['group_size']} (QA-LoRA)"
    return f"{NAMES[fmt['quant_type']]} b{fmt['blocksize']}" + (" +DQ" if fmt["double_quant"] else "")


def _quantized_layer(linear, fmt: dict):
    """The frozen quantized layer of ``fmt`` made from a float ``nn.Linear``, and its stored bytes."""
    if fmt["kind"] == "blockwise":
        layer = NF4Linear.from_linear(linear, fmt["blocksize"], fmt["double_quant"], fmt["quant_type"])
        return layer, layer.quantized.nbytes
    if fmt["kind"] == "groupwise":
        layer = GroupwiseLinear.from_linear(linear, fmt["bits"], fmt["group_size"])
        n = linear.in_features * linear.out_features
        return layer, layer.quantized.bits_per_parameter() * n / 8  # codes packed, float16 scales and zeros
    raise ValueError(f"unknown format kind {fmt['kind']!r}; expected 'blockwise' or 'groupwise'")


def quantize_base(fmt: dict, model=None):
    """The base model with its 24 block matrices quantized as ``fmt`` says, in place; returns (model, stats).

    ``stats``: ``bits`` (stored bits per weight over the 24 matrices), ``weight_rel_mse``
    (sum (W - W~)^2 / sum W^2 over them) and ``n_weights``.
    """
    model = base_model() if model is None else model
    stored, n_weights, err, norm = 0.0, 0, 0.0, 0.0
    for i, target in resolve_targets(len(model.blocks), TARGETS):
        path = target.path(i)
        linear = model.get_submodule(path)
        W = to_numpy(linear.weight.data).astype(np.float64)  # (out, in)
        layer, nbytes = _quantized_layer(linear, fmt)
        W_hat = to_numpy(layer.dequantized_weight()).astype(np.float64)  # (out, in)
        err += float(((W - W_hat) ** 2).sum())
        norm += float((W**2).sum())
        stored += nbytes
        n_weights += W.size
        model.set_submodule(path, layer)
    return model, {"bits": 8.0 * stored / n_weights, "weight_rel_mse": err / norm, "n_weights": n_weights}


def _log_softmax(logits) -> np.ndarray:
    z = to_numpy(logits).astype(np.float64)  # (B, T, V)
    z = z - z.max(axis=-1, keepdims=True)  # (B, T, V)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (B, T, V)


def predictions(model, evals: dict) -> dict:
    """Per task, what the model predicts: {"logp": (B, T, V) log-probabilities, "targets": (B, T)} (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return {task: {"logp": _log_softmax(model(idx)), "targets": to_numpy(targets)}  # (B, T, V), (B, T)
                for task, (idx, targets) in evals.items()}
    finally:
        model.train(was_training)


def _rows(pred: dict, reference: dict | None) -> dict:
    """Per-row sums over the answer positions: tokens, NLL, KL to the reference, exact match."""
    out = {}
    for task, p in pred.items():
        logp, targets = p["logp"], p["targets"]
        scored = targets != data.IGNORE_INDEX  # (B, T)
        picked = np.take_along_axis(logp, np.where(scored, targets, 0)[..., None], axis=-1)[..., 0]  # (B, T)
        row = {"tokens": scored.sum(axis=1), "nll": -(picked * scored).sum(axis=1),  # (B,), (B,)
               "right": ((logp.argmax(axis=-1) == targets) | ~scored).all(axis=1)}  # (B,)
        if reference is not None:
            ref = reference[task]["logp"]  # (B, T, V)
            kl = (np.exp(ref) * (ref - logp)).sum(axis=-1)  # (B, T) KL(p_ref || p) per position
            row["kl"] = (kl * scored).sum(axis=1)  # (B,)
        out[task] = row
    return out


def _mean_and_se(per_row, tokens) -> tuple[float, float]:
    """sum(per_row) / sum(tokens) and its standard error over rows (token counts taken as fixed)."""
    n_tok = float(tokens.sum())
    return float(per_row.sum()) / n_tok, float(per_row.std() * math.sqrt(per_row.size)) / n_tok


def score_predictions(pred: dict, reference: dict | None = None,
                      reference_rows: dict | None = None) -> tuple[dict, dict]:
    """(summary, per-row sums) of ``predictions``: loss and exact match (per task and mean); given the reference
    model's predictions and rows, also the KL to it, the paired change of the loss and the rows that flipped."""
    rows = _rows(pred, reference)
    cat = {k: np.concatenate([rows[t][k] for t in rows]) for k in rows[next(iter(rows))]}  # (R,) each
    out = {"loss": float(cat["nll"].sum() / cat["tokens"].sum()),
           "exact_match": {t: float(rows[t]["right"].mean()) for t in rows},
           "exact_match_mean": float(cat["right"].mean())}
    if reference is not None:
        ref = {k: np.concatenate([reference_rows[t][k] for t in reference_rows]) for k in ("nll", "right")}  # (R,)
        out["loss_delta"], out["loss_delta_se"] = _mean_and_se(cat["nll"] - ref["nll"], cat["tokens"])
        out["kl"], out["kl_se"] = _mean_and_se(cat["kl"], cat["tokens"])
        out["flips"] = int((cat["right"] != ref["right"]).sum())
    return out, rows


def _pick(measured: list, **keys) -> dict:
    for m in measured:
        if all(m["format"].get(k) == v for k, v in keys.items()):
            return m
    raise KeyError(keys)


def _findings(result: dict) -> list[str]:
    """One line per measured relation, numbers included; ``result`` carries the scale's settings as ``settings``."""
    rows, fl, st = result["formats"], result["float32"], result["settings"]
    bs = 64 if 64 in st["blocksizes"] else st["blocksizes"][0]
    dq = True in st["double_quant"]
    at = {qt: _pick(rows, kind="blockwise", quant_type=qt, blocksize=bs, double_quant=dq) for qt in st["quant_types"]}
    bits = next(iter(at.values()))["bits"]
    by_mse = sorted(at, key=lambda qt: at[qt]["weight_rel_mse"])
    by_kl = sorted(at, key=lambda qt: at[qt]["kl"])
    lines = [
        f"weight error (relative MSE over the 24 block matrices, blocksize {bs}): "
        + " < ".join(f"{NAMES[qt]} {at[qt]['weight_rel_mse']:.5f}" for qt in by_mse),
        f"exact match on the pre-training tasks at {bits:.3f} bits: float32 {fl['exact_match_mean']:.2%}, "
        + ", ".join(f"{NAMES[qt]} {at[qt]['exact_match_mean']:.2%} ({at[qt]['flips']} rows flipped)" for qt in at)
        + f" of {result['n_rows']} rows",
        f"loss per answer token: float32 {fl['loss']:.5f}; change at {bits:.3f} bits "
        + ", ".join(f"{NAMES[qt]} {at[qt]['loss_delta']:+.5f} +- {at[qt]['loss_delta_se']:.5f}" for qt in at)
        + " (paired standard error over rows)",
        f"KL(float32 || quantized) per answer token at {bits:.3f} bits: "
        + " < ".join(f"{NAMES[qt]} {at[qt]['kl']:.2e} +- {at[qt]['kl_se']:.1e}" for qt in by_kl)
        + " (the paper's Table 2, perplexity: NF4 + DQ 27.41 < Float4 (E2M1) 31.07 < Int4 34.34)",
    ]
    paired = [r for r in rows if "kl_minus_nf4" in r]
    if paired:
        ahead = sum(r["kl_minus_nf4"] > 0 for r in paired)
        lines.append(f"NF4 has the smallest KL in {ahead} of {len(paired)} paired comparisons (FP4 or INT4 against NF4 "
                     f"at the same blocksize and DQ); at {bits:.3f} bits, KL minus NF4's: " + ", ".join(
                         f"{NAMES[qt]} {at[qt]['kl_minus_nf4']:+.2e} +- {at[qt]['kl_minus_nf4_se']:.1e}"
                         for qt in at if "kl_minus_nf4" in at[qt]))
    if {"fp4", "int4"} <= set(st["quant_types"]):
        settings = [(b, d) for b in st["blocksizes"] for d in st["double_quant"]]
        int4_ahead = sum(_pick(rows, kind="blockwise", quant_type="int4", blocksize=b, double_quant=d)["kl"]
                         < _pick(rows, kind="blockwise", quant_type="fp4", blocksize=b, double_quant=d)["kl"]
                         for b, d in settings)
        lines.append(f"INT4 has a smaller KL than FP4 at {int4_ahead} of {len(settings)} (blocksize, DQ) settings "
                     "(the paper's Table 2 has Float4 (E2M1) ahead of Int4)")
    if "nf4" in st["quant_types"] and set(st["double_quant"]) == {False, True}:
        a = _pick(rows, kind="blockwise", quant_type="nf4", blocksize=bs, double_quant=False)
        b = _pick(rows, kind="blockwise", quant_type="nf4", blocksize=bs, double_quant=True)
        lines.append(f"double quantization (NF4, blocksize {bs}): {a['bits']:.3f} -> {b['bits']:.3f} bits per weight, "
                     f"weight error {a['weight_rel_mse']:.5f} -> {b['weight_rel_mse']:.5f}, KL {a['kl']:.2e} -> "
                     f"{b['kl']:.2e}")
        if 256 in st["blocksizes"] and bs != 256:
            c = _pick(rows, kind="blockwise", quant_type="nf4", blocksize=256, double_quant=False)
            lines.append(f"at equal bits, small blocks with DQ or large blocks without: NF4 b{bs} +DQ "
                         f"({b['bits']:.3f} bits) weight error {b['weight_rel_mse']:.5f}, KL {b['kl']:.2e}; NF4 b256 "
                         f"({c['bits']:.3f} bits) {c['weight_rel_mse']:.5f}, KL {c['kl']:.2e}")
    for g in st["group_sizes"]:
        r = _pick(rows, kind="groupwise", group_size=g)
        lines.append(f"QA-LoRA group-wise INT4, group {g} ({r['bits']:.3f} bits with float16 scales and zeros): "
                     f"weight error {r['weight_rel_mse']:.5f}, KL {r['kl']:.2e}, "
                     f"exact match {r['exact_match_mean']:.2%}")
    return lines


def run(scale: str = "full", progress: bool = True) -> dict:
    s = SCALES[scale]
    evals = eval_sets(s["n_per_task"], seed=s["eval_seed"], tasks=data.PRETRAIN_TASKS)
    reference = predictions(base_model(), evals)
    fl, ref_rows = score_predictions(reference)
    measured, kl_rows = [], {}
    for fmt in progress_bar(formats(s), progress, desc=f"quantized_base ({scale})"):
        model, stats = quantize_base(fmt)
        m, rows = score_predictions(predictions(model, evals), reference, ref_rows)
        kl_rows[label(fmt)] = np.concatenate([rows[t]["kl"] for t in rows])  # (R,) per-row KL sums
        measured.append({"format": fmt, "label": label(fmt), **stats, **m})
    tokens = np.concatenate([ref_rows[t]["tokens"] for t in ref_rows])  # (R,)
    for m in measured:  # the KL of each block-wise type minus NF4's at the same blocksize, paired over rows
        f = m["format"]
        nf4 = {**f, "quant_type": "nf4"}
        if f["kind"] == "blockwise" and f["quant_type"] != "nf4" and label(nf4) in kl_rows:
            m["kl_minus_nf4"], m["kl_minus_nf4_se"] = _mean_and_se(kl_rows[m["label"]] - kl_rows[label(nf4)], tokens)
    result = {"float32": fl, "formats": measured, "n_rows": int(sum(len(ref_rows[t]["tokens"]) for t in ref_rows)),
              "n_weights": measured[0]["n_weights"] if measured else 0}
    result["findings"] = _findings({**result, "settings": s})
    return result


def plot(result: dict):
    from ..plots.quant import plot_quantized_base

    return plot_quantized_base(result)
