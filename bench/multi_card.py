"""Many cards in one IOC: `python bench/multi_card.py [--cards 1,2,4,8] [--seconds S] [--dir D]`.

For each N in `--cards`: N simulated ACQ425ELF cards (16 channels + 2 spad words =
40 B/sample, clkdiv 100 = 1 MHz, so 40 MB/s each) served by ONE `dtacq-ioc run
CONFIG --no-sim`; the cards are played by a `dtacq-ioc sim CONFIG` process of their
own, so the IOC's CPU is measured apart from the simulator's. Every card streams
into a run that writes .dig files (trigger `rotate`, a new file every `--rotate-s`
seconds: each file's first spad counter is the simulator's sample number, so the
files tell how many samples the simulator sent over the run); the display runs at
10 Hz; 4 pyepics clients (separate processes) and 10 PVWS clients (WebSocket to the
IOC's bridge, one process) each monitor `<P>1:AI:WF:01` of every card.

Printed per N, over a `--seconds` window: samples sent by the simulators (SIM:SENT)
and received by the IOC (STREAM:SAMPLES) when the clients stop; over the run, the
samples the simulators sent (the files' counter span) vs the samples in the files vs
the catalog's count; counter errors (STREAM:COUNTER_ERRORS + RUN:ERRORS_RBV);
overruns (RUN:OVERRUNS_RBV); the IOC's CPU (% of one core) and memory (PSS, from /proc),
both with its readout processes (`--readout process`, the default) or not (`thread`);
the simulator's CPU, the clients' CPU and the whole machine's (busy % of all cores);
the slowest display rate seen by any CA and any PVWS client (Hz, the minimum over
clients of each client's slowest PV); and the cost per card (IOC CPU / N over IOC CPU
at N = 1; 1.0 = linear). Before the IOC starts, the same streams are read by a bare
reader (`bare`: one thread per card, recv into 4 MiB, write, sha256, nothing else) for
as long: its CPU is the floor of moving those bytes in Python, and IOC/bare says how
far above it the IOC is. Targets (issue 14): N = 8
lossless, every client >= 9.5 Hz, cost per card at N = 8 <= 1.2.

`--startup` instead times start-up with `--startup-cards` (8) cards, median of
`--launches` (3): launch of `dtacq-ioc run CONFIG` -> READY=1 on $NOTIFY_SOCKET, and
-> every card's `<P>STATE` read (caproto, a fresh search each time) as IDLE or
RUNNING; once with the cards already up (`--no-sim`, as real cards are), once with
the IOC starting its own simulator. Target < 3 s.

    .venv/bin/python bench/multi_card.py --cards 1,2 --seconds 5 --rotate-s 1
    .venv/bin/python bench/multi_card.py --startup --launches 1

Run files are checked and deleted as soon as a run ends (8 cards write 320 MB/s)
unless `--keep-files`. Roles `ca-client`, `ws-clients` and `bare` are the child processes;
run them only through the main command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from ca_waveforms import (  # noqa: E402  (this directory's helpers: /proc readers, processes)
    ca_environment,
    cpu_seconds,
    own_processes,
    process,
    pss_mb,
    wait_until,
)
from soak import COUNTER_WRAP, Ledger  # noqa: E402  (a run's files, counter continuity)
from support import (  # noqa: E402
    NotifyListener,
    child_env,
    free_port,
    random_loopback,
    sim_card_toml,
    wait_for_port,
)

from dtacq_ioc.contract import CARD_STATES  # noqa: E402

RATE_HZ = 1e6  # ACQ425ELF's default clkdiv 100 on the 100 MHz clock
MIN_MBPS = 30.0  # the stream is at full rate (40 MB/s) once STREAM:MBPS passes this
CA_CLIENTS = 4
WS_CLIENTS = 10
CONNECT_S = 6.0  # clients connect and settle before the window opens
READY_TIMEOUT_S = 60.0
TARGET_HZ = 9.5
TARGET_COST = 1.2
TARGET_STARTUP_S = 3.0
# caproto reads an enum as its state name
CONNECTED = {name.encode() for name in CARD_STATES if name in ("IDLE", "RUNNING")}


# --- child roles ------------------------------------------------------------------------


def window_rates(counts: dict[str, int], start: float, end: float) -> dict[str, float]:
    return {name: n / (end - start) for name, n in counts.items()}


def ca_client_main(args: argparse.Namespace) -> int:
    """Monitor `--pvs` over [start, end); print each PV's update rate as JSON."""
    import epics

    names = args.pvs.split(",")
    counts = dict.fromkeys(names, 0)
    total = dict.fromkeys(names, 0)

    def on_update(pvname: str = "", **_: Any) -> None:
        total[pvname] += 1
        if args.start <= time.time() < args.end:
            counts[pvname] += 1

    pvs = [epics.PV(n, auto_monitor=True, callback=on_update) for n in names]
    time.sleep(max(0.0, args.end - time.time()) + 0.2)
    for pv in pvs:
        pv.clear_callbacks()
    # A PV short of updates: was it never found, or found and its monitor silent?
    notes = {pv.pvname: f"connected, {total[pv.pvname]} updates in all" if pv.connected
             else "never connected" for pv in pvs}  # fmt: skip
    print(json.dumps({"hz": window_rates(counts, args.start, args.end), "notes": notes}),
          flush=True)  # fmt: skip
    for pv in pvs:
        pv.disconnect()
    return 0


