"""`dtacq-ioc screens`: real processes write the .bob files; a real IOC serves every PV in them.

The screens are written from the config (sim.toml itself, and a card with two sites);
then `dtacq-ioc run` serves the same cards on loopback addresses of the test's own and
pyepics (libca) connects to every name the screens reference, all at once.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import epics
import pytest
from ioc_support import ioc_process, ioc_toml, new_prefix
from support import ROOT, free_port, random_loopback

from dtacq_ioc.config import load_config
from dtacq_ioc.ioc.screens import CardNames, served_names, served_suffixes

SIM_TOML = ROOT / "ioc_configs" / "sim.toml"
CONNECT_TIMEOUT_S = 20.0


@dataclass
class Refs:
    """What a set of screens asks of the IOC."""

    read: set[str] = field(default_factory=set)  # every PV a widget or action names
    write: set[str] = field(default_factory=set)  # PVs an operator writes through the screen
    enums: set[str] = field(default_factory=set)  # PVs shown in combo boxes
    files: set[str] = field(default_factory=set)  # displays opened by buttons


def write_screens(config: Path, outdir: Path) -> list[Path]:
    """`python -m dtacq_ioc screens CONFIG -o DIR` as a real process; the paths it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "screens", str(config), "-o", str(outdir)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert paths and all(p.parent == outdir and p.suffix == ".bob" for p in paths)
    return paths


def check_layout(root: ET.Element, path: Path) -> None:
    """Widgets lie inside the display and never on top of each other."""
    width, height = int(root.findtext("width")), int(root.findtext("height"))
    boxes = []
    for w in root.findall("widget"):
        x, y, dx, dy = (int(w.findtext(t)) for t in ("x", "y", "width", "height"))
        assert min(x, y) >= 0 and x + dx <= width and y + dy <= height, (path.name, x, y)
        boxes.append((x, y, x + dx, y + dy, w.findtext("name")))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"{path.name}: {a[4]} overlaps {b[4]}"


def collect(paths: list[Path]) -> Refs:
    refs = Refs()
    for path in paths:
        root = ET.parse(path).getroot()  # raises on malformed XML
        assert root.tag == "display" and root.get("version") == "2.0.0", path
        check_layout(root, path)
        for widget in root.iter("widget"):
            kind = widget.get("type")
            pv = widget.findtext("pv_name")
            if pv:
                refs.read.add(pv)
                if kind in ("textentry", "combo"):
                    refs.write.add(pv)
                if kind == "combo":
                    refs.enums.add(pv)
        for trace in root.iter("trace"):
            for tag in ("x_pv", "y_pv"):
                if trace.findtext(tag):
                    refs.read.add(trace.findtext(tag))
        for action in root.iter("action"):
            if action.get("type") == "write_pv":
                refs.read.add(action.findtext("pv_name"))
                refs.write.add(action.findtext("pv_name"))
            elif action.get("type") == "open_display":
                refs.files.add(action.findtext("file"))
    return refs


def connect_all(names: set[str], timeout: float = CONNECT_TIMEOUT_S) -> dict[str, epics.PV]:
    """Connect to every name in parallel (libca searches them together); fail naming the rest."""
    pvs = {name: epics.PV(name, auto_monitor=False) for name in sorted(names)}
    deadline = time.monotonic() + timeout
    for pv in pvs.values():
        pv.wait_for_connection(timeout=max(0.1, deadline - time.monotonic()))
    missing = sorted(name for name, pv in pvs.items() if not pv.connected)
    assert not missing, f"{len(missing)} screen PVs not served: {missing[:20]}"
    return pvs


def check_against_ioc(refs: Refs) -> None:
    pvs = connect_all(refs.read)
    try:
        not_writable = sorted(n for n in refs.write if not pvs[n].write_access)
        assert not not_writable, f"screen writes to read-only PVs: {not_writable}"
        not_enum = sorted(n for n in refs.enums if not pvs[n].type.endswith("enum"))
        assert not not_enum, f"combo boxes on non-enum PVs: {not_enum}"
    finally:
        for pv in pvs.values():
            pv.disconnect()


