"""What a model and an optimizer really hold, measured from their arrays; and what a step needs.

LoRA (Hu et al., 2021), section 4.2; QLoRA (Dettmers et al., 2023),
section 3.

Two kinds of measurement, neither of them an estimate:

**Held** (any backend): the bytes of the arrays a model and an optimizer keep, read from each
array's ``.nbytes``. A model holds its parameters and its buffers (``nn.Buffer``: the packed
codes and block constants of a quantized weight), which ``Module.named_arrays()`` lists; that is
all ``resident_bytes`` counts. Full fine-tuning keeps, for every parameter, the weight, its
gradient and AdamW's two moments (4x the weights); LoRA keeps gradients and moments only for the
small A and B. ``memory_report`` puts the numbers side by side.

**Traced** (NumPy only): what a computation allocates while it runs. Activations are not held
between steps, so they are not "resident": the forward makes them, the backward frees them.
``traced_peak`` runs a function under ``tracemalloc`` (NumPy reports every array allocation to
it) and returns the high-water mark of the bytes allocated during the call; ``step_memory``
does that for one training step and splits the result into weights, gradients, optimizer state
and activations. Arrays on a GPU (CuPy) are not seen by ``tracemalloc``.
"""

from __future__ import annotations

import math
import numbers
import tracemalloc

from ..adapter import QuantizedLinear

# ----------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------

_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DECIMAL = ("B", "kB", "MB", "GB", "TB", "PB")


