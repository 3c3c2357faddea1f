"""The demo's first table, on a very short run: every row is measured, and the measurements add up."""

from lora_from_scratch import demo
from lora_from_scratch.io import BASE_CHECKPOINT, load_checkpoint


def test_finetune_table_measures_what_each_method_holds():
    rows = demo.finetune_table(steps=3, batch_size=8, eval_per_task=8, progress=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == ["base model (no tuning)"] + [demo.NAMES[m] for m in ("full", "lora", "qlora", "qalora")]
    base = load_checkpoint(BASE_CHECKPOINT)
    cfg = base.config
    C, L = cfg.n_embd, cfg.n_layer
    r = demo.RANK
    # r (in + out) per adapted matrix: q, k, v, o are C x C, fc is C -> 4C, proj 4C -> C
    lora = L * r * (4 * 2 * C + 2 * (C + 4 * C))
    # QA-LoRA's A sees in / group_size pooled features: r (in / 32 + out) per matrix
    qalora = L * r * (4 * (C // 32 + C) + (C // 32 + 4 * C) + (4 * C // 32 + C))
    assert by["full fine-tuning"]["trainable"] == base.num_parameters()
    assert by["LoRA r=8"]["trainable"] == by["QLoRA NF4 r=8"]["trainable"] == lora
    assert by["QA-LoRA INT4 r=8"]["trainable"] == qalora
    for row in rows[1:]:
        # float32 gradients plus AdamW's two moments: 12 bytes per trainable parameter
        assert row["state_bytes"] == 12 * row["trainable"], row
        assert row["task_bytes"] == 4 * row["trainable"], row
    assert by["QLoRA NF4 r=8"]["weight_bytes"] < by["LoRA r=8"]["weight_bytes"] / 4
    assert by["base model (no tuning)"]["desc"] == 0.0
    text = demo.format_finetune_table(rows)
    assert all(name in text for name in by)
