"""The IOC under EPICS base 7.0.8.1's own tools, with EPICS base's softIoc as the reference.

One `dtacq-ioc run` serves two simulated cards (ACQ425ELF: SHORT waveforms, ACQ437ELF:
LONG waveforms); the PVs are those it lists (`--list-pvs`), never typed here. A softIoc
serves a mirror record of each (the record type the PV's native type, count and access
call for, with its states and text), and every request is asked of both: where softIoc
answers with a value the IOC must too; where softIoc answers with a failed-read status
the IOC may too. No request may abort a client (exit 134) or get "Internal Failure".
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from epics_base import (
    ALARM_FIELDS,
    COMMON_FIELDS,
    RECORD_FIELDS,
    REQUESTS,
    CaEndpoint,
    Camonitor,
    Channel,
    EpicsBase,
    Mirror,
    ServedIoc,
    ToolResult,
    blocks,
    channels,
    dtacq_ioc,
    enum_states,
    epics_base,
    plain_values,
    soft_ioc,
)
from support import ROOT, random_loopback, sim_card_toml

DISPLAY_SAMPLES = 64
CARDS = (("C1", "ACQ425ELF", "acq2106"), ("C2", "ACQ437ELF", "acq1001"))


def write_config(directory: Path) -> tuple[Path, list[str], list[str]]:
    """Two simulated cards, each on a loopback address of its own; prefixes and hosts."""
    tag = secrets.token_hex(3).upper()
    prefixes, hosts, cards = [], [], []
    for name, module, carrier in CARDS:
        prefixes.append(f"E{tag}:{name}:")
        hosts.append(random_loopback())
        cards.append(sim_card_toml(name, hosts[-1], module=module, carrier=carrier,
                                   prefix=prefixes[-1]))  # fmt: skip
    ioc_name = f"e{tag.lower()}"
    path = directory / "test.toml"
    path.write_text(
        f"""
[ioc]
name = "{ioc_name}"
autosave_dir = "autosave"
display_samples = {DISPLAY_SAMPLES}

[archive]
data_dir = "data"
{"".join(cards)}
"""
    )
    return path, prefixes, hosts


@dataclass
class Rig:
    """The IOC, what cainfo says of its PVs, and softIoc's mirror of them."""

    base: EpicsBase
    ioc: ServedIoc
    prefixes: list[str]
    hosts: list[str]
    chans: dict[str, Channel]
    states: dict[str, tuple[str, ...]]
    mirror: Mirror
    ref: CaEndpoint

    def rtyp(self, name: str) -> str:
        return self.mirror.records[name]

    def card_names(self, card: int = 0) -> dict[str, str]:
        """suffix -> full name of one card's PVs."""
        prefix = self.prefixes[card]
        return {n.removeprefix(prefix): n for n in self.ioc.names if n.startswith(prefix)}

    def sync_texts(self) -> None:
        """Give the mirror's string records the text the IOC's string PVs hold now."""
        names = [n for n, c in self.chans.items() if c.native == "DBF_STRING"]
        texts = plain_values(self.ioc.endpoint.caget(*names).stdout)
        for name in names:
            result = self.ref.caput(self.mirror.name(name), texts.get(name, ""))
            assert result.returncode == 0, result.tail()


def describe(ioc: ServedIoc) -> tuple[dict[str, Channel], dict, dict, dict]:
    """cainfo of every PV, the states of enum PVs, the text of string PVs, and the
    record type each PV names in .RTYP (where it serves one)."""
    chans = channels(ioc.endpoint, ioc.names)
    enums = [n for n, c in chans.items() if c.native == "DBF_ENUM"]
    got = ioc.endpoint.caget("-d", "DBR_CTRL_ENUM", *enums)
    assert not got.aborted, got.tail()
    states = {n: enum_states(b) for n, b in blocks(got.stdout).items()}
    strings = [n for n, c in chans.items() if c.native == "DBF_STRING"]
    texts = plain_values(ioc.endpoint.caget(*strings).stdout)
    got = ioc.endpoint.caget(*(n + ".RTYP" for n in ioc.names))
    served = {k.removesuffix(".RTYP"): v for k, v in plain_values(got.stdout).items()}
    return chans, states, texts, served


@contextlib.contextmanager
def restartable(directory: Path, config: tuple[Path, list[str], list[str]] | None = None
                ) -> Iterator[Callable[[], contextlib.AbstractContextManager[Rig]]]:  # fmt: skip
    """A function that serves `config` (a new one in `directory` if None) in a new IOC
    process each time it is entered; softIoc's mirror, made from the first, outlives
    them all (the PVs are the same on every restart)."""
    base = epics_base()
    path, prefixes, hosts = config or write_config(directory)
    with contextlib.ExitStack() as stack:
        refs: list[tuple[Mirror, CaEndpoint]] = []

        @contextlib.contextmanager
        def serve() -> Iterator[Rig]:
            with dtacq_ioc(base, path, ready=f"{prefixes[-1]}STATE=IDLE") as ioc:
                chans, states, texts, served = describe(ioc)
                if not refs:
                    mirror = Mirror(f"REF{secrets.token_hex(2).upper()}:")
                    db = mirror.db(chans, states, texts, served)
                    probe = mirror.name(ioc.names[0])
                    refs.append((mirror, stack.enter_context(soft_ioc(base, db, directory, probe))))
                mirror, ref = refs[0]
                yield Rig(base, ioc, prefixes, hosts, chans, states, mirror, ref)

        yield serve


