"""The bridge's page in headless Chromium (Debian's, driven by Playwright) on the real IOC."""

from __future__ import annotations

import os

import pytest
from support import free_port, random_loopback, running, sim_card_toml, write_config

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium (make test-deps installs it)"
)


def test_page_shows_live_waveforms_and_runs(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    host = random_loopback()
    port = free_port()
    cfg = write_config(
        tmp_path,
        sim_card_toml("P1", host),
        extra=f'[bridge]\nenabled = true\nport = {port}\ntokens = ["page-token"]\n',
    )
    with running(["run", str(cfg)], ready=("127.0.0.1", port), timeout=60), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/?token=page-token")
            expect(page.locator("#link")).to_have_text("connected", timeout=20_000)
            expect(page.locator('[data-pv="STATE"]')).to_have_text("IDLE", timeout=30_000)
            # live waveform updates arrive and are drawn
            page.wait_for_function(
                "+document.getElementById('wf-updates').textContent >= 5", timeout=30_000
            )
            assert page.locator("#wf-plot canvas").count() >= 1
            expect(page.locator("#start")).to_be_enabled(timeout=10_000)
            page.fill("#run-name", "from the page")
            page.fill("#run-log", "browser test")
            page.click("#start")
            expect(page.locator("#run-state")).to_have_text("RUNNING", timeout=30_000)
            page.click("#stop")
            expect(page.locator("#run-state")).to_have_text("IDLE", timeout=60_000)
            link = page.locator("#recent tbody a").first
            expect(link).to_be_visible(timeout=30_000)
            href = link.get_attribute("href")
            assert href and href.startswith("/data/")
            resp = page.request.get(f"http://127.0.0.1:{port}{href}")
            assert resp.status == 200 and len(resp.body()) > 4
            assert not errors, errors
        finally:
            browser.close()
