"""``python -m lora_from_scratch verify``: the evidence a student can read without pytest.

Every layer and model of the package is compared with the library that defines it, and the
error is printed next to the bound it must stay under:

- the GPT-2 layers (Radford et al., 2019; attention: Vaswani et al., 2017, eq. 1) against
  PyTorch autograd with the same weights: outputs and every gradient by name, float64 and
  float32; every hand-written backward against float64 central differences (``gradcheck``);
- the whole GPT against Hugging Face ``transformers``' ``GPT2LMHeadModel`` (tiny random
  configurations built in memory, nothing downloaded): logits, loss and every gradient;
- LoRA (Hu et al., 2021, section 4.1), QLoRA (Dettmers et al., 2023, section 3, eq. 5-6) and
  QA-LoRA (Xu et al., 2023, section 3.3) layers against the same layer written in torch ops;
  LoRA adapters against PEFT: one layer, PiSSA's start, files both ways, gradients, merging;
- NF4 and FP4 blockwise quantization (QLoRA, sections 2-3) against bitsandbytes, bit for bit:
  the measured error is the number of mismatching bytes (or float bit patterns), bound 0.

The test suite calls the same functions with the same bounds and the same test data
(``tests/test_parity_torch.py``, ``test_functional_gradcheck.py``, ``test_gpt_hf.py``,
``test_lora.py``, ``test_lora_peft.py``, ``test_qlora.py``, ``test_qalora.py``,
``test_quant_blockwise.py``, ``test_verify.py``), so each comparison is written once, here.
Every comparison function returns a list of ``Measurement(what, error, bound)``; ``assert_ok``
raises if any is out of bounds. A comparison that cannot be made as stated (a wrong dtype,
different parameter names, a reference that would make it vacuous) raises ``Mismatch``.

The reference libraries are test dependencies, imported inside the functions: the package
imports without them. Test data is made on the host (``backend.rng``) and moved to the backend
under test (``backend.asarray``), so ``--backend cupy verify`` checks the GPU code against the
CPU references. Errors are norm-wise relative, ||ours - ref|| / ||ref|| (``gradcheck.rel_error``),
unless the row says otherwise.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

from .adapters import (  # noqa: F401  (re-exported: verify.X is what the tests and the CLI use)
    ADAPTER_SHAPES,
    adapter_layer_gradients,
    adapter_layer_vs_torch,
    adapter_vs_torch,
    make_adapter_layer,
)
from .bnb import (  # noqa: F401  (re-exported: verify.X is what the tests and the CLI use)
    BLOCKSIZES,
    PARITY_SHAPES,
    bnb_4bit_mismatches,
    bnb_blocksizes,
    bnb_double_quant_codes,
    bnb_parity,
    bnb_quantize,
    float_bits,
    mismatching_floats,
    parity_input,
)
from .hf import (  # noqa: F401  (re-exported: verify.X is what the tests and the CLI use)
    HF_CONFIGS,
    hf_batch,
    hf_gpt_float32,
    hf_gpt_float64,
    hf_model,
    hf_state,
    hf_tied_head,
    our_lm_loss,
)
from .measure import (  # noqa: F401  (re-exported: verify.X is what the tests and the CLI use)
    GRADCHECK_TOL,
    INSTALL,
    REFERENCES,
    TORCH_TOL,
    Measurement,
    Mismatch,
    assert_ok,
    require,
    worst,
)
from .peft import (  # noqa: F401  (re-exported: verify.X is what the tests and the CLI use)
    ALL_TARGETS,
    PEFT_C,
    PEFT_HEADS,
    PEFT_LAYERS,
    PEFT_POSITIONS,
    PEFT_VOCAB,
    ours_to_peft,
    peft_base_state,
    peft_gradients,
    peft_hf_config,
    peft_hf_model,
    peft_ids,
    peft_layer,
    peft_load_error,
    peft_merge,
    peft_pissa,
    peft_saved_adapter,
    peft_to_ours,
    randomize_B,
    torch_logits,
)
from .torch_layers import (  # noqa: F401  (re-exported: verify.X is what the tests and the CLI use)
    FUNCTIONAL,
    FUNCTIONAL_SEEDS,
    GPT_CHECK_CONFIG,
    _close,
    adapter_gradients,
    exactly_zero,
    gradcheck_functional,
    gradcheck_gpt,
    gradcheck_pair,
    key_biases,
    randomize_params,
    set_params,
    torch_cross_entropy,
    torch_dropout,
    torch_embedding,
    torch_gelu,
    torch_layernorm,
    torch_linear,
    torch_module,
    torch_softmax,
)


# ============================================================================ the table
class Check(NamedTuple):
    component: str
    reference: str
    run: Callable[[], list]
    needs: tuple  # the reference libraries it imports


def _peft_checks() -> list:
    """The PEFT rows share one base state and one PEFT-saved adapter per variant (made on first use)."""
    shared = {}

    def base():
        if "sd" not in shared:
            shared["sd"] = peft_base_state()
        return shared["sd"]

    def saved(use_rslora):
        key = ("saved", use_rslora)
        if key not in shared:  # removed when the table is done (or at exit)
            shared.setdefault("tmp", tempfile.TemporaryDirectory(prefix="lfs-verify-peft-"))
            folder = os.path.join(shared["tmp"].name, f"peft-rslora-{use_rslora}")
            shared[key] = (peft_saved_adapter(base(), folder, use_rslora), folder)
        return shared[key]

    def round_trip(targets, use_rslora, init):
        with tempfile.TemporaryDirectory(prefix="lfs-verify-peft-") as folder:
            return ours_to_peft(base(), os.path.join(folder, "adapter"), targets, use_rslora, init)

    needs = ("torch", "transformers", "peft")
    rows = [Check("LoRALinear (float64)", "peft lora.Linear", lambda: peft_layer(False, 0.0), needs),
            Check("LoRALinear (rsLoRA, dropout 0.3)", "peft lora.Linear", lambda: peft_layer(True, 0.3), needs),
            Check("LoRALinear PiSSA init (float32)", "peft pissa", lambda: peft_pissa(False), needs),
            Check("LoRA adapter -> PEFT files (all six)", "PeftModel + back", lambda: round_trip(ALL_TARGETS, False,
                                                                                             "kaiming"), needs),
            Check("LoRA adapter -> PEFT files (rsLoRA, PiSSA)", "PeftModel + back",
                  lambda: round_trip(ALL_TARGETS, True, "pissa"), needs)]
    for use_rslora in (False, True):
        tag = "rsLoRA, " if use_rslora else ""
        rows += [Check(f"PEFT adapter -> ours ({tag}fused c_attn)", "PeftModel",
                       lambda u=use_rslora: peft_to_ours(*saved(u), base()), needs),
                 Check(f"adapter gradients ({tag}float64)", "PeftModel autograd",
                       lambda u=use_rslora: peft_gradients(*saved(u), base()), needs),
                 Check(f"merge_lora ({tag}float64)", "peft merge_and_unload",
                       lambda u=use_rslora: peft_merge(*saved(u), base()), needs)]
    return rows


def checks() -> list:
    """Every row of the table, in order: (component, reference, the comparison, the libraries it needs)."""
    torch_ = ("torch",)
    rows = []
    for dtype in ("float64", "float32"):
        rows += [Check(f"Linear ({dtype})", "torch.nn.Linear", lambda d=dtype: torch_linear(d, True), torch_),
                 Check(f"Linear, no bias ({dtype})", "torch.nn.Linear", lambda d=dtype: torch_linear(d, False), torch_),
                 Check(f"Embedding ({dtype})", "torch.nn.Embedding", lambda d=dtype: torch_embedding(d), torch_),
                 Check(f"LayerNorm ({dtype})", "torch.nn.LayerNorm", lambda d=dtype: torch_layernorm(d), torch_),
                 Check(f"GELU, tanh ({dtype})", "torch gelu(tanh)", lambda d=dtype: torch_gelu(d), torch_),
                 Check(f"softmax ({dtype})", "torch.softmax", lambda d=dtype: torch_softmax(d), torch_),
                 Check(f"dropout, torch's mask ({dtype})", "torch dropout", lambda d=dtype: torch_dropout(d), torch_),
                 Check(f"cross-entropy ({dtype})", "torch cross_entropy", lambda d=dtype: torch_cross_entropy(d),
                       torch_),
                 Check(f"CausalSelfAttention ({dtype})", "torch sdpa(causal)", lambda d=dtype: torch_module(
                     "attention", d), torch_),
                 Check(f"MLP ({dtype})", "torch autograd", lambda d=dtype: torch_module("mlp", d), torch_),
                 Check(f"Block ({dtype})", "torch autograd", lambda d=dtype: torch_module("block", d), torch_)]
    for dtype in ("float64", "float32"):
        rows += [Check(f"LoRALinear, dropout 0.4 ({dtype})", "torch autograd",
                       lambda d=dtype: adapter_layer_vs_torch("lora", d, dropout=0.4, use_rslora=True), torch_),
                 Check(f"QLoRALinear NF4, dropout 0.4 ({dtype})", "torch autograd",
                       lambda d=dtype: adapter_layer_vs_torch("qlora", d, dropout=0.4), torch_),
                 Check(f"QALoRALinear INT4 ({dtype})", "torch avg_pool1d",
                       lambda d=dtype: adapter_layer_vs_torch("qalora", d, bits=4), torch_),
                 Check(f"QALoRALinear INT2 ({dtype})", "torch avg_pool1d",
                       lambda d=dtype: adapter_layer_vs_torch("qalora", d, bits=2), torch_)]
    for name in FUNCTIONAL:
        rows.append(Check(f"functional.{name}_* (float64)", "central differences",
                          lambda n=name: gradcheck_functional(n), ()))
    rows += [Check("GPT, every parameter (float64)", "central differences", gradcheck_gpt, ()),
             Check("LoRALinear, dropout 0.4 (float64)", "central differences",
                   lambda: adapter_layer_gradients("lora", dropout=0.4), ()),
             Check("QLoRALinear NF4 (float64)", "central differences", lambda: adapter_layer_gradients("qlora"), ()),
             Check("QALoRALinear INT2 (float64)", "central differences",
                   lambda: adapter_layer_gradients("qalora", bits=2), ())]
    hf = ("torch", "transformers")
    for cfg in HF_CONFIGS:
        shape = f"L{cfg['n_layer']}H{cfg['n_head']}C{cfg['n_embd']}"
        for attn in ("eager", "sdpa"):
            rows.append(Check(f"GPT {shape} logits, loss (float32)", f"GPT2LMHeadModel {attn}",
                              lambda c=cfg, a=attn: hf_gpt_float32(c, a), hf))
        rows.append(Check(f"GPT {shape} every gradient (float64)", "GPT2LMHeadModel", lambda c=cfg: hf_gpt_float64(c),
                          hf))
    rows.append(Check("GPT tied head: wte gradient (float64)", "GPT2LMHeadModel", lambda: hf_tied_head(HF_CONFIGS[1]),
                      hf))
    rows += _peft_checks()
    bnb = ("torch", "bitsandbytes")
    rows += [Check(f"NF4 quantize + dequantize ({len(PARITY_SHAPES)} shapes)", "bitsandbytes",
                   lambda: bnb_parity("nf4"), bnb),
             Check(f"FP4 quantize + dequantize ({len(PARITY_SHAPES)} shapes)", "bitsandbytes",
                   lambda: bnb_parity("fp4"), bnb),
             Check("NF4 at block sizes 32 to 4096", "bitsandbytes", bnb_blocksizes, bnb),
             Check("NF4 double quantization: every stored array", "bitsandbytes", bnb_double_quant_codes, bnb)]
    return rows


def missing_references() -> list:
    """The reference libraries that cannot be imported here."""
    import importlib
    import logging

    quiet = logging.getLogger("bitsandbytes")  # it warns on import about optional CPU kernels verify never uses
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    missing = []
    try:
        for name in REFERENCES:
            try:
                importlib.import_module(name)
            except ImportError:
                missing.append(name)
    finally:
        quiet.setLevel(level)
    return missing


def _fmt_error(m: Measurement) -> str:
    return f"{int(m.error)}" if m.bound == 0 else f"{m.error:.2e}"


def _fmt_bound(m: Measurement) -> str:
    return "= 0" if m.bound == 0 else f"< {m.bound:.0e}"


HEAD = f"{'component':<44} | {'reference':<24} | {'measured error':>14} | {'bound':>7} | ok"


def run_checks(rows, out=print) -> tuple[int, int]:
    """Run every check, print one line each (the worst of its measurements); returns (passed, failed)."""
    out(HEAD)
    out("-" * len(HEAD))
    passed = failed = 0
    for check in rows:
        try:
            measurements = check.run()
        except Exception as e:  # a Mismatch, or a comparison that crashed: reported, not hidden
            failed += 1
            out(f"{check.component:<44} | {check.reference:<24} | {'-':>14} | {'':>7} | FAILED: "
                f"{type(e).__name__}: {e}")
            continue
        m = worst(measurements)
        ok = all(x.ok for x in measurements)
        passed, failed = passed + ok, failed + (not ok)
        out(f"{check.component:<44} | {check.reference:<24} | {_fmt_error(m):>14} | {_fmt_bound(m):>7} | "
            f"{'ok' if ok else 'FAILED'}")
        for bad in (x for x in measurements if not x.ok):
            out(f"    {bad.what}: {bad.error:.3e}, bound {bad.bound:g}")
    return passed, failed


def add_arguments(parser) -> None:
    parser.description = ("Compare every layer and model with PyTorch autograd, transformers, PEFT and "
                          "bitsandbytes, and print the measured error of each next to its bound. Exit code 0: "
                          "every row ok; 1: a row failed or the reference libraries are not installed (then "
                          f"it says how to install them: {INSTALL}).")


def main(args=None) -> int:
    """Print the table; exit code 0 when every row is ok, 1 otherwise (or when references are missing)."""
    t0, c0 = time.perf_counter(), time.process_time()
    missing = missing_references()
    rows = checks()
    runnable = [c for c in rows if not set(c.needs) & set(missing)]
    print("lora_from_scratch verify: each row is measured now; 'measured error' is the worst of the row's "
          "comparisons\n(norm-wise relative unless it says max abs; a count of mismatching bytes or values "
          "must be 0)\n", flush=True)
    import warnings

    with warnings.catch_warnings():  # the references' deprecation notices are not findings
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        passed, failed = run_checks(runnable, out=lambda line: print(line, flush=True))
    skipped = len([c for c in rows if c.needs]) - len([c for c in runnable if c.needs])
    print(f"\n{passed} ok, {failed} failed ({time.perf_counter() - t0:.0f} s wall, "
          f"{time.process_time() - c0:.0f} s CPU)")
    if missing:
        print(f"\nNot run: the {skipped} comparisons with PyTorch, transformers, PEFT and bitsandbytes "
              f"({', '.join(missing)} cannot be imported: not installed).\nInstall the test dependencies with:\n"
              f"    {INSTALL}")
        return 1
    return 0 if failed == 0 else 1
