"""Phoebus Display Builder (.bob) screens for the config's cards.

`dtacq-ioc screens CONFIG -o DIR` writes, per card, an overview (state, clock,
buffer, stream statistics, run control, card actions), waveform and spectrum
plots, and a channel table (mean/min/max/RMS and gains), plus `index.bob`
linking them all. Names are written out in full (no macros) so a screen opens
on its own; every name is checked against the PV list that the IOC builds from
the same config (`build_group_class`), so a screen never points at a PV the IOC
does not serve.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dtacq_ioc.config import CardConfig, Config
from dtacq_ioc.ioc import cardgroup
from dtacq_ioc.ioc.cardgroup import SiteLayout, served_suffixes, site_layouts

log = logging.getLogger(__name__)

# Phoebus's textupdate/textentry "format" value that shows a CHAR array as text.
FORMAT_STRING = "6"
ROW = 26  # height of one row of widgets, pixels
TRACE_COLORS = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def served_names(config: Config) -> set[str]:
    """Every full PV name the IOC serves for this config."""
    return cardgroup.served_names(list(config.cards), config.ioc)


@dataclass(frozen=True)
class CardNames:
    """Full PV names of one card; asking for a name it does not serve is a bug here."""

    card: CardConfig
    suffixes: frozenset[str]

    def __call__(self, suffix: str) -> str:
        if suffix not in self.suffixes:
            raise KeyError(f"screens: card {self.card.name} serves no PV {suffix!r}")
        return self.card.prefix + suffix


def _sub(parent: ET.Element, tag: str, text: object | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = str(text)
    return el


def _color(parent: ET.Element, tag: str, rgb: tuple[int, int, int]) -> None:
    outer = _sub(parent, tag)
    _sub(outer, "color", red=str(rgb[0]), green=str(rgb[1]), blue=str(rgb[2]))


@dataclass
class Screen:
    """One .bob display under construction; widgets are placed by absolute position."""

    title: str
    width: int = 1000
    root: ET.Element = field(init=False)
    bottom: int = 0  # lowest pixel used so far, to size the display

    def __post_init__(self) -> None:
        self.root = ET.Element("display", version="2.0.0")
        _sub(self.root, "name", self.title)

    def widget(self, kind: str, version: str, name: str, x: int, y: int, w: int,
               h: int = ROW - 4) -> ET.Element:  # fmt: skip
        el = _sub(self.root, "widget", type=kind, version=version)
        _sub(el, "name", name)
        for tag, value in (("x", x), ("y", y), ("width", w), ("height", h)):
            _sub(el, tag, value)
        self.bottom = max(self.bottom, y + h)
        return el

    def label(self, text: str, x: int, y: int, w: int = 160, h: int = ROW - 4,
              bold: bool = False) -> ET.Element:  # fmt: skip
        el = self.widget("label", "2.0.0", text, x, y, w, h)
        _sub(el, "text", text)
        if bold:
            font = _sub(el, "font")
            _sub(font, "font", family="Liberation Sans", style="BOLD", size="16.0")
        return el

    def heading(self, text: str, y: int) -> int:
        self.label(text, 10, y, self.width - 20, ROW, bold=True)
        return y + ROW + 4

    def text_update(self, pv: str, x: int, y: int, w: int = 160, text: bool = False) -> None:
        el = self.widget("textupdate", "2.0.0", pv, x, y, w)
        _sub(el, "pv_name", pv)
        if text:
            _sub(el, "format", FORMAT_STRING)
        _sub(el, "show_units", "true")

    def text_entry(self, pv: str, x: int, y: int, w: int = 160, text: bool = False,
                   h: int = ROW - 4) -> None:  # fmt: skip
        el = self.widget("textentry", "3.0.0", pv, x, y, w, h)
        _sub(el, "pv_name", pv)
        if text:
            _sub(el, "format", FORMAT_STRING)
        if h > ROW:
            _sub(el, "multi_line", "true")
        _sub(el, "show_units", "true")

    def combo(self, pv: str, x: int, y: int, w: int = 160) -> None:
        el = self.widget("combo", "2.0.0", pv, x, y, w)
        _sub(el, "pv_name", pv)
        _sub(el, "items_from_pv", "true")

    def led(self, pv: str, x: int, y: int) -> None:
        el = self.widget("led", "2.0.0", pv, x, y, ROW - 6, ROW - 6)
        _sub(el, "pv_name", pv)

    def write_button(self, text: str, pv: str, value: str, x: int, y: int, w: int = 100,
                     confirm: str = "") -> None:  # fmt: skip
        el = self.widget("action_button", "3.0.0", text, x, y, w, ROW)
        _sub(el, "text", text)
        actions = _sub(el, "actions")
        action = _sub(actions, "action", type="write_pv")
        _sub(action, "description", text)
        _sub(action, "pv_name", pv)
        _sub(action, "value", value)
        if confirm:  # Phoebus's names (ActionButtonWidget); it skips unknown ones silently
            _sub(el, "show_confirm_dialog", "true")
            _sub(el, "confirm_message", confirm)

    def open_button(self, text: str, file: str, x: int, y: int, w: int = 160) -> None:
        el = self.widget("action_button", "3.0.0", text, x, y, w, ROW)
        _sub(el, "text", text)
        actions = _sub(el, "actions")
        action = _sub(actions, "action", type="open_display")
        _sub(action, "description", text)
        _sub(action, "file", file)
        _sub(action, "target", "tab")

    def xy_plot(self, title: str, x_title: str, y_title: str,
                traces: list[tuple[str, str, str]], x: int, y: int, w: int,
                h: int) -> None:  # fmt: skip
        """traces: (legend name, x_pv, y_pv)."""
        el = self.widget("xyplot", "3.0.0", title, x, y, w, h)
        _sub(el, "title", title)
        _sub(el, "show_legend", "true")
        x_axis = _sub(el, "x_axis")
        _sub(x_axis, "title", x_title)
        _sub(x_axis, "autoscale", "true")
        y_axes = _sub(el, "y_axes")
        y_axis = _sub(y_axes, "y_axis")
        _sub(y_axis, "title", y_title)
        _sub(y_axis, "autoscale", "true")
        holder = _sub(el, "traces")
        for i, (name, x_pv, y_pv) in enumerate(traces):
            trace = _sub(holder, "trace")
            _sub(trace, "name", name)
            _sub(trace, "x_pv", x_pv)
            _sub(trace, "y_pv", y_pv)
            _sub(trace, "err_pv", "")
            _sub(trace, "axis", 0)
            _sub(trace, "trace_type", 1)  # line
            _color(trace, "color", TRACE_COLORS[i % len(TRACE_COLORS)])
            _sub(trace, "line_width", 1)

    def write(self, path: Path) -> Path:
        _sub(self.root, "width", self.width)
        _sub(self.root, "height", self.bottom + 20)
        tree = ET.ElementTree(self.root)
        ET.indent(tree, space="  ")
        tmp = path.with_name(path.name + ".tmp")
        tree.write(tmp, encoding="UTF-8", xml_declaration=True)
        tmp.replace(path)
        return path


@dataclass(frozen=True)
class CardFiles:
    """The file names of one card's screens (relative to the output directory)."""

    card: str

    @property
    def overview(self) -> str:
        return f"{self.card}_overview.bob"

    @property
    def waveforms(self) -> str:
        return f"{self.card}_waveforms.bob"

    @property
    def spectra(self) -> str:
        return f"{self.card}_spectra.bob"

    @property
    def channels(self) -> str:
        return f"{self.card}_channels.bob"

    def plots(self) -> list[tuple[str, str]]:
        return [("Waveforms", self.waveforms), ("Spectra", self.spectra),
                ("Channels", self.channels)]  # fmt: skip


