"""One PVGroup per card, built from the config.

The PV names are the project's public interface (README, "PVs"); they follow
D-TACQ's on-card IOC where the idea is the same (`<S>:AI:WF:<NN>`,
`<S>:GAIN:<NN>`, `<S>:MODEL`, `CLKDIV`, ...). Setpoints call the card's
controller; readbacks are written by `CardPVs.publish` from snapshots the
controller produces, so the card's threads never touch a PV.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np
from caproto import AlarmSeverity, AlarmStatus, ChannelType

from dtacq_ioc.card.models import ModuleSpec, module_spec
from dtacq_ioc.card.transient import MAX_OSAM, MAX_POST, MAX_PRE, ShotState
from dtacq_ioc.config import CardConfig, IocConfig
from dtacq_ioc.contract import CARD_STATES, CLOCKS, NO_YES, RUN_STATES, StreamLayout
from dtacq_ioc.ioc import pvs
from dtacq_ioc.ioc.pvs import LINK, CheckedGroup, Handler

SHOT_MODES = ("CONTINUOUS", "TRANSIENT")
TRANS_STATES = tuple(state.name for state in ShotState)  # MODE:TRANS_ACT:STATE
MIN_BUFFER_BYTES = 64 << 10  # below this the per-buffer cost outruns a fast stream


class SettingHandlers(Protocol):
    """What card setting PVs call on a put (ioc/settings.py)."""

    async def put_clkdiv(self, value: Any) -> Any: ...
    async def put_ext_clock(self, value: Any) -> Any: ...
    async def put_ext_clock_freq(self, value: Any) -> Any: ...
    async def put_buffer_size(self, value: Any) -> Any: ...
    async def put_sites(self, value: Any) -> Any: ...
    async def put_gain(self, site: int, channel: int | None, value: Any) -> Any: ...


class RunHandlers(Protocol):
    """What run PVs call on a put (ioc/runs.py)."""

    def handler(self, suffix: str) -> Handler: ...
    async def start(self, value: Any) -> Any: ...
    async def stop(self, value: Any) -> Any: ...


class ShotHandlers(Protocol):
    """What the transient-capture actions call (ioc/shots.py ShotControl)."""

    async def put_mode(self, value: Any) -> Any: ...
    async def arm(self, value: Any) -> Any: ...
    async def abort(self, value: Any) -> Any: ...
    async def soft_trigger(self, value: Any) -> Any: ...


class ShotSettingHandlers(Protocol):
    """What the transient-capture settings call (ioc/shots.py ShotSettings)."""

    async def put_pre(self, value: Any) -> Any: ...
    async def put_post(self, value: Any) -> Any: ...
    async def put_osam(self, value: Any) -> Any: ...
    async def put_demux(self, value: Any) -> Any: ...
    async def put_soft_trigger(self, value: Any) -> Any: ...
    async def put_trigger(self, value: Any) -> Any: ...
    async def put_auto_rearm(self, value: Any) -> Any: ...


class ActionHandlers(Protocol):
    """What the card's action PVs call (ioc/link.py)."""

    async def reset(self, value: Any) -> Any: ...
    async def reboot(self, value: Any) -> Any: ...


@dataclass(frozen=True)
class Handlers:
    settings: SettingHandlers
    runs: RunHandlers
    actions: ActionHandlers
    shots: ShotHandlers
    shot_settings: ShotSettingHandlers


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


def site_layouts(card: CardConfig, sites: tuple[int, ...] | None = None) -> list[SiteLayout]:
    """The layouts of `sites` (default: the config's) as a stream aggregating them has them."""
    layouts, first = [], 0
    for site in card.sites if sites is None else sites:
        spec = module_spec(card.modules[site])
        labels = card.gain_labels.get(spec.name) or spec.gain_labels
        layouts.append(SiteLayout(site, spec, first, labels))
        first += spec.nchan
    return layouts


def sites_text(sites: tuple[int, ...]) -> str:
    """SITES as it reads: "1,2"."""
    return ",".join(map(str, sites))


def _attr(suffix: str) -> str:
    return "pv_" + re.sub(r"\W", "_", suffix).lower()


