"""Sphinx configuration; built offline by `tox -e docs` with warnings as errors."""

project = "Panther"
author = "Panther developers"
copyright = "2026, Panther developers"
release = "0.1.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.doctest", "sphinx.ext.mathjax"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_use_rtype = False
nitpicky = False
doctest_global_setup = "import torch\nimport panther as pr\ntorch.manual_seed(0)"
