"""The NumPy/CuPy backend: the source rules that keep the package GPU-ready, backend selection, and a GPU run.

(a) A scan of the package source with ``ast``: computational modules must
not import NumPy at all (they take ``xp = xp_of(...)`` from their inputs),
and no module may import CuPy at module level (it is imported lazily, so
the package works without a GPU). (b) ``set_backend`` / ``LFS_BACKEND`` /
``xp_of`` behaviour, in subprocesses where the process state matters.
(c) On a machine with CuPy and a GPU, a small GPT's forward and backward
on CuPy agree with NumPy.
"""

import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import rel

import lora_from_scratch
from lora_from_scratch import backend
from lora_from_scratch.backend import get_backend_name, set_backend, to_numpy, xp_of

PACKAGE = pathlib.Path(lora_from_scratch.__file__).parent
REPO = PACKAGE.parent
HOST_SIDE = {"backend.py", "files.py", "hf_folder.py", "finetune.py", "checkpoint.py", "hf_io.py", "peft_io.py",
             "data.py", "plots/__init__.py", "train.py", "__main__.py", "gradcheck.py", "demo.py", "quant/tables.py"}


HOST_SIDE_FOLDERS = ("experiments/", "exercises/", "plots/")  # orchestration and checking: host-side by nature


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 8, f"expected the package sources under {PACKAGE}"
    return [(f.relative_to(PACKAGE).as_posix(), f) for f in files]


def _imports(tree):
    """Yields (top-level module name, line, at_module_level) for every import statement."""

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name.split(".")[0], child.lineno, not in_function
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module.split(".")[0], child.lineno, not in_function
            yield from walk(child, nested)

    yield from walk(tree, False)


def scan_violations(sources):
    """'file:line: ...' for each NumPy import in a computational module and each module-level CuPy import."""
    problems = []
    for rel_path, path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for module, line, top_level in _imports(tree):
            if module == "numpy" and rel_path not in HOST_SIDE and not rel_path.startswith(HOST_SIDE_FOLDERS):
                problems.append(f"lora_from_scratch/{rel_path}:{line}: computational module imports numpy")
            if module in ("cupy", "cupyx") and top_level:
                problems.append(f"lora_from_scratch/{rel_path}:{line}: imports {module} at module level")
    return problems


def test_source_scan_numpy_and_cupy_imports():
    problems = scan_violations(_sources())
    assert not problems, "backend rules broken:\n" + "\n".join(problems)


