"""The settings and run state of one simulated carrier, shared by its servers.

Everything a knob can change lives here, under one lock. `reset()` restores
the power-on state (a booted card: run0 done for its sites with spad 1,2,0),
which a reboot uses. Status changes are kept as numbered lines so the 2235
console sends every change, however quickly they follow each other.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dtacq_ioc.card.models import ModuleSpec, module_for_site, module_spec
from dtacq_ioc.config import CardConfig, FaultConfig, SimCardConfig, SimSiteConfig
from dtacq_ioc.sim.signals import SiteSignals

if TYPE_CHECKING:
    from dtacq_ioc.sim.shotdata import ShotData

STATE_NAMES = ("IDLE", "ARM", "RUN_PRE", "RUN_POST", "POST_PROCESS", "CLEANUP")
IDLE, ARM, RUN_PRE, RUN_POST, POST_PROCESS = range(5)
STREAM_RUN = RUN_PRE  # a running stream reports state 2 (CONTINUOUS:STATE RUN)
CONTINUOUS_NAMES = ("IDLE", "ARM", "RUN", "RUN2", "POST_PROCESS", "CLEANUP")
TRIPLETS = ("clk", "trg", "sync", "event0", "event1")
FIN_HZ = {"zclk": 33_333_000, "xclk": 32_768_000}
POWER_ON_SPAD = (1, 2, 0)
SOFTWARE_VERSION = "acq400-511-20240301120000"
STATUS_HISTORY = 64


def module_model(name: str) -> str:
    """The MODEL knob for a configured module name (the LIA variant is an ACQ425ELF)."""
    return name.split("-")[0]


def carrier_tag(carrier: str) -> str:
    # The first SITELIST field is a carrier code clients drop; keep it card-like.
    return "216" if carrier == "acq2106" else "1001"


def fpga_version(sim: SimCardConfig) -> str:
    nslots = 6 if sim.carrier == "acq2106" else 1
    by_site = {s.site: module_spec(s.module).module_type for s in sim.sites}
    codes = "_".join(by_site.get(i, "ff") for i in range(1, nslots + 1))
    bits = "64B" if sim.carrier == "acq2106" else "32B"
    suffix = "_LIA" if is_lia(sim) else ""
    return f"{sim.carrier.upper()}_TOP_{codes}_9011_{bits}{suffix} 0x{sim.carrier[3:]}0{bits[:2]}b"


def is_lia(sim: SimCardConfig) -> bool:
    return sim.lia or any(s.module.endswith("-LIA") for s in sim.sites)


@dataclass
class Faults:
    """The runtime copy of FaultConfig (and the throttle), changed by SIM:* knobs."""

    drop_every: int = 0
    drop_count: int = 1
    corrupt_every: int = 0
    close_after: int = 0
    not_ready: bool = False
    knob_delay_s: float = 0.0
    reboot_s: float = 5.0
    unthrottled: bool = False
    mbps: float = 0.0  # unthrottled: cap the stream at this many MB/s (0 = none)
    hang_until: float = 0.0  # time.monotonic() until which the card is silent (network loss)
    no_trigger: bool = False  # every trigger (soft, auto, external) is lost: a shot never fires
    shot_cut: int = 0  # each shot-data connection closes after this many bytes (0 = never)

    def hang_left(self) -> float:
        return self.hang_until - time.monotonic()

    @classmethod
    def from_config(cls, f: FaultConfig, unthrottled: bool) -> Faults:
        return cls(
            drop_every=f.drop_every_samples,
            drop_count=f.drop_count,
            corrupt_every=f.corrupt_every_samples,
            close_after=f.close_after_bytes,
            not_ready=f.not_ready,
            knob_delay_s=f.knob_delay_s,
            reboot_s=f.reboot_s,
            unthrottled=unthrottled,
        )


@dataclass
class SiteState:
    site: int
    config: SimSiteConfig
    spec: ModuleSpec  # LIA-aware
    serial: str
    sysclk_hz: int
    clkdiv: int = 0
    hi_res: bool = False
    data32: bool = False
    gains: list[int] = field(default_factory=list)
    triplets: dict[str, str] = field(default_factory=dict)
    nacc: str = "1,1"

    @property
    def model(self) -> str:
        return module_model(self.config.module)

    @property
    def word_size(self) -> int:
        return 4 if self.data32 else 2

    @property
    def has_gains(self) -> bool:
        return bool(self.spec.gain_codes)


@dataclass
class Transient:
    pre: int = 0
    post: int = 2000
    osam: int = 1
    demux: int = 1
    soft_trigger: int = 1

    def text(self) -> str:
        return (
            f"PRE={self.pre} POST={self.post} OSAM={self.osam} DEMUX={self.demux} "
            f"SOFT_TRIGGER={self.soft_trigger}"
        )


class CardState:
    """One carrier's knob-visible state; guard every access with `lock`."""

    def __init__(self, card: CardConfig, unthrottled: bool = False):
        if card.sim is None:
            raise ValueError(f"card {card.name} has no [cards.sim] table")
        self.card = card
        self.sim: SimCardConfig = card.sim
        self.default_unthrottled = unthrottled or self.sim.unthrottled
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.fpga_version = fpga_version(self.sim)
        self.hostname = self.sim.hostname or f"{self.sim.carrier}_{self.sim.serial[-3:]}"
        self.status_seq = 0
        self.status_lines: deque[tuple[int, str]] = deque(maxlen=STATUS_HISTORY)
        self.reset()

    def reset(self) -> None:
        """Power-on defaults: what a freshly booted card reports."""
        with self.lock:
            sim = self.sim
            self.sites: dict[int, SiteState] = {}
            for cfg in sorted(sim.sites, key=lambda s: s.site):
                spec = module_for_site(module_model(cfg.module), self.fpga_version)
                gains = list(cfg.gains) + [0] * (spec.nchan - len(cfg.gains))
                self.sites[cfg.site] = SiteState(
                    site=cfg.site,
                    config=cfg,
                    spec=spec,
                    serial=f"E{spec.module_type}{sim.serial[-5:]}{cfg.site}",
                    sysclk_hz=sim.sysclk_hz or spec.default_sysclk_hz,
                    clkdiv=spec.default_clkdiv,
                    data32=spec.word_size == 4,
                    gains=gains[: spec.nchan] if spec.gain_codes else [],
                    triplets={t: "0,0,0" for t in TRIPLETS},
                )
            self.fpmux = "zclk"
            self.clk_mb_set = FIN_HZ["zclk"]
            self.clk_mb_fin: int | None = None  # None: what the selected source gives
            self.zclk_src = "INT33M"
            self.routes = {
                "SIG:SRC:CLK:0": "EXT",
                "SIG:SRC:CLK:1": "MCLK",
                "SIG:SRC:TRG:0": "EXT",
                "SIG:SRC:TRG:1": "STRIG",
            }
            self.spad = POWER_ON_SPAD
            self.spad_values = [0] * 8
            self.transient = Transient()
            self.state = IDLE
            self.pre = self.post = self.elapsed = 0
            self.demux = 0  # the state line's last field: the shot's demux (0 for a stream)
            self.shot = 0
            self.shot_busy = False  # a transient shot is armed or running: no streaming
            self.last_shot: ShotData | None = None  # the finished shot's data (53000, 53000+ch)
            self.sync_role = "role not set"
            self.continuous = False
            self.samples_sent = 0
            self.faults = Faults.from_config(sim.faults, self.default_unthrottled)
            self.stream_gen = 0  # bumped by run0: a running stream must stop
            self.version = 0  # bumped by anything that changes what the stream sends
            self.run0(tuple(self.sites))
            self.set_state(IDLE)

    # --- aggregation -------------------------------------------------------------

    @property
    def nspad(self) -> int:
        en, length, _ = self.spad
        return {0: 0, 1: length, 2: 1}[en]

    def run0(self, sites: tuple[int, ...]) -> str:
        """Aggregate these sites: recompute NCHAN, data32, ssb, spadstart; stop streaming."""
        with self.lock:
            self.agg_sites = sites
            states = [self.sites[s] for s in sites]
            self.data32 = any(s.data32 for s in states)
            nspad = self.nspad
            self.nchan = sum(s.spec.nchan for s in states) + (nspad if self.data32 else 2 * nspad)
            self.ssb = sum(s.spec.nchan * s.word_size for s in states) + 4 * nspad
            self.spadstart = self.ssb - 4 * nspad
            self.agg_spad = self.spad
            self.stream_gen += 1
            self.touch()
            if len({s.word_size for s in states}) > 1:
                return "WARNING: mixed word sizes; set data32=1 on all sites"
            return ""

    def aggregator(self) -> str:
        sites = ",".join(map(str, self.agg_sites)) or "none"
        mask = sum(1 << (s - 1) for s in self.agg_sites)
        spad = ",".join(map(str, self.spad))
        return f"reg=0x{mask:08x} sites={sites} threshold=16384 DATA_MOVER_EN=on spad={spad}"

    def touch(self) -> None:
        """Something the stream depends on changed."""
        self.version += 1

    # --- clocks ------------------------------------------------------------------

    def master(self) -> SiteState:
        return self.sites[self.agg_sites[0] if self.agg_sites else min(self.sites)]

    def external_clock(self) -> bool:
        return self.fpmux == "fpclk" and self.master().triplets["clk"].startswith("1,")

    def clock_hz(self) -> float:
        """The master site's clock: the front-panel clock when selected, else sysclkhz."""
        if self.external_clock():
            return self.sim.ext_clock_hz
        return float(self.master().sysclk_hz)

    def sample_rate_hz(self) -> float:
        """0 when the card is not clocked (external clock selected but absent)."""
        m = self.master()
        return self.clock_hz() / (m.clkdiv * m.spec.divider_for(m.hi_res))

    def stream_sites(self) -> list[SiteSignals]:
        return [
            SiteSignals(
                site=s.site,
                spec=s.spec,
                signals=s.config.signals,
                gains=tuple(s.gains),
                data32=s.data32,
            )
            for s in (self.sites[n] for n in self.agg_sites)
        ]

    def spad_words(self) -> tuple[int, ...]:
        """The spad words after each sample; word 0 is replaced by the counter."""
        n = self.nspad
        return tuple(self.spad_values[i] if 0 < i < 8 else 0 for i in range(n))

    # --- run state and the 2235 console -------------------------------------------

    def state_line(self) -> str:
        return f"{self.state} {self.pre} {self.post} {self.elapsed} {self.demux}"

    def stream_state(self, state: int, elapsed: int | None = None) -> None:
        """A state change of the stream, ignored while a transient shot owns the state."""
        with self.lock:
            if not self.shot_busy:
                self.demux = 0
                self.set_state(state, elapsed)

    def set_state(self, state: int, elapsed: int | None = None) -> None:
        with self.lock:
            self.state = state
            if elapsed is not None:
                self.elapsed = elapsed
            self.status_seq += 1
            self.status_lines.append((self.status_seq, self.state_line()))
            self.changed.notify_all()

    def status_since(self, seq: int) -> list[tuple[int, str]]:
        return [(n, line) for n, line in self.status_lines if n > seq]
