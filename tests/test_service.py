"""Running as a service: the systemd unit, sd_notify from a real IOC, the status PVs and
`dtacq-ioc status`, all through real processes, sockets and CA clients."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import epics
import pytest
from support import (
    ROOT,
    NotifyListener,
    child_env,
    free_port,
    output,
    random_loopback,
    running,
    sim_card_toml,
    write_config,
)

from dtacq_ioc import __version__
from dtacq_ioc.archive.records import RunRecord
from dtacq_ioc.archive.spool import Spool
from dtacq_ioc.config import load_config
from dtacq_ioc.notify import Notifier, socket_address, watchdog_interval

UNIT = ROOT / "ioc_configs" / "systemd" / "dtacq-ioc@.service"
VENV_BIN = Path(sys.executable).parent / "dtacq-ioc"


# --- the unit file -----------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze missing: run `make test-deps`")
    assert VENV_BIN.exists()
    text = UNIT.read_text()
    # verify insists that ExecStart exists: point it at this checkout's venv.
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/dtacq-ioc/.venv/bin/dtacq-ioc", str(VENV_BIN)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys but warns: any line about our unit is a failure.
    noise = [line for line in (result.stdout + result.stderr).splitlines() if "dtacq-ioc" in line]
    assert result.returncode == 0 and noise == [], result.stdout + result.stderr

    s = unit_settings(text)
    for key, value in {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "dtacq",
        "Group": "dtacq", "ProtectSystem": "strict", "ProtectHome": "yes",
        "NoNewPrivileges": "yes", "PrivateTmp": "yes", "KillSignal": "SIGTERM",
        "EnvironmentFile": "-/etc/dtacq-ioc/%i.env", "StateDirectory": "dtacq-ioc/%i",
    }.items():  # fmt: skip
        assert s.get(key) == [value], key
    assert s["ExecStart"] == ["/opt/dtacq-ioc/.venv/bin/dtacq-ioc run /etc/dtacq-ioc/%i.toml"]
    assert int(s["WatchdogSec"][0]) > 0 and int(s["TimeoutStopSec"][0]) > 0
    assert s["ReadWritePaths"] == ["/var/lib/dtacq-ioc/%i"]


# --- sd_notify ---------------------------------------------------------------------------


def test_notifier_sends_to_path_and_abstract_sockets(tmp_path):
    for address in (str(tmp_path / "notify"), f"@dtacq-test-{uuid.uuid4().hex}"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(socket_address(address))
            sock.settimeout(5)
            notifier = Notifier({"NOTIFY_SOCKET": address})
            notifier.ready("serving")
            notifier.status("two\nlines")
            notifier.watchdog()
            notifier.stopping()
            notifier.close()
            got = [sock.recv(4096).decode() for _ in range(4)]
        assert got[0].splitlines() == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=serving"]
        assert got[1:] == ["STATUS=two lines", "WATCHDOG=1", "STOPPING=1"]


def test_notifier_outside_systemd_and_watchdog_settings(tmp_path):
    assert not Notifier({}).send("READY=1")
    assert watchdog_interval({"WATCHDOG_USEC": "4000000"}) == 4.0
    assert watchdog_interval({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    # Nobody listening: the send fails quietly (an IOC must not die for a lost message).
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert not gone.send("WATCHDOG=1")


def caget(name: str, **kw):
    return epics.caget(name, timeout=5, **kw)


def wait_value(name: str, predicate, timeout: float = 30.0, as_string: bool = False):
    """Monitor `name` until its value satisfies predicate; return that value."""
    seen = threading.Event()
    last: list = []

    def changed(value=None, char_value=None, **_):
        last.append(char_value if as_string else value)
        if predicate(last[-1]):
            seen.set()

    pv = epics.PV(name, auto_monitor=True, callback=changed)
    try:
        assert seen.wait(timeout), f"{name}: still {last[-1:]} after {timeout} s"
    finally:
        pv.disconnect()
    return last[-1]


def ioc_output(proc: subprocess.Popen) -> str:
    return output(proc)


def test_ioc_notifies_ready_watchdog_status_and_stopping(tmp_path, loopback):
    config = write_config(tmp_path, sim_card_toml("A", loopback))
    listener = NotifyListener()
    env = child_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="1000000")
    try:
        with running(["run", str(config)], env=env) as proc:
            ready = listener.wait_for(lambda m: "READY=1" in m, 60, proc)
            # READY means served: the status PVs answer at once.
            assert f"MAINPID={proc.pid}" in ready.splitlines()
            assert caget("DTACQ:test:VERSION") == __version__
            assert caget("TEST:A:CONNECTED", as_string=True) in ("No", "Yes")
            listener.wait_for(lambda m: m == "STATUS=1/1 cards connected, 0 runs spooled", 30)
            # Watchdog pings every WatchdogSec/2 = 0.5 s, on and on.
            start = len(listener.messages)
            for _ in range(4):
                listener.wait_for(lambda m: m == "WATCHDOG=1", 5, proc)
            pings = listener.messages[start:].count("WATCHDOG=1")
            assert pings >= 4
            proc.send_signal(signal.SIGTERM)
            listener.wait_for(lambda m: m == "STOPPING=1", 20)
            assert proc.wait(timeout=60) == 0, ioc_output(proc)
    finally:
        listener.close()


# --- status PVs and `dtacq-ioc status` ---------------------------------------------------


def down_card_toml(name: str, host: str) -> str:
    """A card nobody plays: the IOC keeps trying to connect to it."""
    return f"""
