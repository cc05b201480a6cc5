"""Sphinx configuration of flowbench's documentation (docs/manual/development.md#the-documentation says why Sphinx).

Build it as CI does, with every warning an error:

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

It needs no network: no intersphinx, and the furo theme ships no web fonts.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the checkout's flowbench, even without `pip install -e .`
os.environ.setdefault("OMP_NUM_THREADS", "1")  # autodoc imports torch; one thread is enough and is quiet

import flowbench

project = "flowbench"
author = "the flowbench authors"
copyright = "the flowbench authors, MIT licence"
release = version = flowbench.__version__

extensions = [
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "sphinx.ext.napoleon",  # their Google-style Args/Returns/Raises sections
    "sphinx.ext.viewcode",  # "[source]" links to the highlighted module
    "myst_parser",  # the Markdown pages (the manual and the tutorial are Markdown)
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "**/__pycache__"]

# Markdown: `#anchor` links to headings down to ###, $math$ and definition lists.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath", "deflist"]

# API reference: members in source order; type hints in the description, not in a long signature line.
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"flowbench {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
