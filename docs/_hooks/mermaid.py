"""MkDocs hook: the site's diagrams render offline, from the Mermaid build in ``docs/javascripts/``.

Material for MkDocs draws each ```` ```mermaid ```` block with Mermaid, which it loads from a CDN unless a global
``mermaid`` already exists. ``docs/javascripts/mermaid.min.js`` is Mermaid 11.17.2's own ``dist/mermaid.min.js``
(the npm package ``mermaid``, MIT, ``mermaid-LICENSE.txt`` beside it), copied into the site like any file of
``docs/``; this hook loads it on the pages that have a diagram, before Material's bundle, so no page asks the
network for it. To update it, replace the file with another Mermaid 11 release's ``dist/mermaid.min.js`` and
change ``MERMAID_VERSION``.
"""

from __future__ import annotations

from mkdocs.utils import get_relative_url

MERMAID_JS = "javascripts/mermaid.min.js"
MERMAID_VERSION = "11.17.2"
BUNDLE = '<script src="'  # Material's scripts, its bundle among them, come last in <body>


def on_post_page(output: str, page, config) -> str:
    """Add a ``<script>`` for the local Mermaid before the first script of a page that has a diagram."""
    if 'class="mermaid"' not in output:
        return output
    tag = f'<script src="{get_relative_url(MERMAID_JS, page.url)}"></script>\n'
    at = output.find(BUNDLE, output.find("<body"))
    at = at if at >= 0 else output.rfind("</body>")
    return output[:at] + tag + output[at:]
