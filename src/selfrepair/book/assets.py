"""The book's offline JavaScript: the vega bundle and MathJax, vendored into ``book/_static/vendor``.

The vega bundle (vega, vega-lite, vega-embed) comes from the installed ``vl-convert-python``;
MathJax from the npm registry once, cached under ``.cache/npm`` and checked against a pinned sha512.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from ..errors import InputError

MATHJAX = {"version": "3.2.2", "license": "Apache-2.0",
           "sha512": "Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="}
MATHJAX_KEEP = ("LICENSE", "es5/tex-chtml.js", "es5/output/chtml/fonts/woff-v2/",
                "es5/input/tex/extensions/", "es5/a11y/", "es5/ui/")
VEGA_LICENSE = "BSD-3-Clause"  # vega, vega-lite and vega-embed alike


def vendor_assets(static: Path, npm_cache: Path, *, force: bool = False) -> dict:
    """Write ``static/vendor/``: ``vega-bundle.js`` (vega, vega-lite, vega-embed from
    ``vl_convert.javascript_bundle``) and ``mathjax/`` (MathJax from ``npm pack``, sha512-checked),
    plus ``VERSIONS.json`` with versions and licenses. Skipped when ``VERSIONS.json`` is current."""
    import altair as alt
    import vl_convert

    vendor = static / "vendor"
    vl = alt.SCHEMA_VERSION.lstrip("v")
    versions = {"vega": vl_convert.get_vega_version(), "vega-lite": vl,
                "vega-embed": vl_convert.get_vega_embed_version(), "vl-convert": vl_convert.__version__,
                "vega-license": VEGA_LICENSE, "mathjax": MATHJAX["version"],
                "mathjax-license": MATHJAX["license"]}
    stamp = vendor / "VERSIONS.json"
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == versions:
        return versions
    vendor.mkdir(parents=True, exist_ok=True)
    bundle = vl_convert.javascript_bundle(vl_version=".".join(vl.split(".")[:2]))
    # A function scope keeps the bundle's minified top-level names off the page's global scope.
    (vendor / "vega-bundle.js").write_text(f"/* vega {versions['vega']}, vega-lite {vl}, vega-embed "
                                           f"{versions['vega-embed']} ({VEGA_LICENSE}) */\n"
                                           f"(function () {{\n{bundle}\n}})();\n")
    tgz = npm_cache / f"mathjax-{MATHJAX['version']}.tgz"
    if not tgz.is_file():
        npm_cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "pack", f"mathjax@{MATHJAX['version']}", "--silent",
                            "--pack-destination", str(npm_cache)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise InputError(f"cannot fetch MathJax with npm ({e}); put mathjax-{MATHJAX['version']}"
                             f".tgz from the npm registry into {npm_cache}") from e
    if base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode() != MATHJAX["sha512"]:
        raise InputError(f"{tgz} does not match the pinned sha512 of mathjax {MATHJAX['version']}")
    shutil.rmtree(vendor / "mathjax", ignore_errors=True)
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            rel = member.name.removeprefix("package/")
            if member.isfile() and rel.startswith(MATHJAX_KEEP):
                target = vendor / "mathjax" / rel.removeprefix("es5/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    stamp.write_text(json.dumps(versions, indent=1) + "\n")
    return versions
