"""The bridge's page in headless Chromium (Debian's, driven by Playwright) on the real IOC.

One IOC (a simulated two-site card, the bridge on loopback with no token configured, so
it makes a one-time token) serves every test of this module; the tests click through
the page and check what reached the card over Channel Access. Screenshots of the main
views go to $DTACQ_TEST_ARTIFACTS (default tmp/artifacts).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import ioc_support
import pytest
from ioc_support import wait_for
from support import ROOT, free_port, output, random_loopback, running, sim_card_toml, write_config

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
ARTIFACTS = Path(os.environ.get("DTACQ_TEST_ARTIFACTS", ROOT / "tmp" / "artifacts"))
PREFIX = "PAGE:P1:"
SITE2 = '\n[[cards.sim.sites]]\nsite = 2\nmodule = "ACQ425ELF"\n'
T = 30_000  # ms, for the page to show what the IOC did

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="needs Debian's chromium (make test-deps installs it)"
)


class Site:
    """The running IOC: its port, its log and the page URL it logged."""

    def __init__(self, proc: Any, port: int, data_dir: Path):
        self.proc = proc
        self.port = port
        self.data_dir = data_dir
        self.base = f"http://127.0.0.1:{port}/"
        self.link = wait_for(self._link, "the one-time token's URL in the IOC's log")

    def _link(self) -> str | None:
        m = re.search(r"open (http://\S+/\?token=\S+)", output(self.proc))
        return m.group(1) if m else None


@pytest.fixture(scope="module")
def ioc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("page")
    host = random_loopback()
    port = free_port()
    cards = sim_card_toml("P1", host, prefix=PREFIX, faults="reboot_s = 1.0") + SITE2
    cfg = write_config(
        tmp, cards, extra=f'[bridge]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n'
    )
    with running(["run", str(cfg)], ready=("127.0.0.1", port), timeout=60) as proc:
        yield Site(proc, port, tmp / "data")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Dialogs:
    """The page's confirmations are accepted, unless a test asks to dismiss the next one."""

    dismiss_next: bool = False

    def answer(self, dialog: Any) -> None:
        if self.dismiss_next:
            self.dismiss_next = False
            dialog.dismiss()
        else:
            dialog.accept()


@pytest.fixture
def dialogs() -> Dialogs:
    return Dialogs()


@pytest.fixture
def page(browser: Any, ioc: Site, dialogs: Dialogs) -> Iterator[Any]:
    """A page opened at the IOC's logged link, connected and writable."""
    from playwright.sync_api import expect

    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", dialogs.answer)
    pg.goto(ioc.link)
    expect(pg.locator("#link")).to_have_text("connected", timeout=T)
    expect(pg.locator("#card-state")).to_have_text("IDLE", timeout=T)
    expect(pg.locator("#start")).to_be_enabled(timeout=T)
    yield pg
    pg.close()
    assert not errors, errors


def caget(suffix: str) -> Any:
    return ioc_support.caget(PREFIX + suffix)


def castr(suffix: str) -> str:
    return ioc_support.castr(PREFIX + suffix)