def format_bytes(n, binary: bool = True, digits: int = 1) -> str:
    """A byte count for people: ``format_bytes(3 * 2**20) == "3.0 MiB"``.

    ``binary=True`` uses powers of 1024 (KiB, MiB, GiB, TiB: how memory is
    sized); ``binary=False`` uses powers of 1000 (kB, MB, GB, TB: how the
    LoRA paper and disk makers write sizes). Counts below one unit step are
    written as whole bytes (``"512 B"``).
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise ValueError(f"format_bytes needs a number of bytes; got {n!r}")
    n = float(n)
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"format_bytes needs a finite number of bytes >= 0; got {n!r}")
    base, units = (1024.0, _BINARY) if binary else (1000.0, _DECIMAL)
    if n < base:
        return f"{n:.0f} B"
    i = min(int(math.log(n, base)), len(units) - 1)
    value = n / base**i
    if round(value, digits) >= base and i + 1 < len(units):  # 1023.96 KiB would print as "1024.0 KiB"
        i, value = i + 1, value / base
    return f"{value:.{digits}f} {units[i]}"


# ----------------------------------------------------------------------------------------------
# held: parameters, buffers, gradients, optimizer state
# ----------------------------------------------------------------------------------------------


def _check_trainable(trainable) -> None:
    if trainable not in (None, True, False):
        raise ValueError(f"trainable must be None, True or False; got {trainable!r}")


def _selected(model, trainable):
    return [p for p in model.parameters() if trainable is None or p.trainable == trainable]


def _distinct(arrays) -> list:
    """The arrays (None skipped), each once by identity: two holders of one array count it once."""
    seen, out = set(), []
    for a in arrays:
        if a is not None and id(a) not in seen:
            seen.add(id(a))
            out.append(a)
    return out


def _nbytes(arrays) -> int:
    return sum(int(a.nbytes) for a in _distinct(arrays))


def parameter_bytes(model, trainable: bool | None = None) -> int:
    """Bytes of the model's Parameters' data: all (``None``), only trainable (``True``), only frozen (``False``).

    Buffers (a quantized weight's codes and constants) are not parameters and are not counted
    here: ``buffer_bytes`` counts them, ``resident_bytes`` counts both. Like every count here,
    each array once: two Parameters holding the same array count it once.
    """
    _check_trainable(trainable)
    return _nbytes(p.data for p in _selected(model, trainable))


def buffer_bytes(model) -> int:
    """Bytes of the model's buffers: the stored form of its quantized weights (codes, scales, zero points)."""
    return _nbytes(b.data for _, b in model.named_buffers())


def parameter_count(model, trainable: bool | None = None) -> int:
    """Number of weights the model computes with: parameter values, plus the weights its quantized layers encode.

    ``trainable`` selects as in ``parameter_bytes``. A quantized weight (``adapter.QuantizedLinear``:
    QLoRA's NF4 base, QA-LoRA's group-wise base) is frozen and counts as the out * in weights it
    stands for, not as its codes, so the total matches ``lora.count_parameters``.
    """
    _check_trainable(trainable)
    count = sum(int(a.size) for a in _distinct(p.data for p in _selected(model, trainable)))
    if trainable is not True:
        count += sum(m.weight_count for _, m in model.named_modules() if isinstance(m, QuantizedLinear))
    return count


def gradient_bytes(model) -> int:
    """Bytes of the gradients present (``p.grad is not None``); frozen parameters have none."""
    return _nbytes(p.grad for p in model.parameters())


def _state_bytes(value, seen: set) -> int:
    """Bytes of the arrays in an optimizer's state: nested dicts, lists and tuples of arrays and numbers."""
    if isinstance(value, dict):
        return sum(_state_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_bytes(v, seen) for v in value)
    if hasattr(value, "nbytes") and hasattr(value, "shape") and id(value) not in seen:
        seen.add(id(value))
        return int(value.nbytes)
    return 0  # step counters and other plain numbers


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's state arrays (AdamW: exp_avg and exp_avg_sq per trainable parameter).

    Zero before the first ``step()``: the moments are allocated lazily. Uses the optimizer's own
    ``state_nbytes()`` when it has one, else sums the arrays of its ``state`` mapping.
    """
    if optimizer is None:
        return 0
    if hasattr(optimizer, "state_nbytes"):
        return int(optimizer.state_nbytes())
    state = getattr(optimizer, "state", None)
    if not isinstance(state, dict):
        raise ValueError(f"cannot measure the state of {type(optimizer).__name__}: no state_nbytes() or .state dict")
    return _state_bytes(state, set())


def trainable_state_bytes(model, optimizer=None) -> int:
    """Gradients plus optimizer moments: the memory that exists only for the parameters being trained."""
    return gradient_bytes(model) + optimizer_state_bytes(optimizer)


def resident_bytes(module, include_grads: bool = False) -> int:
    """Bytes that ``module`` keeps between steps: every parameter and every buffer, each array once.

    The arrays are those of ``module.named_arrays()``: parameters (float weights, biases,
    adapters) and buffers (the packed codes and constants of quantized weights). Each array is
    counted once, by identity, so a weight shared by two layers (the tied LM head, a bias two
    layers hold) counts once. A NumPy *view* of another array is a different object and counts
    its own ``nbytes``. ``include_grads=True`` adds the gradients present.

    Not counted: the caches of a forward (activations are made and freed by a step, see
    ``traced_peak`` and ``step_memory``) and the optimizer's state (``optimizer_state_bytes``).
    """
    holders = [h for _, h in module.named_arrays()]  # Parameters and Buffers
    grads = [h.grad for h in holders] if include_grads else []  # a Buffer's grad is always None
    return _nbytes([h.data for h in holders] + grads)


def memory_report(model, optimizer=None) -> dict:
    """Counts and bytes of a model (and optimizer), measured from the arrays they hold.

    Keys: ``parameters``, ``trainable_parameters``, ``frozen_parameters`` (counts, as
    ``parameter_count``: a quantized weight counts as the weights it encodes, all frozen) and
    ``trainable_fraction``; ``parameter_bytes``, ``trainable_bytes``, ``frozen_bytes`` (the
    Parameters' data); ``resident_bytes`` (parameters and buffers: everything the model holds,
    quantized storage included); ``gradient_bytes``, ``optimizer_bytes``,
    ``trainable_state_bytes`` (gradients + optimizer); ``total_bytes`` (resident + gradients +
    optimizer). Activations are not in it (``step_memory`` measures them).
    """
    n_all = parameter_count(model)
    n_train = parameter_count(model, trainable=True)
    grads = gradient_bytes(model)
    opt = optimizer_state_bytes(optimizer)
    resident = resident_bytes(model)
    return {
        "parameters": n_all,
        "trainable_parameters": n_train,
        "frozen_parameters": n_all - n_train,
        "trainable_fraction": n_train / n_all if n_all else 0.0,
        "parameter_bytes": parameter_bytes(model),
        "trainable_bytes": parameter_bytes(model, trainable=True),
        "frozen_bytes": parameter_bytes(model, trainable=False),
        "resident_bytes": resident,
        "gradient_bytes": grads,
        "optimizer_bytes": opt,
        "trainable_state_bytes": grads + opt,
        "total_bytes": resident + grads + opt,
    }


def format_report(report: dict, binary: bool = True) -> str:
    """The ``memory_report`` dict as an aligned text table."""
    lines = [
        f"parameters        {report['parameters']:>14,d}",
        f"  trainable       {report['trainable_parameters']:>14,d}  ({report['trainable_fraction']:.3%})",
        f"  frozen          {report['frozen_parameters']:>14,d}",
    ]
    for key, label in (("resident_bytes", "weights held"), ("gradient_bytes", "gradients"),
                       ("optimizer_bytes", "optimizer state"), ("total_bytes", "total")):
        lines.append(f"{label:<18}{format_bytes(report[key], binary=binary):>14}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# traced: what a computation allocates while it runs (host memory)
# ----------------------------------------------------------------------------------------------

_enclosing: list[list[int]] = []  # the peaks seen by the traced_peak calls in progress, innermost last


def traced_peak(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` under ``tracemalloc``: ``(result, peak, retained)`` in bytes.

    ``peak``: the most bytes that were allocated by the call and not yet freed, at any moment
    during it (the high-water mark above what was allocated when it began). ``retained``: the
    bytes the call allocated that are still allocated after it (what it left behind, e.g. new
    gradients or optimizer moments). Inside an enclosing ``traced_peak`` call it can be negative:
    the inner call may free memory the outer one traced.

    Host memory only: NumPy reports each array's data buffer to ``tracemalloc``, and so do
    Python objects, so everything the call makes on the host is seen: weights it creates
    (a dequantized copy of a 4-bit weight), gradients, optimizer state, the activations a
    forward keeps for its backward, and every temporary. Arrays that existed before the call
    are not counted, even where the call reads them. CuPy arrays live in GPU memory, which
    ``tracemalloc`` does not see: measure on the NumPy backend.

    Tracing slows the call down (a few times over) and changes no result. Calls may nest: an
    inner call does not hide the outer one's earlier peak. Not thread-safe.
    """
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    before, peak_so_far = tracemalloc.get_traced_memory()
    for frame in _enclosing:  # reset_peak() forgets the peak the enclosing calls have seen so far
        frame[0] = max(frame[0], peak_so_far)
    tracemalloc.reset_peak()
    frame = [before]
    _enclosing.append(frame)
    try:
        result = fn(*args, **kwargs)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        _enclosing.pop()
        if started:
            tracemalloc.stop()
    return result, max(peak, frame[0]) - before, current - before


def step_memory(model, optimizer, batch) -> dict:
    """The host memory of one training step, measured: what it needs at its peak and what it holds after.

    ``batch`` is ``(idx, targets)``, token ids (B, T) and next-token targets (B, T). The step is
    ``train.train_step``'s without clipping: ``model.zero_grad()`` (the previous step's gradients
    go), then under ``traced_peak``: ``model.loss`` (forward, LM head and cross-entropy), ``model.backward``,
    ``optimizer.step()``. Returns bytes (and the loss), on the NumPy backend:

    - ``held_before``: what the model and optimizer hold when the step begins (weights, buffers
      and any optimizer state from earlier steps; no gradients);
    - ``peak``: the high-water mark of the step, ``held_before`` plus the most the step itself
      had allocated at any one moment;
    - ``step_peak``: ``peak - held_before``, the memory the step needs on top of what was held:
      activations and temporaries, the gradients formed so far and (at a first step) the
      optimizer moments being made;
    - ``activations``: what the forward and the loss leave for the backward (each layer's cache,
      the logits' gradient), measured after the loss: the activation memory of the batch;
    - ``weights``, ``gradients``, ``optimizer``: what is held after the step (``resident_bytes``,
      ``gradient_bytes``, ``optimizer_state_bytes``); ``retained``: what the step allocated and
      kept (its gradients, new moments);
    - ``loss``: the step's loss, a float.

    Full fine-tuning holds a gradient and two AdamW moments for every parameter; LoRA only for
    the adapters, while its activations are about the same (the gradient still has to flow down
    through every frozen layer).
    """
    idx, targets = batch
    model.zero_grad()
    held_before = resident_bytes(model) + optimizer_state_bytes(optimizer)

    def forward():
        return model.loss(idx, targets)  # (): the LM head and the loss in chunks (as train.train_step)

    def step():
        loss, _, activations = traced_peak(forward)
        model.backward()
        optimizer.step()
        return float(loss), activations

    (loss, activations), peak, retained = traced_peak(step)
    return {
        "held_before": held_before,
        "peak": held_before + peak,
        "step_peak": peak,
        "activations": activations,
        "weights": resident_bytes(model),
        "gradients": gradient_bytes(model),
        "optimizer": optimizer_state_bytes(optimizer),
        "retained": retained,
        "loss": loss,
    }
