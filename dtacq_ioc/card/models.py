"""Facts about ACQ400 modules: what the host must know to configure and decode them.

Values come from D-TACQ's documentation and the nEDM driver (see
shared/reference/acq400-protocol.md and nedm-legacy.md). Where the sources
disagree (ACQ437 gain labels) the labels are a default that a config overrides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

SPAD_SETTING = "1,2,0"


@dataclass(frozen=True)
class ModuleSpec:
    name: str  # the site's MODEL knob, first token (e.g. "ACQ425ELF")
    module_name: str  # the lower-case module_name knob
    module_type: str  # hex id of the module_type knob
    nchan: int  # AI channel words per sample
    word_size: int  # bytes per AI word in the stream
    resolution: int  # ADC bits
    bit_shift: int  # right shift that turns a stream word into an ADC code
    divider: int  # sample rate = clock / (clkdiv * divider)
    hi_res_divider: int  # divider when hi_res_mode is 1 (ACQ43x), else == divider
    min_clkdiv: int
    max_clkdiv: int
    default_clkdiv: int
    fixed_clkdiv: bool  # the LIA firmware and ACQ480 ignore clkdiv
    default_sysclk_hz: int  # what sysclkhz reads on a default-clocked card
    max_khz: int
    min_khz: int
    gain_codes: tuple[int, ...]  # empty: no per-channel gain
    gain_ranges_v: tuple[float, ...]  # full-scale volts per gain code
    gain_labels: tuple[str, ...]  # labels per gain code, as the old system showed them
    fixed_range_v: float  # full scale when the module has no gain select
    max_buffer_bytes: int  # the old system's limit on a readout buffer
    counter_check: bool  # the spad counter is reliable (not on the LIA variant)
    default_buffer_bytes: int = 1 << 20

    @property
    def full_scale_code(self) -> int:
        return 1 << (self.resolution - 1)

    def divider_for(self, hi_res: bool) -> int:
        return self.hi_res_divider if hi_res else self.divider

    def range_v(self, gain_code: int | None) -> float:
        """Full-scale volts for a gain code (the fixed range on modules without gains)."""
        if not self.gain_codes or gain_code is None:
            return self.fixed_range_v
        return self.gain_ranges_v[self.gain_codes.index(gain_code)]

    def volts_per_code(self, gain_code: int | None) -> float:
        return self.range_v(gain_code) / self.full_scale_code

    @property
    def dtype(self) -> str:
        return "<i2" if self.word_size == 2 else "<i4"

    def check_clkdiv(self, clkdiv: int) -> str | None:
        """None when clkdiv is allowed, else the reason it is refused."""
        if self.fixed_clkdiv:
            return f"{self.name} has a fixed clock divider ({self.default_clkdiv})"
        if not self.min_clkdiv <= clkdiv <= self.max_clkdiv:
            return f"clkdiv {clkdiv} out of {self.min_clkdiv}..{self.max_clkdiv} for {self.name}"
        return None


class _Gains(TypedDict):
    gain_codes: tuple[int, ...]
    gain_ranges_v: tuple[float, ...]
    gain_labels: tuple[str, ...]


_SAR_GAINS = _Gains(
    gain_codes=(0, 1, 2, 3),
    gain_ranges_v=(10.0, 5.0, 2.5, 1.25),
    gain_labels=("x1", "x2", "x4", "x8"),
)

MODULES: dict[str, ModuleSpec] = {
    spec.name: spec
    for spec in (
        ModuleSpec(
            name="ACQ425ELF", module_name="acq425elf", module_type="05", nchan=16, word_size=2,
            resolution=16, bit_shift=0, divider=1, hi_res_divider=1, min_clkdiv=50,
            max_clkdiv=65535, default_clkdiv=100, fixed_clkdiv=False,
            default_sysclk_hz=100_000_000, max_khz=2000, min_khz=10, fixed_range_v=10.0,
            max_buffer_bytes=2 << 20, counter_check=True, **_SAR_GAINS,
        ),
        ModuleSpec(
            name="ACQ425ELF-LIA", module_name="acq425elf", module_type="05", nchan=80,
            word_size=2, resolution=16, bit_shift=0, divider=128, hi_res_divider=128,
            min_clkdiv=100, max_clkdiv=100, default_clkdiv=100, fixed_clkdiv=True,
            default_sysclk_hz=100_000_000, max_khz=2000, min_khz=1, fixed_range_v=10.0,
            max_buffer_bytes=2 << 20, counter_check=False, **_SAR_GAINS,
        ),
        ModuleSpec(
            name="ACQ437ELF", module_name="acq437elf", module_type="06", nchan=16, word_size=4,
            resolution=24, bit_shift=8, divider=256, hi_res_divider=512, min_clkdiv=4,
            max_clkdiv=255, default_clkdiv=8, fixed_clkdiv=False,
            default_sysclk_hz=33_333_000, max_khz=128, min_khz=4,
            gain_codes=(0, 1, 2, 3), gain_ranges_v=(10.0, 5.0, 2.0, 1.0),
            gain_labels=("x1", "x2", "x5", "x10"), fixed_range_v=10.0,
            max_buffer_bytes=1 << 20, counter_check=True,
        ),
        ModuleSpec(
            name="ACQ420FMC", module_name="acq420fmc", module_type="01", nchan=4, word_size=2,
            resolution=16, bit_shift=0, divider=1, hi_res_divider=1, min_clkdiv=50,
            max_clkdiv=65535, default_clkdiv=100, fixed_clkdiv=False,
            default_sysclk_hz=100_000_000, max_khz=2000, min_khz=10, fixed_range_v=10.0,
            max_buffer_bytes=2 << 20, counter_check=True, **_SAR_GAINS,
        ),
        ModuleSpec(
            name="ACQ424ELF", module_name="acq424elf", module_type="04", nchan=32, word_size=2,
            resolution=16, bit_shift=0, divider=1, hi_res_divider=1, min_clkdiv=100,
            max_clkdiv=65535, default_clkdiv=100, fixed_clkdiv=False,
            default_sysclk_hz=100_000_000, max_khz=1000, min_khz=10, gain_codes=(),
            gain_ranges_v=(), gain_labels=(), fixed_range_v=10.24,
            max_buffer_bytes=2 << 20, counter_check=True,
        ),
        ModuleSpec(
            name="ACQ435ELF", module_name="acq435elf", module_type="02", nchan=32, word_size=4,
            resolution=24, bit_shift=8, divider=256, hi_res_divider=512, min_clkdiv=4,
            max_clkdiv=255, default_clkdiv=8, fixed_clkdiv=False,
            default_sysclk_hz=33_333_000, max_khz=128, min_khz=4, gain_codes=(),
            gain_ranges_v=(), gain_labels=(), fixed_range_v=10.0,
            max_buffer_bytes=1 << 20, counter_check=True,
        ),
        ModuleSpec(
            name="ACQ480FMC", module_name="acq480fmc", module_type="08", nchan=8, word_size=2,
            resolution=16, bit_shift=0, divider=1, hi_res_divider=1, min_clkdiv=1,
            max_clkdiv=1, default_clkdiv=1, fixed_clkdiv=True,
            default_sysclk_hz=20_000_000, max_khz=80000, min_khz=10000,
            gain_codes=tuple(range(13)),
            gain_ranges_v=tuple(2.5 / 10 ** (db / 20) for db in range(13)),
            gain_labels=tuple(f"{db}dB" for db in range(13)), fixed_range_v=2.5,
            max_buffer_bytes=4 << 20, counter_check=True,
        ),
    )
}  # fmt: skip


def module_spec(name: str) -> ModuleSpec:
    """The spec for a MODEL string; extra tokens after the model are ignored as nEDM did."""
    key = name.split()[0] if name.strip() else name
    try:
        return MODULES[key]
    except KeyError:
        raise KeyError(f"unknown module {name!r}; known: {', '.join(MODULES)}") from None


def module_for_site(model: str, fpga_version: str) -> ModuleSpec:
    """Resolve a site's spec from its MODEL knob and the carrier's fpga_version.

    The lock-in firmware is not a different MODEL: only fpga_version tells it
    apart, by its "_LIA" suffix on the first token.
    """
    spec = module_spec(model)
    first = fpga_version.split()[0] if fpga_version.strip() else ""
    if spec.name == "ACQ425ELF" and first.endswith("_LIA"):
        return MODULES["ACQ425ELF-LIA"]
    return spec


def sample_rate_hz(clock_hz: float, clkdiv: int, divider: int) -> float:
    """The old system's rate: (external clock or sysclkhz) / (clkdiv * divider)."""
    return clock_hz / (clkdiv * divider)