@dataclass
class Update:
    """What the controller wants published: PV suffix -> value, plus alarms."""

    values: dict[str, Any] = field(default_factory=dict)
    alarms: dict[str, tuple[AlarmStatus, AlarmSeverity]] = field(default_factory=dict)
    link_ok: bool | None = None
    timestamp: float | None = None


def sample_bytes(sites: list[SiteLayout]) -> int:
    """Bytes of one sample of these sites, as the card's StreamLayout counts them (ssb)."""
    sites_nchan = tuple(s.spec.nchan for s in sites)
    layout = StreamLayout(tuple(s.site for s in sites), sites_nchan, buffer_word(sites))
    return layout.sample_bytes


def buffer_word(sites: list[SiteLayout]) -> int:
    """Bytes per AI word of the aggregated stream (one size for every site)."""
    return max(s.spec.word_size for s in sites)


def buffer_type(sites: list[SiteLayout]) -> ChannelType:
    return ChannelType.INT if buffer_word(sites) == 2 else ChannelType.LONG


def _card_pvs(card: CardConfig, sites: list[SiteLayout], h: Handlers) -> dict[str, Any]:
    """The card-level PVs. LINK: the value comes from the card (INVALID while it is away)."""
    specs = [s.spec for s in sites]
    clk_lo = max(s.min_clkdiv for s in specs)
    clk_hi = min(s.max_clkdiv for s in specs)
    max_buffer = min(s.max_buffer_bytes for s in specs)
    min_buffer = min(max(sample_bytes(sites), MIN_BUFFER_BYTES), max_buffer)
    st = h.settings
    p = pvs
    return {
        **_run_pvs(h.runs),
        # The old protocol's readBuffer hands out whole run buffers: the newest, as sent.
        "RUN:BUFFER": p.waveform("RUN:BUFFER", "Latest run buffer, AI words",
                                 buffer_type(sites), max_buffer // buffer_word(sites),
                                 alarm_group=LINK),
        **_stream_pvs(h.actions),
        **_shot_pvs(h.shots, h.shot_settings),
        "STATE": p.enum("STATE", "Card state", CARD_STATES),
        "CONNECTED": p.enum("CONNECTED", "Card link up", NO_YES),
        "HEARTBEAT": p.integer("HEARTBEAT", "IOC heartbeat, +1 per second"),
        "LAST_ERROR": p.long_string("LAST_ERROR", "Last error text"),
        "HOST": p.string("HOST", "Card network host", value=card.host),
        "MODEL": p.string("MODEL", "Carrier model", alarm_group=LINK),
        "HOSTNAME": p.string("HOSTNAME", "Card's own host name", alarm_group=LINK),
        "SERIAL": p.string("SERIAL", "Carrier serial number", alarm_group=LINK),
        "FW:SW": p.string("FW:SW", "Card software version", alarm_group=LINK),
        "FW:FPGA": p.long_string("FW:FPGA", "Card FPGA image", alarm_group=LINK),
        "SITELIST": p.string("SITELIST", "Sites the IOC can read", value=sites_text(card.sites)),
        "SITES": p.string("SITES", "Sites read out", value=sites_text(card.sites),
                          put=st.put_sites, saved=True),
        "CLKDIV": p.integer("CLKDIV", "Clock divider", value=specs[0].default_clkdiv,
                            limits=(clk_lo, clk_hi), put=st.put_clkdiv, saved=True),
        "CLKDIV_RBV": p.integer("CLKDIV_RBV", "Clock divider readback", alarm_group=LINK),
        "EXT_CLOCK": p.enum("EXT_CLOCK", "Clock source", CLOCKS, put=st.put_ext_clock,
                            saved=True),
        "EXT_CLOCK_RBV": p.enum("EXT_CLOCK_RBV", "Clock source readback", CLOCKS,
                                alarm_group=LINK),
        "EXT_CLOCK_FREQ": p.number("EXT_CLOCK_FREQ", "External clock frequency", units="Hz",
                                   precision=1, value=10e6, limits=(1.0, 1e9),
                                   put=st.put_ext_clock_freq, saved=True),
        "SAMPLE_RATE_RBV": p.number("SAMPLE_RATE_RBV", "Sample rate", units="Hz", precision=1,
                                    alarm_group=LINK),
        "SYSCLK_RBV": p.number("SYSCLK_RBV", "Card system clock", units="Hz", precision=0,
                               alarm_group=LINK),
        "BUFFER_SIZE": p.integer("BUFFER_SIZE", "Readout buffer size", units="B",
                                 value=max(min(max_buffer, 1 << 18), min_buffer),
                                 limits=(min_buffer, max_buffer), put=st.put_buffer_size,
                                 saved=True),
        # The spad counter is 32 bits unsigned: it passes 2**31, so it is a DOUBLE.
        "AI:COUNTER": p.number("AI:COUNTER", "Spad counter of latest sample", precision=0,
                               alarm_group=LINK),
    }  # fmt: skip


