"""Sphinx configuration of bora's API reference, built offline from the docstrings with autodoc.

    bash scripts/docs.sh        # into build/docs, warnings as errors

Each page documents one subpackage's modules (``automodule`` with ``:members:``); an object is documented
once, in the module that defines it (``ignore-module-all``: re-exports listed in a module's ``__all__`` are
left to their home module), so cross-references such as :class:`~bora.api.Bora` have one target.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's sources, installed or not

import bora  # noqa: E402

project = "bora"
author = "bora contributors"
copyright = "bora contributors"
release = version = bora.__version__

extensions = ["sphinx.ext.autodoc"]
autodoc_default_options = {"ignore-module-all": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # signatures show defaults as written (e.g. a config), not their repr
autodoc_inherit_docstrings = False  # an override without a docstring (e.g. torch's forward) is left out
nitpicky = False
exclude_patterns = []
html_theme = "alabaster"
html_title = f"bora {release} API reference"
html_show_sourcelink = False
