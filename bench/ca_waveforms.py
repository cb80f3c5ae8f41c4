"""Big CA waveforms to many clients: `python bench/ca_waveforms.py [--window S] [--clients N]`.

16 channels x 100 000-sample int16 waveforms at 10 Hz, monitored by 4 pyepics
clients (each a separate process, `auto_monitor=True` on all 16 PVs), served in
the same run, one after the other, by:

1. our IOC (`dtacq-ioc run`, one simulated ACQ425ELF at clkdiv 100 = 1 MHz,
   `display_samples = 100000`, `display_rate_hz = 10`), first with no client
   (its CPU for the 40 MB/s stream readout alone), then with the clients on
   `<P>1:AI:WF:01..16`;
2. pythonSoftIOC (EPICS base's C server): 16 int16 waveform records of 100 000
   elements, set to new data at 10 Hz by a small script run as its own process.

Reported per server: updates/s per client (mean over its 16 PVs, and the slowest
PV), server CPU (% of one core, from /proc/<pid>/stat over the window, ours with its
readout process), server memory (PSS of those processes, mean/max over the window:
shared pages counted once), and latency (client receive time minus the PV's
timestamp), median and p95. Targets (issue 4): every client >= 9.5 Hz, memory <=
pythonSoftIOC's, CPU <= 1.3x pythonSoftIOC's, p95 < 50 ms.

Roles `client` and `softioc` are the child processes; run them only through the
main command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import free_port, random_loopback, sim_card_toml  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0
CONNECT_S = 6.0  # clients connect and settle before the window opens


# --- measurements of a server process --------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def own_processes(pid: int) -> list[int]:
    """`pid` and the processes it runs as parts of itself (the readout processes and
    multiprocessing's tracker), not the simulator it may have started."""
    return [pid, *(c for c in children(pid) if b"multiprocessing" in cmdline(c))]


def simulator_processes(pid: int) -> list[int]:
    return [c for c in children(pid) if b"multiprocessing" not in cmdline(c)]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of the processes together: shared pages (the libraries, the
    display rings) counted once between them, where summing RSS would count them in each."""
    total_kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total_kb += int(line.split()[1])
                break
    return total_kb / 1024


@dataclass
class Row:
    server: str
    clients: list[dict]
    cpu_pct: float
    rss_mb: tuple[float, float]  # mean and max over the window
    extra: str = ""

    def latencies(self) -> list[float]:
        return [x for c in self.clients for x in c["latencies_ms"]]

    def frame_latencies(self) -> list[float]:
        return [x for c in self.clients for x in c["frame_latencies_ms"]]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- the child roles -------------------------------------------------------------------


def client_main(args: argparse.Namespace) -> int:
    """Monitor every PV; count updates and latencies that arrive inside [start, end)."""
    import epics

    names = [f"{args.prefix}1:AI:WF:{i + 1:02d}" for i in range(args.channels)]
    counts = dict.fromkeys(names, 0)
    seen = dict.fromkeys(names, 0)
    latencies: list[float] = []
    by_pv: dict[str, list[float]] = {n: [] for n in names}
    arrivals: list[tuple[float, float, str]] = []  # stamp, receive time, PV

    def on_update(pvname=None, timestamp=None, **_):
        now = time.time()
        seen[pvname] += 1
        if args.start <= now < args.end:
            counts[pvname] += 1
            latencies.append((now - timestamp) * 1000.0)
            by_pv[pvname].append(latencies[-1])
            arrivals.append((timestamp, now, pvname))

    pvs = [epics.PV(n, auto_monitor=True, form="time", callback=on_update) for n in names]
    time.sleep(max(0.0, args.start - time.time()))
    late = [n for n in names if not seen[n]]
    time.sleep(max(0.0, args.end - time.time()) + 0.3)
    for pv in pvs:
        pv.clear_callbacks()
    window = args.end - args.start
    rates = [counts[n] / window for n in names]
    result = {
        "hz": sum(rates) / len(rates),
        "min_hz": min(rates),
        "not_ready_at_start": late,
        "latencies_ms": latencies,
        "frame_latencies_ms": frame_latencies(arrivals, len(names), 0.5 / args.rate),
        # Median per PV, in the order the server sends a frame's PVs (01 first): a rise
        # from first to last is the frame's burst, the first PV's is the path of one.
        "median_by_pv_ms": [statistics.median(by_pv[n]) if by_pv[n] else None for n in names],
    }
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    for pv in pvs:
        pv.disconnect()
    return 0


def frame_latencies(arrivals: list[tuple[float, float, str]], channels: int,
                    gap_s: float) -> list[float]:  # fmt: skip
    """Per frame, ms from its first PV's timestamp to its last PV's arrival: what a client
    waits for a whole frame. Our PVs share one stamp a frame; softIoc stamps each record
    as its script sets it, so its per-PV latency leaves out the time between the first
    record's set and the last's. A frame is the updates whose stamps lie within `gap_s`
    of its first; one with every PV exactly once counts."""
    frames: list[list[tuple[float, float, str]]] = []
    for item in sorted(arrivals):
        if frames and item[0] - frames[-1][0][0] < gap_s:
            frames[-1].append(item)
        else:
            frames.append([item])
    return [
        1000.0 * (max(a for _, a, _ in f) - f[0][0])
        for f in frames
        if len(f) == channels and len({pv for *_, pv in f}) == channels
    ]


def softioc_main(args: argparse.Namespace) -> int:
    """pythonSoftIOC serving the same shape of data, new values at the same rate."""
    import numpy as np
    from softioc import asyncio_dispatcher, builder, softioc

    builder.SetDeviceName(args.prefix.rstrip(":"))
    records = [
        builder.WaveformIn(f"1:AI:WF:{i + 1:02d}", datatype=np.int16, length=args.samples)
        for i in range(args.channels)
    ]
    counter = builder.longIn("COUNT", initial_value=0)
    builder.LoadDatabase()
    # PVA off: the comparison is Channel Access, and its ports would collide across runs.
    softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher(), enable_pva=False)
    t = np.arange(args.samples)
    bases = [
        (np.sin(2 * np.pi * t / 1000 + i) * 16000).astype(np.int16) for i in range(len(records))
    ]
    period, k = 1.0 / args.rate, 0
    deadline = time.monotonic()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        step = np.int16(k % 1000)
        for i, record in enumerate(records):
            record.set(bases[i] + step)  # a new array: the data changes each time
        counter.set(k)
        k += 1
        deadline += period
        time.sleep(max(0.0, deadline - time.monotonic()))


# --- the main command ------------------------------------------------------------------


def ca_environment() -> None:
    """Channel Access on loopback with ports of this run's own (children inherit it)."""
    os.environ.update(
        EPICS_CA_SERVER_PORT=str(free_port()),
        EPICS_CA_REPEATER_PORT=str(free_port()),
        EPICS_CA_ADDR_LIST="127.0.0.1",
        EPICS_CA_AUTO_ADDR_LIST="NO",
        EPICS_CAS_INTF_ADDR_LIST="127.0.0.1",
        EPICS_CA_MAX_ARRAY_BYTES=str(16 << 20),  # pyepics' own default; ample for 200 kB arrays
    )


@contextlib.contextmanager
def process(cmd: list[str], **kw) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until(predicate, what: str, proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} while waiting for {what}")
        with contextlib.suppress(Exception):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout} s")
        time.sleep(0.2)


