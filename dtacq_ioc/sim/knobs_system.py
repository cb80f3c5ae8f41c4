"""Site 0 (the carrier): identity, clocks, aggregator, spad, run control and SIM:* faults."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

from dtacq_ioc.sim.knobtable import (
    AfterReply,
    Knob,
    KnobRejected,
    KnobTable,
    Reply,
    number,
    numeric,
    split_command,
)
from dtacq_ioc.sim.shots import ShotControl
from dtacq_ioc.sim.state import (
    CONTINUOUS_NAMES,
    FIN_HZ,
    IDLE,
    SOFTWARE_VERSION,
    STATE_NAMES,
    STREAM_RUN,
    CardState,
    carrier_tag,
)

FPMUX = ("off", "xclk", "fpclk", "zclk")
SYNC_ROLES = ("fpmaster", "rpmaster", "master", "slave", "slavemb", "solo")
TRANSIENT_LIMITS = {
    "PRE": (0, 4_000_000),
    "POST": (0, 4_000_000),
    "OSAM": (0, 256),
    "DEMUX": (-1, 1),
    "SOFT_TRIGGER": (0, 1),
}


def const(value: str) -> Callable[[], str]:
    return lambda: value


def flag(value: str, name: str) -> bool:
    if value.strip() not in ("0", "1"):
        raise KnobRejected(f"ERROR: {name}: {value.strip()!r} is not 0 or 1")
    return value.strip() == "1"


def parse_spad(value: str, current: tuple[int, int, int]) -> tuple[int, int, int]:
    """'EN,LEN,DIX' (fields may be left off: they keep their value) -> the spad triple."""
    fields = [f for f in value.replace(" ", "").split(",")]
    if len(fields) > 3 or any(f == "" for f in fields):
        raise KnobRejected(f"ERROR: spad: {value!r} is not EN,LEN,DIX")
    limits = ((0, 2), (1, 16), (0, 2))
    out = list(current)
    for i, f in enumerate(fields):
        out[i] = numeric(f, *limits[i])
    return out[0], out[1], out[2]


def parse_bits(value: str, current: int) -> int:
    """spadN writes: hex (with or without 0x); '+hex' sets bits, '-hex' clears them."""
    v = value.strip()
    op = v[0] if v[:1] in "+-" else ""
    try:
        bits = int(v[len(op) :], 16)
    except ValueError:
        raise KnobRejected(f"ERROR: {v!r} is not a hex value") from None
    if not 0 <= bits <= 0xFFFFFFFF:
        raise KnobRejected(f"ERROR: {v!r} is wider than 32 bits")
    if op == "+":
        return current | bits
    if op == "-":
        return current & ~bits & 0xFFFFFFFF
    return bits


def build_system_knobs(
    st: CardState,
    shots: ShotControl,
    reboot: Callable[[float], None],
    site_table: Callable[[int], KnobTable | None],
) -> KnobTable:
    t = KnobTable(0)
    sim = st.sim
    for name, value in (
        ("MODEL", sim.carrier),
        ("HN", st.hostname),
        ("SERIAL", sim.serial),
        ("software_version", SOFTWARE_VERSION),
        ("fpga_version", st.fpga_version),
        ("is_tiga", "none"),
        # No comms/DSP/WR sites are simulated; "none" keeps HAPI from opening 4232/4233.
        ("has_mgt", "none"),
        ("has_mgtdram", "none"),
        ("has_dsp", "none"),
        ("has_wr", "none"),
        ("bufferlen", "4194304"),
    ):
        t.add(Knob(name, const(value)))
    sitelist = ",".join(
        [carrier_tag(sim.carrier)] + [f"{s.site}={s.model[3:6]}" for s in st.sites.values()]
    )
    t.add(Knob("SITELIST", const(sitelist)))
    t.add(Knob("sites", lambda: ",".join(map(str, st.agg_sites)) or "none"))
    t.add(Knob("aggregator", st.aggregator))
    t.add(Knob("distributor", const("comms=9 pad=0 on=0 sites=none DATA_MOVER_EN=off")))

    # Clocks.
    def set_fpmux(value: str) -> str:
        v = value.strip().lower()
        if v not in FPMUX:
            raise KnobRejected(f"ERROR: fpmux: {value.strip()!r} is not one of {'|'.join(FPMUX)}")
        st.fpmux = v
        st.clk_mb_fin = None  # the input frequency follows the new source
        st.touch()
        return ""

    t.add(Knob("fpmux", lambda: st.fpmux, set_fpmux))
    t.add(Knob("SYS:CLK:FPMUX", lambda: st.fpmux.upper(), set_fpmux))
    t.add(Knob("SIG:CLK_MB:FREQ", lambda: f"{st.clock_hz():.3f}"))

    def set_mb(value: str) -> str:
        st.clk_mb_set = numeric(value, 4_000, 250_000_000)
        return ""

    t.add(Knob("SIG:CLK_MB:SET", lambda: str(st.clk_mb_set), set_mb))

    def get_fin() -> str:
        if st.clk_mb_fin is not None:
            return str(st.clk_mb_fin)
        return f"{sim.ext_clock_hz if st.fpmux == 'fpclk' else FIN_HZ.get(st.fpmux, 0):.0f}"

    def set_fin(value: str) -> str:
        st.clk_mb_fin = numeric(value, 0, 250_000_000)  # HAPI's set_mb_clk writes it
        return ""

    t.add(Knob("SIG:CLK_MB:FIN", get_fin, set_fin))

    def set_zclk(value: str) -> str:
        st.zclk_src = value.strip()
        return ""

    t.add(Knob("SIG:ZCLK_SRC", lambda: st.zclk_src, set_zclk))
    t.add(Knob("SIG:CLK_EXT:FREQ", lambda: f"{sim.ext_clock_hz:.3f}"))
    for site in st.sites:
        # The site clock: the MB clock after the site's divider (ACQ43x then divide by 256/512).
        def site_clock(site: int = site) -> str:
            return f"{st.clock_hz() / st.sites[site].clkdiv:.3f}"

        t.add(Knob(f"SIG:CLK_S{site}:FREQ", site_clock))
    for name in ("SIG:SRC:CLK:0", "SIG:SRC:CLK:1", "SIG:SRC:TRG:0", "SIG:SRC:TRG:1"):

        def set_route(value: str, name: str = name) -> str:
            route = value.strip().upper()
            if not route.replace("_", "").isalnum():
                raise KnobRejected(f"ERROR: {name}: {value.strip()!r} is not a signal source")
            st.routes[name] = route  # stored only: the simulated trigger is always soft
            return ""

        def get_route(name: str = name) -> str:
            return st.routes[name]

        t.add(Knob(name, get_route, set_route))

    # Scratchpad and aggregation.
    def set_spad(value: str) -> str:
        st.spad = parse_spad(value, st.spad)
        st.touch()
        return ""

    t.add(Knob("spad", lambda: ",".join(map(str, st.spad)), set_spad))
    t.add(Knob("spad0", lambda: f"0x{(st.samples_sent & 0xFFFFFFFF):08x}"))
    for i in range(1, 8):

        def set_word(value: str, i: int = i) -> str:
            st.spad_values[i] = parse_bits(value, st.spad_values[i])
            st.touch()
            return ""

        def get_word(i: int = i) -> str:
            return f"0x{st.spad_values[i]:08x}"

        t.add(Knob(f"spad{i}", get_word, set_word))

    def run0(value: str) -> str:
        parts = value.split()
        if len(parts) > 2:
            raise KnobRejected(f"ERROR: run0: {value!r} is not <sitelist> [spad]")
        sites: list[int] = []
        for f in parts[0].split(","):
            site = numeric(f, 1, 6) if f.strip().isdigit() else -1
            if site not in st.sites:
                raise KnobRejected(f"ERROR: run0: site {f!r} has no module")
            if site not in sites:
                sites.append(site)
        if len(parts) == 2:
            st.spad = parse_spad(parts[1], st.spad)
        return st.run0(tuple(sorted(sites)))

    t.add(Knob("run0", st.aggregator, run0))
    t.add(Knob("NCHAN", lambda: str(st.nchan)))
    t.add(Knob("data32", lambda: str(int(st.data32))))
    t.add(Knob("ssb", lambda: str(st.ssb)))
    t.add(Knob("spadstart", lambda: str(st.spadstart)))

    # Run control.
    def set_transient(value: str) -> str:
        changes: dict[str, int] = {}
        for token in value.split():
            key, _, val = token.partition("=")
            if key not in TRANSIENT_LIMITS or not val.lstrip("-").isdigit():
                raise KnobRejected(f"ERROR: {token} not supported")
            lo, hi = TRANSIENT_LIMITS[key]
            changes[key.lower()] = min(max(int(val), lo), hi)
        for field_name, setting in changes.items():
            setattr(st.transient, field_name, setting)
        return ""

    t.add(Knob("transient", lambda: st.transient.text(), set_transient))
    for name, action in (
        ("set_arm", shots.arm),
        ("set_abort", shots.abort),
        ("soft_trigger", shots.soft_trigger),
    ):
        # The bare name executes too: these knobs act on query as on set ("=0" does nothing,
        # as the on-card IOC writes 0 after 1).
        def act(value: str, action: Callable[[], str] = action) -> str:
            return "" if value.strip() == "0" else action()

        t.add(Knob(name, action, act))
    t.add(Knob("state", st.state_line))
    t.add(Knob("cstate", lambda: f"STX {st.state_line()}"))
    t.add(Knob("TRANS_ACT:STATE", lambda: STATE_NAMES[st.state]))
    t.add(Knob("TRANS_ACT:PRE", lambda: str(st.pre)))
    t.add(Knob("TRANS_ACT:POST", lambda: str(st.post)))
    t.add(Knob("TRANS_ACT:TOTSAM", lambda: str(st.elapsed)))

    def raw_data_size() -> str:
        # The card's raw buffer is consumed by an on-card demux.
        shot = st.last_shot
        return str(shot.raw_bytes if shot is not None and not shot.demux else 0)

    t.add(Knob("raw_data_size", raw_data_size))

    def set_continuous(value: str) -> str:
        on = flag(value, "CONTINUOUS")
        if on and st.shot_busy:
            raise KnobRejected("ERROR: CONTINUOUS: a transient shot is armed (set_abort first)")
        st.continuous = on
        st.stream_state(STREAM_RUN if on else IDLE)  # an armed shot keeps its state
        return ""

    t.add(
        Knob(
            "CONTINUOUS", lambda: str(int(st.continuous or st.state == STREAM_RUN)), set_continuous
        )
    )
    t.add(Knob("CONTINUOUS:STATE", lambda: CONTINUOUS_NAMES[st.state]))

    def streamtonowhere(value: str) -> str:
        v = value.strip()
        if v == "status":
            return "running" if st.continuous else "stopped"
        if v not in ("start", "stop"):
            raise KnobRejected(f"ERROR: streamtonowhered: {v!r} is not start|stop|status")
        return set_continuous("1" if v == "start" else "0")

    t.add(
        Knob("streamtonowhered", lambda: "running" if st.continuous else "stopped", streamtonowhere)
    )

    def set_role(value: str) -> str:
        role = value.split()[0]
        if role not in SYNC_ROLES:
            raise KnobRejected(f"ERROR: sync_role: {role!r} is not one of {'|'.join(SYNC_ROLES)}")
        st.sync_role = value.strip()
        return ""

    t.add(Knob("sync_role", lambda: st.sync_role, set_role))

    def set_shot(value: str) -> str:
        st.shot = numeric(value, 0, 2**31 - 1)
        return ""

    t.add(Knob("shot", lambda: str(st.shot), set_shot))
    add_site_scripts(t, site_table)
    add_fault_knobs(t, st, reboot)
    add_trigger_knobs(t, st, shots)
    return t


def add_site_scripts(t: KnobTable, site_table: Callable[[int], KnobTable | None]) -> None:
    """The card's get.site / set.site scripts: another site's knob, asked from site 0."""

    def usage(script: str) -> str:
        return f"ERROR: {script}: usage {script} SITE KNOB" + (" VALUE" * (script == "set.site"))

    def forward(script: str, value: str, setting: bool) -> str:
        parts = value.split(None, 1)
        if len(parts) < 2 or not parts[0].isdigit():
            raise KnobRejected(usage(script))
        table = site_table(int(parts[0]))
        if table is None:
            raise KnobRejected(f"ERROR: {script}: no site {parts[0]}")
        _, knob_value = split_command(parts[1])
        if setting != (knob_value is not None):
            raise KnobRejected(usage(script))
        reply = Reply()
        table.run(parts[1], reply)
        if reply.failed or any(line.startswith("ERROR") for line in reply.lines):
            raise KnobRejected("\n".join(reply.lines))
        return "\n".join(reply.lines)

    for script in ("get.site", "set.site"):

        def forward_to(value: str, script: str = script) -> str:
            return forward(script, value, script == "set.site")

        t.add(Knob(script, partial(usage, script), forward_to))


def add_trigger_knobs(t: KnobTable, st: CardState, shots: ShotControl) -> None:
    """SIM:* knobs of transient shots: an external trigger line and the trigger faults."""

    def fire(value: str) -> str:
        fields = value.replace(" ", "").lower().removeprefix("d").split(",")
        if len(fields) > 2 or not all(f.isdigit() for f in fields) or int(fields[0]) > 7:
            raise KnobRejected(f"ERROR: SIM:EXT_TRIGGER: {value.strip()!r} is not dN[,edge]")
        edges = (int(fields[1]),) if len(fields) == 2 else (0, 1)  # no edge: a whole pulse
        if any(e > 1 for e in edges):
            raise KnobRejected(f"ERROR: SIM:EXT_TRIGGER: edge {edges[0]} is not 0 or 1")
        shots.external(int(fields[0]), edges)
        return ""

    t.add(Knob("SIM:EXT_TRIGGER", lambda: "", fire))

    def set_no_trigger(value: str) -> str:
        st.faults.no_trigger = flag(value, "SIM:NO_TRIGGER")
        return ""

    t.add(Knob("SIM:NO_TRIGGER", lambda: str(int(st.faults.no_trigger)), set_no_trigger))

    def set_cut(value: str) -> str:
        st.faults.shot_cut = numeric(value, 0, 2**62)
        return ""

    t.add(Knob("SIM:SHOT_CUT", lambda: str(st.faults.shot_cut), set_cut))
    t.add(
        Knob(
            "SIM:SHOT_START",
            lambda: str(st.last_shot.first if st.last_shot is not None else -1),
        )
    )


def add_fault_knobs(t: KnobTable, st: CardState, reboot: Callable[[float], None]) -> None:
    """SIM:* knobs: faults switched at runtime (a real card has none of these)."""
    # reset() replaces st.faults: always read it through st, never keep the object.

    def set_drop(value: str) -> str:
        parts = value.replace(" ", "").split(",")
        if len(parts) > 2:
            raise KnobRejected(f"ERROR: SIM:DROP: {value!r} is not every[,count]")
        every = numeric(parts[0], 0, 2**31 - 1)
        count = numeric(parts[1], 1, 2**31 - 1) if len(parts) == 2 else st.faults.drop_count
        st.faults.drop_every, st.faults.drop_count = every, count
        return ""

    t.add(Knob("SIM:DROP", lambda: f"{st.faults.drop_every},{st.faults.drop_count}", set_drop))

    def int_fault(attr: str, name: str) -> Knob:
        def set_value(value: str) -> str:
            setattr(st.faults, attr, numeric(value, 0, 2**62))
            return ""

        return Knob(name, lambda: str(getattr(st.faults, attr)), set_value)

    t.add(int_fault("corrupt_every", "SIM:CORRUPT"))
    t.add(int_fault("close_after", "SIM:CLOSE_AFTER"))

    def bool_fault(attr: str, name: str) -> Knob:
        def set_value(value: str) -> str:
            setattr(st.faults, attr, flag(value, name))
            return ""

        return Knob(name, lambda: str(int(getattr(st.faults, attr))), set_value)

    t.add(bool_fault("not_ready", "SIM:NOT_READY"))
    t.add(bool_fault("unthrottled", "SIM:UNTHROTTLED"))

    def bounded(name: str, value: str, top: float, unit: str) -> float:
        x = number(name, value)
        if not 0 <= x <= top:
            raise KnobRejected(f"ERROR: {name}: {x} not in 0..{top:g} {unit}")
        return x

    def set_delay(value: str) -> str:
        st.faults.knob_delay_s = bounded("SIM:KNOB_DELAY", value, 60, "s")
        return ""

    t.add(Knob("SIM:KNOB_DELAY", lambda: f"{st.faults.knob_delay_s:g}", set_delay))

    def set_reboot(value: str) -> AfterReply:
        seconds = bounded("SIM:REBOOT", value, 600, "s")
        st.faults.reboot_s = seconds
        return AfterReply("", lambda: reboot(seconds))

    t.add(Knob("SIM:REBOOT", lambda: f"{st.faults.reboot_s:g}", set_reboot))

    def set_mbps(value: str) -> str:
        st.faults.mbps = bounded("SIM:MBPS", value, 100_000, "MB/s")
        return ""

    t.add(Knob("SIM:MBPS", lambda: f"{st.faults.mbps:g}", set_mbps))

    def set_hang(value: str) -> AfterReply:
        seconds = bounded("SIM:HANG", value, 600, "s")

        def hang() -> None:  # after the reply: the set itself is still answered
            st.faults.hang_until = time.monotonic() + seconds

        return AfterReply("", hang)

    t.add(Knob("SIM:HANG", lambda: f"{max(0.0, st.faults.hang_left()):.1f}", set_hang))
    t.add(Knob("SIM:SENT", lambda: str(st.samples_sent)))