def shot(pg: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_idle(pg: Any) -> None:
    from playwright.sync_api import expect

    expect(pg.locator("#run-state")).to_have_text("IDLE", timeout=60_000)


# --- 1. first run from the page ---


def test_logged_link_writes_and_the_page_says_why_it_cannot(browser: Any, ioc: Site) -> None:
    from playwright.sync_api import expect

    assert ioc.link.startswith(ioc.base + "?token=")
    pg = browser.new_page()
    try:
        pg.goto(ioc.base)
        expect(pg.locator("#link")).to_have_text("connected", timeout=T)
        expect(pg.locator("#access")).to_contain_text("no token", timeout=T)
        expect(pg.locator("#access")).to_contain_text("link with ?token=")
        expect(pg.locator("#start")).to_be_disabled()
        expect(pg.locator("#card-state")).to_have_text("IDLE", timeout=T)
        shot(pg, "read-only")
        pg.goto(ioc.base + "?token=wrong")
        expect(pg.locator("#access")).to_contain_text("not accepted", timeout=T)
        pg.goto(ioc.link)
        expect(pg.locator("#start")).to_be_enabled(timeout=T)
        expect(pg.locator("#access")).to_be_hidden()
    finally:
        pg.close()


# --- 2. every site and channel; gains ---


def test_plots_any_channel_of_any_site_and_sets_gains(page: Any) -> None:
    from playwright.sync_api import expect

    box = page.locator('#channels input[data-key="2:03"]')
    expect(box).to_be_visible(timeout=T)
    box.check()
    page.locator('#channels input[data-key="1:01"]').uncheck()
    expect(page.locator("#wf-plot .u-legend")).to_contain_text("2:03", timeout=T)
    page.wait_for_function("+document.getElementById('wf-updates').textContent >= 3", timeout=T)
    page.locator('#channels input[data-key="1:01"]').check()
    # per-channel gain of site 2, then GAIN:ALL of site 1
    page.locator("#gains details").nth(1).locator("summary").click()
    page.select_option("#gain-2-03", "1")
    wait_for(lambda: caget("2:GAIN:03") == 1, "2:GAIN:03 set from the page")
    assert caget("2:GAIN:04") == 0
    page.select_option("#gain-all-1", "1")
    page.click("#set-gain-1")
    wait_for(
        lambda: caget("1:GAIN:16") == 1 and caget("1:GAIN:01") == 1, "1:GAIN:ALL from the page"
    )
    expect(page.locator("#gain-1-16")).to_have_value("1", timeout=T)
    page.select_option("#gain-all-1", "0")
    page.click("#set-gain-1")
    page.select_option("#gain-2-03", "0")
    wait_for(lambda: caget("1:GAIN:16") == 0 and caget("2:GAIN:03") == 0, "gains back to x1")


def test_units_and_fft_scale(page: Any) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#wf-plot .u-axis").nth(1)).to_be_visible(timeout=T)
    page.check('input[name="units"][value="ADC"]')
    page.wait_for_function("state.wfPlot && state.wfPlot.axes[1].label === 'ADC'", timeout=T)
    page.wait_for_function(
        "Math.max(...state.wfPlot.data[1].map(Math.abs)) > 100", timeout=T
    )  # codes, not volts
    page.check('input[name="units"][value="V"]')
    page.wait_for_function("state.wfPlot && state.wfPlot.axes[1].label === 'V'", timeout=T)
    page.wait_for_function("Math.max(...state.wfPlot.data[1].map(Math.abs)) < 20", timeout=T)
    page.check('input[name="fft"][value="lin"]')
    page.wait_for_function("state.specPlot && state.specPlot.scales.y.distr === 1", timeout=T)
    page.check('input[name="fft"][value="log"]')
    page.wait_for_function("state.specPlot && state.specPlot.scales.y.distr === 3", timeout=T)


def test_modules_to_read_set_from_the_page_and_the_plot_follows(page: Any) -> None:
    from playwright.sync_api import expect

    legend = page.locator("#wf-plot .u-legend")
    expect(page.locator("#read-sites")).to_be_visible(timeout=T)
    expect(legend).to_contain_text("1:01", timeout=T)
    try:
        page.locator('.read-site[data-site="1"]').uncheck()
        page.click("#set-sites")
        expect(page.locator("#sites")).to_have_text("2", timeout=T)
        assert ca("SITES") == "2"
        # Site 1's channels are gone; the plot shows site 2's first channel instead.
        expect(page.locator('#channels input[data-key="1:01"]')).to_have_count(0, timeout=T)
        expect(page.locator('#channels input[data-key="2:01"]')).to_be_checked(timeout=T)
        expect(legend).to_contain_text("2:01", timeout=T)
        expect(legend).not_to_contain_text("1:01")
        # The box of site 1 stays, so it can be read again.
        page.locator('.read-site[data-site="1"]').check()
        page.click("#set-sites")
        expect(page.locator("#sites")).to_have_text("1,2", timeout=T)
        expect(page.locator('#channels input[data-key="1:01"]')).to_be_visible(timeout=T)
    finally:
        if ca("SITES") != "1,2":  # leave both sites streaming for the other tests
            ca_put("SITES", "1,2")


# --- 3. the old page's controls ---


def test_clock_rate_clkdiv_and_external_clock(page: Any) -> None:
    from playwright.sync_api import expect

    page.fill("#rate-khz", "500")
    page.click("#set-rate")
    expect(page.locator("#rate-rbv")).to_have_text(re.compile(r"^500000(\.0)?$"), timeout=T)
    page.fill("#clkdiv", "100")
    page.click("#set-clkdiv")
    expect(page.locator("#clkdiv-rbv")).to_have_text("100", timeout=T)
    # Too slow a rate: the IOC refuses, and the page shows its one-line reason.
    page.fill("#rate-khz", "2")
    page.click("#set-rate")
    expect(page.locator("#message")).to_contain_text("below the minimum 5000 Hz", timeout=T)
    expect(page.locator("#clkdiv-rbv")).to_have_text("100")
    page.check("#ext-clock")
    page.fill("#ext-freq", "20000000")
    page.click("#set-ext")
    expect(page.locator("#ext-rbv")).to_have_text("External", timeout=T)
    assert caget("EXT_CLOCK_FREQ") == 20e6
    page.uncheck("#ext-clock")
    page.click("#set-ext")
    expect(page.locator("#ext-rbv")).to_have_text("Internal", timeout=T)


def test_run_with_trigger_downsample_channels_then_runs_view(page: Any, ioc: Site) -> None:
    from playwright.sync_api import expect

    page.fill("#run-name", "page trigger run")
    page.fill("#run-log", "browser test")
    page.check("#run-save")
    page.check("#run-upload")
    page.check("#run-ds-on")
    page.fill("#run-ds", "4")
    expect(page.locator("#run-trigger option", has_text="sample_count")).to_have_count(1, timeout=T)
    page.select_option("#run-trigger", "sample_count")
    page.fill("#run-trigger-args", '{"samples": 30000}')
    # site 1 whole, and channel 2 of site 2 (index 16 + 1)
    expect(page.locator('.model[data-site="2"]')).to_have_text("ACQ425ELF", timeout=T)
    page.click("#save-none")
    page.locator('.save-site[data-site="1"]').check()
    page.locator('.save-ch[data-index="17"]').check()
    page.click("#start")
    expect(page.locator("#run-count")).to_have_text("1")
    wait_idle(page)  # the trigger ends the run by itself
    last = page.locator("#last-run a.open-run")
    expect(last).to_be_visible(timeout=T)
    assert castr("RUN:CHANNELS") == ",".join(str(i) for i in [*range(16), 17])
    assert caget("RUN:DOWNSAMPLE") == 4
    links = page.locator("#last-run a:not(.open-run)")
    assert links.count() >= 1
    href = links.first.get_attribute("href")
    assert href and href.startswith("/data/")
    assert page.request.get(ioc.base.rstrip("/") + href).status == 200
    shot(page, "live")

    # the runs view: search by name and today's date, open it, plot it
    run_id = last.text_content()
    page.click("#tab-runs")
    page.fill("#q-name", "trigger run")
    page.fill("#q-since", time.strftime("%Y-%m-%d", time.gmtime()))
    page.click("#run-search button")
    row = page.locator(f'#runs-table tr[data-run="{run_id}"]')
    expect(row).to_be_visible(timeout=T)
    expect(row).to_contain_text("30000")
    expect(row).to_contain_text("ok")
    expect(row).to_contain_text("pending")  # marked for upload, not yet delivered (sqlite)
    page.fill("#q-name", "no such name at all")
    page.click("#run-search button")
    expect(page.locator("#runs-note")).to_have_text("no runs match", timeout=T)
    page.fill("#q-name", "")
    page.click("#run-search button")
    expect(row).to_be_visible(timeout=T)
    row.locator("a").click()
    expect(page.locator("#rd-id")).to_have_text(run_id, timeout=T)
    header = json.loads(page.locator("#rd-header").text_content())
    assert header["downsample"] == 4 and header["channel_list"] == [*range(16), 17]
    assert header["measurement_name"] == "page trigger run"
    page.wait_for_function("+document.getElementById('rd-plot').dataset.drawn >= 1", timeout=T)
    expect(page.locator("#rd-note")).to_contain_text("exact min/max")
    assert page.locator("#rd-plot canvas").count() == 1
    page.locator('#rd-channels input[data-ch="17"]').check()
    page.wait_for_function("+document.getElementById('rd-plot').dataset.drawn >= 2", timeout=T)
    expect(page.locator("#rd-plot .u-legend")).to_contain_text("ch 17 max")
    shot(page, "runs")
    # drag across the plot: the range is read again, now a part of the run
    box = page.locator("#rd-plot .u-over").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, y, steps=5)
    page.mouse.up()
    page.wait_for_function("+document.getElementById('rd-plot').dataset.drawn >= 3", timeout=T)
    zoomed = re.search(r"samples (\d+)-(\d+) of (\d+)", page.locator("#rd-note").text_content())
    lo, hi, total = (int(g) for g in zoomed.groups())
    assert 0 < lo < hi < total and (hi - lo) < total / 2
    page.click("#rd-full")
    expect(page.locator("#rd-note")).to_contain_text(f"samples 0-{total} of {total}", timeout=T)
    # files and exports download
    for sel in ("#rd-files a", "#rd-csv", "#rd-npy"):
        resp = page.request.get(urljoin(ioc.base, page.locator(sel).first.get_attribute("href")))
        assert resp.status == 200 and len(resp.body()) > 100, sel
    assert page.request.get(ioc.base + "runs/nope").status == 404


