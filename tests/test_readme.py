"""Every ``python`` code block of README.md runs unmodified, as a complete program.

Each block runs in a fresh namespace (a module of its own) with a temporary folder as
the working directory, so the files it writes land there; ``examples`` in that folder
links to the repository's, so blocks that import ``examples/bert.py`` from the
repository root find it. A block that sets ``XLA_FLAGS`` (several CPU devices) must run
before JAX starts, so it runs in its own process.
"""

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks() -> list[tuple[str, str]]:
    """``[(name, code)]``: each ``python`` block with the heading it sits under."""
    found, heading = [], "top"
    # Fences first, so that a "# comment" inside a code block is not a heading.
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$|^(#+ [^\n]*)$", README, re.M | re.S):
        if match.group(3):
            heading = match.group(3).lstrip("# ").strip()
        elif match.group(1) == "python":
            name = re.sub(r"\W+", "-", heading.lower()).strip("-")
            found.append((f"{len(found)}-{name}", match.group(2)))
    return found


BLOCKS = _blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 8


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[n for n, _ in BLOCKS])
def test_readme_block_runs(code, tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    if "XLA_FLAGS" in code:
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return
    monkeypatch.chdir(tmp_path)
    # What a block adds to the import path or imports from examples/ goes when it ends.
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = sys.modules.pop("bert", None)
    module = types.ModuleType("readme_block")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        exec(compile(code, "README.md", "exec"), module.__dict__)
    finally:
        sys.modules.pop("bert", None)
        if before is not None:
            sys.modules["bert"] = before
