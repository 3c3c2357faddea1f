"""What the package refuses, and what the user then sees: bad arguments, order-of-calls mistakes, training
that diverges, interruption.

- Every command of ``python -m lora_from_scratch``: bad input (arguments, output paths, a backend that
  cannot run here) is one line and exit code 2, checked before any work (the work functions are replaced
  here by ones that fail the test if called); Ctrl-C is one line and exit code 130, and a command's
  outputs are all there or none (``outputs.write_set``).
- ``pretrain`` writes ``runs/base.safetensors`` under the current folder by default, never the shipped model.
- A NaN gradient under a finite loss never reaches the weights, clipped or not.
- ``quant.pack_nibbles`` refuses codes and fills that do not fit in 4 bits.
- Integer arguments get one answer everywhere (``checks.check_int``): Python and NumPy integers pass,
  bools and floats fail, with the argument's name.

The command line is run in process (``__main__.main``) except where the process itself is the point
(the backend check): those subprocesses fail before any work, in about a second.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_from_scratch import __main__ as cli
from lora_from_scratch import backend, data, demo, lora, optim, outputs, train
from lora_from_scratch.checkpoint import BASE_CHECKPOINT
from lora_from_scratch.model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder; every function that does a command's work fails the test if it is reached."""
    monkeypatch.chdir(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the command started its work before refusing its input")

    monkeypatch.setattr(train, "train", no_work)
    monkeypatch.setattr(demo, "run_demo", no_work)
    monkeypatch.setattr("lora_from_scratch.plots.make_all_figures", no_work)
    monkeypatch.setattr("lora_from_scratch.exercises.students.write_student_notebooks", no_work)
    monkeypatch.setattr("lora_from_scratch.experiments.run_experiment", no_work)
    monkeypatch.setattr(demo, "subprocess", None)  # bench would run the benchmark scripts
    monkeypatch.setattr(outputs, "_WRITTEN", [])
    monkeypatch.delenv("LFS_DEBUG", raising=False)
    (tmp_path / "a-file").write_text("keep")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / demo.FIGURES[0]).write_text("old figure")
    return tmp_path


def _listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