def test_auto_repeat_starts_the_next_run(page: Any) -> None:

    page.fill("#run-name", "repeat")
    page.select_option("#run-trigger", "sample_count")
    page.fill("#run-trigger-args", '{"samples": 5000}')
    page.uncheck("#run-ds-on")
    page.uncheck("#run-upload")
    page.check("#auto-repeat")
    page.click("#start")
    page.wait_for_function("+document.getElementById('run-count').textContent >= 3", timeout=90_000)
    page.uncheck("#auto-repeat")
    wait_idle(page)
    runs = page.request.get(urljoin(page.url, "/runs/?name=repeat")).json()
    assert len(runs) >= 3 and all(r["state"] == "complete" for r in runs), runs
    assert all(r["upload"] == "" for r in runs), runs  # "upload" unchecked reached the card


def test_progress_reset_refusal_and_reboot(page: Any, dialogs: Dialogs) -> None:
    from playwright.sync_api import expect

    page.fill("#run-name", "progress")
    page.select_option("#run-trigger", "time_limit")
    page.fill("#run-trigger-args", '{"seconds": 600}')
    page.click("#start")
    expect(page.locator("#run-state")).to_have_text("RUNNING", timeout=T)
    page.wait_for_function(
        "(v => v > 0 && v < 1)(document.getElementById('run-progress').value)", timeout=T
    )
    assert float(page.locator("#run-elapsed").text_content() or 0) >= 0
    expect(page.locator("#run-samples")).not_to_have_text("0", timeout=T)
    expect(page.locator("#run-files")).to_have_text("1", timeout=T)
    # the IOC refuses a reset during a run: its own words appear
    page.click("#reset")
    expect(page.locator("#message")).to_contain_text("stop the run first", timeout=T)
    page.click("#stop")
    wait_idle(page)
    # confirmation dismissed: nothing is sent
    before = caget("STREAM:BUFFERS")
    dialogs.dismiss_next = True
    page.click("#reset")
    assert not dialogs.dismiss_next  # the page asked
    wait_for(lambda: caget("STREAM:BUFFERS") > before + 5, "stream still running")
    page.click("#reset")  # accepted: the stream restarts, its counters from zero
    low = wait_for(lambda: caget("STREAM:BUFFERS") < before, "the readout reset")
    assert low
    page.click("#reboot")
    expect(page.locator("#card-state")).not_to_have_text("IDLE", timeout=T)
    expect(page.locator("#card-state")).to_have_text("IDLE", timeout=90_000)


