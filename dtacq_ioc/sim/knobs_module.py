"""Module sites 1..6: identity, clocking, clkdiv, gains, calibration and counters."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from dtacq_ioc.sim.knobs_system import const, flag
from dtacq_ioc.sim.knobtable import Knob, KnobRejected, KnobTable, numeric
from dtacq_ioc.sim.state import IDLE, TRIPLETS, CardState, SiteState


def gain_labels(s: SiteState) -> tuple[str, ...]:
    """The GAIN:NN strings: dB steps on ACQ480, full-scale volts elsewhere ("10V", "2.5V")."""
    if s.spec.module_name == "acq480fmc":
        return s.spec.gain_labels
    return tuple(f"{r:g}V" for r in s.spec.gain_ranges_v)


def parse_triplet(name: str, value: str) -> str:
    """'EN,dX,edge' as the card's clk/trg/sync/event knobs take it."""
    fields = value.replace(" ", "").split(",")
    ok = len(fields) == 3 and all(f.isdigit() for f in fields)
    if not ok or int(fields[0]) > 1 or int(fields[1]) > 7 or int(fields[2]) > 1:
        raise KnobRejected(f"ERROR: {name}: {value.strip()!r} is not EN,dX,edge (e.g. 1,0,1)")
    return ",".join(str(int(f)) for f in fields)


def build_module_knobs(st: CardState, s: SiteState) -> KnobTable:
    t = KnobTable(s.site)
    spec = s.spec
    part = s.config.part_num or f"{s.model}-{spec.nchan}-{spec.max_khz}-{spec.resolution}"
    role = "MASTER" if s.site == min(st.sites) else "SLAVE"
    for name, value in (
        ("MODEL", s.model),
        ("PART_NUM", part),
        ("SERIAL", s.serial),
        ("MANUFACTURER", "D-TACQ Solutions"),
        ("module_name", spec.module_name),
        ("module_type", spec.module_type),
        ("module_role", role),
        ("NCHAN", str(spec.nchan)),
        ("RESOLUTION", str(spec.resolution)),
        ("MAXRATE", str(spec.max_khz * 1000)),
        ("MAX_KHZ", str(spec.max_khz)),
        ("MIN_KHZ", str(spec.min_khz)),
        ("is_adc", "1"),
        ("active_chan", str(spec.nchan)),
    ):
        t.add(Knob(name, const(value)))

    # 16-bit SAR modules may put their codes in 32-bit words; ACQ43x and ACQ480 cannot choose.
    settable32 = spec.word_size == 2 and spec.module_name != "acq480fmc"

    def set_data32(value: str) -> str:
        s.data32 = flag(value, "data32")
        st.touch()
        return ""

    t.add(Knob("data32", lambda: str(int(s.data32)), set_data32 if settable32 else None))
    t.add(Knob("word_size", lambda: str(s.word_size)))

    for trip in TRIPLETS:

        def set_trip(value: str, trip: str = trip) -> str:
            s.triplets[trip] = parse_triplet(trip, value)
            st.touch()
            return ""

        def get_trip(trip: str = trip) -> str:
            return s.triplets[trip]

        t.add(Knob(trip, get_trip, set_trip))

    def set_clkdiv(value: str) -> str:
        s.clkdiv = numeric(value, spec.min_clkdiv, spec.max_clkdiv)
        st.touch()
        return ""

    t.add(Knob("clkdiv", lambda: str(s.clkdiv), set_clkdiv))
    t.add(Knob("CLKDIV", lambda: str(s.clkdiv), set_clkdiv))
    t.add(Knob("sysclkhz", lambda: str(s.sysclk_hz)))
    if spec.hi_res_divider != spec.divider:

        def set_hi_res(value: str) -> str:
            s.hi_res = flag(value, "hi_res_mode")
            st.touch()
            return ""

        t.add(Knob("hi_res_mode", lambda: str(int(s.hi_res)), set_hi_res))

    def set_nacc(value: str) -> str:
        fields = value.replace(" ", "").split(",")
        if len(fields) > 2:
            raise KnobRejected(f"ERROR: nacc: {value.strip()!r} is not n[,div]")
        n = numeric(fields[0], 1, 32)
        div = numeric(fields[1], 0, 32) if len(fields) == 2 else n
        s.nacc = f"{n},{div}"
        return ""

    t.add(Knob("nacc", lambda: s.nacc, set_nacc))
    if s.has_gains:
        add_gain_knobs(t, st, s)
    add_cal_knobs(t, s)

    def count() -> str:
        return str(st.samples_sent if s.site in st.agg_sites else 0)

    def freq() -> str:
        running = st.state != IDLE and s.site in st.agg_sites
        return f"{st.sample_rate_hz() if running else 0.0:.3f}"

    def set_shot(value: str) -> str:
        st.shot = numeric(value, 0, 2**31 - 1)
        return ""

    t.add(Knob("shot", lambda: str(st.shot), set_shot))  # HAPI sets and reads it on site 1

    def ch_data_size() -> str:
        # Bytes per channel of a demuxed shot (HAPI reads it from the aggregator's master).
        shot = st.last_shot
        return str(shot.count * s.word_size if shot is not None and shot.demux else 0)

    t.add(Knob("ch_data_size", ch_data_size))
    t.add(Knob("sample_count", count))
    t.add(Knob("SIG:sample_count:COUNT", count))
    t.add(Knob("SIG:sample_count:FREQ", freq))
    return t


