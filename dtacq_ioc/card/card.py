"""One carrier: identify it, configure clocks, gains and the stream, reset, reboot.

Every setting goes through the site knob services; values the module cannot
take (clkdiv range, gain codes, a too-low sample rate) are refused here,
before anything is sent, with the reason; the card's own ERROR replies come
back as KnobError.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtacq_ioc.card import models
from dtacq_ioc.card.errors import CardError, KnobError, SettingRefused
from dtacq_ioc.card.knobs import KnobClient
from dtacq_ioc.card.models import SPAD_SETTING, ModuleSpec
from dtacq_ioc.card.stream import OnBuffer, OnEnd, StreamClient
from dtacq_ioc.card.transient import OnLink, OnStatus, Transient
from dtacq_ioc.config import CardConfig
from dtacq_ioc.contract import StreamLayout

if TYPE_CHECKING:  # paramiko is imported when SSH is used: a readout process never does
    from dtacq_ioc.card.ssh import SshClient

log = logging.getLogger(__name__)

SYSTEM_SITE = 0  # clocks, aggregator, spad, run0
CLOCK_SITE = 1  # the module site that takes the front-panel clock
EXTERNAL_CLK = "1,0,1"  # enabled, d0, rising edge
INTERNAL_CLK = "0,0,0"
RESET_PAUSE_S = 0.3  # the old system's jump-start pause


@dataclass(frozen=True)
class SiteInfo:
    site: int
    model: str  # first token of the site's MODEL
    spec: ModuleSpec
    nchan: int  # AI channel words the site sends
    data32: bool
    word_size: int
    serial: str
    part_num: str


@dataclass(frozen=True)
class CardInfo:
    model: str  # carrier, lower case ("acq2106")
    hostname: str
    serial: str
    software_version: str
    fpga_version: str
    sites: dict[int, SiteInfo]  # module sites with a known AI module
    aggregated: tuple[int, ...]  # the card's aggregator sites at connect

    @property
    def lia(self) -> bool:
        return any(s.spec.name.endswith("-LIA") for s in self.sites.values())


def parse_sitelist(text: str) -> tuple[int, ...]:
    """SITELIST "216,1=480,2=480": the first field is not a site; the rest are site=type."""
    sites = []
    for field in text.split(",")[1:]:
        head = field.split("=")[0].strip()
        if head.isdigit():
            sites.append(int(head))
    return tuple(sites)


def parse_sites(text: str) -> tuple[int, ...]:
    """The aggregator's "sites" knob: "1,2", or "none"."""
    return tuple(int(s) for s in text.replace(" ", "").split(",") if s.isdigit())