@contextlib.contextmanager
def rig_for(directory: Path, config: tuple[Path, list[str], list[str]] | None = None
            ) -> Iterator[Rig]:  # fmt: skip
    """The IOC on `config` (a new one in `directory` if None) and softIoc's mirror."""
    with restartable(directory, config) as serve, serve() as rig:
        yield rig


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[Rig]:
    with rig_for(tmp_path_factory.mktemp("epics_base")) as r:
        yield r


def assert_sound(result: ToolResult) -> None:
    """No request may abort the client or be answered with an internal failure."""
    assert not result.aborted, f"the tool aborted:\n{result.tail()}"
    assert not result.internal_failure, f"Internal Failure:\n{result.tail()}"


def compare_requests(rig: Rig, names: list[str], requests=REQUESTS) -> list[str]:
    """Every request of every name, asked of the IOC and of softIoc; the differences."""
    texts = {n for n in names if rig.chans[n].native == "DBF_STRING"}
    got = rig.ioc.endpoint.requests(names, requests, texts=texts)
    ref = rig.ref.requests([rig.mirror.name(n) for n in names], requests,
                           texts={rig.mirror.name(n) for n in texts})  # fmt: skip
    problems = []
    for req in got:
        for result in (got[req], ref[req]):
            if result.aborted or result.internal_failure:
                problems.append(f"{req}: aborted or Internal Failure {result.summary()}")
        ref_failed = {n for n in names if rig.mirror.name(n) in ref[req].failed_channels()}
        for name in sorted(got[req].failed_channels() - ref_failed):
            problems.append(f"{req} {name} ({rig.rtyp(name)}): the IOC failed, softIoc answers")
    return problems


def report(problems: list[str]) -> str:
    return "\n".join(problems[:40]) + f"\n({len(problems)} in all)"


# --- reads ---


def test_cainfo_answers_every_pv(rig):
    result = rig.ioc.endpoint.cainfo(*rig.ioc.names)
    assert_sound(result)
    assert result.returncode == 0, result.tail()
    assert set(blocks(result.stdout)) == set(rig.ioc.names)


@pytest.mark.timeout(600)
def test_no_request_of_any_type_aborts_a_client(rig):
    """Every DBR type family, over every PV, as a plain read (ca_array_get): an answer or a
    failed-read status, never an abort or "Internal Failure"."""
    for result in rig.ioc.endpoint.requests(rig.ioc.names, callback=False).values():
        assert_sound(result)


@pytest.mark.timeout(600)  # twenty request types over every PV, on both servers
def test_every_request_type_gets_the_kind_of_answer_softioc_gives(rig):
    # The same text on both sides: whether a text reads as a number depends on it.
    rig.sync_texts()
    problems = compare_requests(rig, rig.ioc.names)
    assert not problems, report(problems)


def test_each_pv_names_a_record_type_fitting_its_type_and_access(rig):
    got = rig.ioc.endpoint.caget(*(n + ".RTYP" for n in rig.ioc.names))
    assert_sound(got)
    served = {k.removesuffix(".RTYP"): v for k, v in plain_values(got.stdout).items()}
    problems = []
    for name, ch in rig.chans.items():
        want = ch.record_type(len(rig.states.get(name, ())))
        if served.get(name) != want:
            access = "writable" if ch.writable else "read-only"
            problems.append(f"{name}: RTYP {served.get(name)!r}, {ch.native} x{ch.count} "
                            f"{access} is a {want}")  # fmt: skip
    assert not problems, report(problems)


def _same_number(a: str, b: str) -> bool:
    try:
        x, y = float(a), float(b)
    except ValueError:
        return a == b
    # caget prints doubles to 6 significant digits (%g): equal to that precision.
    return math.isclose(x, y, rel_tol=1e-5) or (math.isnan(x) and math.isnan(y))


# A field and the DBR_CTRL metadata line it must equal (EPICS base's get_units,
# get_precision, get_graphic_double, get_control_double, get_alarm_double).
METADATA_OF_FIELD = {
    "EGU": "Units", "PREC": "Precision", "HOPR": "Hi disp limit", "LOPR": "Lo disp limit",
    "HIHI": "Hi alarm limit", "HIGH": "Hi warn limit", "LOW": "Lo warn limit",
    "LOLO": "Lo alarm limit", "SEVR": "Severity", "STAT": "Status",
}  # fmt: skip
# Outputs' control limits are their drive limits; the others' are the display limits.
CONTROL_LIMITS = {"out": ("DRVH", "DRVL"), "in": ("HOPR", "LOPR")}


