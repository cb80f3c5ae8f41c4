"""Soak: `python bench/soak.py --minutes M [--rotate-s S] [--keep-files] [--json FILE]`.

One simulated ACQ425ELF (16 channels + 2 spad words = 40 B/sample) at clkdiv 80
= 1.25 MHz, i.e. 50 MB/s, streamed without pause into `dtacq-ioc run` (IOC, bridge
and, as its child, the simulator), while:

- one run writes every sample, rotating files every `--rotate-s` seconds (trigger
  `rotate`, by time); each file is checked as soon as the next one opens (header,
  whole samples, first spad counter = previous first counter + previous samples)
  and then deleted unless `--keep-files` (50 MB/s fills a disk fast);
- 4 pyepics clients (separate processes) monitor 4 raw waveforms, one volts
  waveform and STREAM:SAMPLES;
- 10 WebSocket clients (one process) subscribe through the bridge's PVWS
  protocol (`ws://127.0.0.1:<port>/pvws/pv`) to 3 waveforms and STREAM:MBPS.

Every 10 s it prints the IOC's RSS and CPU, the stream rate, samples sent by the
simulator (`SIM:SENT` on site 0) vs received by the IOC (`STREAM:SAMPLES`) and
counter errors. At the end it stops the run and reports the files checked, the
catalog's record (runs.sqlite), what the clients received, and RSS growth after
the first minute. Acceptance (issue 6, 30 minutes): no sample lost, no counter
error, RSS growth < 10 % after the first minute, every rotated file in the catalog.

`--writer-queue-buffers N` sets `archive.writer_queue_buffers` (default 64 buffers of
BUFFER_SIZE = 256 KiB, about 0.3 s at 50 MB/s): the writer fsyncs each file as it
closes it, and a rotation that takes longer than the queue lasts drops rows
(counted as overruns, and seen here as a counter gap between files).

Roles `ca-client` and `ws-clients` are child processes; run them only through the
main command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from ca_waveforms import (  # noqa: E402  (this directory's helpers: /proc readers, processes)
    ca_environment,
    children,
    cpu_seconds,
    process,
    rss_mb,
    wait_until,
)
from support import free_port, random_loopback, sim_card_toml  # noqa: E402

from dtacq_ioc.archive.dig import read_header, sample_dtype  # noqa: E402

CLKDIV = 80  # 100 MHz / 80 = 1.25 MHz x 40 B = 50 MB/s
RATE_HZ = 1.25e6
REPORT_S = 10.0
COUNTER_WRAP = 1 << 32
CA_CLIENTS = 4
WS_CLIENTS = 10
PREFIX = "SOAK:DIG:"
CA_PVS = [f"{PREFIX}1:AI:WF:{i:02d}" for i in (1, 2, 3, 4)] + [
    f"{PREFIX}1:AI:WF:01:V",
    f"{PREFIX}STREAM:SAMPLES",
]
WS_PVS = [
    f"{PREFIX}1:AI:WF:01:V",
    f"{PREFIX}1:AI:WF:05",
    f"{PREFIX}1:AI:WF:16",
    f"{PREFIX}STREAM:MBPS",
]


# --- child roles ------------------------------------------------------------------------


def ca_client_main(args: argparse.Namespace) -> int:
    """Monitor CA_PVS until `--end`; print updates per PV and disconnects as JSON."""
    import epics

    counts = dict.fromkeys(CA_PVS, 0)
    drops = {"disconnects": 0}

    def on_update(pvname=None, **_):
        counts[pvname] += 1

    def on_connection(pvname=None, conn=True, **_):
        if not conn:
            drops["disconnects"] += 1

    pvs = [
        epics.PV(n, auto_monitor=True, callback=on_update, connection_callback=on_connection)
        for n in CA_PVS
    ]
    time.sleep(max(0.0, args.end - time.time()))
    for pv in pvs:
        pv.clear_callbacks()
    sys.stdout.write(json.dumps({"updates": counts, **drops}) + "\n")
    sys.stdout.flush()
    for pv in pvs:
        pv.disconnect()
    return 0


def ws_clients_main(args: argparse.Namespace) -> int:
    """`--count` PVWS clients subscribed to WS_PVS until `--end`; print what each received."""
    from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol

    results: list[dict] = []

    class Client(WebSocketClientProtocol):
        def onOpen(self) -> None:
            self.stats = {"updates": dict.fromkeys(WS_PVS, 0), "bytes": 0, "errors": 0}
            results.append(self.stats)
            self.sendMessage(json.dumps({"type": "subscribe", "pvs": WS_PVS}).encode())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.stats["bytes"] += len(payload)
            if isBinary:
                return
            messages = json.loads(payload)
            for msg in messages if isinstance(messages, list) else [messages]:
                if msg.get("type") == "update" and msg.get("pv") in self.stats["updates"]:
                    self.stats["updates"][msg["pv"]] += 1
                elif msg.get("type") == "error":
                    self.stats["errors"] += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        factory = WebSocketClientFactory(args.url)
        factory.protocol = Client
        host, port = args.url.split("//")[1].split("/")[0].split(":")
        conns = [await loop.create_connection(factory, host, int(port)) for _ in range(args.count)]
        await asyncio.sleep(max(0.0, args.end - time.time()))
        for transport, _ in conns:
            transport.close()

    asyncio.run(main())
    sys.stdout.write(json.dumps({"clients": results}) + "\n")
    sys.stdout.flush()
    return 0


# --- the run's files, checked while it runs ----------------------------------------------


@dataclass
class FileCheck:
    name: str
    size: int
    samples: int
    first_counter: int


@dataclass
class Ledger:
    """Closed files of the run, in order, with the counter continuity checked."""

    run_dir: Path | None = None
    files: list[FileCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    keep: bool = False

    def check_closed(self, data_dir: Path, final: bool = False) -> None:
        """Check (and unless keep, delete) every file older than the newest one."""
        if self.run_dir is None:
            dirs = sorted(data_dir.glob("*/*/"), key=lambda p: p.stat().st_mtime)
            self.run_dir = dirs[-1] if dirs else None
            if self.run_dir is None:
                return
        names = sorted(self.run_dir.glob("*.dig"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        done = {f.name for f in self.files}
        closed = names if final else names[:-1]  # the writer closes file k before opening k+1
        for path in closed:
            if path.name not in done:
                self._check(path)

    def _check(self, path: Path) -> None:
        header, offset = read_header(path)
        size = path.stat().st_size
        width = sample_dtype(header).itemsize * len(header["channel_list"])
        samples, rest = divmod(size - offset, width)
        first = int(header["first_counter"])
        if rest:
            self.problems.append(f"{path.name}: {rest} bytes of a partial sample")
        if self.files:
            prev = self.files[-1]
            expected = (prev.first_counter + prev.samples) % COUNTER_WRAP
            if first != expected:
                self.problems.append(
                    f"{path.name}: first counter {first}, expected {expected} "
                    f"({first - expected:+d} samples)"
                )
        self.files.append(FileCheck(path.name, size, samples, first))
        if not self.keep:
            path.unlink()


# --- the main command -------------------------------------------------------------------


def knob_reader(host: str):
    from dtacq_ioc.card.knobs import KnobClient

    return KnobClient("soak-sim", host, 0, 4220, 5.0)


def write_config(workdir: Path, host: str, bridge_port: int, queue_buffers: int) -> Path:
    config = workdir / "soak.toml"
    card = sim_card_toml("DIG", host, module="ACQ425ELF", prefix=PREFIX)
    config.write_text(
        f"""
