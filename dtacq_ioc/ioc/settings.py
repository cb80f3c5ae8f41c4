"""A card's settings: what the IOC wants (from puts and autosave), applied to the card and
read back.

A put completes when the card has the setting and its readbacks have been read and
published, so a client reading after its put sees the applied value everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dtacq_ioc.contract import CLOCKS
from dtacq_ioc.ioc.autosave import Autosave
from dtacq_ioc.ioc.cardgroup import SiteLayout, Update, sample_bytes, sites_text
from dtacq_ioc.ioc.context import CardContext
from dtacq_ioc.ioc.pvs import STRING_MAX, PutRefused, text_value

log = logging.getLogger(__name__)


@dataclass
class Wanted:
    """The settings the IOC holds for the card; applied at every connect."""

    clkdiv: int | None = None
    external: bool = False
    ext_freq_hz: float = 10e6
    buffer_bytes: int = 0
    gains: dict[tuple[int, int], str] = field(default_factory=dict)  # (site, channel) -> label
    sites: tuple[int, ...] = ()  # the sites the stream aggregates (SITES), in site order


def parse_sites(text: str, available: tuple[int, ...]) -> tuple[int, ...]:
    """SITES: "1,2" or "2" (spaces allowed) -> the sites in order; PutRefused in words."""
    known = sites_text(available)
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        raise PutRefused(f"SITES: no site given; list one or more of {known}")
    sites: list[int] = []
    for part in parts:
        if not part.isdigit():
            raise PutRefused(f"SITES: {part[:20]!r} is not a site number (this card has {known})")
        site = int(part)
        if site not in available:
            raise PutRefused(f"SITES: site {site} is not one of this card's sites {known}")
        if site in sites:
            raise PutRefused(f"SITES: site {site} is listed twice")
        sites.append(site)
    return tuple(sorted(sites))


class CardSettings:
    """Setpoint handlers for clock, buffer, sites and gains (bound to their PVs in cardgroup)."""

    def __init__(self, ctx: CardContext, autosave: Autosave, buffer_bytes: int):
        self.ctx = ctx
        self.autosave = autosave
        self.wanted = Wanted(buffer_bytes=buffer_bytes, sites=ctx.config.sites)

    # -- puts ---------------------------------------------------------------------------

    def _check_can_change(self, what: str) -> None:
        if not self.ctx.connected:
            raise self.ctx.refuse(f"{what}: card not connected")
        if self.ctx.run_active():
            raise self.ctx.refuse(f"{what}: a run is active; stop it before changing settings")

    async def put_clkdiv(self, value: Any) -> int:
        clkdiv = int(value)
        self._check_can_change("CLKDIV")
        await self._apply("CLKDIV", lambda: self.ctx.card.set_clkdiv(clkdiv))
        self.wanted.clkdiv = clkdiv
        return clkdiv

    async def put_ext_clock(self, value: Any) -> str:
        external = value == CLOCKS[1]
        self._check_can_change("EXT_CLOCK")
        freq = self.wanted.ext_freq_hz
        await self._apply(
            "EXT_CLOCK", lambda: self.ctx.card.set_external_clock(freq if external else None)
        )
        self.wanted.external = external
        return str(value)

    async def put_ext_clock_freq(self, value: Any) -> float:
        freq = float(value)
        if self.wanted.external:
            self._check_can_change("EXT_CLOCK_FREQ")
            await self._apply("EXT_CLOCK_FREQ", lambda: self.ctx.card.set_external_clock(freq))
        self.wanted.ext_freq_hz = freq
        return freq

    async def put_buffer_size(self, value: Any) -> int:
        size = int(value)
        self._check_can_change("BUFFER_SIZE")
        self.wanted.buffer_bytes = size
        await self._apply("BUFFER_SIZE", lambda: None)
        return size

    async def put_sites(self, value: Any) -> str:
        """The modules the stream aggregates: the display and later runs follow."""
        try:
            sites = parse_sites(text_value(value), self.ctx.config.sites)
        except PutRefused as exc:
            raise self.ctx.refuse(str(exc)) from None
        self._check_can_change("SITES")
        await self._apply("SITES", lambda: None, sites)
        self.wanted.sites = sites
        return sites_text(sites)

    async def put_gain(self, site: int, channel: int | None, value: Any) -> str:
        layout = self.ctx.site(site)
        suffix = f"{site}:GAIN:{'ALL' if channel is None else f'{channel:02d}'}"
        label = str(value)
        self._check_can_change(suffix)
        code = layout.spec.gain_codes[layout.labels.index(label)]
        card = self.ctx.card

        def apply() -> None:
            if channel is None:
                card.set_all_gains(site, code)
            else:
                card.set_gain(site, channel, code)
            self.ctx.readout.refresh_calibration()
            self.read_back()

        await self.ctx.run_on_card(suffix, apply)
        channels = range(1, layout.spec.nchan + 1) if channel is None else (channel,)
        for ch in channels:
            self.wanted.gains[(site, ch)] = label
            if channel is None:  # each channel's PV and saved value follow GAIN:ALL
                self.autosave.set(self.ctx.name, f"{site}:GAIN:{ch:02d}", label)
        await self.ctx.publish(Update(values=self._gain_values(layout, channel is None)))
        return label

    def _gain_values(self, layout: SiteLayout, all_channels: bool) -> dict[str, Any]:
        pre = f"{layout.site}:GAIN:"
        out = {k: v for k, v in self.ctx.readbacks.items() if k.startswith(pre)}
        if not all_channels:
            out.pop(pre + "ALL", None)
        return out

    async def _apply(self, what: str, change: Any, sites: tuple[int, ...] | None = None) -> None:
        """Change the card, restart the stream (on `sites`, else the wanted ones) and read
        back; publish the readbacks."""

        def apply() -> None:
            change()
            self.restart_stream(sites)

        await self.ctx.run_on_card(what, apply)
        await self.ctx.publish(Update(values=dict(self.ctx.readbacks)))

    # -- autosave -----------------------------------------------------------------------

    def adopt(self, suffix: str, value: Any) -> bool:
        """Take a restored setting (already valid for its PV); False when it is not ours."""
        if suffix == "CLKDIV":
            self.wanted.clkdiv = int(value)
        elif suffix == "EXT_CLOCK":
            self.wanted.external = value == CLOCKS[1]
        elif suffix == "EXT_CLOCK_FREQ":
            self.wanted.ext_freq_hz = float(value)
        elif suffix == "BUFFER_SIZE":
            self.wanted.buffer_bytes = int(value)
        elif suffix == "SITES":  # a site no longer configured: PutRefused, the entry skipped
            self.wanted.sites = parse_sites(str(value), self.ctx.config.sites)
        elif ":GAIN:" in suffix:
            site, _, channel = suffix.split(":")
            self.wanted.gains[(int(site), int(channel))] = str(value)
        else:
            return False
        return True

    # -- on the card's thread -------------------------------------------------------------

    def apply_wanted(self) -> None:
        """At connect: put the wanted clock and gains on the card."""
        card, wanted = self.ctx.card, self.wanted
        card.set_external_clock(wanted.ext_freq_hz if wanted.external else None)
        if wanted.clkdiv is not None and not card.fixed_clkdiv:
            card.set_clkdiv(wanted.clkdiv)
        for (site, channel), label in wanted.gains.items():
            layout = self.ctx.site(site)
            if label in layout.labels:
                card.set_gain(site, channel, layout.spec.gain_codes[layout.labels.index(label)])

    def start_stream(self, sites: tuple[int, ...] | None = None) -> None:
        """Stream `sites` (else the wanted ones), the buffer rounded down to whole samples."""
        sites = sites or self.wanted.sites
        samples = max(1, self.wanted.buffer_bytes // sample_bytes(self.ctx.layouts(sites)))
        self.ctx.readout.start(sites, samples)

    def restart_stream(self, sites: tuple[int, ...] | None = None) -> None:
        self.ctx.readout.stop()
        self.start_stream(sites)
        self.read_back()

    def read_back(self) -> None:
        """Read the card's identity and settings into the readback values."""
        card = self.ctx.card
        info = card.info
        if info is None:
            return
        ext = card.external_clock()
        rb: dict[str, Any] = {
            "MODEL": info.model[:STRING_MAX],
            "HOSTNAME": info.hostname[:STRING_MAX],
            "SERIAL": info.serial[:STRING_MAX],
            "FW:SW": info.software_version[:STRING_MAX],
            "FW:FPGA": info.fpga_version,
            "CLKDIV_RBV": card.clkdiv(),
            "EXT_CLOCK_RBV": CLOCKS[ext is not None],
            "SYSCLK_RBV": float(ext or card.sysclk_hz()),
            "SAMPLE_RATE_RBV": card.sample_rate_hz(),
        }
        for layout in self.ctx.sites:
            site = info.sites[layout.site]
            pre = f"{layout.site}:"
            rb[pre + "MODEL"] = site.model[:STRING_MAX]
            rb[pre + "PART_NUM"] = site.part_num[:STRING_MAX]
            rb[pre + "SERIAL"] = site.serial[:STRING_MAX]
            rb[pre + "NCHAN"] = site.nchan
            if layout.spec.gain_codes:
                codes = card.gains(layout.site)
                labels = [layout.labels[layout.spec.gain_codes.index(c)] for c in codes]
                for i, label in enumerate(labels):
                    rb[f"{pre}GAIN:{i + 1:02d}"] = label
                if labels and all(label == labels[0] for label in labels):
                    rb[pre + "GAIN:ALL"] = labels[0]
        self.ctx.readbacks = rb
