"""What the command line writes: output paths checked before any work, and one run's files written as a set.

A command that trains for minutes and then cannot write its result has wasted the minutes; a
command interrupted between its second and third file leaves a set that no run produced (new
figures beside an old JSON). So every command of ``python -m lora_from_scratch``:

- checks each output path before it starts (``check_output_path``): a file where a folder is
  expected, a folder where a file is expected, a path under a file, a folder it cannot write in,
  and an existing file it would replace unless ``--force`` (for the files a user names: the
  commands that regenerate the repository's own folders, ``figures``, ``experiment`` and
  ``student-notebooks``, replace their files by design);
- writes all its files at the end, as one set (``write_set``): each goes to a temporary file beside
  its target first; only when every one is complete are they renamed into place, with Ctrl-C held
  back for those few renames and every rename undone if one fails. So either the whole set is there
  or none of it is, and an interrupted run leaves the previous files as they were.

``written()`` lists what this process has put in place, so an interruption can say exactly what
was left (``interrupted_message``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading

from .files import usual_mode

_WRITTEN: list[str] = []  # every file this process put in place, in order


def written() -> list[str]:
    """The files this process has written so far (complete sets only), in order."""
    return list(_WRITTEN)


def interrupted_message() -> str:
    """One line for Ctrl-C: nothing written, or exactly which complete set was."""
    if not _WRITTEN:
        return "interrupted: no output was written (files from earlier runs are as they were)"
    return f"interrupted after writing {len(_WRITTEN)} complete file(s): {', '.join(_WRITTEN)}"


def _nearest_folder(path: str) -> str:
    """The nearest existing ancestor of ``path`` (the folders below it do not exist yet)."""
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def check_output_path(path, what: str, folder: bool = False, force: bool = True) -> str:
    """Refuse, before any work, an output that cannot be written: a ValueError naming ``what`` and ``path``.

    ``folder``: ``path`` is a folder (it may exist, or not yet); else a file, which must not exist
    unless ``force``. Missing folders are fine (the writer makes them); a file on the way is not.
    """
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{what} needs a path")
    target = os.path.abspath(path)
    if folder:
        if os.path.exists(target) and not os.path.isdir(target):
            raise ValueError(f"{what} {path}: exists and is not a folder")
    else:
        if os.path.isdir(target):
            raise ValueError(f"{what} {path}: is a folder, not a file")
        if os.path.exists(target) and not force:
            raise ValueError(f"{what} {path}: exists; pass --force to replace it")
    probe = target if folder and os.path.isdir(target) else _nearest_folder(target)
    if not os.path.isdir(probe):
        raise ValueError(f"{what} {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: cannot write in {probe} (permission denied)")
    try:  # the real test: can a file be made there (read-only file systems, ACLs)?
        fd, tmp = tempfile.mkstemp(prefix=".tmp-check-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {probe} ({e.strerror or e})") from None
    return path


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold SIGINT back inside the block (main thread only) and deliver it as KeyboardInterrupt at the end."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous in (signal.SIG_IGN, None):
        yield
        return
    caught = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def write_set(files: dict) -> list[str]:
    """Write ``{path: write_fn(tmp_path)}`` as one set: every file, or none. Returns the paths.

    Each ``write_fn`` writes its whole file to a temporary path beside the target (same file
    system, the target's name as suffix so the extension is kept); a failure or Ctrl-C there
    removes the temporaries and changes nothing. Then the targets are renamed into place with
    Ctrl-C held back; if a rename fails, the ones done are undone (the old files put back).
    """
    staged = []  # (tmp, path)
    try:
        for path, write in files.items():
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=_nearest_folder(path))
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            os.chmod(tmp, usual_mode())  # mkstemp makes the file private (0600): give it the usual mode
        paths = [path for _, path in staged]
        with _ctrl_c_held():
            _commit(staged)
            _WRITTEN.extend(paths)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)
    return paths


def _commit(staged) -> None:
    """Rename every temporary onto its target; on any failure put every target back as it was."""
    done = []  # one dict per target: path, backup (the old file's new name, or None), moved, folders made
    try:
        for tmp, path in staged:
            folder = os.path.dirname(os.path.abspath(path))
            step = {"path": path, "backup": None, "moved": False, "made": []}
            done.append(step)
            probe = folder
            while not os.path.exists(probe):
                step["made"].append(probe)
                probe = os.path.dirname(probe)
            os.makedirs(folder, exist_ok=True)
            if os.path.exists(path):
                fd, step["backup"] = tempfile.mkstemp(prefix=".old-", suffix=os.path.basename(path), dir=folder)
                os.close(fd)
                os.replace(path, step["backup"])  # the old file, onto the empty one mkstemp reserved
                step["moved"] = True
            os.replace(tmp, path)
    except BaseException:
        for step in reversed(done):
            if step["moved"]:
                os.replace(step["backup"], step["path"])  # the old file back
            elif step["backup"] is not None:
                os.remove(step["backup"])  # reserved, not used: the old file never moved
            elif os.path.exists(step["path"]):
                os.remove(step["path"])  # a new file where there was none
            for made in step["made"]:  # deepest first
                with contextlib.suppress(OSError):
                    os.rmdir(made)
        raise
    for step in done:
        if step["backup"] is not None:
            os.remove(step["backup"])


class Staging:
    """A temporary ``folder`` for a writer that fills a folder; ``paths``: where its files went (after the block)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.paths: list[str] = []


@contextlib.contextmanager
def staged_folder(out: str):
    """``with staged_folder("figures") as st: make_all_figures(st.folder)``: the files go into ``out`` as one set.

    Nothing is written into ``out`` until the block ends without an error; then every file the
    block made in ``st.folder`` (on the same file system as ``out``) moves into ``out`` at once
    (``write_set``), and ``st.paths`` lists them. On an error or Ctrl-C ``out`` is left as it was.
    """
    staging = Staging(tempfile.mkdtemp(prefix=".tmp-", dir=_nearest_folder(os.path.join(out, "x"))))
    try:
        yield staging
        files = {}
        for root, _, names in os.walk(staging.folder):
            for name in sorted(names):
                src = os.path.join(root, name)
                files[os.path.join(out, os.path.relpath(src, staging.folder))] = (
                    lambda dst, src=src: os.replace(src, dst))
        staging.paths = write_set(files)
    finally:
        shutil.rmtree(staging.folder, ignore_errors=True)
