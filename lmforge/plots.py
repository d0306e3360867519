"""The page `dvc plots show` and `dvc plots diff` write, with its chart libraries inside it.

    lmforge plots template        # rewrite .dvc/plots-template.html from the pinned bundle

DVC's own page loads vega, vega-lite and vega-embed from a CDN: with no network it is blank.
``.dvc/config`` points ``plots.html_template`` at this page instead. It holds the three libraries
inline (the bundle the pinned vl-convert-python ships) and leaves out DVC's ``{scripts}``
placeholder, so DVC adds no CDN tags.

The page is committed (~0.9 MB): DVC takes a template path that does not exist for the template's
text and fails, so a fresh clone, a test's repo copy and `dvc exp`'s temp copies must have it as is.
Regenerate it only when the pin in pyproject.toml moves; tests/test_plots.py checks that the
committed page is exactly what this module writes.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.common import UserError

TEMPLATE = Path(".dvc/plots-template.html")  # .dvc/config: html_template = plots-template.html
# DVC's plot templates are Vega-Lite 5 specs (their $schema; the confusion template still uses
# v4-style selections, which Vega-Lite 6 no longer compiles).
VEGA_LITE = "5.21"
# vl-convert bundles an ES module around this snippet; it makes the libraries globals, where DVC's
# per-plot <script> (`vegaEmbed('#id', spec)`) looks for them.
ENTRY = "window.vegaEmbed = vegaEmbed; window.vega = vega; window.vegaLite = vegaLite;"
# DVC fills the template with str.replace on these, wherever they appear (dvc_render.html.HTML).
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")


def page(bundle: str, versions: str) -> str:
    """The HTML template: DVC's default page with ``bundle`` inline instead of the CDN tags."""
    if any(p in bundle for p in PLACEHOLDERS):  # DVC would replace it inside the library
        raise UserError(f"the vega bundle contains one of {', '.join(PLACEHOLDERS)}")
    inline = bundle.replace("</script", "<\\/script")  # would end the inline <script> early
    # A function scope keeps the bundle's top-level names (a module's, strict) off the page's
    # global scope, which DVC's per-plot scripts share (`var spec`).
    wrapped = f'(function () {{\n"use strict";\n{inline}\n}})();'
    return "\n".join([
        "<!DOCTYPE html>",
        "<html>",
        "<head>",
        '<meta charset="utf-8">',
        "{refresh_tag}",
        "<title>DVC plots</title>",
        f"<!-- {versions}, inline: written by `lmforge plots template` -->",
        f"<script>{wrapped}</script>",
        "<style>table { border-spacing: 15px; }</style>",
        "</head>",
        "<body>",
        "{plot_divs}",
        "</body>",
        "</html>",
        "",
    ])


def render() -> str:
    """The page, from the installed vl-convert-python."""
    try:
        import vl_convert
    except ImportError:
        raise UserError("vl-convert-python is not installed: pip install -e '.[dev]'") from None
    from importlib.metadata import version

    versions = (f"vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE}, vega-embed "
                f"{vl_convert.get_vega_embed_version()} (vl-convert-python "
                f"{version('vl-convert-python')})")
    return page(vl_convert.javascript_bundle(ENTRY, vl_version=VEGA_LITE), versions)


def run(args) -> int:
    """`lmforge plots template`: write the page; 0."""
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(), encoding="utf-8")
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")
    return 0
