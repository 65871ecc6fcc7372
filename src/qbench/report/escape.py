"""The one escape for user-supplied text (recipe and model names, corpus names, chat prompts and
answers) written into the markdown tables and READMEs, which `snakemake --report` and markdown
viewers render as HTML: the text shows literally, never as markup or script."""

from __future__ import annotations

import html
import re

__all__ = ["md_text"]

# Markdown characters that change rendering anywhere in a line (``_`` inside a word does not, in
# GFM, and recipe names use it: it is left as is); ``|`` ends a table cell.
_MD_SPECIAL = re.compile(r"([\\`*\[\]|~])")


def md_text(value) -> str:
    """``value`` as one line of literal text in markdown/HTML: whitespace runs (newlines too)
    collapsed, ``& < >`` as HTML entities, markdown's special characters backslash-escaped."""
    if value is None:
        return ""
    s = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(s, quote=False))