UPDATE_HEAD = '{"type":"update","pv":"'  # how the bridge begins every update (pvws_update)


def ws_clients_main(args: argparse.Namespace) -> int:
    """`--count` PVWS clients subscribed to `--pvs`; print each one's rates per PV as JSON."""
    import websockets

    names = args.pvs.split(",")

    def pv_of(raw: str | bytes) -> str:
        text = raw if isinstance(raw, str) else raw.decode(errors="replace")
        if text.startswith(UPDATE_HEAD):  # the name without parsing 10 kB of base64
            return text[len(UPDATE_HEAD) : text.index('"', len(UPDATE_HEAD))]
        msg = json.loads(text)
        return str(msg.get("pv", "")) if msg.get("type") == "update" else ""

    async def one() -> dict[str, float]:
        counts = dict.fromkeys(names, 0)
        async with websockets.connect(args.url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "subscribe", "pvs": names}))
            while (left := args.end - time.time()) > 0:
                try:
                    raw = await asyncio.wait_for(ws.recv(), left)
                except TimeoutError:
                    break
                if args.start <= time.time() < args.end and (name := pv_of(raw)) in counts:
                    counts[name] += 1
        return window_rates(counts, args.start, args.end)

    async def every() -> list[dict[str, float]]:
        return await asyncio.gather(*(one() for _ in range(args.count)))

    print(json.dumps({"clients": asyncio.run(every())}), flush=True)
    return 0


# Bytes per write: 4x the IOC's buffer for ACQ425ELF (1 MiB), so the floor pays no
# more syscalls than the IOC does.
BARE_BUFFER = 4 << 20


def bare_main(args: argparse.Namespace) -> int:
    """The floor: every card's 4210 stream read into a buffer, written to a file and
    sha256-hashed, one thread per card and nothing else, until `--end`; print the bytes
    each card moved over [start, end) as JSON."""
    import hashlib
    import socket
    import threading

    hosts = args.hosts.split(",")
    moved = dict.fromkeys(hosts, 0)

    def one(host: str) -> None:
        digest = hashlib.sha256()
        buf = bytearray(BARE_BUFFER)
        view = memoryview(buf)
        path = args.dir / f"{host}.raw"
        with socket.create_connection((host, 4210), timeout=10) as sock, \
                path.open("wb", buffering=0) as out:  # fmt: skip
            while (now := time.time()) < args.end:
                fill = 0
                while fill < len(buf):
                    n = sock.recv_into(view[fill:])
                    if n == 0:
                        raise ConnectionError(f"{host}: stream closed")
                    fill += n
                out.write(view)
                digest.update(view)
                if now >= args.start:
                    moved[host] += fill
        path.unlink()

    threads = [threading.Thread(target=one, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"bytes": moved}), flush=True)
    return 0


