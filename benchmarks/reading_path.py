"""The reading path: how much of the package one training step runs, and the import cycles among its modules.

A reader who wants to follow one LoRA, QLoRA or QA-LoRA step has to read every function the step
calls. This script measures that length. For each method, in a fresh Python process, it builds a
small GPT (random weights) and a batch outside the measurement, then traces, with
``sys.setprofile``, exactly what a training run does for one step:

- adapt the model (``methods.adapt``: ``apply_lora``, ``apply_qlora`` or ``apply_qalora``),
- make the optimizer (``methods.make_optimizer`` with the default ``train.TrainConfig``),
- one ``methods.train_step`` (forward, cross-entropy, backward, gradient clipping, AdamW).

Making and checking the batch is traced apart (it is the data the step reads; only the reading
order counts it).

Every package function that runs is collected (a comprehension, a lambda or a nested function
counts as the function that holds it; code run at import time is not counted), and the source
lines of those functions are counted without docstrings, comments and blank lines (``ast`` finds
the docstrings, ``tokenize`` the comments and blank lines). A line is counted once however many
traced functions hold it, so "all three" is the union of the three paths, not their sum.

The import graph is read with ``ast`` from every module of the package: an edge a -> b for each
``import`` / ``from ... import`` of a package module in a, where ``from .p import name`` points to
the submodule ``p.name`` when there is one and to ``p`` otherwise (the parent packages Python
also runs on the way are not counted as edges). Imports at module level and imports inside
functions are told apart: a cycle is a strongly connected group of more than one module, counted
once in the graph of module-level imports and once in the graph of all imports (a function-level
import also runs, only later).

    python benchmarks/reading_path.py                  # the step of the demo's base model size
    python benchmarks/reading_path.py --quick          # a tiny model: the same code runs
    python benchmarks/reading_path.py --reading-order  # the README's reading-order table
    python benchmarks/reading_path.py --json out.json  # everything as JSON
    python benchmarks/reading_path.py --functions      # also each function's lines on the path
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import subprocess
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "lora_from_scratch"
PACKAGE_DIR = os.path.join(ROOT, PACKAGE)
METHODS = ("lora", "qlora", "qalora")
NAMES = {"lora": "LoRA", "qlora": "QLoRA", "qalora": "QA-LoRA"}
# the model of the demo's base checkpoint (__main__.BASE_CONFIG) and a tiny one for --quick
SIZES = {"base": dict(block_size=32, n_layer=4, n_head=4, n_embd=128),
         "quick": dict(block_size=32, n_layer=1, n_head=2, n_embd=32)}
BATCH = 4

# The files a student reads to follow one QLoRA step from the data to the update, in order, each
# with the equation it holds. The line counts are measured (the QLoRA path); a file on the path
# missing from this list is reported after the table.
READING_ORDER = [
    ("data.py", "a batch: lines `task:input>answer.` as ids (B, T); targets = the next character, "
                "scored on the answer only"),
    ("backend.py", "`xp = xp_of(x, W)`: NumPy or CuPy, taken from the arrays themselves"),
    ("methods.py", "`adapt(model, \"qlora\", r, alpha)`: one name per method; then one step of any method: "
                   "forward, loss, backward, gradient norm clipped to 1, optimizer step"),
    ("adapter.py", "the six target matrices Wq, Wk, Wv, Wo, fc, proj (Hu et al., 2021, section 4.2), each "
                   "`Linear` replaced by an adapted layer, everything else frozen; "
                   "h = base(x) + s pool(dropout(x)) A^T B^T, s = alpha / r; "
                   "dB = s dy^T (x A^T), dA = s (dy B)^T x (eq. 3)"),
    ("checks.py", "argument checks written once: the block size a power of two from 16 to 4096"),
    ("quant/tables.py", "NF4: 16 levels at quantiles of N(0, 1), scaled to [-1, 1] (Dettmers et al., 2023, eq. 4)"),
    ("quant/blockwise.py", "c = absmax(block), code = nearest level to x / c, two codes per byte; "
                           "c stored in 8 bits (double quantization, eq. 1)"),
    ("qlora.py", "h = x doubleDequant(c1, c2, W_NF4)^T + b + s dropout(x) A^T B^T (eq. 5-6)"),
    ("model.py", "x = wte[idx] + wpe; x += attn(ln_1(x)); x += mlp(ln_2(x)); logits = ln_f(x) wte^T"),
    ("nn.py", "`Linear`: y = x W^T + b; a frozen W gets no dW and no optimizer state"),
    ("functional.py", "the forward/backward pairs: dx = dy W, dW = dy^T x; "
                      "cross-entropy dlogits = (softmax - onehot) / (scored targets)"),
    ("optim.py", "AdamW: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, "
                 "p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)"),
]


# ---------------------------------------------------------------- counting source lines

def _docstring_lines(tree) -> set[int]:
    """The line numbers of every docstring (module, class, function) in ``tree``."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str) -> set[int]:
    """The lines of ``source`` that hold code: not blank, not only a comment, not part of a docstring."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))  # a multi-line string holds all its lines
    return lines - _docstring_lines(ast.parse(source))


class SourceFile:
    """One package file: its code lines and its functions, to map a traced code object to its source."""

    def __init__(self, path: str):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        self.code = code_lines(source)
        # (first line with decorators, last line, name) of every def and lambda
        self.functions = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
                self.functions.append((first, node.end_lineno, getattr(node, "name", "<lambda>")))

    def function_at(self, code):
        """(first, last) lines of the function ``code`` runs: its own def, or the def holding a comprehension."""
        line = code.co_firstlineno
        for first, last, name in self.functions:
            if first == line and name == code.co_name:
                return first, last
        holding = [(first, last) for first, last, _ in self.functions if first <= line <= last]
        return min(holding, key=lambda span: span[1] - span[0]) if holding else None  # the innermost


    def name_at(self, span) -> str:
        """The name of the function whose (first, last) lines are ``span``."""
        return next(name for first, last, name in self.functions if (first, last) == span)


def relative(path: str) -> str:
    return os.path.relpath(path, PACKAGE_DIR).replace(os.sep, "/")


def count_lines(codes) -> dict:
    """{file: set of counted lines} for the traced code objects ``codes`` (package files only)."""
    files, counted = {}, {}
    for code in codes:
        path = os.path.abspath(code.co_filename)
        if code.co_name == "<module>" or not path.startswith(PACKAGE_DIR + os.sep):
            continue  # import-time code, or outside the package
        if path not in files:
            files[path] = SourceFile(path)
        span = files[path].function_at(code)
        if span is None:  # a class body run at import time
            continue
        lines = {n for n in range(span[0], span[1] + 1) if n in files[path].code}
        counted.setdefault(relative(path), set()).update(lines)
    return counted


def count_functions(codes) -> dict:
    """{"file:line:function": counted lines} for the traced code objects ``codes``, as ``count_lines`` counts them."""
    files, counted = {}, {}
    for code in codes:
        path = os.path.abspath(code.co_filename)
        if code.co_name == "<module>" or not path.startswith(PACKAGE_DIR + os.sep):
            continue
        if path not in files:
            files[path] = SourceFile(path)
        span = files[path].function_at(code)
        if span is not None:
            lines = sum(n in files[path].code for n in range(span[0], span[1] + 1))
            counted[f"{relative(path)}:{span[0]}:{files[path].name_at(span)}"] = lines
    return counted


# ---------------------------------------------------------------- tracing one step

def trace_step(method: str, size: str) -> dict:
    """The code objects that make a batch and that one step of ``method`` runs (run in a fresh process).

    {"batch": [...], "step": [...]}, each code object as "file:first line:name". The batch (made and
    checked on the host as ``train.train`` does) is traced apart: it is the data a step reads, not the
    step, and only the reading order shows it.
    """
    sys.path.insert(0, ROOT)
    import numpy as np

    from lora_from_scratch import data
    from lora_from_scratch.functional import check_ids, check_targets
    from lora_from_scratch.methods import adapt, make_optimizer, train_step
    from lora_from_scratch.model import GPT, GPTConfig
    from lora_from_scratch.train import TrainConfig

    cfg = GPTConfig(vocab_size=data.VOCAB_SIZE, **SIZES[size])
    model = GPT(cfg, seed=0)
    train_cfg = TrainConfig()
    seen = {"batch": set(), "step": set()}

    def traced(part, fn, *args):
        def profile(frame, event, arg):
            if event == "call":
                seen[part].add(frame.f_code)

        sys.setprofile(profile)
        try:
            return fn(*args)
        finally:
            sys.setprofile(None)

    def batch():
        rng = np.random.default_rng(0)
        idx, targets = data.make_batch(rng, BATCH, (data.FINETUNE_TASK,), block_size=cfg.block_size)  # (B, T) each
        check_ids(idx, cfg.vocab_size)
        check_targets(targets, cfg.vocab_size)
        return idx, targets

    def step(idx, targets):
        adapt(model, method)
        opt = make_optimizer(model, train_cfg)
        train_step(model, opt, idx, targets, train_cfg.grad_clip)

    traced("step", step, *traced("batch", batch))
    return {part: [f"{c.co_filename}:{c.co_firstlineno}:{c.co_name}" for c in codes] for part, codes in seen.items()}


class _Code:
    """A code object as the child process reported it (file, first line, name)."""

    def __init__(self, text: str):
        self.co_filename, line, self.co_name = text.rsplit(":", 2)
        self.co_firstlineno = int(line)


def traced_codes(method: str, size: str) -> dict:
    """Trace one step of ``method`` in a fresh interpreter, so no method inherits another's first-call work.

    {"batch": [code objects], "step": [code objects]} (see ``trace_step``)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--trace", method, "--size", size],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"tracing {method} failed:\n{proc.stderr[-3000:]}")
    return {part: [_Code(line) for line in lines] for part, lines in json.loads(proc.stdout).items()}