def _run_pvs(run: RunHandlers) -> dict[str, Any]:
    """Run control and run readbacks."""
    p = pvs
    return {
        "RUN:START": p.action("RUN:START", "Start a run", run.start),
        "RUN:STOP": p.action("RUN:STOP", "Stop the run", run.stop),
        "RUN:NAME": p.long_string("RUN:NAME", "Measurement name", put=run.handler("RUN:NAME"),
                                  max_length=256, saved=True),
        "RUN:LOG": p.long_string("RUN:LOG", "Run log text", put=run.handler("RUN:LOG"),
                                 saved=True),
        "RUN:SAVE": p.enum("RUN:SAVE", "Write .dig files", NO_YES, value="Yes",
                           put=run.handler("RUN:SAVE"), saved=True),
        "RUN:UPLOAD": p.enum("RUN:UPLOAD", "Record in the catalog", NO_YES, value="Yes",
                             put=run.handler("RUN:UPLOAD"), saved=True),
        "RUN:DOWNSAMPLE": p.integer("RUN:DOWNSAMPLE", "Mean of N samples", value=1,
                                    limits=(1, 1_000_000), put=run.handler("RUN:DOWNSAMPLE"),
                                    saved=True),
        "RUN:TRIGGER": p.string("RUN:TRIGGER", "Trigger name", value="always",
                                put=run.handler("RUN:TRIGGER"), saved=True),
        "RUN:TRIGGER_ARGS": p.long_string("RUN:TRIGGER_ARGS", "Trigger arguments (JSON)",
                                          value="{}", put=run.handler("RUN:TRIGGER_ARGS"),
                                          saved=True),
        "RUN:CHANNELS": p.long_string("RUN:CHANNELS", "Channels to save, empty=all",
                                      put=run.handler("RUN:CHANNELS"), saved=True),
        "RUN:LOGITEMS": p.long_string("RUN:LOGITEMS", "Extra header items (JSON)", value="{}",
                                      put=run.handler("RUN:LOGITEMS"), saved=True),
        "RUN:STATE_RBV": p.enum("RUN:STATE_RBV", "Run state", RUN_STATES),
        "RUN:ID_RBV": p.string("RUN:ID_RBV", "Run id"),
        # Samples and bytes of a run pass 2**31 (36 min at 1 MHz): DOUBLE, not LONG.
        "RUN:SAMPLES_RBV": p.number("RUN:SAMPLES_RBV", "Samples in run", precision=0),
        "RUN:BYTES_RBV": p.number("RUN:BYTES_RBV", "Bytes written", units="B", precision=0),
        "RUN:FILE_RBV": p.long_string("RUN:FILE_RBV", "Current run file", max_length=1024),
        "RUN:ERRORS_RBV": p.integer("RUN:ERRORS_RBV", "Counter errors in run"),
        "RUN:OVERRUNS_RBV": p.integer("RUN:OVERRUNS_RBV", "Buffers lost to disk"),
        "RUN:ELAPSED_RBV": p.number("RUN:ELAPSED_RBV", "Run time", units="s", precision=1),
        "RUN:FAULT_RBV": p.long_string("RUN:FAULT_RBV", "Why the run failed"),
        "RUN:LAST_RESULT": p.long_string("RUN:LAST_RESULT", "Last run result (JSON)",
                                         max_length=16384),
        "RUN:RECENT": p.long_string("RUN:RECENT", "Recent runs (JSON)", max_length=65536),
        "TRIGGERS": p.long_string("TRIGGERS", "Trigger names (JSON)"),
    }  # fmt: skip


