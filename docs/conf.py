"""Sphinx configuration for the jdoptim documentation."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

project = "jdoptim"
author = "jdoptim developers"
copyright = "2026, jdoptim developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",  # some docstrings use Google-style "Args:" / "Notes:" sections
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
nitpicky = False
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme_options = {"description": "Jacobian descent as a torch.compile-first optimizer"}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}
html_theme = "alabaster"
html_static_path = ["_static"]


def _append_bench_results(app, docname, source):
    """Show ``bench/RESULTS.md`` at the end of the performance page when it exists."""
    if docname != "performance":
        return
    results = ROOT / "bench" / "RESULTS.md"
    if results.exists():
        source[0] += (
            "\n``bench/RESULTS.md`` (verbatim):\n\n"
            ".. literalinclude:: ../bench/RESULTS.md\n   :language: markdown\n"
        )
    else:
        source[0] += "\n``bench/RESULTS.md`` was not present when these pages were built.\n"


def setup(app):
    app.connect("source-read", _append_bench_results)