def test_narrow_screen(browser: Any, ioc: Site) -> None:
    from playwright.sync_api import expect

    pg = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        pg.goto(ioc.link)
        expect(pg.locator("#card-state")).to_have_text("IDLE", timeout=T)
        pg.wait_for_function("state.wfPlot !== null", timeout=T)
        width = pg.evaluate("document.documentElement.scrollWidth")
        assert width <= 400, f"page is {width} px wide on a 390 px screen"
        shot(pg, "narrow")
    finally:
        pg.close()


# --- 4. transient shots ---


def ca(suffix: str) -> Any:
    """A fresh CA read through caproto's sync client: one value (enums as label) or an array."""
    from caproto.sync.client import read

    data = read(PREFIX + suffix, timeout=10).data
    if len(data) != 1:
        return data
    return data[0].decode() if isinstance(data[0], bytes) else data[0]


def ca_put(suffix: str, value: Any) -> None:
    from caproto.sync.client import write

    write(PREFIX + suffix, value, notify=True, timeout=20)


def trigger_line_pixels(pg: Any) -> float:
    """The share of the shot plot's canvas pixels on the trigger's column that are the line's."""
    return pg.evaluate(
        """() => {
        const u = state.shotPlot, x = +document.getElementById('shot-plot').dataset.triggerX;
        const img = u.ctx.getImageData(x, u.bbox.top, 1, u.bbox.height).data;
        let dark = 0;
        for (let i = 0; i < img.length; i += 4) if (img[i] + img[i + 1] + img[i + 2] < 60) dark++;
        return dark / (img.length / 4);
    }"""
    )