def _rows(screen: Screen, y: int, rows: Iterable[tuple[str, list[tuple]]],
          label_w: int = 170) -> int:  # fmt: skip
    """Rows of `label: widget widget ...`; each widget is (method name, pv, width, kwargs)."""
    for label, widgets in rows:
        screen.label(label, 10, y, label_w)
        x = 10 + label_w + 10
        for method, pv, w, kwargs in widgets:
            getattr(screen, method)(pv, x, y, w, **kwargs)
            x += w + 10
        y += ROW
    return y


def _nav(screen: Screen, files: CardFiles, y: int) -> int:
    x = 10
    for text, file in [("Overview", files.overview), *files.plots(), ("Index", "index.bob")]:
        screen.open_button(text, file, x, y, 130)
        x += 140
    return y + ROW + 10


def _overview(card: CardConfig, n: CardNames, sites: list[SiteLayout], files: CardFiles) -> Screen:
    s = Screen(f"{card.name} overview", width=900)
    y = s.heading(f"{card.name} ({card.prefix}) at {card.host}", 10)
    y = _nav(s, files, y)
    upd, ent, cmb = "text_update", "text_entry", "combo"
    txt = {"text": True}

    y = s.heading("State", y)
    s.led(n("CONNECTED"), 190, y + 2)
    s.label("Connected", 10, y, 170)
    y += ROW
    y = _rows(s, y, [
        ("State", [(upd, n("STATE"), 200, {})]),
        ("Heartbeat", [(upd, n("HEARTBEAT"), 200, {})]),
        ("Last error", [(upd, n("LAST_ERROR"), 690, txt)]),
        ("Carrier", [(upd, n("MODEL"), 200, {}), (upd, n("HOSTNAME"), 200, {}),
                     (upd, n("SERIAL"), 200, {})]),
        ("Firmware", [(upd, n("FW:SW"), 300, {}), (upd, n("FW:FPGA"), 380, txt)]),
    ])  # fmt: skip
    for site in sites:
        p = f"{site.site}:"
        y = _rows(s, y, [(f"Site {site.site}", [
            (upd, n(p + "MODEL"), 200, {}), (upd, n(p + "PART_NUM"), 260, {}),
            (upd, n(p + "SERIAL"), 120, {}), (upd, n(p + "NCHAN"), 90, {})])])  # fmt: skip

    y = s.heading("Clock and buffer (setting, readback)", y + 6)
    y = _rows(s, y, [
        ("Clock divider", [(ent, n("CLKDIV"), 160, {}), (upd, n("CLKDIV_RBV"), 160, {})]),
        ("Clock source", [(cmb, n("EXT_CLOCK"), 160, {}), (upd, n("EXT_CLOCK_RBV"), 160, {})]),
        ("External clock", [(ent, n("EXT_CLOCK_FREQ"), 160, {})]),
        ("Sample rate", [(upd, n("SAMPLE_RATE_RBV"), 160, {}), (upd, n("SYSCLK_RBV"), 160, {})]),
        ("Buffer size", [(ent, n("BUFFER_SIZE"), 160, {})]),
        ("Sites read out", [(ent, n("SITES"), 160, {})]),
    ])  # fmt: skip

    y = s.heading("Stream", y + 6)
    y = _rows(s, y, [
        ("Rate", [(upd, n("STREAM:MBPS"), 160, {})]),
        ("Buffers, samples", [(upd, n("STREAM:BUFFERS"), 160, {}),
                              (upd, n("STREAM:SAMPLES"), 160, {})]),
        ("Counter errors", [(upd, n("STREAM:COUNTER_ERRORS"), 160, {})]),
        ("Latest counter", [(upd, n("AI:COUNTER"), 160, {})]),
    ])  # fmt: skip

    y = _run_section(s, n, y + 6)
    y = _transient_section(s, n, y + 6)
    y = s.heading("Card actions", y + 6)
    s.write_button("Reset readout", n("RESET"), "1", 190, y, 150,
                   confirm="Jump-start the card's readout (run0 sequence)?")  # fmt: skip
    reboot = f"Reboot {card.name} over SSH? Streaming stops until it is back."
    s.write_button("Reboot card", n("REBOOT"), "1", 350, y, 150, confirm=reboot)
    return s