class Card:
    """The host's handle on one carrier. Knob clients are created per site on demand."""

    def __init__(self, config: CardConfig, min_sample_rate_hz: float = 5000.0):
        self.config = config
        self.name = config.name
        self.min_sample_rate_hz = min_sample_rate_hz
        self.info: CardInfo | None = None
        self.layout: StreamLayout | None = None  # set by configure_stream
        self._knobs: dict[int, KnobClient] = {}
        self._streams: list[StreamClient] = []
        self._lock = threading.Lock()
        self._ext_clock_hz: float | None = None  # what the operator said the clock runs at
        self._transient: Transient | None = None

    def __repr__(self) -> str:
        return f"Card({self.name!r}, {self.config.host})"

    # -- connection ------------------------------------------------------------------

    def knob(self, site: int) -> KnobClient:
        with self._lock:
            client = self._knobs.get(site)
            if client is None:
                client = KnobClient(
                    self.name,
                    self.config.host,
                    site,
                    self.config.knob_port_base + site,
                    self.config.timeout_s,
                )
                self._knobs[site] = client
            return client

    def connect(self) -> CardInfo:
        """Identify the carrier and its modules (this also opens the knob connections)."""
        k0 = self.knob(SYSTEM_SITE)
        fpga = k0.query("fpga_version")
        sites: dict[int, SiteInfo] = {}
        for site in parse_sitelist(k0.query("SITELIST")):
            site_info = self._identify_site(site, fpga)
            if site_info is not None:
                sites[site] = site_info
        info = CardInfo(
            model=k0.query("MODEL"),
            hostname=k0.query("HN"),
            serial=k0.query("SERIAL"),
            software_version=k0.query("software_version"),
            fpga_version=fpga,
            sites=sites,
            aggregated=parse_sites(k0.query("sites")),
        )
        if not sites:
            raise CardError(self.name, f"{self.name}: no known AI module in SITELIST")
        missing = [s for s in self.config.sites if s not in sites]
        if missing:
            raise CardError(
                self.name,
                f"{self.name}: configured sites {missing} not on the card (has {sorted(sites)})",
            )
        self.info = info
        log.info(
            "%s: %s %s serial %s, sites %s",
            self.name,
            info.model,
            info.hostname,
            info.serial,
            ", ".join(f"{s}={i.spec.name}" for s, i in sites.items()),
        )
        return info

    def _identify_site(self, site: int, fpga_version: str) -> SiteInfo | None:
        k = self.knob(site)
        model_text = k.query("MODEL").strip()
        model = model_text.split()[0] if model_text else ""
        try:
            spec = models.module_for_site(model, fpga_version)
        except KeyError:
            log.warning(
                "%s site %d: module %r is not an AI module we know", self.name, site, model_text
            )
            return None
        data32 = self._int(site, "data32") == 1
        try:
            word_size = self._int(site, "word_size")
        except KnobError:
            word_size = 4 if data32 else 2  # older firmware: data32 decides
        return SiteInfo(
            site=site,
            model=model,
            spec=spec,
            nchan=self._int(site, "NCHAN"),
            data32=data32,
            word_size=word_size,
            serial=k.query("SERIAL"),
            part_num=k.query("PART_NUM"),
        )

    def wait_ready(self, timeout: float) -> CardInfo:
        """Reconnect after a reboot: retry connect() until it succeeds or timeout passes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.connect()
            except CardError as exc:
                if time.monotonic() > deadline:
                    raise CardError(
                        self.name, f"{self.name}: not back within {timeout:g} s: {exc}"
                    ) from exc
                self._close_knobs()
                time.sleep(0.2)

    def close(self) -> None:
        for stream in list(self._streams):
            stream.stop()
        self._streams.clear()
        if self._transient is not None:
            self._transient.close()
            self._transient = None
        self._close_knobs()

    def transient(
        self, on_status: OnStatus | None = None, on_link: OnLink | None = None
    ) -> Transient:
        """The card's transient shots (one per card; the callbacks of the first call stay)."""
        with self._lock:
            if self._transient is None:
                self._transient = Transient(self, on_status, on_link)
            return self._transient

    def _close_knobs(self) -> None:
        with self._lock:
            clients = list(self._knobs.values())
        for client in clients:
            client.close()

    # -- helpers ----------------------------------------------------------------------

    def _int(self, site: int, knob: str) -> int:
        text = self.knob(site).query(knob).strip()
        try:
            return int(text)
        except ValueError:
            raise KnobError(self.name, site, knob, f"expected an integer, got {text!r}") from None

    def _float(self, site: int, knob: str) -> float:
        text = self.knob(site).query(knob).strip()
        try:
            return float(text.split()[0])
        except (ValueError, IndexError):
            raise KnobError(self.name, site, knob, f"expected a number, got {text!r}") from None

    def _require_info(self) -> CardInfo:
        if self.info is None:
            raise CardError(self.name, f"{self.name}: not connected (call connect() first)")
        return self.info

    def site_info(self, site: int) -> SiteInfo:
        info = self._require_info()
        try:
            return info.sites[site]
        except KeyError:
            raise SettingRefused(
                self.name, f"site {site}", f"no AI module there (sites {sorted(info.sites)})"
            ) from None

    def ai_sites(self) -> tuple[int, ...]:
        """The sites to read: the config's, else the card's aggregated AI sites, else all."""
        info = self._require_info()
        if self.config.sites:
            return self.config.sites
        aggregated = tuple(s for s in info.aggregated if s in info.sites)
        return aggregated or tuple(sorted(info.sites))

    def _first(self) -> SiteInfo:
        return self.site_info(self.ai_sites()[0])

    # -- clock ------------------------------------------------------------------------

    def clkdiv(self) -> int:
        return self._int(self._first().site, "clkdiv")

    def set_clkdiv(self, clkdiv: int) -> int:
        """Set clkdiv on every AI site read; return the card's read-back.

        Refused before anything is sent when the module does not allow it or when
        the rate it gives is below the configured minimum.
        """
        sites = [self.site_info(s) for s in self.ai_sites()]
        for s in sites:
            reason = s.spec.check_clkdiv(clkdiv)
            if reason:
                raise SettingRefused(self.name, "clkdiv", f"site {s.site}: {reason}")
        self._check_rate(self._rate(clkdiv), f"clkdiv {clkdiv}")
        for s in sites:
            self.knob(s.site).set("clkdiv", clkdiv)
        return self.clkdiv()

    def sysclk_hz(self) -> float:
        """The clock-master module site's sysclkhz."""
        return self._float(self._first().site, "sysclkhz")

    def external_clock(self) -> float | None:
        """The front-panel clock frequency when the card runs on it, else None."""
        mux = self.knob(SYSTEM_SITE).query("fpmux").strip().lower()
        if "fpclk" not in mux:
            return None
        if self._ext_clock_hz:
            return self._ext_clock_hz
        # Set outside this process: the card's measurement is the best knowledge.
        freq = self._float(SYSTEM_SITE, "SIG:CLK_EXT:FREQ")
        if freq <= 0:
            raise CardError(self.name, f"{self.name}: external clock selected but not running")
        return freq

    def set_external_clock(self, freq_hz: float | None) -> None:
        """Front-panel clock at freq_hz (fpmux=fpclk, clk=1,0,1), or None for internal."""
        k0 = self.knob(SYSTEM_SITE)
        if freq_hz is None:
            k0.set("fpmux", "xclk")
            self.knob(CLOCK_SITE).set("clk", INTERNAL_CLK)
            self._ext_clock_hz = None
            return
        if not freq_hz > 0:
            raise SettingRefused(self.name, "external clock", f"{freq_hz} Hz must be > 0")
        k0.set("fpmux", "fpclk")
        self.knob(CLOCK_SITE).set("clk", EXTERNAL_CLK)
        self._ext_clock_hz = float(freq_hz)

    @property
    def ext_clock_hz(self) -> float | None:
        """The front-panel clock's frequency as set here (the card cannot say it exactly)."""
        return self._ext_clock_hz

    def assume_external_clock(self, freq_hz: float | None) -> None:
        """Take the frequency another process set (a readout process's card is told its
        IOC's), without touching the card."""
        self._ext_clock_hz = freq_hz

    def _hi_res_sites(self) -> list[SiteInfo]:
        infos = [self.site_info(s) for s in self.ai_sites()]
        return [i for i in infos if i.spec.hi_res_divider != i.spec.divider]

    def hi_res(self) -> bool:
        """hi_res_mode of the ACQ43x sites (False on modules without it)."""
        sites = self._hi_res_sites()
        return bool(sites) and self._int(sites[0].site, "hi_res_mode") == 1

    def set_hi_res(self, on: bool) -> None:
        sites = self._hi_res_sites()
        if not sites:
            raise SettingRefused(self.name, "hi_res_mode", "no ACQ43x site to set it on")
        for s in sites:
            self.knob(s.site).set("hi_res_mode", 1 if on else 0)

    def sample_rate_hz(self) -> float:
        """(external clock or sysclkhz) / (clkdiv x divider), as the old system computed it."""
        return self._rate(None)

    def _rate(self, clkdiv: int | None) -> float:
        """The rate with the card's clkdiv, or with `clkdiv` if given."""
        spec = self._first().spec
        clock = self.external_clock() or self.sysclk_hz()
        if spec.fixed_clkdiv:
            clkdiv = spec.default_clkdiv
        elif clkdiv is None:
            clkdiv = self.clkdiv()
        return models.sample_rate_hz(clock, clkdiv, spec.divider_for(self.hi_res()))

    def check_sample_rate(self) -> float:
        """The sample rate, or SettingRefused when it is below the configured minimum."""
        return self._check_rate(self.sample_rate_hz(), "sample rate")

    def _check_rate(self, rate: float, setting: str) -> float:
        if rate < self.min_sample_rate_hz:
            raise SettingRefused(
                self.name,
                setting,
                f"{rate:.6g} Hz is below the minimum {self.min_sample_rate_hz:g} Hz "
                "(ioc.min_sample_rate_hz)",
            )
        return rate

    @property
    def fixed_clkdiv(self) -> bool:
        """The modules ignore clkdiv (LIA firmware, ACQ480)."""
        return self._first().spec.fixed_clkdiv

    # -- gains ------------------------------------------------------------------------

    def gains(self, site: int) -> list[int]:
        """Gain code per channel ([] for modules without gain select)."""
        info = self.site_info(site)
        if not info.spec.gain_codes:
            return []
        text = self.knob(site).query("gains").strip()
        if text.isdigit():
            return [int(c) for c in text]
        return [self._int(site, f"gain{ch}") for ch in range(1, info.nchan + 1)]

    def _check_gain(self, info: SiteInfo, code: int) -> None:
        codes = info.spec.gain_codes
        if not codes:
            raise SettingRefused(self.name, "gain", f"site {info.site}: {info.model} has no gains")
        if code not in codes:
            raise SettingRefused(
                self.name,
                "gain",
                f"site {info.site}: code {code!r} not in {codes[0]}..{codes[-1]} for {info.model}",
            )

    def set_gain(self, site: int, channel: int, code: int) -> None:
        info = self.site_info(site)
        self._check_gain(info, code)
        if not 1 <= channel <= info.nchan:
            raise SettingRefused(
                self.name, "gain", f"site {site}: channel {channel} not in 1..{info.nchan}"
            )
        self.knob(site).set(f"gain{channel}", code)

    def set_all_gains(self, site: int, code: int) -> None:
        info = self.site_info(site)
        self._check_gain(info, code)
        self.knob(site).set("gain", code)

    # -- stream -----------------------------------------------------------------------

    def configure_stream(self, sites: tuple[int, ...] | list[int] | None = None) -> StreamLayout:
        """Aggregate `sites` with the spad counter (spad 1,2,0; run0) and check the result."""
        chosen = tuple(sites) if sites else self.ai_sites()
        infos = [self.site_info(s) for s in chosen]
        sizes = {i.word_size for i in infos}
        if len(sizes) > 1:
            raise SettingRefused(
                self.name,
                "stream sites",
                f"mixed word sizes {sorted(sizes)} over sites {chosen}; set data32=1 on all",
            )
        layout = StreamLayout(chosen, tuple(i.nchan for i in infos), sizes.pop())
        k0 = self.knob(SYSTEM_SITE)
        k0.set("spad", SPAD_SETTING)
        k0.set("run0", f"{','.join(map(str, chosen))} {SPAD_SETTING}")
        nchan = self._int(SYSTEM_SITE, "NCHAN")
        ssb = self._int(SYSTEM_SITE, "ssb")
        if (nchan, ssb) != (layout.card_nchan, layout.sample_bytes):
            raise CardError(
                self.name,
                f"{self.name}: after run0 {chosen} the card reports NCHAN {nchan}, ssb {ssb}; "
                f"expected NCHAN {layout.card_nchan}, ssb {layout.sample_bytes}",
            )
        self.layout = layout
        return layout

    def default_buffer_samples(self, layout: StreamLayout) -> int:
        """The config's buffer_bytes, else the smallest module default, in whole samples."""
        nbytes = self.config.buffer_bytes or min(
            self.site_info(s).spec.default_buffer_bytes for s in layout.sites
        )
        return max(1, nbytes // layout.sample_bytes)

    def open_stream(
        self,
        layout: StreamLayout,
        buffer_samples: int | None,
        on_buffer: OnBuffer,
        on_end: OnEnd,
        flush_s: float | None = None,
    ) -> StreamClient:
        """Start reading the stream (refused below the minimum sample rate)."""
        self.check_sample_rate()
        stream = StreamClient(
            self.name,
            self.config.host,
            self.config.stream_port,
            layout,
            buffer_samples or self.default_buffer_samples(layout),
            on_buffer,
            on_end,
            self.config.timeout_s,
            flush_s=flush_s,
        )
        self._streams = [s for s in self._streams if s.running]
        stream.start()
        self._streams.append(stream)
        return stream

    def reset_readout(self) -> None:
        """The old jump-start for a stuck card: run0 1, run0 1,2, ... twice, then reconfigure."""
        sites = self.layout.sites if self.layout else self.ai_sites()
        k0 = self.knob(SYSTEM_SITE)
        for _ in range(2):
            for n in range(1, len(sites) + 1):
                k0.set("run0", ",".join(map(str, sites[:n])))
                time.sleep(RESET_PAUSE_S)
        if self.layout is not None:
            self.configure_stream(self.layout.sites)

    # -- administration ---------------------------------------------------------------

    def ssh(self) -> SshClient:
        from dtacq_ioc.card.ssh import SshClient  # see the TYPE_CHECKING import above

        return SshClient(self.config.host, self.config.ssh, card=self.name)

    def reboot(self) -> None:
        """Reboot over SSH; knob connections reopen on next use (see wait_ready)."""
        self.ssh().reboot()
        self._close_knobs()