def test_transient_shot_from_the_page(page: Any, browser: Any, ioc: Site) -> None:
    from playwright.sync_api import expect

    pre, post = 2000, 3000
    expect(page.locator("#transient")).to_be_hidden()
    page.select_option("#mode", label="TRANSIENT")
    expect(page.locator("#transient")).to_be_visible(timeout=T)
    try:
        expect(page.locator("#shot-box")).to_be_visible()
        # the IOC's refusal, in its words
        page.click("#tr-soft")
        expect(page.locator("#message")).to_contain_text("no shot is armed", timeout=T)
        page.fill("#tr-pre", str(pre))
        page.fill("#tr-post", str(post))
        page.select_option("#tr-source", "soft")
        page.uncheck("#tr-self")
        page.uncheck("#tr-rearm")
        page.click("#tr-arm")
        expect(page.locator("#tr-state")).to_have_text("RUN_PRE", timeout=T)
        page.wait_for_function(
            f"+document.getElementById('tr-pre-rbv').textContent >= {pre}", timeout=T
        )
        assert ca("MODE") == "TRANSIENT"
        assert (ca("MODE:TRANSIENT:PRE"), ca("MODE:TRANSIENT:POST")) == (pre, post)
        assert ca("MODE:TRANSIENT:TRIGGER") == "soft"
        assert ca("MODE:TRANSIENT:AUTO_REARM") == ca("MODE:TRANSIENT:SOFT_TRIGGER") == "No"
        page.click("#tr-soft")
        expect(page.locator("#tr-shot")).to_have_text("1", timeout=T)
        expect(page.locator("#tr-state")).to_have_text("IDLE", timeout=T)
        # the shot plotted: volts of channel 1:01 against the timebase, trigger at 0
        tb = ca("1:AI:TW:TB")
        rate = ca("SAMPLE_RATE_RBV")
        assert tb[0] == pytest.approx(-pre / rate)
        volts = ca("1:AI:TW:01:V")
        page.wait_for_function(
            f"state.shotPlot && state.shotPlot.data[0].length === {len(tb)}", timeout=T
        )
        x, y = page.evaluate("[state.shotPlot.data[0], state.shotPlot.data[1]]")
        assert x == pytest.approx(list(tb * 1e3)) and y == pytest.approx(list(volts))
        expect(page.locator("#shot-plot .u-legend")).to_contain_text("1:01")
        assert trigger_line_pixels(page) > 0.8
        shot(page, "transient")
        # ADC units: the codes of the same shot
        page.check('input[name="units"][value="ADC"]')
        page.wait_for_function(
            "state.shotPlot && state.shotPlot.axes[1].label === 'ADC'", timeout=T
        )
        codes = ca("1:AI:TW:01")
        page.wait_for_function(f"state.shotPlot.data[1].length === {len(codes)}", timeout=T)
        assert page.evaluate("state.shotPlot.data[1]") == list(codes)
        page.check('input[name="units"][value="V"]')
        # a front-panel line with its edge: armed, waiting, then aborted from the page
        page.select_option("#tr-source", "d3")
        page.select_option("#tr-edge", "falling")
        page.click("#tr-arm")
        expect(page.locator("#tr-state")).to_have_text(re.compile("^(ARM|RUN_PRE)$"), timeout=T)
        assert ca("MODE:TRANSIENT:TRIGGER") == "d3 falling"
        page.click("#tr-abort")
        expect(page.locator("#tr-state")).to_have_text("IDLE", timeout=T)
        page.select_option("#tr-source", "soft")
        # auto re-arm with the soft trigger once armed: shot after shot until it is cleared
        page.check("#tr-self")
        page.check("#tr-rearm")
        page.click("#tr-arm")
        page.wait_for_function("+document.getElementById('tr-shot').textContent >= 3", timeout=T)
        assert ca("MODE:TRANSIENT:AUTO_REARM") == ca("MODE:TRANSIENT:SOFT_TRIGGER") == "Yes"
        page.uncheck("#tr-rearm")
        wait_for(lambda: ca("MODE:TRANSIENT:AUTO_REARM") == "No", "auto re-arm cleared")
        expect(page.locator("#tr-state")).to_have_text("IDLE", timeout=T)
        # a fresh narrow page shows the same last shot
        narrow = browser.new_page(viewport={"width": 390, "height": 844})
        try:
            narrow.goto(ioc.link)
            expect(narrow.locator("#transient")).to_be_visible(timeout=T)
            narrow.wait_for_function("state.shotPlot !== null", timeout=T)
            expect(narrow.locator("#tr-shot")).to_have_text(str(ca("SHOT")), timeout=T)
            assert trigger_line_pixels(narrow) > 0.8
            width = narrow.evaluate("document.documentElement.scrollWidth")
            assert width <= 400, f"page is {width} px wide on a 390 px screen"
            narrow.locator("#shot-box").scroll_into_view_if_needed()
            shot(narrow, "transient-narrow")
        finally:
            narrow.close()
        page.select_option("#mode", label="CONTINUOUS")
        expect(page.locator("#transient")).to_be_hidden(timeout=T)
        wait_for(lambda: ca("MODE") == "CONTINUOUS", "MODE back to CONTINUOUS over CA")
    finally:
        if ca("MODE") != "CONTINUOUS":  # leave the card streaming for the other tests
            ca_put("MODE:TRANSIENT:SET_ABORT", 1)
            wait_for(lambda: ca("MODE:TRANS_ACT:STATE") == "IDLE", "the shot aborted")
            ca_put("MODE", "CONTINUOUS")


def test_mode_switch_refused_during_a_run(page: Any) -> None:
    from playwright.sync_api import expect

    page.fill("#run-name", "mode refused")
    page.select_option("#run-trigger", "time_limit")
    page.fill("#run-trigger-args", '{"seconds": 600}')
    page.click("#start")
    expect(page.locator("#run-state")).to_have_text("RUNNING", timeout=T)
    page.select_option("#mode", label="TRANSIENT")
    expect(page.locator("#message")).to_contain_text(
        "stop the run before changing the mode", timeout=T
    )
    expect(page.locator("#mode")).to_have_value("0", timeout=T)  # the IOC's mode again
    expect(page.locator("#transient")).to_be_hidden()
    assert ca("MODE") == "CONTINUOUS"
    page.click("#stop")
    wait_idle(page)