[ioc]
name = "soak"
interfaces = ["127.0.0.1"]
display_rate_hz = 10.0
display_samples = 4096
autosave_dir = "autosave"
[archive]
data_dir = "data"
writer_queue_buffers = {queue_buffers}
[bridge]
enabled = true
host = "127.0.0.1"
port = {bridge_port}
{card}
"""
    )
    return config


def set_clock(get, ioc: subprocess.Popen, attempts: int = 3) -> None:
    """CLKDIV for 1.25 MHz, checked on the readback (tried again if a put went astray)."""
    import epics

    for attempt in range(attempts):
        status = epics.caput(PREFIX + "CLKDIV", CLKDIV, wait=True, timeout=20)
        try:
            wait_until(lambda: get("SAMPLE_RATE_RBV") == RATE_HZ, "1.25 MHz", ioc, timeout=15)
            return
        except TimeoutError:
            print(
                f"attempt {attempt + 1}: caput status {status}, CLKDIV {get('CLKDIV')}, "
                f"CLKDIV_RBV {get('CLKDIV_RBV')}, rate {get('SAMPLE_RATE_RBV')}, "
                f"last error {get('LAST_ERROR', as_string=True)!r}",
                flush=True,
            )
    raise RuntimeError(f"the sample rate did not reach {RATE_HZ:g} Hz")


@dataclass
class Sample:
    t_s: float
    ioc_rss_mb: float
    ioc_cpu_pct: float
    sim_cpu_pct: float
    mb_per_s: float
    sent: int
    received: int
    counter_errors: int
    files_checked: int


def soak(args: argparse.Namespace, workdir: Path) -> dict:
    import epics

    host, bridge_port = random_loopback(), free_port()
    config = write_config(workdir, host, bridge_port, args.writer_queue_buffers)
    data_dir = workdir / "data"
    ledger = Ledger(keep=args.keep_files)
    cmd = [sys.executable, "-m", "dtacq_ioc", "--log-level", "WARNING", "run", str(config)]
    with process(cmd) as ioc:

        def get(suffix: str, **kw):
            # A fresh read each time: a cached monitor value lagged a CLKDIV change by > 45 s.
            return epics.caget(PREFIX + suffix, timeout=5, use_monitor=False, **kw)

        wait_until(lambda: get("STATE", as_string=True) == "IDLE", "the card IDLE", ioc)
        set_clock(get, ioc)
        epics.caput(PREFIX + "RUN:TRIGGER", "rotate", wait=True, timeout=10)
        rotate = json.dumps({"seconds": args.rotate_s})
        epics.caput(PREFIX + "RUN:TRIGGER_ARGS", rotate, wait=True, timeout=10)
        epics.caput(PREFIX + "RUN:NAME", "soak", wait=True, timeout=10)
        epics.caput(PREFIX + "RUN:START", 1, wait=True, timeout=30)
        wait_until(lambda: get("RUN:STATE_RBV", as_string=True) == "RUNNING", "the run", ioc)
        sim_pid = next(
            p for p in children(ioc.pid) if b"sim" in Path(f"/proc/{p}/cmdline").read_bytes()
        )
        knobs = knob_reader(host)

        t0 = time.monotonic()
        end = time.time() + args.minutes * 60
        client_cmd = [sys.executable, __file__]
        url = f"ws://127.0.0.1:{bridge_port}/pvws/pv"
        with contextlib.ExitStack() as stack:
            out = {"stdout": subprocess.PIPE, "text": True}
            cas = [
                stack.enter_context(process([*client_cmd, "ca-client", "--end", str(end)], **out))
                for _ in range(CA_CLIENTS)
            ]
            ws = stack.enter_context(process([*client_cmd, "ws-clients", "--url", url,
                                              "--count", str(WS_CLIENTS), "--end", str(end)],
                                             **out))  # fmt: skip
            samples: list[Sample] = []
            cpu = (cpu_seconds(ioc.pid), cpu_seconds(sim_pid), time.monotonic())
            while time.time() < end:
                time.sleep(min(REPORT_S, max(0.0, end - time.time())))
                if ioc.poll() is not None:
                    raise RuntimeError(f"the IOC exited with {ioc.returncode}")
                ledger.check_closed(data_dir)
                now = (cpu_seconds(ioc.pid), cpu_seconds(sim_pid), time.monotonic())
                span = now[2] - cpu[2]
                received = int(get("STREAM:SAMPLES"))  # first: then lag = sent - received >= 0
                sent = int(knobs.query("SIM:SENT"))
                s = Sample(
                    t_s=round(now[2] - t0, 1),
                    ioc_rss_mb=round(rss_mb(ioc.pid), 1),
                    ioc_cpu_pct=round(100 * (now[0] - cpu[0]) / span, 1),
                    sim_cpu_pct=round(100 * (now[1] - cpu[1]) / span, 1),
                    mb_per_s=round(get("STREAM:MBPS"), 2),
                    sent=sent,
                    received=received,
                    counter_errors=int(get("STREAM:COUNTER_ERRORS")),
                    files_checked=len(ledger.files),
                )
                cpu = now
                samples.append(s)
                print(
                    f"{s.t_s:7.1f} s  RSS {s.ioc_rss_mb:7.1f} MB  CPU ioc {s.ioc_cpu_pct:5.1f}% "
                    f"sim {s.sim_cpu_pct:5.1f}%  {s.mb_per_s:6.2f} MB/s  sent {s.sent} "
                    f"received {s.received} (lag {s.sent - s.received})  "
                    f"counter errors {s.counter_errors}  files {s.files_checked}",
                    flush=True,
                )
            ca_results = [json.loads(c.communicate(timeout=60)[0].splitlines()[-1]) for c in cas]
            ws_result = json.loads(ws.communicate(timeout=60)[0].splitlines()[-1])

        # The final comparison, then stop the run and check its last file and its record.
        received_end = int(get("STREAM:SAMPLES"))
        sent_end = int(knobs.query("SIM:SENT"))
        run_samples = int(get("RUN:SAMPLES_RBV"))
        epics.caput(PREFIX + "RUN:STOP", 1, wait=True, timeout=120)
        wait_until(lambda: get("RUN:STATE_RBV", as_string=True) == "IDLE", "the run's end", ioc)
        run_errors = int(get("RUN:ERRORS_RBV"))
        run_overruns = int(get("RUN:OVERRUNS_RBV"))
        knobs.close()
    ledger.check_closed(data_dir, final=True)
    return report(args, samples, ledger, ca_results, ws_result, data_dir, {
        "sent_at_end": sent_end, "received_at_end": received_end,
        "run_samples_before_stop": run_samples, "run_counter_errors": run_errors,
        "run_overruns": run_overruns,
    })  # fmt: skip


def report(args, samples, ledger, ca_results, ws_result, data_dir: Path, end: dict) -> dict:
    from dtacq_ioc.archive.sqlite import CATALOG_FILE, SqliteCatalog

    catalog = SqliteCatalog(data_dir / CATALOG_FILE)
    try:
        runs = catalog.list_runs(limit=1000)
    finally:
        catalog.close()
    record = runs[0] if runs else None
    catalog_files = {(f.name, f.size) for f in record.files} if record else set()
    checked = {(f.name, f.size) for f in ledger.files}
    after_1min = [s.ioc_rss_mb for s in samples if s.t_s >= 60] or [s.ioc_rss_mb for s in samples]
    growth = 100 * (after_1min[-1] - after_1min[0]) / after_1min[0] if after_1min else 0.0
    ca_updates = [sum(r["updates"].values()) for r in ca_results]
    ws_updates = [sum(c["updates"].values()) for c in ws_result["clients"]]
    seconds = args.minutes * 60
    result = {
        "minutes": args.minutes,
        "rate_hz": RATE_HZ,
        "writer_queue_buffers": args.writer_queue_buffers,
        "samples": [asdict(s) for s in samples],
        **end,
        "lag_at_end": end["sent_at_end"] - end["received_at_end"],
        "stream_counter_errors": samples[-1].counter_errors if samples else None,
        "rss_after_1min_mb": after_1min[0] if after_1min else None,
        "rss_end_mb": after_1min[-1] if after_1min else None,
        "rss_growth_pct": round(growth, 2),
        "files_checked": len(ledger.files),
        "files": [asdict(f) for f in ledger.files],
        "file_samples": sum(f.samples for f in ledger.files),
        "file_problems": ledger.problems,
        "catalog_runs": len(runs),
        "catalog_state": record.state if record else None,
        "catalog_samples": record.samples if record else None,
        "catalog_counter_errors": record.counter_errors if record else None,
        "catalog_files": len(catalog_files),
        "files_missing_from_catalog": sorted(n for n, _ in checked - catalog_files),
        "ca_clients_hz": [round(u / seconds / len(CA_PVS), 2) for u in ca_updates],
        "ca_disconnects": sum(r["disconnects"] for r in ca_results),
        "ws_clients": len(ws_result["clients"]),
        "ws_clients_hz": [round(u / seconds / len(WS_PVS), 2) for u in ws_updates],
        "ws_errors": sum(c["errors"] for c in ws_result["clients"]),
    }
    ok = (
        not ledger.problems
        and result["stream_counter_errors"] == 0
        and end["run_counter_errors"] == 0
        and end["run_overruns"] == 0
        and result["catalog_samples"] == result["file_samples"]
        and not result["files_missing_from_catalog"]
        and len(catalog_files) == len(checked)
    )
    result["lossless"] = ok
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    c = sub.add_parser("ca-client")
    c.add_argument("--end", type=float, required=True)
    w = sub.add_parser("ws-clients")
    w.add_argument("--url", required=True)
    w.add_argument("--count", type=int, default=WS_CLIENTS)
    w.add_argument("--end", type=float, required=True)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--rotate-s", type=float, default=60.0, help="seconds per file")
    parser.add_argument(
        "--writer-queue-buffers",
        type=int,
        default=64,
        help="archive.writer_queue_buffers (default: the config default, 64)",
    )
    parser.add_argument("--keep-files", action="store_true", help="do not delete checked files")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="write the full result here")
    args = parser.parse_args(argv)
    if args.role == "ca-client":
        return ca_client_main(args)
    if args.role == "ws-clients":
        return ws_clients_main(args)

    ca_environment()
    with contextlib.ExitStack() as stack:
        workdir = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        result = soak(args, workdir)
    summary = {k: v for k, v in result.items() if k not in ("samples", "files")}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if result["lossless"] else 1


if __name__ == "__main__":
    sys.exit(main())