def measure(server: subprocess.Popen, prefix: str, args: argparse.Namespace,
            nclients: int) -> tuple[list[dict], float, tuple[float, float]]:  # fmt: skip
    """Run the clients (if any) over one window; return their results, CPU % and RSS."""
    start = time.time() + (CONNECT_S if nclients else 1.0)
    end = start + args.window
    cmd = [sys.executable, __file__, "client", "--prefix", prefix, "--start", str(start),
           "--end", str(end), "--channels", str(args.channels)]  # fmt: skip
    with contextlib.ExitStack() as stack:
        clients = [
            stack.enter_context(process(cmd, stdout=subprocess.PIPE, text=True))
            for _ in range(nclients)
        ]
        time.sleep(max(0.0, start - time.time()))
        pids = own_processes(server.pid)  # ours reads the stream in a process of its own
        cpu0, t0 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        rss = []  # sampled through the window: numpy temporaries make one reading noisy
        while (left := end - time.time()) > 0:
            time.sleep(min(1.0, left))
            rss.append(pss_mb(pids))
        cpu1, t1 = sum(cpu_seconds(p) for p in pids), time.monotonic()
        results = []
        for c in clients:
            out, _ = c.communicate(timeout=60)
            if c.returncode != 0 or not out.strip():
                raise RuntimeError(f"a client failed (exit {c.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results, 100.0 * (cpu1 - cpu0) / (t1 - t0), (statistics.mean(rss), max(rss))


def ours(args: argparse.Namespace, workdir: Path) -> list[Row]:
    import epics

    host, prefix = random_loopback(), f"BOURS{secrets.token_hex(2).upper()}:"
    config = workdir / "ours.toml"
    card = sim_card_toml("B1", host, module="ACQ425ELF", prefix=prefix)
    config.write_text(
        f"""
[ioc]
name = "bench"
interfaces = ["127.0.0.1"]
display_rate_hz = {args.rate}
display_samples = {args.samples}
autosave_dir = "autosave"
[archive]
data_dir = "data"
{card}
"""
    )
    cmd = [sys.executable, "-m", "dtacq_ioc", "--log-level", "WARNING",
           "--debug", "dtacq_ioc.timing", "run", str(config)]  # fmt: skip
    timing = workdir / "timing.log"
    with timing.open("w") as log, process(cmd, stderr=log) as ioc:
        wait_until(lambda: epics.caget(prefix + "STATE", as_string=True, timeout=1) == "IDLE",
                   "our IOC's card IDLE", ioc)  # fmt: skip
        if epics.caget(prefix + "CLKDIV_RBV") != 100:
            epics.caput(prefix + "CLKDIV", 100, wait=True, timeout=10)
        wait_until(lambda: epics.caget(prefix + "SAMPLE_RATE_RBV", timeout=1) == 1e6,
                   "1 MHz sample rate", ioc)  # fmt: skip
        wait_until(lambda: epics.caget(prefix + "STREAM:MBPS", timeout=1) > 30,
                   "the stream at full rate", ioc)  # fmt: skip
        mbps = epics.caget(prefix + "STREAM:MBPS")
        sims = simulator_processes(ioc.pid)
        sim_cpu0 = sum(cpu_seconds(p) for p in sims)
        t0 = time.monotonic()
        _, cpu, rss = measure(ioc, prefix, args, 0)
        sim_cpu = 100.0 * (sum(cpu_seconds(p) for p in sims) - sim_cpu0) / (time.monotonic() - t0)
        alone = Row("ours, stream only", [], cpu, rss,
                    f"stream {mbps:.1f} MB/s; simulator process {sim_cpu:.0f}% CPU")  # fmt: skip
        window_start = time.time()
        results, cpu, rss = measure(ioc, prefix, args, args.clients)
        errors = epics.caget(prefix + "STREAM:COUNTER_ERRORS")
        steps = frame_steps(timing.read_text(), window_start + CONNECT_S, time.time())
        loaded = Row("ours", results, cpu, rss, f"counter errors {errors}\n{steps}")
    return [alone, loaded]


def frame_steps(text: str, start: float, end: float) -> str:
    """Where a frame's time goes, from the IOC's dtacq_ioc.timing lines: the frame is
    stamped, its messages built (publish), then sent to each client in turn."""
    frames: list[tuple[float, float]] = []
    sends: list[tuple[float, float]] = []
    for line in text.splitlines():
        words = line.split()
        if "stamped" in words:
            stamp, built = float(words[words.index("stamped") + 1]), float(words[-1])
            if start <= stamp < end:
                frames.append((stamp, built))
        elif "started" in words:
            sends.append((float(words[words.index("started") + 1]),
                          float(words[words.index("ended") + 1])))  # fmt: skip
    build, first, each, last = [], [], [], []
    for i, (stamp, built) in enumerate(frames):
        nxt = frames[i + 1][0] if i + 1 < len(frames) else end
        mine = [s for s in sends if stamp <= s[0] < nxt]
        if not mine:
            continue
        build.append(built - stamp)
        first.append(mine[0][0] - stamp)
        each.extend(b - a for a, b in mine)
        last.append(mine[-1][1] - stamp)
    if not build:
        return "no timing lines from the IOC"

    def ms(values: list[float]) -> str:
        return f"{1000 * statistics.median(values):.1f}/{1000 * percentile(values, 0.95):.1f}"

    return (f"frame steps, median/p95 ms over {len(build)} frames: stamp -> messages built "
            f"{ms(build)}, -> first send {ms(first)}; one client's send {ms(each)}; "
            f"stamp -> last send done {ms(last)}")  # fmt: skip


def softioc_row(args: argparse.Namespace) -> Row:
    import epics

    prefix = f"BSOFT{secrets.token_hex(2).upper()}:"
    cmd = [sys.executable, __file__, "softioc", "--prefix", prefix, "--channels",
           str(args.channels), "--samples", str(args.samples),
           "--rate", str(args.rate)]  # fmt: skip
    with process(cmd, stdout=subprocess.DEVNULL) as server:
        wait_until(lambda: (epics.caget(prefix + "COUNT", timeout=1) or 0) > 2,
                   "pythonSoftIOC updating", server)  # fmt: skip
        results, cpu, rss = measure(server, prefix, args, args.clients)
    return Row("pythonSoftIOC", results, cpu, rss)


def report(rows: list[Row], args: argparse.Namespace) -> None:
    out = sys.stdout.write
    out(f"\n{args.channels} ch x {args.samples} int16 at {args.rate} Hz, "
        f"{args.clients} pyepics clients, {args.window:.0f} s window\n\n")  # fmt: skip
    out(f"{'server':<20}{'client Hz (slowest PV)':<36}{'CPU %':>7}{'PSS MB mean/max':>16}"
        f"{'lat med ms':>11}{'p95 ms':>8}\n")  # fmt: skip
    for r in rows:
        hz = " ".join(f"{c['hz']:.2f}({c['min_hz']:.1f})" for c in r.clients) or "-"
        lat = r.latencies()
        med = f"{statistics.median(lat):.1f}" if lat else "-"
        p95 = f"{percentile(lat, 0.95):.1f}" if lat else "-"
        rss = f"{r.rss_mb[0]:.0f}/{r.rss_mb[1]:.0f}"
        out(f"{r.server:<20}{hz:<36}{r.cpu_pct:>7.1f}{rss:>16}{med:>11}{p95:>8}\n")
        by_pv = [c.get("median_by_pv_ms") or [] for c in r.clients]
        if by_pv and all(by_pv) and all(None not in b for b in by_pv):
            first = statistics.median(b[0] for b in by_pv)
            last = statistics.median(b[-1] for b in by_pv)
            lat_text = f"median latency: first PV of a frame {first:.1f} ms, last {last:.1f} ms"
            out(f"{'':<20}{lat_text}\n")
        if frames := r.frame_latencies():
            out(f"{'':<20}whole frame (first stamp -> last PV received), median/p95: "
                f"{statistics.median(frames):.1f}/{percentile(frames, 0.95):.1f} ms "
                f"over {len(frames)} frames\n")  # fmt: skip
        late = sum(len(c["not_ready_at_start"]) for c in r.clients)
        if r.extra or late:
            note = f"; {late} PVs had no update at window start" if late else ""
            for i, extra in enumerate(r.extra.splitlines()):
                out(f"{'':<20}{extra}{note if i == 0 else ''}\n")
    by = {r.server: r for r in rows}
    if "ours" in by and "pythonSoftIOC" in by:
        a, b = by["ours"], by["pythonSoftIOC"]
        slowest = min(c["min_hz"] for c in a.clients)
        p95 = percentile(a.latencies(), 0.95)
        out(f"\nCPU ours/softioc {a.cpu_pct / b.cpu_pct:.2f} (target <= 1.3); "
            f"memory ours/softioc {a.rss_mb[0] / b.rss_mb[0]:.2f} mean, "
            f"{a.rss_mb[1] / b.rss_mb[1]:.2f} max (target <= 1.0)\n")  # fmt: skip
        if "ours, stream only" in by:
            alone = by["ours, stream only"].cpu_pct
            out(
                f"CPU ours minus stream-only, over softioc: {(a.cpu_pct - alone) / b.cpu_pct:.2f}\n"
            )
        out(f"ours: slowest PV {slowest:.2f} Hz (target >= 9.5); p95 {p95:.1f} ms (target < 50)\n")
        ours_f, soft_f = a.frame_latencies(), b.frame_latencies()
        if ours_f and soft_f:
            frame_ratio = percentile(ours_f, 0.95) / percentile(soft_f, 0.95)
            pv_ratio = p95 / percentile(b.latencies(), 0.95)
            out(f"p95 latency ours/softioc: whole frame {frame_ratio:.2f}, "
                f"per PV {pv_ratio:.2f}\n")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "client", "softioc"])
    parser.add_argument("--window", type=float, default=25.0, help="seconds measured per server")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--only", choices=["ours", "softioc"], help="run one server only")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--end", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "client":
        return client_main(args)
    if args.role == "softioc":
        return softioc_main(args)

    ca_environment()
    workdir = Path(tempfile.mkdtemp(prefix="ca_waveforms_"))
    rows: list[Row] = []
    try:
        if args.only in (None, "ours"):
            rows += ours(args, workdir)
        if args.only in (None, "softioc"):
            rows.append(softioc_row(args))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(rows, args)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
