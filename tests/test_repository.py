"""The repository speaks of itself alone: its files cite papers and libraries, never a document it does not hold.

A reader of the code, the notebooks or the README has only this repository; a reference such as
"syllabus section 8" points nowhere for them.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = re.compile(r"syllabus|SEED\.md|SEED section|DESIGN\.md", re.IGNORECASE)
SKIP = {".git", ".ci-venv", "build", "dist", "runs", "__pycache__"}


def _text_files():
    for path in ROOT.rglob("*"):
        if any(part in SKIP for part in path.relative_to(ROOT).parts):
            continue
        if path.is_file() and path.suffix in {".py", ".ipynb", ".md", ".toml", ".txt", ".cfg"}:
            yield path


def test_no_reference_to_documents_outside_the_repository():
    files = list(_text_files())
    assert len(files) > 20, "expected the package, tests and notebooks"
    hits = []
    for path in files:
        if path == pathlib.Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "references to documents this repository does not hold:\n" + "\n".join(hits)


def test_the_scan_catches_a_planted_reference(tmp_path):
    assert FORBIDDEN.search("as syllabus section 8 says")
    assert FORBIDDEN.search("see DESIGN.md")
    assert not FORBIDDEN.search("QLoRA (Dettmers et al., 2023), section 3")
