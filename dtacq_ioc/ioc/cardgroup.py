"""One PVGroup per card, built from the config.

The PV names are the project's public interface (README, "PVs"); they follow
D-TACQ's on-card IOC where the idea is the same (`<S>:AI:WF:<NN>`,
`<S>:GAIN:<NN>`, `<S>:MODEL`, `CLKDIV`, ...). Setpoints call the card's
controller; readbacks are written by `CardPVs.publish` from snapshots the
controller produces, so the card's threads never touch a PV.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from caproto import AlarmSeverity, AlarmStatus, ChannelType

from dtacq_ioc.card.models import ModuleSpec, module_spec
from dtacq_ioc.config import CardConfig, IocConfig
from dtacq_ioc.ioc import pvs
from dtacq_ioc.ioc.pvs import LINK, CheckedGroup

if TYPE_CHECKING:
    from dtacq_ioc.ioc.controller import CardController

CARD_STATES = ("DISCONNECTED", "CONNECTING", "IDLE", "RUNNING", "FAULT")
RUN_STATES = ("IDLE", "STARTING", "RUNNING", "STOPPING", "FAULT")
NO_YES = ("No", "Yes")
CLOCKS = ("Internal", "External")
# Settings kept by autosave: PV suffix -> kind of value.
SAVED = ("CLKDIV", "EXT_CLOCK", "EXT_CLOCK_FREQ", "BUFFER_SIZE", "RUN:NAME", "RUN:LOG",
         "RUN:SAVE", "RUN:UPLOAD", "RUN:DOWNSAMPLE", "RUN:TRIGGER", "RUN:TRIGGER_ARGS",
         "RUN:CHANNELS", "RUN:LOGITEMS")  # fmt: skip


@dataclass(frozen=True)
class SiteLayout:
    """Where a site's channels sit among the card's AI channels (site order)."""

    site: int
    spec: ModuleSpec
    first: int  # index of the site's first channel among all AI channels
    labels: tuple[str, ...]  # gain labels per code

    @property
    def channels(self) -> range:
        return range(self.first, self.first + self.spec.nchan)


def site_layouts(card: CardConfig) -> list[SiteLayout]:
    layouts, first = [], 0
    for site in card.sites:
        spec = module_spec(card.modules[site])
        labels = card.gain_labels.get(spec.name) or spec.gain_labels
        layouts.append(SiteLayout(site, spec, first, labels))
        first += spec.nchan
    return layouts


def _attr(suffix: str) -> str:
    return "pv_" + re.sub(r"\W", "_", suffix).lower()


@dataclass
class Update:
    """What the controller wants published: PV suffix -> value, plus alarms."""

    values: dict[str, Any] = field(default_factory=dict)
    alarms: dict[str, tuple[AlarmStatus, AlarmSeverity]] = field(default_factory=dict)
    link_ok: bool | None = None
    timestamp: float | None = None


def _put(method: str) -> pvs.Putter:
    """A putter that hands (PV suffix, value) to the group's controller method."""

    async def putter(group, instance, value):
        result = await getattr(group.controller, method)(instance.pvspec.name, value)
        if instance.alarm.severity:  # an earlier refused put left WRITE/MAJOR: this one took
            await instance.alarm.write(status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM)
        return result

    return putter