def sim_copy(tmp_path: Path) -> Path:
    """sim.toml with its cards on fresh loopback addresses, no bridge, and data under tmp_path.

    PV names depend only on prefixes, modules and display_samples, which stay as they are.
    """
    text = SIM_TOML.read_text()
    subs = [
        ('host = "127.0.0.2"', f'host = "{random_loopback()}"'),
        ('host = "127.0.0.3"', f'host = "{random_loopback()}"'),
        ("enabled = true", "enabled = false"),
        ("port = 2222", f"port = {free_port()}"),
    ]
    for old, new in subs:
        assert old in text, f"sim.toml changed: {old!r} not found; update this test"
        text = text.replace(old, new)
    directory = tmp_path / "configs"
    directory.mkdir()
    (tmp_path / "triggers").mkdir()  # its trigger_dir, "../triggers", must exist
    path = directory / "sim.toml"
    path.write_text(text)
    return path


def test_sim_toml_screens_reference_only_pvs_the_ioc_serves(tmp_path):
    outdir = tmp_path / "screens"
    paths = write_screens(SIM_TOML, outdir)
    config = load_config(SIM_TOML)
    names = {p.name for p in paths}
    for card in config.cards:
        for kind in ("overview", "waveforms", "spectra", "channels"):
            assert f"{card.name}_{kind}.bob" in names
    assert "index.bob" in names
    refs = collect(paths)
    assert refs.files <= names, refs.files - names
    assert refs.read <= served_names(config)
    # The overview carries the run control, actions and settings; plots their axes.
    for card in config.cards:
        for suffix in ("RUN:START", "RUN:STOP", "RESET", "REBOOT", "CLKDIV", "1:GAIN:16",
                       "1:AI:WF:TB", "1:AI:SPEC:FREQ", "1:AI:WF:16:V",
                       "1:AI:CH:16:RMS"):  # fmt: skip
            assert card.prefix + suffix in refs.read, suffix

    copy = sim_copy(tmp_path)
    prefix = config.cards[0].prefix
    host = re.search(r'host = "([\d.]+)"', copy.read_text()).group(1)
    with ioc_process(copy, prefix, host):
        check_against_ioc(refs)


def test_two_site_card_gets_both_sites_on_every_screen(tmp_path, loopback):
    prefix = new_prefix()
    second_site = '\n[[cards.sim.sites]]\nsite = 2\nmodule = "ACQ425ELF"\n'
    config = ioc_toml(tmp_path, loopback, prefix, site_extra=second_site)
    paths = write_screens(config, tmp_path / "screens")
    refs = collect(paths)
    for site in (1, 2):
        for suffix in ("MODEL", "GAIN:ALL", "GAIN:16", "AI:WF:TB", "AI:WF:16:V", "AI:SPEC:16",
                       "AI:SPEC:FREQ", "AI:CH:16", "AI:CH:01:MIN"):  # fmt: skip
            assert f"{prefix}{site}:{suffix}" in refs.read, (site, suffix)
    with ioc_process(config, prefix, loopback):
        check_against_ioc(refs)


def test_screens_of_a_bad_config_fail_with_one_line_per_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[ioc]\ndisplay_samples = 3\n[[cards]]\nname = "X"\n')
    done = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "screens", str(bad), "-o", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "display_samples" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_asking_for_a_pv_the_card_does_not_serve_is_refused():
    config = load_config(SIM_TOML)
    card = config.cards[0]
    names = CardNames(card, served_suffixes(card, config.ioc))
    assert names("CLKDIV") == card.prefix + "CLKDIV"
    with pytest.raises(KeyError, match="NO_SUCH_PV"):
        names("NO_SUCH_PV")