def machine_busy() -> Callable[[], float]:
    """Start counting the whole machine's busy time; the call returns it since, in % of
    all its cores (100 = saturated)."""

    def jiffies() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, all0 = jiffies()

    def since() -> float:
        busy, every = jiffies()
        return 100 * (busy - busy0) / max(1, every - all0)

    return since


# --- the IOC, its cards and their simulators ---------------------------------------------


@dataclass
class SimCard:
    name: str
    host: str
    prefix: str


def write_config(workdir: Path, n: int, bridge_port: int, readout: str = "process",
                 queue_buffers: int = 64) -> tuple[Path, list[SimCard]]:  # fmt: skip
    tag = secrets.token_hex(2).upper()  # PV names of this run's own
    cards = [SimCard(f"C{i + 1}", random_loopback(), f"MC{tag}:C{i + 1}:") for i in range(n)]
    entries = "".join(
        sim_card_toml(c.name, c.host, module="ACQ425ELF", prefix=c.prefix) for c in cards
    )
    config = workdir / "multi_card.toml"
    config.write_text(
        f"""
[ioc]
name = "multi{tag}"
interfaces = ["127.0.0.1"]
display_rate_hz = 10.0
display_samples = 4096
autosave_dir = "autosave"
readout = "{readout}"
[archive]
data_dir = "data"
writer_queue_buffers = {queue_buffers}
[bridge]
enabled = true
host = "127.0.0.1"
port = {bridge_port}
{entries}
"""
    )
    return config, cards


def dtacq(*args: str) -> list[str]:
    return [sys.executable, "-m", "dtacq_ioc", "--log-level", "WARNING", *args]


@contextlib.contextmanager
def simulators(config: Path, cards: list[SimCard], log: Path) -> Iterator[list[int]]:
    """`dtacq-ioc sim CONFIG` playing every card, ready when each card's knob port answers.

    One process for all: it takes about 4 % of a core per card at 40 MB/s, so at N = 8
    it is not what limits the stream (its CPU is printed beside the IOC's).
    """
    with log.open("a") as out, process(dtacq("sim", str(config)), stderr=out) as proc:
        for card in cards:
            wait_for_port(card.host, 4221, timeout=READY_TIMEOUT_S, proc=proc)
        yield [proc.pid]


@contextlib.contextmanager
def launched_ioc(config: Path, log: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, float]]:
    """`dtacq-ioc run CONFIG`; yields it and the seconds from launch to READY=1."""
    listener = NotifyListener()
    env = child_env(NOTIFY_SOCKET=listener.address)
    try:
        with log.open("a") as out:
            t0 = time.monotonic()
            with process(dtacq("run", str(config), *extra), env=env, stderr=out) as ioc:
                listener.wait_for(lambda m: "READY=1" in m.splitlines(), READY_TIMEOUT_S, ioc)
                yield ioc, time.monotonic() - t0
    finally:
        listener.close()


def caget(name: str, **kw: Any) -> Any:
    import epics

    # A fresh read each time: a cached monitor value can lag a change by seconds.
    value = epics.caget(name, timeout=5, use_monitor=False, **kw)
    if value is None:
        raise TimeoutError(f"no answer from {name}")
    return value


def caput(name: str, value: Any, timeout: float = 30) -> None:
    import epics

    if epics.caput(name, value, wait=True, timeout=timeout) != 1:
        raise RuntimeError(f"writing {value!r} to {name} did not complete")


def card_streaming(card: SimCard, ioc: subprocess.Popen) -> None:
    def get(suffix: str, **kw: Any) -> Any:
        return caget(card.prefix + suffix, **kw)

    wait_until(lambda: get("STATE", as_string=True) == "IDLE", f"{card.name} IDLE", ioc)
    wait_until(lambda: get("SAMPLE_RATE_RBV") == RATE_HZ, f"{card.name} at 1 MHz", ioc)
    wait_until(lambda: get("STREAM:MBPS") > MIN_MBPS, f"{card.name} at full rate", ioc)


def start_run(card: SimCard, rotate_s: float, ioc: subprocess.Popen) -> None:
    caput(card.prefix + "RUN:TRIGGER", "rotate")
    caput(card.prefix + "RUN:TRIGGER_ARGS", json.dumps({"seconds": rotate_s}))
    caput(card.prefix + "RUN:NAME", "multi_card")
    caput(card.prefix + "RUN:START", 1)
    wait_until(lambda: caget(card.prefix + "RUN:STATE_RBV", as_string=True) == "RUNNING",
               f"{card.name}'s run", ioc)  # fmt: skip