def _summary(counted: dict) -> dict:
    by_file = {path: len(lines) for path, lines in sorted(counted.items())}
    return {"lines": sum(by_file.values()), "files": len(by_file), "by_file": by_file}


def reading_path(size: str = "base") -> dict:
    """Lines and files per method and for the three together: {"lora": {...}, ..., "all": {...}, "batch": {...}}.

    "batch" is what making and checking one batch runs (the same for every method), outside the step's count.
    """
    codes = {m: traced_codes(m, size) for m in METHODS}
    per_method = {m: count_lines(codes[m]["step"]) for m in METHODS}
    union = {}
    for counted in per_method.values():
        for path, lines in counted.items():
            union.setdefault(path, set()).update(lines)
    out = {name: _summary(counted) for name, counted in [*per_method.items(), ("all", union)]}
    out["batch"] = _summary(count_lines(codes["qlora"]["batch"]))
    out["functions"] = {m: count_functions(codes[m]["step"]) for m in METHODS}
    return out


# ---------------------------------------------------------------- the import graph

def package_modules(package_dir: str = PACKAGE_DIR) -> dict:
    """{module name: file path} for every module of the package in ``package_dir``."""
    package, modules = os.path.basename(package_dir), {}
    for folder, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for name in sorted(files):
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), package_dir)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join([package, *parts])] = os.path.join(folder, name)
    return modules