def _shot_pvs(sh: ShotHandlers, ss: ShotSettingHandlers) -> dict[str, Any]:
    """Transient capture, named as D-TACQ's on-card IOC names it."""
    p, t = pvs, "MODE:TRANSIENT:"
    return {
        "MODE": p.enum("MODE", "Continuous stream or transient shots", SHOT_MODES,
                       put=sh.put_mode),
        t + "PRE": p.integer(t + "PRE", "Samples before the trigger", limits=(0, MAX_PRE),
                             put=ss.put_pre, saved=True),
        t + "POST": p.integer(t + "POST", "Samples after the trigger", value=100_000,
                              limits=(1, MAX_POST), put=ss.put_post, saved=True),
        t + "OSAM": p.integer(t + "OSAM", "Sub-sampling of the shot", value=1,
                              limits=(1, MAX_OSAM), put=ss.put_osam, saved=True),
        t + "DEMUX": p.enum(t + "DEMUX", "Card demultiplexes the shot", NO_YES, value="Yes",
                            put=ss.put_demux, saved=True),
        t + "SOFT_TRIGGER": p.enum(t + "SOFT_TRIGGER", "Soft trigger once armed", NO_YES,
                                   put=ss.put_soft_trigger, saved=True),
        t + "TRIGGER": p.string(t + "TRIGGER", "Trigger: soft, or dN rising|falling",
                                value="soft", put=ss.put_trigger, saved=True),
        t + "AUTO_REARM": p.enum(t + "AUTO_REARM", "Arm again after each shot", NO_YES,
                                 put=ss.put_auto_rearm, saved=True),
        t + "SET_ARM": p.action(t + "SET_ARM", "Arm a shot", sh.arm),
        t + "SET_ABORT": p.action(t + "SET_ABORT", "Abort the shot", sh.abort),
        "SIG:SOFT_TRIGGER": p.action("SIG:SOFT_TRIGGER", "Soft trigger", sh.soft_trigger),
        "MODE:TRANS_ACT:STATE": p.enum("MODE:TRANS_ACT:STATE", "Transient state",
                                       TRANS_STATES, alarm_group=LINK),
        "MODE:TRANS_ACT:PRE": p.integer("MODE:TRANS_ACT:PRE", "Pre samples taken",
                                        alarm_group=LINK),
        "MODE:TRANS_ACT:POST": p.integer("MODE:TRANS_ACT:POST", "Post samples taken",
                                         alarm_group=LINK),
        "MODE:TRANS_ACT:TOTSAM": p.integer("MODE:TRANS_ACT:TOTSAM", "Shot samples",
                                           alarm_group=LINK),
        "SHOT": p.integer("SHOT", "Shot number of the last shot"),
    }  # fmt: skip


def _stream_pvs(actions: ActionHandlers) -> dict[str, Any]:
    """Stream figures and the card's actions."""
    p = pvs
    return {
        "STREAM:MBPS": p.number("STREAM:MBPS", "Stream rate", units="MB/s", precision=2,
                                alarm_group=LINK),
        "STREAM:BUFFERS": p.integer("STREAM:BUFFERS", "Buffers received", alarm_group=LINK),
        # Samples pass 2**31 after 36 min at 1 MHz: DOUBLE.
        "STREAM:SAMPLES": p.number("STREAM:SAMPLES", "Samples received", precision=0,
                                   alarm_group=LINK),
        "STREAM:COUNTER_ERRORS": p.integer("STREAM:COUNTER_ERRORS", "Counter jumps"),
        "RESET": p.action("RESET", "Jump-start the readout", actions.reset),
        "REBOOT": p.action("REBOOT", "Reboot the card over SSH", actions.reboot),
    }  # fmt: skip