# --- one N -------------------------------------------------------------------------------


@dataclass
class CardResult:
    sent: int  # SIM:SENT when the clients stopped
    received: int  # STREAM:SAMPLES just before
    run_span: int  # samples the simulator sent over the run: the files' counter span
    in_files: int
    catalog: int
    counter_errors: int  # stream + run
    overruns: int
    problems: list[str]

    @property
    def lossless(self) -> bool:
        return (
            not self.problems
            and self.counter_errors == 0
            and self.overruns == 0
            and self.run_span == self.in_files == self.catalog
        )


@dataclass
class Row:
    n: int
    cards: list[CardResult]
    ioc_cpu_pct: float
    ioc_rss_mb: tuple[float, float]  # mean and max over the window
    sim_cpu_pct: float
    ca_hz: list[dict[str, float]]  # per client, per PV
    ca_notes: list[dict[str, str]]  # per client, per PV: connected, updates in all
    ws_hz: list[dict[str, float]]
    client_cpu_pct: float  # the CA and PVWS client processes together
    busy_pct: float  # the whole machine, % of all cores
    bare_cpu_pct: float  # the floor: the same streams read, written, hashed, bare
    bare_mbps: float

    @property
    def ca_min(self) -> float:
        return min(min(c.values()) for c in self.ca_hz)

    @property
    def ws_min(self) -> float:
        return min(min(c.values()) for c in self.ws_hz)

    def slow(self) -> list[str]:
        """Each client PV below the target rate, slowest first, to tell a slow IOC from
        one lost PV."""
        notes = {("CA", i, name): f" ({note})" for i, client in enumerate(self.ca_notes)
                 for name, note in client.items()}  # fmt: skip
        slow = [(hz, f"{kind} client {i + 1}: {name} {hz:.2f} Hz{notes.get((kind, i, name), '')}")
                for kind, clients in (("CA", self.ca_hz), ("PVWS", self.ws_hz))
                for i, rates in enumerate(clients)
                for name, hz in rates.items() if hz < TARGET_HZ]  # fmt: skip
        return [text for _, text in sorted(slow)]

    def total(self, key: str) -> int:
        return sum(getattr(c, key) for c in self.cards)


def run_files_result(data_dir: Path, card: SimCard, keep: bool) -> tuple[int, int, int, list[str]]:
    """(counter span, samples in files, catalog samples, problems) of the card's last run."""
    from dtacq_ioc.archive.sqlite import CATALOG_FILE, SqliteCatalog

    catalog = SqliteCatalog(data_dir / CATALOG_FILE, readonly=True)
    try:
        records = catalog.list_runs(1, card=card.name)
    finally:
        catalog.close()
    if not records or not records[0].files:
        return 0, 0, 0, [f"{card.name}: no run with files in the catalog"]
    record = records[0]
    problems = []
    if record.state != "complete":
        problems.append(f"{card.name}: run {record.state} {record.fault}".strip())
    ledger = Ledger(run_dir=Path(record.files[0].path).parent, keep=keep)
    ledger.check_closed(data_dir, final=True)
    first, last = ledger.files[0], ledger.files[-1]
    span = (last.first_counter + last.samples - first.first_counter) % COUNTER_WRAP
    in_files = sum(f.samples for f in ledger.files)
    problems += [f"{card.name}: {p}" for p in ledger.problems]
    return span, in_files, record.samples, problems


def measure_n(n: int, args: argparse.Namespace, base: Path) -> Row:
    """The bare floor, then the IOC, over the same simulated cards."""
    workdir = base / f"n{n}"
    workdir.mkdir(parents=True, exist_ok=True)
    bridge_port = free_port()
    config, cards = write_config(workdir, n, bridge_port, args.readout, args.writer_queue)
    log = workdir / "ioc.log"
    with simulators(config, cards, workdir / "sim.log") as sim_pids:
        bare = measure_bare(cards, args, workdir)
        with launched_ioc(config, log, "--no-sim") as (ioc, _):
            return measure_ioc(n, cards, args, workdir, sim_pids, ioc, bridge_port, bare)