# --- Phoebus reads only the properties its widget model defines ---
#
# Facts from Phoebus's Display Builder model (app/display/model, ...builder/model/): the
# XML names of the properties each widget class defines in defineProperties, with those
# of its base classes (Widget, VisibleWidget, MacroWidget, PVWidget, WritablePVWidget),
# runtime-only properties left out. Phoebus skips any other element silently.
WIDGET = {"type", "name", "class", "x", "y", "width", "height", "actions", "rules", "scripts"}
VISIBLE = WIDGET | {"visible", "tooltip"}
PV = VISIBLE | {"pv_name", "border_alarm_sensitive"}
PHOEBUS_PROPERTIES: dict[str, set[str]] = {
    "display": WIDGET | {"macros", "background_color", "grid_visible", "grid_color",
                         "grid_step_x", "grid_step_y"},
    "label": VISIBLE | {"macros", "text", "font", "foreground_color", "background_color",
                        "transparent", "horizontal_alignment", "vertical_alignment",
                        "rotation_step", "auto_size", "wrap_words"},
    "textupdate": PV | {"font", "foreground_color", "background_color", "transparent", "format",
                        "precision", "show_units", "horizontal_alignment",
                        "vertical_alignment", "wrap_words", "rotation_step", "interactive"},
    "textentry": PV | {"font", "foreground_color", "background_color", "format", "precision",
                       "show_units", "horizontal_alignment", "vertical_alignment", "enabled",
                       "wrap_words", "multi_line"},
    "combo": PV | {"font", "foreground_color", "background_color", "items", "items_from_pv",
                   "editable", "enabled", "show_confirm_dialog", "confirm_message", "password"},
    "led": PV | {"bit", "off_label", "off_color", "on_label", "on_color", "font",
                 "foreground_color", "line_color", "square", "labels_from_pv"},
    "action_button": PV | {"text", "font", "foreground_color", "background_color", "transparent",
                           "horizontal_alignment", "vertical_alignment", "rotation_step",
                           "enabled", "show_confirm_dialog", "confirm_message", "password"},
    "xyplot": VISIBLE | {"foreground_color", "background_color", "title", "title_font",
                         "show_toolbar", "show_legend", "x_axis", "y_axes", "traces", "marker"},
}  # fmt: skip
# Structured properties of the plot (PlotWidgetProperties: AxisWidgetProperty,
# YAxisWidgetProperty, TraceWidgetProperty) and the actions' own elements
# (ActionInfoBase's description; OpenDisplayAction, WritePVAction).
AXIS = {"title", "autoscale", "log_scale", "minimum", "maximum", "show_grid", "title_font",
        "scale_font", "visible"}  # fmt: skip
PHOEBUS_PARTS: dict[str, set[str]] = {
    "x_axis": AXIS,
    "y_axis": AXIS | {"on_right", "color"},
    "trace": {"name", "x_pv", "y_pv", "err_pv", "axis", "trace_type", "color", "line_width",
              "line_style", "point_type", "point_size", "visible"},
    "action:open_display": {"description", "file", "target", "name", "macros"},
    "action:write_pv": {"description", "pv_name", "value"},
}  # fmt: skip


def unknown_properties(root: ET.Element) -> list[str]:
    def check(el: ET.Element, allowed: set[str], where: str) -> list[str]:
        return [f"{where}: <{c.tag}>" for c in el if c.tag != "widget" and c.tag not in allowed]

    out = check(root, PHOEBUS_PROPERTIES["display"], "display")
    for w in root.iter("widget"):
        kind, where = w.get("type", ""), f"{w.get('type')} {w.findtext('name')!r}"
        out += check(w, PHOEBUS_PROPERTIES.get(kind, set()), where)
        for axis in [*w.findall("x_axis"), *w.findall("y_axes/y_axis")]:
            out += check(axis, PHOEBUS_PARTS[axis.tag], f"{where} {axis.tag}")
        for holder, part in (("y_axes", "y_axis"), ("traces", "trace")):
            for el in w.findall(holder):
                out += check(el, {part}, f"{where} {holder}")
        for trace in w.findall("traces/trace"):
            out += check(trace, PHOEBUS_PARTS["trace"], f"{where} trace")
        for action in w.findall("actions/action"):
            part = f"action:{action.get('type')}"
            out += check(action, PHOEBUS_PARTS.get(part, set()), f"{where} {part}")
    return out


def test_screens_use_only_properties_phoebus_reads(tmp_path):
    paths = write_screens(SIM_TOML, tmp_path / "screens")
    kinds = set()
    problems = []
    for path in paths:
        root = ET.parse(path).getroot()
        kinds |= {w.get("type") for w in root.iter("widget")}
        problems += [f"{path.name}: {p}" for p in unknown_properties(root)]
    assert kinds <= set(PHOEBUS_PROPERTIES), kinds - set(PHOEBUS_PROPERTIES)
    assert not problems, "\n".join(problems[:30])


def test_reset_and_reboot_ask_for_confirmation(tmp_path):
    paths = write_screens(SIM_TOML, tmp_path / "screens")
    config = load_config(SIM_TOML)
    buttons = {}
    for path in paths:
        for w in ET.parse(path).getroot().iter("widget"):
            pv = w.findtext("actions/action/pv_name")
            if w.get("type") == "action_button" and pv:
                buttons[pv] = w
    for card in config.cards:
        for suffix in ("RESET", "REBOOT"):
            button = buttons[card.prefix + suffix]
            assert button.findtext("show_confirm_dialog") == "true", suffix
            assert len(button.findtext("confirm_message") or "") > 10, suffix
        for suffix in ("RUN:START", "RUN:STOP"):
            assert buttons[card.prefix + suffix].findtext("show_confirm_dialog") is None