def _card_pvs(card: CardConfig, sites: list[SiteLayout]) -> dict:
    """The card-level PVs; putters call the controller class's methods by name."""
    specs = [s.spec for s in sites]
    clk_lo = max(s.min_clkdiv for s in specs)
    clk_hi = min(s.max_clkdiv for s in specs)
    sample_bytes = sum(s.nchan * s.word_size for s in specs) + 8
    max_buffer = min(s.max_buffer_bytes for s in specs)

    ro = None
    p = pvs
    return {
        "STATE": p.enum("STATE", "Card state", CARD_STATES, alarm_group=ro),
        "CONNECTED": p.enum("CONNECTED", "Card link up", NO_YES, alarm_group=ro),
        "HEARTBEAT": p.integer("HEARTBEAT", "IOC heartbeat, +1 per second", alarm_group=ro),
        "LAST_ERROR": p.long_string("LAST_ERROR", "Last error text", alarm_group=ro),
        "HOST": p.string("HOST", "Card network host", value=card.host[:39], alarm_group=ro),
        "MODEL": p.string("MODEL", "Carrier model"),
        "HOSTNAME": p.string("HOSTNAME", "Card's own host name"),
        "SERIAL": p.string("SERIAL", "Carrier serial number"),
        "FW:SW": p.string("FW:SW", "Card software version"),
        "FW:FPGA": p.long_string("FW:FPGA", "Card FPGA image"),
        "SITES": p.string("SITES", "Sites read out", value=",".join(map(str, card.sites))),
        "CLKDIV": p.integer("CLKDIV", "Clock divider", value=specs[0].default_clkdiv,
                            limits=(clk_lo, clk_hi), put=_put("put_setting")),
        "CLKDIV_RBV": p.integer("CLKDIV_RBV", "Clock divider readback"),
        "EXT_CLOCK": p.enum("EXT_CLOCK", "Clock source", CLOCKS, put=_put("put_setting")),
        "EXT_CLOCK_RBV": p.enum("EXT_CLOCK_RBV", "Clock source readback", CLOCKS),
        "EXT_CLOCK_FREQ": p.number("EXT_CLOCK_FREQ", "External clock frequency", units="Hz",
                                   precision=1, value=10e6, limits=(1.0, 1e9),
                                   put=_put("put_setting")),
        "SAMPLE_RATE_RBV": p.number("SAMPLE_RATE_RBV", "Sample rate", units="Hz", precision=1),
        "SYSCLK_RBV": p.number("SYSCLK_RBV", "Card system clock", units="Hz", precision=0),
        "BUFFER_SIZE": p.integer("BUFFER_SIZE", "Readout buffer size", units="B",
                                 value=min(max_buffer, 1 << 18), limits=(sample_bytes, max_buffer),
                                 put=_put("put_setting")),
        "AI:COUNTER": p.number("AI:COUNTER", "Spad counter of latest sample", precision=0),
        "RUN:START": p.action("RUN:START", "Start a run", _put("start_run")),
        "RUN:STOP": p.action("RUN:STOP", "Stop the run", _put("stop_run")),
        "RUN:NAME": p.long_string("RUN:NAME", "Measurement name", put=_put("put_setting"),
                                  alarm_group=ro, max_length=256),
        "RUN:LOG": p.long_string("RUN:LOG", "Run log text", put=_put("put_setting"),
                                 alarm_group=ro),
        "RUN:SAVE": p.enum("RUN:SAVE", "Write .dig files", NO_YES, value="Yes",
                           put=_put("put_setting"), alarm_group=ro),
        "RUN:UPLOAD": p.enum("RUN:UPLOAD", "Record in the catalog", NO_YES, value="Yes",
                             put=_put("put_setting"), alarm_group=ro),
        "RUN:DOWNSAMPLE": p.integer("RUN:DOWNSAMPLE", "Mean of N samples", value=1,
                                    limits=(1, 1_000_000), put=_put("put_setting"), alarm_group=ro),
        "RUN:TRIGGER": p.string("RUN:TRIGGER", "Trigger name", value="always",
                                put=_put("put_setting"), alarm_group=ro),
        "RUN:TRIGGER_ARGS": p.long_string("RUN:TRIGGER_ARGS", "Trigger arguments (JSON)",
                                          value="{}", put=_put("put_setting"), alarm_group=ro),
        "RUN:CHANNELS": p.long_string("RUN:CHANNELS", "Channels to save, empty=all",
                                      put=_put("put_setting"), alarm_group=ro),
        "RUN:LOGITEMS": p.long_string("RUN:LOGITEMS", "Extra header items (JSON)", value="{}",
                                      put=_put("put_setting"), alarm_group=ro),
        "RUN:STATE_RBV": p.enum("RUN:STATE_RBV", "Run state", RUN_STATES, alarm_group=ro),
        "RUN:ID_RBV": p.long_string("RUN:ID_RBV", "Run id", max_length=128),
        "RUN:SAMPLES_RBV": p.number("RUN:SAMPLES_RBV", "Samples in run", precision=0),
        "RUN:BYTES_RBV": p.number("RUN:BYTES_RBV", "Bytes written", units="B", precision=0),
        "RUN:FILE_RBV": p.long_string("RUN:FILE_RBV", "Current run file", max_length=1024),
        "RUN:ERRORS_RBV": p.integer("RUN:ERRORS_RBV", "Counter errors in run", alarm_group=ro),
        "RUN:OVERRUNS_RBV": p.integer("RUN:OVERRUNS_RBV", "Buffers lost to disk", alarm_group=ro),
        "RUN:ELAPSED_RBV": p.number("RUN:ELAPSED_RBV", "Run time", units="s", precision=1),
        "RUN:FAULT_RBV": p.long_string("RUN:FAULT_RBV", "Why the run failed", alarm_group=ro),
        "RUN:LAST_RESULT": p.long_string("RUN:LAST_RESULT", "Last run result (JSON)",
                                         alarm_group=ro, max_length=16384),
        "RUN:RECENT": p.long_string("RUN:RECENT", "Recent runs (JSON)", alarm_group=ro,
                                    max_length=65536),
        "TRIGGERS": p.long_string("TRIGGERS", "Trigger names (JSON)", alarm_group=ro),
        "STREAM:MBPS": p.number("STREAM:MBPS", "Stream rate", units="MB/s", precision=2),
        "STREAM:BUFFERS": p.number("STREAM:BUFFERS", "Buffers received", precision=0),
        "STREAM:SAMPLES": p.number("STREAM:SAMPLES", "Samples received", precision=0),
        "STREAM:COUNTER_ERRORS": p.integer("STREAM:COUNTER_ERRORS", "Counter jumps",
                                           alarm_group=ro),
        "RESET": p.action("RESET", "Jump-start the readout", _put("reset")),
        "REBOOT": p.action("REBOOT", "Reboot the card over SSH", _put("reboot")),
    }  # fmt: skip