FIELD_BATCH = 400  # field names per caget


def field_problems(endpoint: CaEndpoint, chans: dict[str, Channel], rtyps: dict[str, str],
                   states: dict[str, tuple[str, ...]], name_of=lambda n: n,
                   defined: bool = True) -> list[str]:  # fmt: skip
    """Every field clients read from each PV's record type, held against the PV's
    DBR_CTRL metadata (by names relative to the IOC: `name_of` maps them to the server)."""
    wanted = {n: COMMON_FIELDS + RECORD_FIELDS[rtyps[n]] for n in chans}
    names = [f"{name_of(n)}.{f}" for n, fs in wanted.items() for f in fs]
    fields: dict[str, str] = {}
    # In batches: thousands of names in one search burst overflow the server's UDP buffer.
    for i in range(0, len(names), FIELD_BATCH):
        fields.update(endpoint.served_values(names[i : i + FIELD_BATCH])[0])
    by_type: dict[str, list[str]] = {"DBR_CTRL_DOUBLE": [], "DBR_CTRL_ENUM": [],
                                     "DBR_STS_STRING": []}  # fmt: skip
    for n, ch in chans.items():
        kind = {"DBF_ENUM": "DBR_CTRL_ENUM", "DBF_STRING": "DBR_STS_STRING"}
        by_type[kind.get(ch.native, "DBR_CTRL_DOUBLE")].append(name_of(n))
    meta: dict[str, dict[str, str]] = {}
    for req, names in by_type.items():
        result = endpoint.caget("-d", req, *names)
        assert_sound(result)
        meta.update(blocks(result.stdout))
    # -c reads an array at its current length (count 0), which NORD must equal; a plain
    # caget asks for NELM elements and EPICS pads them with zeros.
    arrays = [name_of(n) for n in chans if chans[n].is_array]
    plain = plain_values(endpoint.caget("-c", *arrays).stdout)
    problems = []
    for n, ch in chans.items():
        server, rtyp, ctrl = name_of(n), rtyps[n], meta.get(name_of(n), {})

        def check(f: str, want: str, numeric: bool = False) -> None:
            have = fields.get(f"{server}.{f}")  # noqa: B023
            if have is not None and not (_same_number(have, want) if numeric else have == want):
                problems.append(f"{n}.{f} ({rtyp}): {have!r}, metadata says {want!r}")  # noqa: B023

        missing = [f for f in wanted[n] if f"{server}.{f}" not in fields]
        problems += [f"{n}.{f} ({rtyp}): not served" for f in missing]
        check("RTYP", rtyp)
        if not fields.get(f"{server}.DESC"):
            problems.append(f"{n}.DESC ({rtyp}): empty")
        if defined:
            check("UDF", "0", numeric=True)
        for f in wanted[n]:
            line = METADATA_OF_FIELD.get(f)
            # EPICS reports an alarm limit whose severity is NO_ALARM as NaN: not in use.
            in_use = ctrl.get(line or "", "nan").lower() != "nan" or f not in ALARM_FIELDS
            if line is not None and line in ctrl and in_use:
                check(f, ctrl[line], numeric=f not in ("EGU", "SEVR", "STAT"))
        if rtyp in ("ao", "longout", "ai", "longin", "waveform"):
            hi, lo = CONTROL_LIMITS["out" if rtyp in ("ao", "longout") else "in"]
            if f"{server}.{hi}" in fields and "Hi ctrl limit" in ctrl:
                check(hi, ctrl["Hi ctrl limit"], numeric=True)
                check(lo, ctrl["Lo ctrl limit"], numeric=True)
        if rtyp in ("bi", "bo", "mbbi", "mbbo"):
            labels = states.get(n, ())
            for i, f in enumerate(RECORD_FIELDS[rtyp]):
                check(f, labels[i] if i < len(labels) else "")
        if rtyp == "waveform":
            check("NELM", str(ch.count), numeric=True)
            check("FTVL", ch.native.removeprefix("DBF_"))
            if fields.get(f"{server}.NORD", "0") != "0":  # softIoc: an empty array reads NELM
                check("NORD", plain.get(server, "0").split(" ")[0], numeric=True)
    return problems


def test_record_fields_are_served_and_equal_the_metadata(rig):
    problems = field_problems(rig.ioc.endpoint, rig.chans, rig.mirror.records, rig.states)
    assert not problems, report(problems)


def test_the_field_check_holds_for_softioc_records(rig):
    """The check above, run on softIoc's mirror: EPICS base itself passes it."""
    problems = field_problems(rig.ref, rig.chans, rig.mirror.records, rig.states,
                              name_of=rig.mirror.name, defined=False)  # fmt: skip
    assert not problems, report(problems)