def _site_pvs(s: SiteLayout, n: int, settings: SettingHandlers) -> dict[str, Any]:
    spec, p, pre = s.spec, pvs, f"{s.site}:"
    raw_type = ChannelType.INT if spec.word_size == 2 else ChannelType.LONG
    nspec = n // 2 + 1

    out = {
        pre + "MODEL": p.string(pre + "MODEL", "Module model", alarm_group=LINK),
        pre + "PART_NUM": p.string(pre + "PART_NUM", "Module part number", alarm_group=LINK),
        pre + "SERIAL": p.string(pre + "SERIAL", "Module serial number", alarm_group=LINK),
        pre + "NCHAN": p.integer(pre + "NCHAN", "AI channels", value=spec.nchan,
                                 alarm_group=LINK),
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
                                     units="s", precision=6, alarm_group=LINK),
        pre + "AI:TW:TB": p.waveform(pre + "AI:TW:TB", "Last shot's time from trigger",
                                     ChannelType.DOUBLE, n, units="s", precision=6),
        pre + "AI:SPEC:FREQ": p.waveform(pre + "AI:SPEC:FREQ", "Spectrum frequency axis",
                                         ChannelType.DOUBLE, nspec, units="Hz", precision=1,
                                         alarm_group=LINK),
    }  # fmt: skip
    if spec.gain_codes:
        out[pre + "GAIN:ALL"] = p.enum(
            pre + "GAIN:ALL",
            "Gain of all channels",
            s.labels,
            put=partial(settings.put_gain, s.site, None),
        )
    for i in range(spec.nchan):
        ch = f"{i + 1:02d}"
        if spec.gain_codes:
            out[f"{pre}GAIN:{ch}"] = p.enum(
                f"{pre}GAIN:{ch}",
                f"Gain of channel {ch}",
                s.labels,
                put=partial(settings.put_gain, s.site, i + 1),
                saved=True,
            )
        out.update(_channel_pvs(pre, ch, raw_type, n, nspec))
    return out


def _channel_pvs(pre: str, ch: str, raw_type: ChannelType, n: int, nspec: int) -> dict[str, Any]:
    """One channel's waveforms, spectrum and statistics (all from the card: LINK)."""
    p = pvs
    out = {}
    wf = f"{pre}AI:WF:{ch}"
    # A frame's PVs are written only while watched, and brought up to the latest frame
    # when read (pvs._Derived): most of them most frames nobody looks at, and writing
    # them all was most of the event loop's work with many cards.
    out[wf] = p.waveform(
        wf, f"Ch {ch} latest samples, raw", raw_type, n, derived=True, alarm_group=LINK
    )
    out[wf + ":V"] = p.waveform(
        wf + ":V", f"Ch {ch} latest samples", ChannelType.DOUBLE, n, units="V",
        precision=5, derived=True, alarm_group=LINK,
    )  # fmt: skip
    sp = f"{pre}AI:SPEC:{ch}"
    out[sp] = p.waveform(
        sp, f"Ch {ch} amplitude spectrum", ChannelType.DOUBLE, nspec, units="V",
        precision=6, derived=True, alarm_group=LINK,
    )  # fmt: skip
    mean = f"{pre}AI:CH:{ch}"
    out[mean] = p.number(
        mean, f"Ch {ch} mean", units="V", precision=5, alarm_group=LINK, derived=True
    )
    for stat, what in (("MIN", "minimum"), ("MAX", "maximum"), ("RMS", "RMS")):
        out[f"{mean}:{stat}"] = p.number(
            f"{mean}:{stat}", f"Ch {ch} {what}", units="V", precision=5, alarm_group=LINK,
            derived=True,
        )  # fmt: skip
    tw = f"{pre}AI:TW:{ch}"  # the last transient shot, decimated to n points
    out[tw] = p.waveform(tw, f"Ch {ch} last shot, ADC codes", ChannelType.LONG, n)
    out[tw + ":V"] = p.waveform(
        tw + ":V", f"Ch {ch} last shot", ChannelType.DOUBLE, n, units="V", precision=5
    )
    return out


def build_group_class(card: CardConfig, ioc: IocConfig, handlers: Handlers) -> type[CheckedGroup]:
    """A PVGroup subclass with every PV of this card (names relative to its prefix)."""
    sites = site_layouts(card)
    props = _card_pvs(card, sites, handlers)
    for s in sites:
        props.update(_site_pvs(s, ioc.display_samples, handlers.settings))
    attrs = {_attr(suffix): prop for suffix, prop in props.items()}
    return type(f"Card{card.name}", (CheckedGroup,), attrs)