def _site_pvs(s: SiteLayout, n: int) -> dict:
    spec, p, pre = s.spec, pvs, f"{s.site}:"
    raw_type = ChannelType.INT if spec.word_size == 2 else ChannelType.LONG
    nspec = n // 2 + 1

    out = {
        pre + "MODEL": p.string(pre + "MODEL", "Module model"),
        pre + "PART_NUM": p.string(pre + "PART_NUM", "Module part number"),
        pre + "SERIAL": p.string(pre + "SERIAL", "Module serial number"),
        pre + "NCHAN": p.integer(pre + "NCHAN", "AI channels", value=spec.nchan),
        pre + "WORD_SIZE": p.integer(pre + "WORD_SIZE", "Bytes per sample word", units="B",
                                     value=spec.word_size),
        pre + "BIT_SHIFT": p.integer(pre + "BIT_SHIFT", "Right shift to ADC code",
                                     value=spec.bit_shift),
        pre + "DIVIDER_RBV": p.integer(pre + "DIVIDER_RBV", "Clock divider base",
                                       value=spec.divider),
        pre + "CLKDIV_MIN": p.integer(pre + "CLKDIV_MIN", "Lowest clkdiv", value=spec.min_clkdiv),
        pre + "BUFFER_MAX": p.integer(pre + "BUFFER_MAX", "Largest buffer", units="B",
                                      value=spec.max_buffer_bytes),
        pre + "AI:WF:TB": p.waveform(pre + "AI:WF:TB", "Timebase", ChannelType.DOUBLE, n,
                                     units="s", precision=6),
        pre + "AI:SPEC:FREQ": p.waveform(pre + "AI:SPEC:FREQ", "Spectrum frequency axis",
                                         ChannelType.DOUBLE, nspec, units="Hz", precision=1),
    }  # fmt: skip
    if spec.gain_codes:
        out[pre + "GAIN:ALL"] = p.enum(
            pre + "GAIN:ALL", "Gain of all channels", s.labels, put=_put("put_gain")
        )
    for i in range(spec.nchan):
        ch = f"{i + 1:02d}"
        if spec.gain_codes:
            out[f"{pre}GAIN:{ch}"] = p.enum(
                f"{pre}GAIN:{ch}", f"Gain of channel {ch}", s.labels, put=_put("put_gain")
            )
        wf = f"{pre}AI:WF:{ch}"
        out[wf] = p.waveform(wf, f"Ch {ch} latest samples, raw", raw_type, n)
        # Volts and spectra are computed only while watched or when read (pvs._Derived).
        out[wf + ":V"] = p.waveform(
            wf + ":V", f"Ch {ch} latest samples", ChannelType.DOUBLE, n, units="V",
            precision=5, derived=True,
        )  # fmt: skip
        sp = f"{pre}AI:SPEC:{ch}"
        out[sp] = p.waveform(
            sp, f"Ch {ch} amplitude spectrum", ChannelType.DOUBLE, nspec, units="V",
            precision=6, derived=True,
        )  # fmt: skip
        mean = f"{pre}AI:CH:{ch}"
        out[mean] = p.number(mean, f"Ch {ch} mean", units="V", precision=5)
        for stat, what in (("MIN", "minimum"), ("MAX", "maximum"), ("RMS", "RMS")):
            out[f"{mean}:{stat}"] = p.number(
                f"{mean}:{stat}", f"Ch {ch} {what}", units="V", precision=5
            )
    return out