BAD_INPUT = {
    "figures --out FILE": (["figures", "--out", "a-file"], "--out a-file: exists and is not a folder"),
    "figures --out FILE/x": (["figures", "--out", "a-file/x"], "a-file is not a folder"),
    "student-notebooks --out FILE": (["student-notebooks", "--out", "a-file"], "exists and is not a folder"),
    "experiment --out FILE": (["experiment", "rank_sweep", "--out", "a-file"], "exists and is not a folder"),
    "experiment unknown": (["experiment", "nope"], "unknown experiment 'nope'"),
    "experiment bad scale": (["experiment", "rank_sweep", "--scale", "huge"], "has no scale 'huge'"),
    "pretrain --out existing": (["pretrain", "--out", "a-file"], "--out a-file: exists; pass --force to replace it"),
    "pretrain --out FILE/x": (["pretrain", "--out", "a-file/base.safetensors"], "a-file is not a folder"),
    "pretrain --out folder": (["pretrain", "--out", "figs"], "--out figs: is a folder, not a file"),
    "pretrain --steps 0": (["pretrain", "--steps", "0"], "--steps must be a positive integer, got 0"),
    "pretrain --batch-size -1": (["pretrain", "--batch-size", "-1"], "--batch-size must be a positive integer"),
    "demo --json existing": (["demo", "--json", "a-file"], "--json a-file: exists; pass --force"),
    "demo --figures FILE": (["demo", "--figures", "a-file"], "--figures a-file: exists and is not a folder"),
    "demo --figures with an old figure": (["demo", "--figures", "figs"], f"{demo.FIGURES[0]}: exists; pass --force"),
    "demo --bits 9": (["demo", "--bits", "9"], "--bits must be an integer between 2 and 8, got 9"),
    "demo --rank 0": (["demo", "--rank", "0"], "--rank must be a positive integer, got 0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_before_any_work(in_tmp, capsys, case):
    argv, words = BAD_INPUT[case]
    before = _listing(in_tmp)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and words in err, err
    assert _listing(in_tmp) == before  # nothing written, nothing replaced, no temporary left


@pytest.mark.parametrize("argv", [["bench", "--slow"], ["verify", "--fast"], ["pretrain", "--steps", "ten"],
                                  ["no-such-command"], ["--backend", "tpu", "verify"]])
def test_argparse_refusals_are_one_line_too(in_tmp, capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: python -m lora_from_scratch"), err


def test_bench_outside_a_source_checkout_is_one_line(in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(demo, "__file__", str(in_tmp / "site-packages" / "lora_from_scratch" / "demo.py"))
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which is not there (run from a source checkout)" in err, err


def test_an_unknown_backend_in_the_environment_is_one_line(in_tmp, capsys, monkeypatch):
    monkeypatch.setenv("LFS_BACKEND", "tpu")
    monkeypatch.setattr(backend, "_default_name", None)  # read the variable again
    assert cli.main(["verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "LFS_BACKEND=tpu: unknown backend 'tpu'" in err, err


def _cupy_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import cupy"], capture_output=True).returncode == 0


@pytest.mark.skipif(_cupy_importable(), reason="CuPy is installed here")
@pytest.mark.parametrize("how", ["option", "environment"])
def test_cupy_without_cupy_is_one_line_exit_2(how):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LFS_DEBUG", None)
    args = ["demo", "--quick"]
    if how == "option":
        args = ["--backend", "cupy", *args]
    else:
        env["LFS_BACKEND"] = "cupy"
    proc = subprocess.run([sys.executable, "-m", "lora_from_scratch", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    source = "--backend cupy" if how == "option" else "LFS_BACKEND=cupy"
    assert proc.stderr.startswith(f"error: {source} needs CuPy and an NVIDIA GPU: pip install cupy-cuda12x")
    assert proc.stderr.count("\n") == 1 and proc.stdout == "", proc.stderr


# ------------------------------------------------------------------ pretrain's output
def test_pretrain_writes_under_runs_by_default_never_the_shipped_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(outputs, "_WRITTEN", [])
    eval_set = data.eval_set
    monkeypatch.setattr(data, "eval_set", lambda tasks, n, **kw: eval_set(tasks, 2, **kw))  # a fast evaluation
    shipped = Path(BASE_CHECKPOINT).read_bytes()
    assert cli.main(["pretrain", "--steps", "1", "--batch-size", "2", "--no-progress"]) == 0
    out = tmp_path / "runs" / "base.safetensors"
    assert out.is_file() and f"saved {out}" in capsys.readouterr().out
    assert Path(BASE_CHECKPOINT).read_bytes() == shipped
    assert os.path.abspath(cli._parser().parse_args(["pretrain"]).out) == str(out)
    # a second run is refused before training; --force replaces the file
    first = out.read_bytes()
    assert cli.main(["pretrain", "--steps", "1", "--batch-size", "2", "--no-progress", "--seed", "1"]) == 2
    assert out.read_bytes() == first
    assert cli.main(["pretrain", "--steps", "1", "--batch-size", "2", "--no-progress", "--seed", "1",
                     "--force"]) == 0
    assert out.read_bytes() != first


def test_student_notebooks_and_figures_land_in_the_folder_named(tmp_path, monkeypatch, capsys):
    """The commands that fill a folder stage their files beside it and move them in: the same files, no staging."""
    from lora_from_scratch.exercises import students

    monkeypatch.setattr(outputs, "_WRITTEN", [])
    (tmp_path / "sn").mkdir()
    (tmp_path / "sn" / "mine.txt").write_text("kept")
    assert cli.main(["student-notebooks", "--out", str(tmp_path / "sn")]) == 0
    names = sorted(os.path.basename(p) for p in students.teacher_notebooks())
    assert names and sorted(os.listdir(tmp_path / "sn")) == sorted(names + ["mine.txt"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "sn" / n) for n in names]
    monkeypatch.setattr("lora_from_scratch.plots.make_all_figures",
                        lambda folder: [Path(folder, n).write_text(n) for n in ("a.png", "b.png")])
    assert cli.main(["figures", "--out", str(tmp_path / "new" / "figs")]) == 0
    assert _listing(tmp_path / "new") == {"figs/a.png": b"a.png", "figs/b.png": b"b.png"}
    assert sorted(os.listdir(tmp_path)) == ["new", "sn"]


def test_pretrain_run_from_inside_the_package_does_not_write_there_by_default(in_tmp, monkeypatch, capsys):
    package = Path(cli.__file__).parent
    monkeypatch.chdir(package)
    assert cli.main(["pretrain"]) == 2
    assert "is inside the package here" in capsys.readouterr().err
    assert not (package / "runs").exists()


# ------------------------------------------------------------------ Ctrl-C: all outputs or none
def test_ctrl_c_after_the_demo_figures_leaves_no_file(in_tmp, monkeypatch, capsys):
    """The demo's figures are drawn, then Ctrl-C arrives while its JSON is written: no figure is left behind."""
    monkeypatch.setattr(demo, "run_demo", lambda **kw: {"seconds": {"wall": 1.0, "cpu": 1.0}, "table1": [],
                                                        "extra_runs": []})
    monkeypatch.setattr(demo, "format_result", lambda result: "tables")

    def figure_writers(result, folder):
        return {os.path.join(folder, name): (lambda tmp: Path(tmp).write_bytes(b"new png")) for name in demo.FIGURES}

    def interrupted_json(obj, indent=2, end=""):
        def write(tmp):
            raise KeyboardInterrupt

        return write

    monkeypatch.setattr(demo, "figure_writers", figure_writers)
    monkeypatch.setattr(demo, "json_writer", interrupted_json)
    before = _listing(in_tmp)
    assert cli.main(["demo", "--no-progress", "--figures", "out/figures", "--json", "out/demo.json"]) == 130
    err = capsys.readouterr().err
    assert err == "interrupted: no output was written (files from earlier runs are as they were)\n"
    assert _listing(in_tmp) == before and not (in_tmp / "out").exists()


def test_ctrl_c_during_training_writes_nothing(in_tmp, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    before = _listing(in_tmp)
    assert cli.main(["pretrain", "--no-progress"]) == 130
    assert capsys.readouterr().err.startswith("interrupted: no output was written")
    assert _listing(in_tmp) == before and not (in_tmp / "runs").exists()


def test_ctrl_c_while_figures_are_made_keeps_the_old_folder(in_tmp, monkeypatch, capsys):
    def two_then_interrupted(folder):
        for name in ("a.png", demo.FIGURES[0]):
            Path(folder, name).write_text("new")
        raise KeyboardInterrupt

    monkeypatch.setattr("lora_from_scratch.plots.make_all_figures", two_then_interrupted)
    before = _listing(in_tmp)
    assert cli.main(["figures", "--out", "figs"]) == 130
    assert capsys.readouterr().err.startswith("interrupted: no output was written")
    assert _listing(in_tmp) == before and sorted(os.listdir(in_tmp)) == ["a-file", "figs"]  # no staging folder


def test_write_set_is_all_or_none_when_a_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_WRITTEN", [])
    (tmp_path / "a.json").write_text("old a")
    (tmp_path / "b.json").write_text("old b")
    replace, calls = os.replace, []

    def failing_third_replace(src, dst):  # a.json's backup, a.json, then b.json's backup fails
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_third_replace)
    files = {str(tmp_path / n): (lambda tmp, n=n: Path(tmp).write_text(f"new {n}")) for n in ("a.json", "b.json")}
    files[str(tmp_path / "sub" / "c.json")] = lambda tmp: Path(tmp).write_text("new c")
    with pytest.raises(OSError, match="No space"):
        outputs.write_set(files)
    assert _listing(tmp_path) == {"a.json": b"old a", "b.json": b"old b"}  # old files back, no temporaries
    assert outputs.written() == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_the_renames_waits_for_the_whole_set(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_WRITTEN", [])
    replace = os.replace

    def interrupting_replace(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the renames
        replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", interrupting_replace)
    files = {str(tmp_path / n): (lambda tmp, n=n: Path(tmp).write_text(n)) for n in ("x.png", "y.png", "z.json")}
    with pytest.raises(KeyboardInterrupt):
        outputs.write_set(files)
    assert _listing(tmp_path) == {"x.png": b"x.png", "y.png": b"y.png", "z.json": b"z.json"}
    assert outputs.written() == list(files)
    assert outputs.interrupted_message().startswith("interrupted after writing 3 complete file(s): ")


# ------------------------------------------------------------------ training: a NaN gradient never lands
def test_a_nan_gradient_without_clipping_never_reaches_the_adapter():
    """grad_clip=0 at lr 1e3: the step whose gradient is NaN (loss finite) is held back and training stops."""
    model = GPT(GPTConfig(vocab_size=data.VOCAB_SIZE, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=0)
    lora.apply_lora(model, 2, 4, ["q", "v"], seed=1)
    backward, calls, after = model.backward, [], {}

    def nan_at_the_second_step(dlogits=None):
        backward(dlogits)
        calls.append(1)
        if len(calls) == 2:
            model.blocks[0].attn.q.adapter.B.grad[0, 0] = np.nan

    model.backward = nan_at_the_second_step
    opt_step = optim.AdamW.step

    def recording_step(self):
        opt_step(self)
        after.update({n: p.data.copy() for n, p in model.named_parameters()})

    cfg = train.TrainConfig(steps=4, batch_size=4, lr=1e3, grad_clip=0.0, warmup_steps=1, eval_every=0,
                            eval_per_task=2, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(optim.AdamW, "step", recording_step)
        with pytest.raises(train.TrainingDiverged, match=r"sum of the gradients became nan \(loss .*\) at step 1 "):
            train.train(model, cfg, progress=False)
    assert len(calls) == 2 and after  # the first step was taken, the second was not
    for n, p in model.named_parameters():
        assert np.isfinite(p.data).all() and np.array_equal(p.data, after[n]), n


def test_an_unwritable_training_checkpoint_is_refused_before_the_first_step(tmp_path):
    (tmp_path / "a-file").write_text("x")
    model = GPT(GPTConfig(vocab_size=data.VOCAB_SIZE, block_size=32, n_layer=1, n_head=2, n_embd=16), seed=0)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    cfg = train.TrainConfig(steps=2, batch_size=2, eval_every=1, eval_per_task=2,
                            checkpoint=str(tmp_path / "a-file" / "run.safetensors"))
    with pytest.raises(ValueError, match="TrainConfig.checkpoint .*a-file is not a folder"):
        train.train(model, cfg, progress=False)
    assert all(np.array_equal(p.data, before[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------ 4-bit packing
def test_pack_nibbles_refuses_what_does_not_fit_in_4_bits():
    from lora_from_scratch.quant import pack_nibbles, unpack_nibbles

    with pytest.raises(ValueError, match="from 0 to 15, got 16 at index 0"):
        pack_nibbles(np.array([16, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match="got 200 at index 3"):
        pack_nibbles(np.array([1, 2, 3, 200], dtype=np.uint8))
    for fill in (99, 16, -1, True, 1.0):
        with pytest.raises(ValueError, match=f"fill must be an integer between 0 and 15, got {fill!r}"):
            pack_nibbles(np.array([1, 2, 3], dtype=np.uint8), fill=fill)
    codes = np.array([1, 2, 3], dtype=np.uint8)
    packed = pack_nibbles(codes, fill=np.int64(15))
    assert packed.tolist() == [0x12, 0x3F] and unpack_nibbles(packed, 3).tolist() == [1, 2, 3]


# ------------------------------------------------------------------ integers: one answer everywhere
def _int_users():
    from lora_from_scratch import functional, qalora, qlora, rank
    from lora_from_scratch.memory import paper
    from lora_from_scratch.quant import quantize_4bit, quantize_groupwise

    W = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)  # (8, 64)
    return {
        "data.eval_set n_per_task": ("n_per_task", lambda v: data.eval_set(("copy",), v, seed=0)),
        "rank.low_rank_approximation r": ("r", lambda v: rank.low_rank_approximation(W, v)),
        "groupwise bits": ("bits", lambda v: quantize_groupwise(W, bits=v, group_size=8)),
        "groupwise group_size": ("group_size", lambda v: quantize_groupwise(W, bits=4, group_size=v)),
        "qalora.check_bits": ("bits", lambda v: qalora.check_bits(v)),
        "qalora.check_group_size": ("group_size", lambda v: qalora.check_group_size(v, 64)),
        "functional.group_mean_forward": ("group_size", lambda v: functional.group_mean_forward(W, v)),
        "demo.check_bits": ("bits", lambda v: demo.check_bits(v)),
        "memory.paper rank": ("rank r", lambda v: paper.lora_trainable_parameters(paper.preset("gpt3-175b"), v)),
        "qlora.check_blocksize": ("blocksize", lambda v: qlora.check_blocksize(v)),
        "quantize_4bit blocksize": ("blocksize", lambda v: quantize_4bit(W, blocksize=v)),
    }


@pytest.mark.parametrize("user", list(_int_users()))
def test_numpy_integers_pass_bools_and_floats_fail_everywhere(user):
    name, call = _int_users()[user]
    good = 64 if "blocksize" in user else 4
    call(good)
    call(np.int64(good))  # functional.group_mean_forward refused this while qalora.check_group_size took it
    call(np.uint8(good))
    for bad in (True, np.True_, float(good), np.float64(good), str(good)):
        with pytest.raises(ValueError, match=name):
            call(bad)


def test_check_int_returns_a_python_int_and_names_the_range():
    from lora_from_scratch.checks import check_choice, check_int, check_number, check_power_of_two

    assert type(check_int("n", np.int32(3), 0)) is int
    with pytest.raises(ValueError, match=r"^bits must be an integer between 2 and 8, got 9$"):
        check_int("bits", 9, 2, 8)
    with pytest.raises(ValueError, match=r"^r must be a positive integer, got 0$"):
        check_int("r", 0, 1)
    with pytest.raises(ValueError, match=r"^seed must be an integer >= 0, got -1$"):
        check_int("seed", -1, 0)
    with pytest.raises(ValueError, match=r"^blocksize must be a power of two between 16 and 4096, got 96$"):
        check_power_of_two("blocksize", 96, 16, 4096)
    assert check_power_of_two("blocksize", np.int64(64), 16, 4096) == 64
    with pytest.raises(ValueError, match=r"^unknown method 'dora'; valid methods: \['lora', 'qlora'\]$"):
        check_choice("method", "dora", ("lora", "qlora"))
    with pytest.raises(ValueError, match=r"^unknown method \['lora'\]"):
        check_choice("method", ["lora"], ("lora", "qlora"))
    assert check_number("lr", np.float32(0.5), above=0.0) == 0.5
    for bad in (0.0, -1, float("nan"), float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match=r"^lr must be a finite number > 0.0, got "):
            check_number("lr", bad, above=0.0)


@pytest.mark.parametrize("field, bad", [("steps", 0), ("steps", 2.5), ("batch_size", True), ("seed", -1),
                                        ("eval_every", np.float64(1)), ("lr", float("nan")), ("lr", 0.0),
                                        ("grad_clip", -1.0), ("min_lr_ratio", 2.0), ("tasks", ("copy", "shout"))])
def test_train_config_refuses_each_bad_field_by_name(field, bad):
    with pytest.raises(ValueError, match=field if field != "tasks" else "unknown task 'shout'"):
        train.TrainConfig(**{field: bad})