def _run_section(s: Screen, n: CardNames, y: int) -> int:
    """Run settings, start/stop and the run's readbacks."""
    upd, ent, cmb = "text_update", "text_entry", "combo"
    txt = {"text": True}
    y = s.heading("Run", y)
    y = _rows(s, y, [
        ("Measurement name", [(ent, n("RUN:NAME"), 690, txt)]),
        ("Save files, upload", [(cmb, n("RUN:SAVE"), 120, {}), (cmb, n("RUN:UPLOAD"), 120, {})]),
        ("Downsample", [(ent, n("RUN:DOWNSAMPLE"), 120, {})]),
        ("Trigger, arguments", [(ent, n("RUN:TRIGGER"), 160, {}),
                                (ent, n("RUN:TRIGGER_ARGS"), 520, txt)]),
        ("Channels (empty=all)", [(ent, n("RUN:CHANNELS"), 690, txt)]),
        ("Log items (JSON)", [(ent, n("RUN:LOGITEMS"), 690, txt)]),
    ])  # fmt: skip
    s.label("Log", 10, y, 170)
    s.text_entry(n("RUN:LOG"), 190, y, 690, text=True, h=3 * ROW)
    y += 3 * ROW + 6
    s.write_button("Start run", n("RUN:START"), "1", 190, y, 150)
    s.write_button("Stop run", n("RUN:STOP"), "1", 350, y, 150)
    y += ROW + 8
    y = _rows(s, y, [
        ("State, id", [(upd, n("RUN:STATE_RBV"), 160, {}), (upd, n("RUN:ID_RBV"), 520, txt)]),
        ("Samples, bytes", [(upd, n("RUN:SAMPLES_RBV"), 160, {}),
                            (upd, n("RUN:BYTES_RBV"), 160, {})]),
        ("Elapsed", [(upd, n("RUN:ELAPSED_RBV"), 160, {})]),
        ("Current file", [(upd, n("RUN:FILE_RBV"), 690, txt)]),
        ("Errors, overruns", [(upd, n("RUN:ERRORS_RBV"), 160, {}),
                              (upd, n("RUN:OVERRUNS_RBV"), 160, {})]),
        ("Fault", [(upd, n("RUN:FAULT_RBV"), 690, txt)]),
    ])  # fmt: skip
    return y