def import_graph(package_dir: str = PACKAGE_DIR) -> dict:
    """{"module": {a: set of b}, "function": {a: set of b}}: imports at module level and inside functions."""
    modules = package_modules(package_dir)
    graph = {"module": {m: set() for m in modules}, "function": {m: set() for m in modules}}

    def targets(node, here: str):
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name in modules]
        if node.level:  # relative: from the package holding ``here``
            package = here if modules[here].endswith("__init__.py") else here.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        if base not in modules:
            return []
        return sorted({f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names})

    def visit(node, here: str, where: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                graph[where][here].update(t for t in targets(child, here) if t != here)
            inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else where
            visit(child, here, inner)

    for name, path in modules.items():
        with open(path, encoding="utf-8") as f:
            visit(ast.parse(f.read()), name, "module")
    return graph


def cycles(edges: dict) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(groups)


def import_cycles(package_dir: str = PACKAGE_DIR) -> dict:
    """{"module_level": [...], "all_imports": [...]}: the cycles of each graph (module names without the package)."""
    graph = import_graph(package_dir)
    both = {m: graph["module"][m] | graph["function"][m] for m in graph["module"]}
    short = len(os.path.basename(package_dir)) + 1

    def named(groups):
        return [[m[short:] or "__init__" for m in group] for group in groups]

    return {"module_level": named(cycles(graph["module"])), "all_imports": named(cycles(both))}


# ---------------------------------------------------------------- the report

def reading_order_table(path: dict) -> str:
    """The README's table: the QLoRA path's files in reading order, each with its measured line count.

    data.py's count is the batch's (made before the step); every other count is the step's. A file of
    the order that no function of the step runs (``quant/tables.py``: its tables are made when it is
    imported) keeps its row, with "import" in place of a count.
    """
    by_file = {**path["batch"]["by_file"], **path["qlora"]["by_file"]}
    rows = ["| file | lines | what it holds |", "| --- | ---: | --- |"]
    rows += [f"| `{name}` | {by_file.get(name, 'import')} | {what} |" for name, what in READING_ORDER]
    rows.append(f"| one QLoRA step | {path['qlora']['lines']} | {path['qlora']['files']} files "
                f"(the batch aside: {path['batch']['lines']} lines) |")
    assert not any("|" in what for _, what in READING_ORDER), "a | would break the markdown table"
    missing = sorted(set(by_file) - {name for name, _ in READING_ORDER})
    if missing:
        rows.append(f"\nOn the path but not in the reading order: {', '.join(missing)}")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model (the same functions run)")
    parser.add_argument("--reading-order", action="store_true", help="print the README's reading-order table")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--functions", action="store_true",
                        help="also print every function on the path with its lines and the methods that run it")
    parser.add_argument("--trace", choices=METHODS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--size", choices=sorted(SIZES), default="base", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trace:
        print(json.dumps(trace_step(args.trace, args.size)))
        return
    path = reading_path("quick" if args.quick else "base")
    found = import_cycles()
    if args.reading_order:
        print(reading_order_table(path))
        return
    print("one training step (adapt, optimizer, train_step), lines without docstrings, comments, blank lines:")
    for name in (*METHODS, "all"):
        label = NAMES.get(name, "all three")
        print(f"  {label:<10} {path[name]['lines']:5d} lines in {path[name]['files']:2d} files")
    print("  by file (all three): " + ", ".join(f"{f} {n}" for f, n in path["all"]["by_file"].items()))
    if args.functions:
        print("functions on the path (lines, file:line:function, the methods that run it):")
        names = sorted({f for m in METHODS for f in path["functions"][m]},
                       key=lambda f: (f.split(":")[0], int(f.split(":")[1])))
        for f in names:
            lines = next(path["functions"][m][f] for m in METHODS if f in path["functions"][m])
            runs = ",".join(NAMES[m] for m in METHODS if f in path["functions"][m])
            print(f"  {lines:4d}  {f}  [{runs}]")
    for kind, label in (("module_level", "module-level imports"), ("all_imports", "all imports")):
        groups = found[kind]
        print(f"import cycles ({label}): {len(groups)}" + "".join(f"\n  {' <-> '.join(g)}" for g in groups))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"reading_path": path, "import_cycles": found}, f, indent=2)


if __name__ == "__main__":
    main()