def test_source_scan_catches_violations(tmp_path):
    """The scanner itself: each forbidden form is reported with its file and line."""
    (tmp_path / "quant").mkdir()
    cases = {
        "lora.py": "import math\nimport numpy as np\n",
        "rank.py": "from numpy.linalg import svd\n",
        "qlora.py": "def f():\n    import numpy\n",
        "checkpoint.py": "import numpy as np\nimport cupy\n",
        "quant/nf4.py": "if True:\n    import cupyx.scatter_add\n",
        "quant/tables.py": "import numpy as np\ndef f():\n    import cupy\n",  # allowed: host-side, lazy cupy
        "functional.py": "from .backend import xp_of\ndef g():\n    import cupy\n",  # allowed
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    sources = [(name, tmp_path / name) for name in cases]
    assert sorted(scan_violations(sources)) == sorted([
        "lora_from_scratch/lora.py:2: computational module imports numpy",
        "lora_from_scratch/rank.py:1: computational module imports numpy",
        "lora_from_scratch/qlora.py:2: computational module imports numpy",
        "lora_from_scratch/checkpoint.py:2: imports cupy at module level",
        "lora_from_scratch/quant/nf4.py:2: imports cupyx at module level",
    ])


# ------------------------------------------------------------------ selection
@pytest.fixture
def restore_backend():
    before = get_backend_name()
    yield
    set_backend(before)


def test_set_backend_numpy(restore_backend):
    set_backend("numpy")
    assert get_backend_name() == "numpy"
    assert backend.get_xp() is np
    assert isinstance(backend.asarray([1.0, 2.0]), np.ndarray)


def test_set_backend_bogus_lists_valid_names(restore_backend):
    before = get_backend_name()
    with pytest.raises(ValueError) as err:
        set_backend("bogus")
    msg = str(err.value)
    assert "bogus" in msg and "numpy" in msg and "cupy" in msg
    assert get_backend_name() == before  # a failed call changes nothing


def test_xp_of_numpy_arrays():
    a = np.zeros(3)
    assert xp_of(a) is np
    assert xp_of(a, np.ones((2, 2), dtype=np.float32), 3.0) is np
    assert xp_of() is np
    assert not backend.is_cupy_array(a)
    assert to_numpy(a) is a


def _python(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "LFS_BACKEND"}
    env.update(env_changes)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_env_var_numpy():
    r = _python("from lora_from_scratch import backend as b; import numpy as np\n"
                "assert b.get_backend_name() == 'numpy' and b.get_xp() is np\nprint('ok')",
                LFS_BACKEND="numpy")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_env_var_bogus_raises_value_error():
    r = _python("from lora_from_scratch import backend as b\n"
                "try:\n    b.get_backend_name()\nexcept ValueError as e:\n    print('ValueError', e)",
                LFS_BACKEND="bogus")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ValueError") and "bogus" in r.stdout


def _cupy_importable():
    r = _python("import cupy")
    return r.returncode == 0


@pytest.mark.skipif(_cupy_importable(), reason="CuPy is installed here")
def test_env_var_cupy_without_cupy_is_a_clear_runtime_error():
    r = _python("from lora_from_scratch import backend as b\n"
                "try:\n    b.get_backend_name()\nexcept RuntimeError as e:\n    print('RuntimeError', e)",
                LFS_BACKEND="cupy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("RuntimeError") and "CuPy" in r.stdout


def test_importing_the_package_does_not_import_cupy():
    names = sorted(
        "lora_from_scratch." + p.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"
    )
    names = [n[: -len(".__init__")] if n.endswith(".__init__") else n for n in names]
    assert "lora_from_scratch.model" in names
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx'))\n"
            "print('imported:', bad)")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "imported: []", r.stdout


# ------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
def test_gpt_forward_backward_cupy_matches_numpy(restore_backend):
    cp = pytest.importorskip("cupy")
    from lora_from_scratch.functional import cross_entropy
    from lora_from_scratch.model import GPT, GPTConfig

    cfg = GPTConfig(vocab_size=23, block_size=10, n_layer=2, n_head=4, n_embd=32)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(3, 10))  # (B, T), made on the host
    targets = rng.integers(0, cfg.vocab_size, size=(3, 10))  # (B, T)
    targets[0, :2] = -100

    set_backend("numpy")
    runs = {}
    for name in ("numpy", "cupy"):
        model = GPT(cfg, seed=1)  # float32, the same host draws for both
        if name == "cupy":
            model.to("cupy")
            assert all(backend.is_cupy_array(p.data) for p in model.parameters())
            x, t = cp.asarray(ids), cp.asarray(targets)  # (B, T) on the device
        else:
            x, t = ids, targets
        logits = model(x)  # (B, T, V)
        loss, dlogits = cross_entropy(logits, t)
        model.backward(dlogits)
        assert backend.is_cupy_array(logits) == (name == "cupy")
        runs[name] = (to_numpy(logits), float(loss),
                      {n: to_numpy(p.grad) for n, p in model.named_parameters()})
    (l_np, loss_np, g_np), (l_cp, loss_cp, g_cp) = runs["numpy"], runs["cupy"]
    assert rel(l_cp, l_np) < 1e-5
    assert abs(loss_cp - loss_np) <= 1e-5 * abs(loss_np)
    assert set(g_cp) == set(g_np)
    for n in g_np:
        if n.endswith(".k.bias"):  # exactly 0 in exact arithmetic: compare absolutely
            assert np.abs(g_cp[n]).max() < 1e-6 and np.abs(g_np[n]).max() < 1e-6, n
            continue
        assert rel(g_cp[n], g_np[n]) < 1e-5, n