def _transient_section(s: Screen, n: CardNames, y: int) -> int:
    """Transient shots: mode, the next shot's settings, arm/abort/trigger, the card's state."""
    upd, ent, cmb = "text_update", "text_entry", "combo"
    t = "MODE:TRANSIENT:"
    y = s.heading("Transient shots", y)
    y = _rows(s, y, [
        ("Mode", [(cmb, n("MODE"), 160, {})]),
        ("Pre, post samples", [(ent, n(t + "PRE"), 160, {}), (ent, n(t + "POST"), 160, {})]),
        ("Trigger, self-trigger", [(ent, n(t + "TRIGGER"), 160, {}),
                                   (cmb, n(t + "SOFT_TRIGGER"), 120, {})]),
        ("Re-arm, demux", [(cmb, n(t + "AUTO_REARM"), 120, {}), (cmb, n(t + "DEMUX"), 120, {})]),
        ("State, samples", [(upd, n("MODE:TRANS_ACT:STATE"), 160, {}),
                            (upd, n("MODE:TRANS_ACT:TOTSAM"), 160, {})]),
        ("Last shot", [(upd, n("SHOT"), 160, {})]),
    ])  # fmt: skip
    s.write_button("Arm", n(t + "SET_ARM"), "1", 190, y, 100)
    s.write_button("Soft trigger", n("SIG:SOFT_TRIGGER"), "1", 300, y, 120)
    s.write_button("Abort", n(t + "SET_ABORT"), "1", 430, y, 100)
    return y + ROW + 8


def _channels(sites: list[SiteLayout]) -> Iterator[tuple[SiteLayout, str]]:
    for site in sites:
        for i in range(site.spec.nchan):
            yield site, f"{i + 1:02d}"