def measure_bare(cards: list[SimCard], args: argparse.Namespace, workdir: Path
                 ) -> tuple[float, float]:  # fmt: skip
    """The bare reader's CPU (% of one core) and MB/s over a window as long as the IOC's."""
    start = time.time() + 1.0  # connected and at full rate
    end = start + args.seconds
    cmd = [sys.executable, __file__, "bare", "--hosts", ",".join(c.host for c in cards),
           "--dir", str(workdir), "--start", str(start), "--end", str(end)]  # fmt: skip
    with process(cmd, stdout=subprocess.PIPE, text=True) as bare:
        time.sleep(max(0.0, start - time.time()))
        cpu = cpu_meter([bare.pid])
        time.sleep(max(0.0, end - time.time()))
        pct = cpu()
        moved = last_json(bare)["bytes"]
    return pct, sum(moved.values()) / args.seconds / 1e6


def measure_ioc(n: int, cards: list[SimCard], args: argparse.Namespace, workdir: Path,
                sim_pids: list[int], ioc: subprocess.Popen, bridge_port: int,
                bare: tuple[float, float]) -> Row:  # fmt: skip
    from dtacq_ioc.card.knobs import KnobClient

    for card in cards:
        card_streaming(card, ioc)
    for card in cards:
        start_run(card, args.rotate_s, ioc)
    pvs = ",".join(c.prefix + "1:AI:WF:01" for c in cards)
    start = time.time() + CONNECT_S
    end = start + args.seconds
    window = ["--pvs", pvs, "--start", str(start), "--end", str(end)]
    me = [sys.executable, __file__]
    out: dict[str, Any] = {"stdout": subprocess.PIPE, "text": True}
    with contextlib.ExitStack() as stack:
        cas = [stack.enter_context(process([*me, "ca-client", *window], **out))
               for _ in range(CA_CLIENTS)]  # fmt: skip
        url = f"ws://127.0.0.1:{bridge_port}/pvws/pv"
        ws = stack.enter_context(process([*me, "ws-clients", "--url", url, "--count",
                                          str(WS_CLIENTS), *window], **out))  # fmt: skip
        time.sleep(max(0.0, start - time.time()))
        ioc_pids = own_processes(ioc.pid)  # with its readout processes, when it has them
        ioc_cpu, sim_cpu = cpu_meter(ioc_pids), cpu_meter(sim_pids)
        client_cpu = cpu_meter([c.pid for c in cas] + [ws.pid])
        busy = machine_busy()
        rss = []
        while (left := end - time.time()) > 0:
            time.sleep(min(1.0, left))
            rss.append(pss_mb(ioc_pids))
        ioc_pct, sim_pct, client_pct, busy_pct = ioc_cpu(), sim_cpu(), client_cpu(), busy()
        ca = [last_json(c) for c in cas]
        ws_result = last_json(ws)
    stream = []
    for card in cards:
        received = int(caget(card.prefix + "STREAM:SAMPLES"))  # first: sent >= received
        knobs = KnobClient(card.name, card.host, 0, 4220, 5.0)
        try:
            stream.append((int(knobs.query("SIM:SENT")), received))
        finally:
            knobs.close()
    for card in cards:
        caput(card.prefix + "RUN:STOP", 1, timeout=120)
    results = []
    for card, (sent, received) in zip(cards, stream, strict=True):
        wait_until(lambda c=card: caget(c.prefix + "RUN:STATE_RBV", as_string=True)
                   in ("IDLE", "FAULT"), f"{card.name}'s run to end", ioc)  # fmt: skip
        errors = int(caget(card.prefix + "STREAM:COUNTER_ERRORS")) + int(
            caget(card.prefix + "RUN:ERRORS_RBV")
        )
        overruns = int(caget(card.prefix + "RUN:OVERRUNS_RBV"))
        span, in_files, catalog, problems = run_files_result(
            workdir / "data", card, args.keep_files
        )
        results.append(CardResult(sent, received, span, in_files, catalog, errors,
                                  overruns, problems))  # fmt: skip
    ca_hz, ca_notes = [c["hz"] for c in ca], [c["notes"] for c in ca]
    return Row(n, results, ioc_pct, (statistics.mean(rss), max(rss)), sim_pct, ca_hz, ca_notes,
               ws_result["clients"], client_pct, busy_pct, *bare)  # fmt: skip