def build_group_class(card: CardConfig, ioc: IocConfig) -> type[CheckedGroup]:
    """A PVGroup subclass with every PV of this card (names relative to its prefix)."""
    sites = site_layouts(card)
    props = _card_pvs(card, sites)
    for s in sites:
        props.update(_site_pvs(s, ioc.display_samples))
    attrs = {_attr(suffix): prop for suffix, prop in props.items()}
    return type(f"Card{card.name}", (CheckedGroup,), attrs)


class CardPVs:
    """The live PVs of one card, and the only code that writes their readbacks."""

    def __init__(self, card: CardConfig, ioc: IocConfig, controller: CardController,
                 access: pvs.AccessRules | None):  # fmt: skip
        self.config = card
        self.sites = site_layouts(card)
        cls = build_group_class(card, ioc)
        self.group = cls(prefix=card.prefix)
        self.group.controller = controller  # type: ignore[attr-defined]
        self.group.access_rules = access
        self.pvdb = self.group.pvdb
        self._last: dict[str, Any] = {}
        self._link_ok: bool | None = None

    def pv(self, suffix: str):
        return self.pvdb[self.config.prefix + suffix]

    def value(self, suffix: str) -> Any:
        return self.pv(suffix).value

    async def publish(self, update: Update) -> None:
        """Write changed values; arrays are always new when given."""
        if update.link_ok is not None and update.link_ok != self._link_ok:
            self._link_ok = update.link_ok
            alarm = self.group.alarms[LINK]
            if update.link_ok:
                await alarm.write(status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM)
            else:
                await alarm.write(status=AlarmStatus.COMM, severity=AlarmSeverity.INVALID_ALARM)
        for suffix, value in update.values.items():
            is_array = isinstance(value, np.ndarray)
            if not is_array and self._last.get(suffix, _MISSING) == value:
                continue
            self._last[suffix] = None if is_array else value
            await self.pv(suffix).write(value, verify_value=False, timestamp=update.timestamp)
        for suffix, (status, severity) in update.alarms.items():
            key = suffix + ".alarm"
            if self._last.get(key) == (status, severity):
                continue
            self._last[key] = (status, severity)
            await self.pv(suffix).write_metadata(status=status, severity=severity)


_MISSING = object()
