"""End to end in headless Chromium: the real server on a free loopback port, driven like a user.

Log in, upload the bundled dataset, train the embedded tiny model for a few steps, watch the chart update,
chat with base and adapter, download the adapter, export, compare runs. Screenshots go to
test-artifacts/studio/. Pieces of the library that are not installed are replaced by the test fakes (the
test prints which), so the UI flow is covered either way.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from studio_testkit import PASSWORD, REPO, LiveServer, have

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("SLIMTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
SHOTS = REPO / "test-artifacts" / "studio"
DATASET = REPO / "slimtune" / "data" / "default_data.jsonl"


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python playwright package is not installed (scripts/ci_studio_deps.sh installs it)"
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set SLIMTUNE_CHROMIUM)"
    return None


def _fakes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Which workers / library calls must be faked because the real ones are not installed here."""
    fake = []
    if not (have("slimtune.cli.train_cmd") and have("slimtune.train.run", "train")):
        fake.append("train")
    if not have("slimtune.models.tiny", "write_tiny_model"):
        fake.append("tiny")
    if not (have("slimtune.infer.generate", "generate") and have("slimtune.adapt", "load_adapter")):
        fake.append("chat")
    lib = [name for name, ok in [("summary", have("slimtune.data", "summarize_dataset")),
                                 ("memory", have("slimtune.memory.train_plan", "plan_for_config")),
                                 ("formats", have("slimtune.export", "EXPORT_FORMATS"))] if not ok]
    if "formats" in lib:
        fake.append("export")
    return tuple(fake), tuple(lib)


@pytest.fixture(scope="module")
def browser():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_train_watch_chat_download_export(browser, tmp_path):
    fake, fake_lib = _fakes()
    print(f"e2e with fake workers: {fake or 'none'}; fake library calls: {fake_lib or 'none'}")
    env = {"FAKE_TRAIN_STEP_S": "0.4"}  # only read by the fake trainer: slow enough to see the chart grow
    with LiveServer(tmp_path / "data", password=PASSWORD, fake=fake, fake_library=fake_lib, env=env,
                    log_path=SHOTS / "server.log") as server:
        ctx = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        # Console errors (CSP violations, failed modules) count too; the deliberate wrong login's 401 does not.
        page.on("console", lambda m: errors.append(m.text)
                if m.type == "error" and "status of 401" not in m.text else None)
        page.set_default_timeout(30_000)

        # Log in (the app redirects to the login page first).
        page.goto(server.url + "/")
        page.wait_for_url(re.compile(r".*/login$"))
        page.fill("#password", "wrong")
        page.click("button[type=submit]")
        page.wait_for_selector("#login-error:not(.hidden)")
        page.fill("#password", PASSWORD)
        shot(page, "01-login")
        page.click("button[type=submit]")
        page.wait_for_selector("#model-cards .card")
        shot(page, "02-models")

        # Data: upload the bundled dataset and preview it.
        page.click("a[data-tab=data]")
        page.set_input_files("#file-input", str(DATASET))
        page.wait_for_selector("#detected-format")
        assert int(page.inner_text("#row-count")) > 100
        shot(page, "03-data")

        # Train: the quick preset, a few steps; the memory estimate shows for these settings.
        page.click("a[data-tab=train]")
        # the 2K presets pack samples (the fixed shapes CUDA graphs on auto need); the tiny quick one does not
        page.select_option("#preset", "qlora2k")
        assert page.is_checked("#f-packing") and page.input_value("#f-cuda_graphs") == ""
        page.select_option("#preset", "quick")
        assert not page.is_checked("#f-packing")
        page.fill("#f-name", "e2e-tiny")
        page.fill("#f-max_steps", "4")
        page.fill("#f-batch_size", "4")
        page.fill("#f-max_seq_length", "128")
        # Selector-based waits: the app's CSP forbids eval, which string wait_for_function needs.
        page.wait_for_selector("#mem-total:text-matches('[0-9.]+ [MG]iB')", timeout=90_000)
        page.wait_for_selector("#mem-terms span")  # the main terms of the prediction, by name
        # Advanced memory: a budget nothing fits says so (with what does), one that fits shows the plan and is
        # what the run is started with (the real trainer plans for it again before it starts).
        page.click("#advanced-memory summary")
        page.fill("#f-max_memory", "1KiB")
        page.wait_for_selector("#mem-error:text-matches('^no settings fit')")
        shot(page, "04a-train-budget-too-small")
        page.fill("#f-max_memory", "4GiB")
        page.wait_for_selector("#mem-fits:text-matches('Fits the 4 GiB budget')")
        shot(page, "04-train")
        page.click("#start-run")
        page.wait_for_url(re.compile(r".*#/runs/[a-z0-9]+$"), timeout=90_000)
        run_id = page.url.rsplit("/", 1)[1]

        # Run view: the loss chart fills in while the worker trains.
        page.wait_for_selector("#stat-step:text-matches('^[1-9]')", timeout=150_000)
        page.wait_for_selector("#run-charts .chart-box:first-child .nodata.hidden", state="attached")
        shot(page, "05-run-live")
        page.wait_for_selector("#run-status .badge.completed", timeout=150_000)
        assert page.inner_text("#stat-step").startswith("4")
        assert "completed" in page.inner_text("#run-logs")
        shot(page, "06-run-done")

        # Download the adapter.
        with page.expect_download() as dl:
            page.click("#download-adapter")
        path = tmp_path / "adapter.zip"
        dl.value.save_as(path)
        names = zipfile.ZipFile(io.BytesIO(path.read_bytes())).namelist()
        assert any(n.endswith("/adapter_config.json") for n in names), names

        # Chat: the same prompt to base and adapter, streamed into both panes.
        page.goto(server.url + "/#/chat")
        page.select_option("#chat-run", run_id)
        page.click("details.params summary")
        page.fill("#p-max_new_tokens", "12")
        page.fill("#p-temperature", "0")
        page.fill("#chat-input", "What is the capital of France?")
        page.click("#chat-send")
        for side in ("base", "adapter"):
            page.wait_for_selector(f"#chat-{side} .msg.assistant:not(.streaming)", timeout=120_000)
            assert "error" not in page.get_attribute(f"#chat-{side} .msg.assistant", "class")
        shot(page, "07-chat")

        # Export the adapter in the first format and download the zip.
        page.goto(server.url + "/#/export")
        page.select_option("#export-run", run_id)
        page.click("#start-export")
        link = page.wait_for_selector("#exports-table a.button", timeout=120_000)
        shot(page, "08-export")
        with page.expect_download() as dl:
            link.click()
        assert zipfile.ZipFile(io.BytesIO(Path(dl.value.path()).read_bytes())).namelist()

        # Runs: history and the compare overlay.
        page.goto(server.url + "/#/runs")
        page.check(f"input[data-compare='{run_id}']")
        page.wait_for_selector("#compare-charts .chart-box")
        shot(page, "09-runs-compare")
        ctx.close()
        assert errors == [], errors