def cpu_meter(pids: list[int]) -> Callable[[], float]:
    """Start counting the processes' CPU; the call returns it since, in % of one core."""
    cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
    return lambda: 100 * (sum(cpu_seconds(p) for p in pids) - cpu0) / (time.monotonic() - t0)


def last_json(proc: subprocess.Popen) -> Any:
    out, _ = proc.communicate(timeout=60)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"a client process failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\nACQ425ELF at 1 MHz (40 MB/s) per card, display 10 Hz, {CA_CLIENTS} CA + "
          f"{WS_CLIENTS} PVWS clients on one waveform per card, {args.seconds:g} s window, "
          f"files rotated every {args.rotate_s:g} s, readout: a {args.readout} per card\n"
          )  # fmt: skip
    head = (f"{'N':>2} {'sent':>11} {'received':>11} {'run: sent':>11} {'in files':>11} "
            f"{'catalog':>11} {'cnt err':>7} {'ovr':>4} {'IOC CPU%':>8} {'PSS MB':>9} "
            f"{'sim CPU%':>8} {'clients%':>8} {'busy%':>5} {'CA Hz':>6} {'PVWS Hz':>7} "
            f"{'cost/card':>9} {'bare CPU%':>9} {'IOC/bare':>8} lossless")  # fmt: skip
    print(head)
    base = next((r.ioc_cpu_pct for r in rows if r.n == 1), None)
    for r in rows:
        cost = f"{r.ioc_cpu_pct / r.n / base:.2f}" if base else "-"
        over_bare = f"{r.ioc_cpu_pct / r.bare_cpu_pct:.2f}" if r.bare_cpu_pct else "-"
        lossless = all(c.lossless for c in r.cards)
        rss = f"{r.ioc_rss_mb[0]:.0f}/{r.ioc_rss_mb[1]:.0f}"
        print(f"{r.n:>2} {r.total('sent'):>11} {r.total('received'):>11} "
              f"{r.total('run_span'):>11} {r.total('in_files'):>11} {r.total('catalog'):>11} "
              f"{r.total('counter_errors'):>7} {r.total('overruns'):>4} {r.ioc_cpu_pct:>8.1f} "
              f"{rss:>9} {r.sim_cpu_pct:>8.1f} {r.client_cpu_pct:>8.1f} {r.busy_pct:>5.0f} "
              f"{r.ca_min:>6.2f} {r.ws_min:>7.2f} {cost:>9} {r.bare_cpu_pct:>9.1f} "
              f"{over_bare:>8} {'yes' if lossless else 'NO'}")  # fmt: skip
        for text in [p for c in r.cards for p in c.problems] + r.slow()[:10]:
            print(f"   {text}")
    print("\n'sent'/'received': SIM:SENT / STREAM:SAMPLES summed over the cards when the "
          "clients stopped; 'run: sent': the simulator's samples over the runs (the files' "
          "counter span); PSS mean/max over the window; clients%: the CA and PVWS client "
          "processes; busy%: the whole machine, of all its cores; CA/PVWS Hz: the slowest "
          "client's slowest PV; bare: the same streams read, written and hashed by a "
          "bare reader (one thread per card) before the IOC, at "
          f"{', '.join(f'{r.bare_mbps:.0f}' for r in rows)} MB/s")  # fmt: skip
    last = max(rows, key=lambda r: r.n)
    cost_last = last.ioc_cpu_pct / last.n / base if base else None
    slowest = min(min(r.ca_min, r.ws_min) for r in rows)
    print(f"targets: N={last.n} lossless (target N=8): "
          f"{'yes' if all(c.lossless for c in last.cards) else 'NO'}; slowest client "
          f"{slowest:.2f} Hz (target >= {TARGET_HZ}); cost per card at N={last.n} "
          f"{f'{cost_last:.2f}' if cost_last else '- (no N=1)'} "
          f"(target at N=8 <= {TARGET_COST})")  # fmt: skip