class _Unbound:
    """Handlers for a group built only to list its PVs (screens, tests): puts are refused."""

    async def _refuse(self, *args: Any) -> Any:
        raise pvs.PutRefused("this PV group serves no card")

    put_clkdiv = put_ext_clock = put_ext_clock_freq = put_buffer_size = put_gain = _refuse
    put_sites = _refuse
    start = stop = reset = reboot = _refuse
    put_mode = put_pre = put_post = put_osam = put_demux = put_soft_trigger = _refuse
    put_trigger = put_auto_rearm = arm = abort = soft_trigger = _refuse

    def handler(self, suffix: str) -> Handler:
        return self._refuse


def unbound_handlers() -> Handlers:
    """Handlers of a group that serves no card: every put refused."""
    unbound = _Unbound()
    return Handlers(unbound, unbound, unbound, unbound, unbound)


def served_suffixes(card: CardConfig, ioc: IocConfig) -> frozenset[str]:
    """The PV names (relative to the card's prefix) that the IOC serves for this card."""
    cls = build_group_class(card, ioc, unbound_handlers())
    return frozenset(prop.pvspec.name for prop in cls._pvs_.values())


def served_names(cards: list[CardConfig], ioc: IocConfig) -> set[str]:
    """Every full PV name the IOC serves for these cards."""
    return {c.prefix + s for c in cards for s in served_suffixes(c, ioc)}


class CardPVs:
    """The live PVs of one card, and the only code that writes their readbacks."""

    def __init__(self, card: CardConfig, ioc: IocConfig, handlers: Handlers,
                 access: pvs.AccessRules | None):  # fmt: skip
        self.config = card
        self.sites = site_layouts(card)
        cls = build_group_class(card, ioc, handlers)
        self.group = cls(prefix=card.prefix)
        self.group.access_rules = access
        self.pvdb = self.group.pvdb
        self._last: dict[str, Any] = {}
        self._link_ok: bool | None = None
        # One update at a time, in the order they came: caproto's write awaits before it
        # stores, so two interleaved updates could leave an older value in a PV (and in
        # _last the newer one, which then hides every later write of it).
        self._order = asyncio.Lock()

    def pv(self, suffix: str) -> Any:
        return self.pvdb[self.config.prefix + suffix]

    def value(self, suffix: str) -> Any:
        return self.pv(suffix).value

    def suffix(self, pv: Any) -> str:
        return str(pv.pvname)[len(self.config.prefix) :]

    def saved(self) -> list[Any]:
        """The PVs autosave keeps."""
        return [pv for pv in self.pvdb.values() if getattr(pv, "saved", False)]

    async def publish(self, update: Update) -> None:
        """Write changed values; arrays are always new when given."""
        async with self._order:
            await self._write(update)

    async def _write(self, update: Update) -> None:
        if update.link_ok is not None and update.link_ok != self._link_ok:
            self._link_ok = update.link_ok
            alarm = self.group.alarms[LINK]
            if update.link_ok:
                await alarm.write(status=AlarmStatus.NO_ALARM, severity=AlarmSeverity.NO_ALARM)
            else:
                await alarm.write(status=AlarmStatus.COMM, severity=AlarmSeverity.INVALID_ALARM)
        changed = {}
        for suffix, value in update.values.items():
            is_array = isinstance(value, np.ndarray)
            if not is_array and self._last.get(suffix, _MISSING) == value:
                if update.timestamp is not None:
                    # As a record processed again: its time advances, no monitor is posted.
                    await self.pv(suffix).write_metadata(timestamp=update.timestamp,
                                                         publish=False)  # fmt: skip
                continue
            self._last[suffix] = None if is_array else value
            changed[suffix] = value
        for suffix, (status, severity) in update.alarms.items():
            key = suffix + ".alarm"
            if self._last.get(key) == (status, severity):
                continue
            self._last[key] = (status, severity)
            # A PV with a new value too posts both in one update, as a record does; an
            # alarm alone posts DBE_ALARM (the alarm's own write, not DBE_PROPERTY).
            await self.pv(suffix).alarm.write(status=status, severity=severity,
                                              publish=suffix not in changed)  # fmt: skip
        for suffix, value in changed.items():
            await self.pv(suffix).write(value, verify_value=False, timestamp=update.timestamp)


_MISSING = object()
