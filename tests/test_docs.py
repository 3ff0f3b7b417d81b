"""Every ```python block of the README and of the documentation pages (``docs/**/*.md``) runs as written, each in a
fresh process and folder; only the step counts are made tiny (the substitutions below must each apply, so an edited
page cannot silently skip them).

A block is not run when the line just before its opening fence is one of these HTML comments (invisible on GitHub
and in the built site):

- ``<!-- not run: REASON -->``: never run here (a GPU, the network, a long run); the reason is required.
- ``<!-- needs: MODULE.NAME -->``: run once ``MODULE`` has the attribute ``NAME`` (an API that is announced before
  it lands); skipped, saying so, until then.
"""

import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
MARKER = re.compile(r"^<!--\s*(not run|needs):\s*(.*?)\s*-->\s*$")

# (text in the page, tiny replacement), per page: the pages' sizes are meant for a real run, the test needs seconds.
SMALL = {
    "README.md": [
        ("max_steps=300,", "max_steps=8,"),
        ("max_steps=300)", "max_steps=8)"),
        ("range(1, 301)", "range(1, 9)"),
    ],
    "docs/usage.md": [
        ("max_steps=300,", "max_steps=8,"),
        ("reduction_steps=[8, 15, 23, 30]", "reduction_steps=[2, 4, 6, 8]"),
        ("max_steps=40)", "max_steps=8)"),
        ("max_steps=40, step=20)", "max_steps=8, step=4)"),
        ("range(1, 21)", "range(1, 5)"),
        ("range(21, 41)", "range(5, 9)"),
    ],
    "docs/resume.md": [
        ("max_steps=200, save_steps=100,", "max_steps=8, save_steps=4,"),
        ('"run/checkpoint-100"', '"run/checkpoint-4"'),
    ],
    "docs/hybrids.md": [("max_steps=300,", "max_steps=8,")],
}


@dataclass
class Block:
    page: str  # path relative to the repository
    line: int  # 1-based line of the opening fence
    code: str
    marker: tuple[str, str] | None  # ("not run", reason) or ("needs", "module.name")

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of one Markdown file, with the marker line just before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(REPO).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence.startswith("```"):
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if fence == "```python":
                found = MARKER.match(lines[start - 1]) if start > 0 else None
                marker = (found.group(1), found.group(2)) if found else None
                blocks.append(Block(page, start + 1, "\n".join(body) + "\n", marker))
        i += 1
    return blocks


BLOCKS = [block for path in PAGES for block in python_blocks(path)]


def test_every_page_has_runnable_examples_and_every_substitution_applies():
    pages = {block.page for block in BLOCKS}
    assert "README.md" in pages and len([b for b in BLOCKS if b.page == "README.md"]) >= 2
    for page, substitutions in SMALL.items():
        code = "".join(block.code for block in BLOCKS if block.page == page)
        for old, _ in substitutions:
            assert old in code, f"{page} no longer contains {old!r} in a python block: update SMALL"


def test_markers_are_well_formed():
    for block in BLOCKS:
        if block.marker is None:
            continue
        kind, value = block.marker
        if kind == "not run":
            assert value, f"{block.id}: '<!-- not run: REASON -->' needs a reason"
        else:
            assert re.fullmatch(r"[\w.]+\.\w+", value), f"{block.id}: '<!-- needs: MODULE.NAME -->', got {value!r}"


def test_readme_links_point_to_files_that_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert targets
    for target in targets:
        if "://" not in target:
            assert (REPO / target).is_file(), f"README links to {target}, which does not exist"


def _shrink(block: Block) -> str:
    code = block.code
    for old, new in SMALL.get(block.page, []):
        code = code.replace(old, new)
    return code


def _skip_reason(block: Block) -> str | None:
    if block.marker is None:
        return None
    kind, value = block.marker
    if kind == "not run":
        return f"marked not run: {value}"
    module, name = value.rsplit(".", 1)
    if not hasattr(importlib.import_module(module), name):
        return f"needs {value}, which does not exist yet"
    return None


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_python_block_runs(block, tmp_path):
    reason = _skip_reason(block)
    if reason:
        pytest.skip(reason)
    code = _shrink(block)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{block.id}:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