def test_fields_the_ioc_does_not_act_on_refuse_puts(rig):
    """softIoc acts on EOFF/ESLO (linear conversion) and refuses NELM; the IOC acts on none."""
    targets = [f"{n}.{f}" for n, t in rig.mirror.records.items() if t in ("ai", "ao")
               for f in ("EOFF", "ESLO")]  # fmt: skip
    targets += [f"{n}.NELM" for n, t in rig.mirror.records.items() if t == "waveform"]
    accepted = []
    for target in targets[::7]:  # a sample of each kind keeps this quick
        result = rig.ioc.endpoint.caput(target, "5", "-c")
        assert_sound(result)
        if result.returncode == 0:
            accepted.append(f"{target}: {result.stdout.strip().splitlines()[-1]}")
    assert not accepted, report(accepted)


@pytest.mark.parametrize("options", [(), ("-n",), ("-S",)], ids=["plain", "numeric", "text"])
def test_camonitor_of_every_pv_gets_a_first_update_of_each(rig, options):
    """camonitor prints each PV's first update; it must neither abort nor see failures."""
    cmd = [str(rig.base.tool("camonitor")), *options, *rig.ioc.names]
    proc = subprocess.Popen(cmd, env=rig.ioc.endpoint.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")  # fmt: skip
    seen: set[str] = set()
    lines: list[str] = []
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        while seen < set(rig.ioc.names) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            seen.add(line.split(" ", 1)[0])
    finally:
        proc.terminate()
        code = proc.wait(10)
    text = "".join(lines)
    assert code not in (134, -6) and proc.returncode == -15, text[-2000:]
    assert "Internal Failure" not in text, text[-2000:]
    missing = set(rig.ioc.names) - seen
    assert not missing, f"no update of {sorted(missing)[:10]}:\n{text[-1500:]}"


# --- monitor masks ---

# softIoc's records for the same events: a value that changes at every scan, and an ao
# whose alarm a put to HIHI (pp: it processes the record) changes without its value.
MASK_DB = """
record(calc, "{p}TICK") {{
    field(SCAN, ".1 second")
    field(INPA, "{p}TICK")
    field(CALC, "A+1")
}}
record(ao, "{p}LEVEL") {{
    field(VAL, "100")
    field(PINI, "YES")
    field(HIHI, "1000")
    field(HHSV, "MAJOR")
}}
"""


@contextlib.contextmanager
def monitors(endpoint: CaEndpoint, name: str, *masks: str) -> Iterator[dict[str, Camonitor]]:
    """`camonitor -m MASK NAME` for each mask, each past its first update."""
    started = {m: Camonitor(endpoint, name, "-m", m) for m in masks}
    try:
        for mon in started.values():
            mon.wait_for(lambda u: len(u) >= 1, "no first update")
        yield started
    finally:
        for mon in started.values():
            mon.stop()


def ticking_problems(endpoint: CaEndpoint, name: str) -> list[str]:
    """A value that changes at every update: -m a and -m p get their first update only,
    while -m v (started after them) gets eight."""
    with monitors(endpoint, name, "a", "p") as quiet, monitors(endpoint, name, "v") as loud:
        loud["v"].wait_for(lambda u: len(u) >= 8, "fewer than 8 value updates")
    return [f"camonitor -m {m} {name} printed {len(mon.updates())} updates, not only its "
            f"first:\n" + "\n".join(mon.lines[:5])
            for m, mon in quiet.items() if len(mon.updates()) != 1]  # fmt: skip


def alarm_problems(endpoint: CaEndpoint, name: str, puts: list[tuple[str, str]],
                   values: list[str]) -> list[str]:  # fmt: skip
    """Four puts, as (PV, value): an alarm alone, a new value that clears it, a new value
    alone, then an alarm alone again; `values` are the PV's value after each. -m a must
    print the alarm changes only (the value that cleared the alarm with it), -m v the
    value changes only, each with the alarm it has then."""
    with monitors(endpoint, name, "a", "v") as mon:
        first = mon["v"].updates()[0][0]
        for target, value in puts:
            result = endpoint.caput(target, value)
            assert_sound(result)
        mon["a"].wait_for(lambda u: len(u) >= 4 and u[-1][0] == values[3] and u[-1][1],
                          f"no alarm at {values[3]} after the last put")  # fmt: skip
        mon["v"].wait_for(lambda u: len(u) >= 3 and u[-1][0] == values[2],
                          f"no update of {values[2]}")  # fmt: skip
        alarms = [(v, bool(a)) for v, a in mon["a"].updates()]
        changes = [(v, bool(a)) for v, a in mon["v"].updates()]
    problems = []
    want = [(first, False), (first, True), (values[1], False), (values[3], True)]
    if alarms != want:
        problems.append(f"-m a of {name}: (value, alarmed) {alarms}, not {want}")
    want = [(first, False), (values[1], False), (values[2], False)]
    if changes != want:
        problems.append(f"-m v of {name}: (value, alarmed) {changes}, not {want}")
    return problems


def test_monitors_get_only_the_events_their_mask_asks_for(rig, tmp_path):
    """camonitor -m a / -m v / -m p against softIoc: a subscription gets its first update
    and then only value changes (DBE_VALUE), alarm changes (DBE_ALARM) or property
    changes (DBE_PROPERTY), as its mask asks."""
    p = f"M{secrets.token_hex(2).upper()}:"
    names = rig.card_names()
    clkdiv = names["CLKDIV"]
    start = rig.ioc.endpoint.value(clkdiv)
    _, hi = ctrl_limits(rig, [clkdiv])[clkdiv]
    bad = repr(hi + 1.0)  # refused: CLKDIV goes WRITE/MAJOR, its value unchanged
    step = 1 if int(start) + 2 <= hi else -1  # near the rate it had: the cards keep up
    good = [str(int(start) + step), str(int(start) + 2 * step)]
    with soft_ioc(rig.base, MASK_DB.format(p=p), tmp_path, f"{p}LEVEL") as ref:
        problems = ticking_problems(ref, f"{p}TICK")
        problems += alarm_problems(
            ref, f"{p}LEVEL",
            [(f"{p}LEVEL.HIHI", "50"), (f"{p}LEVEL", "20"), (f"{p}LEVEL", "30"),
             (f"{p}LEVEL.HIHI", "25")],
            ["100", "20", "30", "30"],
        )  # fmt: skip
        assert not problems, "softIoc itself: " + report(problems)
    try:
        problems = ticking_problems(rig.ioc.endpoint, names["1:AI:WF:01"])
        problems += ticking_problems(rig.ioc.endpoint, names["1:AI:CH:01:RMS"])
        problems += alarm_problems(
            rig.ioc.endpoint, clkdiv,
            [(clkdiv, bad), (clkdiv, good[0]), (clkdiv, good[1]), (clkdiv, bad)],
            [start, good[0], good[1], good[1]],
        )  # fmt: skip
    finally:
        assert rig.ioc.endpoint.caput(clkdiv, start).returncode == 0
    assert not problems, report(problems)


# --- channel filters ---


def first_monitor_update(endpoint: CaEndpoint, name: str) -> str:
    cmd = [str(endpoint.base.tool("camonitor")), name]
    proc = subprocess.Popen(cmd, env=endpoint.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        return proc.stdout.readline() if proc.stdout else ""
    finally:
        proc.terminate()
        proc.wait(10)


def count_and_values(line: str, name: str) -> list[str]:
    """The elements caget or camonitor printed after a name (and camonitor's time stamp)."""
    rest = line.split(name, 1)[1].split()
    if re.fullmatch(r"\d{4}-\d\d-\d\d", rest[0]):
        rest = rest[2:]
    count = int(rest[0])
    return rest[1 : 1 + count] if count else []


@pytest.mark.parametrize(
    ("suffix", "want"),
    [(".[0:4]", 5), (".[0:2:8]", 5), ('.{"dbnd":{"abs":1}}', DISPLAY_SAMPLES)],
    ids=["range", "stride", "deadband"],
)
def test_channel_filters_work_for_get_as_for_monitor(rig, suffix, want):
    base = rig.card_names()["1:AI:WF:TB"]  # a fixed axis: get and monitor see the same
    full = rig.ioc.endpoint.caget(base)
    got = rig.ioc.endpoint.caget(base + suffix)
    ref = rig.ref.caget(rig.mirror.name(base) + suffix)
    for result in (full, got, ref):
        assert_sound(result)
        assert result.returncode == 0, result.tail()
    ref_values = count_and_values(ref.stdout, rig.mirror.name(base) + suffix)
    assert len(ref_values) == want, ref.stdout  # what EPICS base gives
    values = count_and_values(got.stdout, base + suffix)
    whole = count_and_values(full.stdout, base)
    expected = {".[0:4]": whole[0:5], ".[0:2:8]": whole[0:9:2]}.get(suffix, whole)
    assert values == expected, got.stdout[:300]
    monitored = count_and_values(first_monitor_update(rig.ioc.endpoint, base + suffix),
                                 base + suffix)  # fmt: skip
    assert monitored == expected


# --- the README ---


README_NAME = re.compile(r"`([^`]+)`")


def readme_patterns(text: str) -> list[str]:
    """The PV names of README.md's PV table (the table after "## PVs").

    A cell lists names in backticks; one starting with ":" continues the cell's first
    name: it replaces that name's last part, or is appended when that part is a
    placeholder (`<P><S>:MODEL`, `:SERIAL` and `<P><S>:AI:CH:<NN>`, `:MIN`)."""
    section = text.split("\n## PVs", 1)[1].split("\n## ", 1)[0]
    patterns = []
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        names = README_NAME.findall(row.split("|")[1])
        first = names[0]
        for name in names:
            if name.startswith(":"):
                head, _, last = first.rpartition(":")
                name = (first if last.startswith("<") else head) + name
            patterns.append(name)
    return patterns


def pattern_regex(pattern: str, prefix: str) -> re.Pattern:
    parts = re.split(r"(<P>|<S>|<NN>)", pattern)
    subst = {"<P>": re.escape(prefix), "<S>": r"\d+", "<NN>": r"\d\d"}
    return re.compile("".join(subst.get(p, re.escape(p)) for p in parts))


def test_readme_pv_table_is_what_the_ioc_serves(rig):
    patterns = readme_patterns((ROOT / "README.md").read_text())
    assert len(patterns) > 40, patterns
    served = [n for n in rig.ioc.names if any(n.startswith(p) for p in rig.prefixes)]
    regexes = {p: [pattern_regex(p, prefix) for prefix in rig.prefixes] for p in patterns}
    unserved = [p for p, rs in regexes.items()
                if not any(r.fullmatch(n) for r in rs for n in served)]  # fmt: skip
    undocumented = [n for n in served
                    if not any(r.fullmatch(n) for rs in regexes.values() for r in rs)]  # fmt: skip
    assert not unserved, f"in the README, not served: {unserved}"
    assert not undocumented, f"served, not in the README: {undocumented}"


# --- puts ---

CLASS_NAME = re.compile(r"\b[A-Z][a-z]+[A-Z]\w*\b|Traceback")


def last_error(rig: Rig, name: str) -> str:
    """The LAST_ERROR of the card (or IOC) that serves `name`, as `caget -S` prints it."""
    prefix = next((p for p in rig.prefixes if name.startswith(p)), None)
    source = (prefix + "LAST_ERROR") if prefix else next(
        n for n in rig.ioc.names if n.endswith(":LAST_ERROR") and not
        any(n.startswith(p) for p in rig.prefixes))  # fmt: skip
    return rig.ioc.endpoint.caget("-S", "-t", source).stdout.strip()


def value_spellings(value: str) -> set[str]:
    out = {value[:20]}
    try:
        number = float(value)
    except ValueError:
        return out
    out |= {repr(number), f"{number:g}"}
    if number.is_integer():
        out.add(str(int(number)))
    return out


def refusal_problems(rig: Rig, name: str, value: str, wait: float = 5.0) -> list[str]:
    """After a refused put: LAST_ERROR holds one line naming the PV, the value and a
    reason, in words (waiting up to `wait` s for it)."""
    suffix = name.split(":", 2)[-1] if any(name.startswith(p) for p in rig.prefixes) else name
    deadline = time.monotonic() + wait
    while True:
        text = last_error(rig, name)
        named = suffix in text and (not value or any(v in text for v in value_spellings(value)))
        if named or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    shown = f"put {name} {value[:20]!r}: LAST_ERROR {text[:200]!r}"
    problems = []
    if not named:
        problems.append(f"{shown}: does not name the PV and the value")
    if "\n" in text.strip():
        problems.append(f"{shown}: more than one line")
    if CLASS_NAME.search(text):
        problems.append(f"{shown}: names an exception class")
    if named and len(text.split(suffix, 1)[1].strip(" :-'\"")) < 8:
        problems.append(f"{shown}: no reason given")
    return problems


def ctrl_limits(rig: Rig, names: list[str]) -> dict[str, tuple[float, float]]:
    got = rig.ioc.endpoint.caget("-d", "DBR_CTRL_DOUBLE", *names)
    assert_sound(got)
    return {n: (float(b["Lo ctrl limit"]), float(b["Hi ctrl limit"]))
            for n, b in blocks(got.stdout).items()}  # fmt: skip


def test_caput_prints_the_applied_value_and_the_readback_has_followed(rig):
    names = rig.card_names()
    for value in ("250", "300"):
        result = rig.ioc.endpoint.caput(names["CLKDIV"], value)
        assert result.returncode == 0, result.tail()
        new = [line for line in result.stdout.splitlines() if line.startswith("New :")]
        assert new and new[0].split()[-1] == value, result.stdout
        assert rig.ioc.endpoint.value(names["CLKDIV_RBV"]) == value
    result = rig.ioc.endpoint.caput(names["CLKDIV"], "250", "-c")
    assert result.returncode == 0, result.tail()
    assert rig.ioc.endpoint.value(names["CLKDIV_RBV"]) == "250"


def test_a_refused_put_fails_names_pv_value_reason_and_alarms_only_that_pv(rig):
    names = rig.card_names()
    lo, hi = ctrl_limits(rig, [names["CLKDIV"]])[names["CLKDIV"]]
    for value in (repr(hi + 1e6), "12.7" if lo <= 12.7 <= hi else "nan", "abc"):
        for plain in (False, True):
            result = rig.ioc.endpoint.caput(names["CLKDIV"], value, *([] if plain else ["-c"]))
            assert_sound(result)
            if not plain:
                assert result.returncode != 0, f"refused put exited 0:\n{result.tail()}"
            problems = refusal_problems(rig, names["CLKDIV"], value)
            assert not problems, report(problems)
    got = rig.ioc.endpoint.caget("-d", "DBR_STS_STRING", *rig.ioc.names)
    alarmed = [n for n, b in blocks(got.stdout).items()
               if n != names["CLKDIV"] and b.get("Status") == "WRITE"]  # fmt: skip
    assert not alarmed, f"a refused put on CLKDIV alarmed: {alarmed}"


# The PVs whose value comes from the card (issue 10: identity, settings readbacks,
# waveforms, stream figures), by suffix.
CARD_DERIVED = re.compile(
    r"(MODEL|HOSTNAME|SERIAL|FW:SW|FW:FPGA|\d+:(MODEL|PART_NUM|SERIAL)"
    r"|CLKDIV_RBV|EXT_CLOCK_RBV|SAMPLE_RATE_RBV|SYSCLK_RBV"
    r"|\d+:AI:(WF|SPEC|CH):\d\d(:V|:MIN|:MAX|:RMS)?|STREAM:\w+)"
)


@pytest.mark.timeout(300)
def test_a_card_that_drops_alarms_its_pvs_and_refuses_setting_puts(tmp_path):
    from test_ioc import sim_knob

    with rig_for(tmp_path) as rig:
        names = rig.card_names()
        sim_knob(rig.hosts[0], "SIM:REBOOT", 120)  # every port refused for that long
        deadline = time.monotonic() + 60
        while rig.ioc.endpoint.value(names["CONNECTED"]) != "No":
            assert time.monotonic() < deadline, "the IOC never saw the card go"
            time.sleep(0.1)
        derived = [n for s, n in names.items() if CARD_DERIVED.fullmatch(s)]
        assert len(derived) > 50, derived
        got = rig.ioc.endpoint.caget("-d", "DBR_STS_STRING", *derived)
        assert_sound(got)
        wrong = [f"{n}: {b.get('Status')}/{b.get('Severity')}"
                 for n, b in blocks(got.stdout).items()
                 if (b.get("Status"), b.get("Severity")) != ("COMM", "INVALID")]  # fmt: skip
        result = rig.ioc.endpoint.caput(names["CLKDIV"], "250", "-c")
        if result.returncode == 0:
            wrong.append(f"CLKDIV put accepted with the card down: {result.summary()}")
        text = last_error(rig, names["CLKDIV"])
        if not ("CLKDIV" in text and "card not connected" in text):
            wrong.append(f"LAST_ERROR after the CLKDIV put: {text[:200]!r}")
        assert not wrong, report(wrong)


# --- puts that must not poison a PV, across restarts ---

TEN_KB = "x" * 10_000
# A read in each DBR type family, the value types taken in turn (a poisoned PV fails
# them all; the full twenty are compared above).
FAMILY_READS = ("DBR_STRING", "DBR_STS_DOUBLE", "DBR_TIME_ENUM", "DBR_GR_LONG",
                "DBR_CTRL_STRING", "DBR_CTRL_DOUBLE")  # fmt: skip
# caput refuses these itself, before anything is sent: no LAST_ERROR is due.
CLIENT_REFUSAL = re.compile(r"Enum string value .* invalid|Invalid element count|too long",
                            re.IGNORECASE)  # fmt: skip


def fuzz_values(ch: Channel, states: tuple[str, ...], limits: tuple[float, float] | None
                ) -> list[tuple[str, bool]]:  # fmt: skip
    """(value, must be refused) for one writable PV."""
    junk = ["nan", "inf", "-inf", "abc", "", TEN_KB]
    if ch.native == "DBF_ENUM":
        beyond = [str(len(states)), "99", "65535", "-1"]
        return [(v, True) for v in beyond + junk]
    if ch.native in ("DBF_DOUBLE", "DBF_LONG", "DBF_FLOAT", "DBF_SHORT") and not ch.is_array:
        lo, hi = limits or (0.0, 0.0)
        out = [(v, lo < hi) for v in junk]
        if lo < hi:
            out += [(repr(hi * 10 + 1e6), True), ("-1", lo > -1), (repr(lo - 1), True)]
        return out
    return [(v, False) for v in ["nan", "-1", "abc", "{not json", "", TEN_KB]]


def fuzz(rig: Rig, names: list[str]) -> list[str]:
    """Every fuzz value to every PV with `caput -c` (a refusal must be one in words, in
    LAST_ERROR), and the first of them also as a plain `caput` (no callback)."""
    numeric = [n for n in names if rig.chans[n].native not in ("DBF_ENUM", "DBF_STRING")
               and not rig.chans[n].is_array]  # fmt: skip
    limits = ctrl_limits(rig, numeric) if numeric else {}
    problems: list[str] = []
    patience = 3  # refusals whose LAST_ERROR is waited for once it has failed to come
    for name in names:
        ch = rig.chans[name]
        text = ["-S"] if ch.native == "DBF_CHAR" else []  # a CHAR array takes text
        values = fuzz_values(ch, rig.states.get(name, ()), limits.get(name))
        for value, must_refuse in values:
            result = rig.ioc.endpoint.caput(name, value, "-c", *text)
            said = (result.stdout + result.stderr).strip()
            if result.aborted or result.internal_failure:
                problems.append(result.summary())
            elif CLIENT_REFUSAL.search(said):
                continue
            elif result.returncode != 0:
                found = refusal_problems(rig, name, value, wait=2.0 if patience else 0.0)
                patience -= any("does not name" in p for p in found) and patience > 0
                problems += found
            elif must_refuse:
                last = said.splitlines()[-1][:120] if said else "(nothing printed)"
                problems.append(f"caput -c {name} {value[:20]!r} accepted (exit 0): {last}")
        plain = rig.ioc.endpoint.caput(name, values[0][0], *text)
        if plain.aborted or plain.internal_failure:
            problems.append(plain.summary())
    return problems


def fuzz_side_by_side(rig: Rig, names: list[str]) -> list[str]:
    """The fuzz of each card's PVs beside the other card's (each card's refusals land in
    its own LAST_ERROR), then the IOC's own PVs, whose puts may reach every card."""
    lanes = [[n for n in names if n.startswith(p)] for p in rig.prefixes]
    own = [n for n in names if not any(n.startswith(p) for p in rig.prefixes)]
    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        found = list(pool.map(lambda lane: fuzz(rig, lane), lanes))
    return [p for lane in found for p in lane] + fuzz(rig, own)


def readable_problems(rig: Rig, when: str) -> list[str]:
    """Each PV read in every DBR type family gets the kind of answer softIoc gives."""
    rig.sync_texts()
    return [f"{when}: {p}" for p in compare_requests(rig, rig.ioc.names, FAMILY_READS)]


def autosave_path(config: Path) -> Path:
    name = tomllib.loads(config.read_text())["ioc"]["name"]
    return config.parent / "autosave" / f"{name}.json"


# Entries no put could have stored: wrong types, indices beyond the states, values past
# the limits, PVs this IOC no longer serves; and a file that is not JSON at all.
BAD_ENTRIES = {
    "C1": {"EXT_CLOCK": 5, "RUN:SAVE": 7, "RUN:UPLOAD": "maybe", "CLKDIV": "abc",
           "BUFFER_SIZE": [1, 2], "RUN:NAME": {"x": 1}, "RUN:TRIGGER": 12,
           "RUN:DOWNSAMPLE": -5, "EXT_CLOCK_FREQ": "NaN", "1:GAIN:01": 99, "NO_SUCH_PV": 1},
    "C2": {"EXT_CLOCK": -1, "CLKDIV": 1e30, "RUN:CHANNELS": None, "1:GAIN:ALL": "x1000"},
}  # fmt: skip
GARBAGE = "\x00\xff{not json at all"


def skip_problems(log: str) -> list[str]:
    """Each of BAD_ENTRIES skipped in one log line naming its card and PV."""
    problems = []
    for card, entries in BAD_ENTRIES.items():
        for suffix in entries:
            named = re.compile(rf"autosave: {card}: .*\b{re.escape(suffix)}\b.*skipped")
            lines = [line for line in log.splitlines() if named.search(line)]
            if len(lines) != 1:
                problems.append(f"autosave entry {card} {suffix}: logged {lines}")
    return problems


@pytest.mark.timeout(900)
def test_put_fuzz_and_corrupt_autosave_leave_every_pv_readable_across_restarts(tmp_path):
    """The fuzz over every writable PV, then every PV read in every type family; again
    after a restart over what autosave kept; again over an autosave file of bad entries
    (each skipped in one log line), and over one that is not JSON."""
    config = write_config(tmp_path)
    saved = autosave_path(config[0])
    with restartable(tmp_path, config) as serve:
        with serve() as rig:
            writable = [n for n, c in rig.chans.items() if c.writable]
            assert len(writable) > 20, writable
            problems = fuzz_side_by_side(rig, writable)
            problems += readable_problems(rig, "after the fuzz")
        with serve() as rig:
            problems += readable_problems(rig, "restarted over the fuzz's autosave")
        saved.write_text(json.dumps(BAD_ENTRIES))
        with serve() as rig:
            problems += readable_problems(rig, "restarted over bad entries")
            problems += skip_problems(rig.ioc.log())
            for card in (0, 1):
                clock = rig.card_names(card)["EXT_CLOCK"]
                if rig.ioc.endpoint.value(clock) not in rig.states[clock]:
                    problems.append(f"{clock} restored to a value outside its states")
        saved.write_text(GARBAGE)
        with serve() as rig:
            problems += readable_problems(rig, "restarted over a file that is not JSON")
    assert not problems, report(problems)