def add_gain_knobs(t: KnobTable, st: CardState, s: SiteState) -> None:
    codes = s.spec.gain_codes
    lo, hi = min(codes), max(codes)
    labels = gain_labels(s)
    digits = "0123456789ABCDEF"

    def set_gain(ch: int, value: str) -> str:
        s.gains[ch] = numeric(value, lo, hi)
        st.touch()
        return ""

    for ch in range(s.spec.nchan):

        def get_gain(ch: int = ch) -> str:
            return str(s.gains[ch])

        t.add(Knob(f"gain{ch + 1}", get_gain, partial(set_gain, ch)))

    def set_gains(value: str) -> str:
        v = value.strip()
        if len(v) != len(s.gains):
            raise KnobRejected(f"ERROR: gains: {v!r} needs {len(s.gains)} characters")
        new = list(s.gains)
        for i, c in enumerate(v.upper()):
            if c in "-X":
                continue  # leave this channel as it is
            if c not in digits or digits.index(c) not in codes:
                raise KnobRejected(f"ERROR: NumericValidator {c} not in range {lo},{hi}")
            new[i] = digits.index(c)
        s.gains[:] = new
        st.touch()
        return ""

    t.add(Knob("gains", lambda: "".join(digits[g] for g in s.gains), set_gains))

    def set_all(value: str) -> str:
        code = numeric(value, lo, hi)
        s.gains[:] = [code] * len(s.gains)
        st.touch()
        return ""

    t.add(Knob("gain", lambda: str(s.gains[0]), set_all))

    def label_code(value: str) -> int:
        v = value.strip()
        for code, label in zip(codes, labels, strict=True):
            if v.upper() == label.upper():
                return code
        if v.isdigit():
            return numeric(v, lo, hi)
        raise KnobRejected(f"ERROR: {v!r} is not one of {','.join(labels)}")

    def set_label(ch: int, value: str) -> str:
        s.gains[ch] = label_code(value)
        st.touch()
        return ""

    for ch in range(s.spec.nchan):

        def get_label(ch: int = ch) -> str:
            return labels[codes.index(s.gains[ch])]

        t.add(Knob(f"GAIN:{ch + 1:02d}", get_label, partial(set_label, ch)))
    t.add(
        Knob(
            "GAIN:ALL",
            lambda: labels[codes.index(s.gains[0])],
            lambda v: set_all(str(label_code(v))),
        )
    )


def add_cal_knobs(t: KnobTable, s: SiteState) -> None:
    """AI:CAL:ESLO/EOFF: "<N+1> <elem0> <ch1>..<chN>" (volts per ADC code, offset in volts)."""

    def eslo() -> str:
        gains: Sequence[int | None] = s.gains or [None] * s.spec.nchan
        slopes = " ".join(f"{s.spec.volts_per_code(g):.6e}" for g in gains)
        return f"{s.spec.nchan + 1} 0 {slopes}"

    def eoff() -> str:
        return f"{s.spec.nchan + 1} 0 " + " ".join(["0"] * s.spec.nchan)

    t.add(Knob("AI:CAL:ESLO", eslo))
    t.add(Knob("AI:CAL:EOFF", eoff))