def _plot_screen(card: CardConfig, n: CardNames, sites: list[SiteLayout], files: CardFiles,
                 kind: str) -> Screen:  # fmt: skip
    """Waveforms (volts against the timebase) or spectra (against frequency), one plot a site."""
    s = Screen(f"{card.name} {kind}", width=1200)
    y = s.heading(f"{card.name} {kind}", 10)
    y = _nav(s, files, y)
    for site in sites:
        p = f"{site.site}:"
        if kind == "waveforms":
            traces = [(f"ch {ch}", n(p + "AI:WF:TB"), n(f"{p}AI:WF:{ch}:V"))
                      for _, ch in _channels([site])]  # fmt: skip
            s.xy_plot(f"Site {site.site} {site.spec.name}: latest samples", "Time (s)",
                      "Volts (V)", traces, 10, y, 1180, 420)  # fmt: skip
        else:
            traces = [(f"ch {ch}", n(p + "AI:SPEC:FREQ"), n(f"{p}AI:SPEC:{ch}"))
                      for _, ch in _channels([site])]  # fmt: skip
            s.xy_plot(f"Site {site.site} {site.spec.name}: amplitude spectrum",
                      "Frequency (Hz)", "Amplitude (V)", traces, 10, y, 1180, 420)  # fmt: skip
        y += 430
    return s


def _channel_table(card: CardConfig, n: CardNames, sites: list[SiteLayout],
                   files: CardFiles) -> Screen:  # fmt: skip
    s = Screen(f"{card.name} channels", width=1000)
    y = s.heading(f"{card.name} channels", 10)
    y = _nav(s, files, y)
    cols = (("Mean", ""), ("Min", ":MIN"), ("Max", ":MAX"), ("RMS", ":RMS"))
    for site in sites:
        p = f"{site.site}:"
        y = s.heading(f"Site {site.site} {site.spec.name}", y + 6)
        if site.spec.gain_codes:
            s.label("All channels gain", 10, y, 170)
            s.combo(n(p + "GAIN:ALL"), 190, y, 140)
            y += ROW + 4
        x = 90
        for title, _ in cols:
            s.label(title, x, y, 150)
            x += 160
        if site.spec.gain_codes:
            s.label("Gain", x, y, 140)
        y += ROW
        for _, ch in _channels([site]):
            s.label(f"ch {ch}", 10, y, 70)
            x = 90
            for _, stat in cols:
                s.text_update(n(f"{p}AI:CH:{ch}{stat}"), x, y, 150)
                x += 160
            if site.spec.gain_codes:
                s.combo(n(f"{p}GAIN:{ch}"), x, y, 140)
            y += ROW
    return s


def _index(config: Config) -> Screen:
    s = Screen(f"{config.ioc.name} digitizers", width=900)
    y = s.heading(f"IOC {config.ioc.name}: digitizers", 10)
    for card in config.cards:
        files = CardFiles(card.name)
        n = CardNames(card, served_suffixes(card, config.ioc))
        s.led(n("CONNECTED"), 10, y + 2)
        s.label(f"{card.name} ({card.prefix})", 40, y, 200)
        s.text_update(n("STATE"), 250, y, 130)
        x = 390
        for text, file in [("Overview", files.overview), *files.plots()]:
            s.open_button(text, file, x, y, 115)
            x += 125
        y += ROW + 8
    return s


def write_screens(config: Config, outdir: Path) -> list[Path]:
    """Write every card's screens and index.bob into outdir; return the paths written."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for card in config.cards:
        n = CardNames(card, served_suffixes(card, config.ioc))
        sites = site_layouts(card)
        files = CardFiles(card.name)
        screens = {
            files.overview: _overview(card, n, sites, files),
            files.waveforms: _plot_screen(card, n, sites, files, "waveforms"),
            files.spectra: _plot_screen(card, n, sites, files, "spectra"),
            files.channels: _channel_table(card, n, sites, files),
        }
        for name, screen in screens.items():
            written.append(screen.write(outdir / name))
    written.append(_index(config).write(outdir / "index.bob"))
    log.info("wrote %d screens to %s", len(written), outdir)
    return written