# --- start-up ----------------------------------------------------------------------------


def states_connected(cards: list[SimCard], ioc: subprocess.Popen) -> None:
    """Until every card's STATE reads connected; each read a fresh search (no cache)."""
    from caproto.sync.client import read

    waiting = list(cards)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while waiting:
        if ioc.poll() is not None:
            raise RuntimeError(f"the IOC exited with {ioc.returncode} during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{', '.join(c.name for c in waiting)} not connected in time")
        for card in list(waiting):
            with contextlib.suppress(Exception):  # not served yet, or a timeout
                state = read(card.prefix + "STATE", timeout=0.5, repeater=False).data[0]
                if state in CONNECTED:
                    waiting.remove(card)
        if waiting:
            time.sleep(0.02)


def time_launches(config: Path, cards: list[SimCard], log: Path, launches: int,
                  *extra: str) -> list[tuple[float, float]]:  # fmt: skip
    """(launch -> READY, launch -> every card connected) of each launch, in seconds."""
    times = []
    for _ in range(launches):
        t0 = time.monotonic()
        with launched_ioc(config, log, *extra) as (ioc, ready_s):
            states_connected(cards, ioc)
            times.append((ready_s, time.monotonic() - t0))
    return times


def median_text(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):5.2f} s {[round(t, 2) for t in seconds]}"


def startup(args: argparse.Namespace, base: Path) -> None:
    config, cards = write_config(base, args.startup_cards, free_port(), args.readout)
    log = base / "startup.log"
    with simulators(config, cards, base / "sim.log"):
        up = time_launches(config, cards, log, args.launches, "--no-sim")
    spawned = time_launches(config, cards, log, args.launches)
    print(f"\nstart-up of `dtacq-ioc run` with {args.startup_cards} simulated cards, "
          f"median of {args.launches} launches (each launch's seconds in brackets)")  # fmt: skip
    for what, times in (("cards already up (--no-sim)", up), ("IOC starts its simulator", spawned)):
        ready, connected = ([t[i] for t in times] for i in (0, 1))
        print(f"  {what:<28} launch -> READY=1 {median_text(ready)}; "
              f"-> every STATE connected {median_text(connected)}")  # fmt: skip
    print(f"  target: < {TARGET_STARTUP_S:g} s")


# --- the main command --------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench",
                        choices=["bench", "ca-client", "ws-clients", "bare"])  # fmt: skip
    parser.add_argument("--cards", default="1,2,4,8", help="the N to run, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="window measured per N")
    parser.add_argument("--rotate-s", type=float, default=5.0, help="seconds per run file")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--keep-files", action="store_true", help="keep the run files")
    parser.add_argument(
        "--readout",
        choices=["process", "thread"],
        default="process",
        help="where the IOC reads each card's stream ([ioc] readout)",
    )
    parser.add_argument(
        "--writer-queue",
        type=int,
        default=64,
        help="[archive] writer_queue_buffers (64, the default)",
    )
    parser.add_argument("--startup", action="store_true", help="time start-up instead")
    parser.add_argument("--startup-cards", type=int, default=8)
    parser.add_argument("--launches", type=int, default=3)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--hosts", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=WS_CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--pvs", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--end", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "ca-client":
        return ca_client_main(args)
    if args.role == "ws-clients":
        return ws_clients_main(args)
    if args.role == "bare":
        return bare_main(args)
    try:
        ns = [int(x) for x in args.cards.split(",")]
    except ValueError:
        parser.error(f"--cards: {args.cards!r} is not a comma-separated list of card counts")
    if any(n < 1 for n in ns) or args.seconds <= 0 or args.rotate_s <= 0 or args.launches < 1:
        parser.error("card counts, --seconds, --rotate-s and --launches must be positive")

    ca_environment()
    with contextlib.ExitStack() as stack:
        base = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        base.mkdir(parents=True, exist_ok=True)
        if args.startup:
            startup(args, base)
            return 0
        rows = []
        for n in ns:
            print(f"N = {n}: {n} cards, {args.seconds:g} s ...", flush=True)
            rows.append(measure_n(n, args, base))
    report(rows, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
