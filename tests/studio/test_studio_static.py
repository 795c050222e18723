"""The front end has no build step: the shipped files are the sources. Check every file they reference exists,
that the vendored chart library carries its licence, and that the pages are served."""

from __future__ import annotations

import re
from pathlib import Path

from slimtune.studio.app import STATIC_DIR

ASSET_RE = re.compile(r"""(?:src|href)=["'](/static/[^"'#?]+)["']""")
IMPORT_RE = re.compile(r"""(?:import|export)\s[^;]*?from\s+["'](\.{1,2}/[^"']+)["']""", re.DOTALL)


def _static(url: str) -> Path:
    return STATIC_DIR / url.removeprefix("/static/")


def test_every_file_the_html_references_exists():
    for page in ("index.html", "login.html"):
        refs = ASSET_RE.findall((STATIC_DIR / page).read_text())
        assert refs, page
        for ref in refs:
            assert _static(ref).is_file(), f"{page} references missing {ref}"


def test_every_js_import_resolves():
    js_files = list(STATIC_DIR.rglob("*.js"))
    checked = 0
    for js in js_files:
        if "vendor" in js.parts:
            continue
        for rel in IMPORT_RE.findall(js.read_text()):
            assert (js.parent / rel).resolve().is_file(), f"{js.relative_to(STATIC_DIR)} imports missing {rel}"
            checked += 1
    assert checked > 10


def test_every_view_is_routed():
    main = (STATIC_DIR / "js" / "main.js").read_text()
    for view in (STATIC_DIR / "js" / "views").glob("*.js"):
        assert f"./views/{view.name}" in main, view.name


def test_vendored_uplot_with_licence():
    vendor = STATIC_DIR / "vendor" / "uplot"
    assert (vendor / "uPlot.iife.min.js").read_text().startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32)")
    assert "MIT License" in (vendor / "LICENSE").read_text()
    assert (vendor / "uPlot.min.css").is_file()


def test_no_build_step_and_no_node_needed():
    # Sources are served as they are; a web/ source tree would mean a build step (and a byte-for-byte check).
    assert not (STATIC_DIR.parent / "web").exists()
    assert not list(STATIC_DIR.rglob("package.json"))


def test_pages_and_assets_are_served(client):
    for url in ["/", "/login", "/static/js/main.js", "/static/vendor/uplot/uPlot.iife.min.js",
                "/static/css/studio.css"]:
        r = client.get(url)
        assert r.status_code == 200, url
    assert client.get("/static/js/main.js").headers["content-type"].startswith(("text/javascript",
                                                                                 "application/javascript"))


def test_train_form_offers_every_run_setting():
    # A setting the API accepts but the form never sends could only be set by hand-written requests.
    from slimtune.studio.schemas import MemoryRequest, TrainConfig

    train_js = (STATIC_DIR / "js" / "views" / "train.js").read_text()
    for name in TrainConfig.model_fields:
        assert re.search(rf"\b{name}\b", train_js), f"the Train form has no field for {name}"
    assert "Advanced memory" in train_js and 'id: "f-max_memory"' in train_js and 'id: "f-optimizer"' in train_js
    for help_text in ("small speed cost", "slower", "a quarter of the memory"):  # each switch's trade-off
        assert help_text in train_js, help_text
    # The memory panel posts exactly the settings the estimate endpoint reads.
    memory_js = (STATIC_DIR / "js" / "memory.js").read_text()
    keys = re.search(r"const MEMORY_KEYS = \[([^\]]*)\]", memory_js).group(1)
    assert set(re.findall(r'"(\w+)"', keys)) == set(MemoryRequest.model_fields)
    assert '"/api/memory/estimate"' in memory_js
