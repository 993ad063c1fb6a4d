"""The documentation: every ``>>>`` example in the pages runs, every Python code block runs, the
examples are shown, the figure script works, and the Sphinx build passes with ``-W``."""

from __future__ import annotations

import doctest
import importlib.util
import re
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts)
DOCTEST_PAGES = [p for p in PAGES if ">>> " in p.read_text()]
CODE_BLOCK = re.compile(r"^\.\. code-block:: python\n((?:\n|   .*\n)+)", re.MULTILINE)


def _rel(path: Path) -> str:
    return str(path.relative_to(DOCS))


def test_the_pages_are_found():
    names = {_rel(p) for p in PAGES}
    for page in [
        "index.rst",
        "installation.rst",
        "quickstart.rst",
        "concepts.rst",
        "faq.rst",
        "optimizer.rst",
        "engines.rst",
        "performance.rst",
        "migrating.rst",
        "aggregation/index.rst",
        "aggregation/upgrad.rst",
        "examples/index.rst",
    ]:
        assert page in names
    assert len(DOCTEST_PAGES) >= 20


@pytest.mark.parametrize("page", DOCTEST_PAGES, ids=[_rel(p) for p in DOCTEST_PAGES])
def test_page_doctests(page: Path):
    result = doctest.testfile(
        str(page),
        module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        raise_on_error=False,
        verbose=False,
        report=True,
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} failing example(s) in {_rel(page)}"


def _python_blocks() -> list[tuple[str, str]]:
    blocks = []
    for page in PAGES:
        for i, match in enumerate(CODE_BLOCK.finditer(page.read_text())):
            blocks.append((f"{_rel(page)}#{i}", textwrap.dedent(match.group(1))))
    return blocks


def test_python_code_blocks_run():
    # Pages prefer `literalinclude` of tested scripts and doctests; any inline Python block
    # must run as is.
    for name, code in _python_blocks():
        exec(compile(code, name, "exec"), {"__name__": "__docs__"})


def test_code_block_pattern_finds_blocks():
    text = ".. code-block:: python\n\n   x = 1\n   assert x == 1\n\nafter\n"
    assert [textwrap.dedent(m.group(1)) for m in CODE_BLOCK.finditer(text)] == [
        "\nx = 1\nassert x == 1\n\n"
    ]


def test_every_example_is_shown_and_every_include_exists():
    included = set()
    for page in PAGES:
        for target in re.findall(r"^\.\. literalinclude:: (\S+)", page.read_text(), re.MULTILINE):
            path = (page.parent / target).resolve()
            assert path.exists(), f"{_rel(page)} includes a missing file: {target}"
            included.add(path)
    for script in (ROOT / "examples").glob("*.py"):
        assert script.resolve() in included, f"{script.name} is not shown in the docs"


def test_make_figure(tmp_path: Path):
    pytest.importorskip("matplotlib")
    namespace = runpy.run_path(str(DOCS / "make_figure.py"))
    out = namespace["main"](tmp_path / "upgrad.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (DOCS / "_static" / "upgrad.png").exists()  # the committed figure of the README


@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None, reason="sphinx not installed")
def test_sphinx_build_has_no_warnings(tmp_path: Path):
    # Same command as the docs (warnings are errors); ~10-20 s on a 2-core CPU.
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "html",
        "-d",
        str(tmp_path / "doctrees"),
        str(DOCS),
        str(tmp_path / "html"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-5000:]
    assert (tmp_path / "html" / "aggregation" / "upgrad.html").exists()