[[cards]]
name = "{name}"
host = "{host}"
prefix = "TEST:{name}:"
timeout_s = 1.0
[cards.modules]
1 = "ACQ425ELF"
"""


def status_cli(config: Path, timeout: float = 5.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "status", str(config), "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(COLUMNS="200"),
    )


def test_status_pvs_and_command_with_a_card_down_and_a_run_spooled(tmp_path, loopback):
    dead = f"http://127.0.0.1:{free_port()}"
    config_path = write_config(
        tmp_path,
        sim_card_toml("UP", loopback) + down_card_toml("DOWN", random_loopback()),
        extra=f'backend = "couchdb"\n[archive.couchdb]\nurl = "{dead}"\ndb = "m"\n',
    )
    config = load_config(config_path)
    # A finished run whose delivery never happened (the database is down).
    Spool(config.archive.spool, config.archive.couchdb).add(
        RunRecord(run_id="r1", card="UP", host=loopback, measurement_name="m", log="",
                  header={}, files=[], started=time.time(), stopped=time.time(), samples=0,
                  bytes_written=0, state="complete", upload=True, doc_id="d1")
    )  # fmt: skip
    with running(["run", str(config_path)]):
        first = wait_value("DTACQ:test:HEARTBEAT", lambda v: v is not None, 60)
        wait_value("DTACQ:test:CARDS_CONNECTED", lambda v: v == 1)
        assert caget("TEST:UP:CONNECTED", as_string=True) == "Yes"
        assert caget("DTACQ:test:CARDS") == 2
        connected = epics.PV("DTACQ:test:CARDS_CONNECTED", form="ctrl")
        assert connected.get_ctrlvars() and connected.severity == 1  # MINOR: one card down
        assert caget("DTACQ:test:RUNS_SPOOLED") == 1
        last_error = wait_value(
            "DTACQ:test:LAST_ERROR", lambda v: v.startswith("DOWN"), as_string=True
        )
        assert len(last_error) > 40  # the whole text (a CHAR array), not a 40-character string
        assert caget("DTACQ:test:UPTIME") >= 1

        result = status_cli(config_path)
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert __version__ in out and "CARDS_CONNECTED" in out
        assert " ".join(last_error.split()[-2:]) in " ".join(out.split())  # past 40 chars
        up = next(line for line in out.splitlines() if "TEST:UP:" in line)
        down = next(line for line in out.splitlines() if "TEST:DOWN:" in line)
        assert "Yes" in up and re.search(r"IDLE|RUNNING", up)
        assert "No" in down and re.search(r"DISCONNECTED|CONNECTING", down)
        wait_value("DTACQ:test:HEARTBEAT", lambda v: v > first, 10)  # it beats


def test_status_command_without_an_ioc_fails_in_one_line(tmp_path, loopback):
    config = write_config(tmp_path, sim_card_toml("A", loopback))
    started = time.monotonic()
    result = status_cli(config, timeout=1.0)
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("dtacq-ioc status: IOC 'test' did not answer DTACQ:test:HEARTBEAT")
    assert time.monotonic() - started < 30
