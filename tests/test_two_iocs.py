"""Two IOC processes with different cards and one bridge, all on one host.

Each IOC serves Channel Access on a loopback address of its own, so a unicast
name search reaches exactly one of them (two servers bound to one address and
port would share, and split, the searches); the bridge searches both.
"""

from __future__ import annotations

import json
import time

from ioc_support import ioc_toml, new_prefix
from support import child_env, free_port, random_loopback, running, stop_process
from websockets.sync.client import connect


def bridge_toml(path, port: int, prefixes: list[str]) -> None:
    cards = "".join(
        f'\n[[cards]]\nname = "C{i}"\nhost = "127.0.0.1"\nprefix = "{p}"\n'
        f'[cards.modules]\n1 = "ACQ425ELF"\n'
        for i, p in enumerate(prefixes)
    )
    path.write_text(
        f'[ioc]\nname = "bridge"\n[archive]\ndata_dir = "data"\n'
        f'[bridge]\nenabled = true\nhost = "127.0.0.1"\nport = {port}\n{cards}'
    )


class Watcher:
    """A PVWS client keeping, per PV, the latest value and whether it is connected."""

    def __init__(self, ws, pvs: list[str]):
        self.ws = ws
        self.ws.send(json.dumps({"type": "subscribe", "pvs": pvs}))
        self.value: dict[str, float] = {}
        self.connected: dict[str, bool] = {}

    def until(self, predicate, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what} within {timeout} s: {self.value} {self.connected}")
            try:
                msg = json.loads(self.ws.recv(timeout=left))
            except TimeoutError:
                continue
            if msg.get("type") != "update":
                continue
            pv = msg["pv"]
            if "value" in msg:
                self.value[pv] = msg["value"]
                self.connected[pv] = True
            if msg.get("connected") is False:
                self.connected[pv] = False


def test_one_bridge_serves_two_iocs_and_one_going_down_leaves_the_other(tmp_path):
    ca_port = free_port()
    iocs, prefixes = [], []
    for i in range(2):
        directory = tmp_path / f"ioc{i}"
        directory.mkdir()
        prefix = new_prefix()
        interface = random_loopback()
        config = ioc_toml(
            directory, random_loopback(), prefix, ioc_extra=f'interfaces = ["{interface}"]'
        )
        env = child_env(EPICS_CA_SERVER_PORT=str(ca_port))
        iocs.append((interface, running(["run", str(config)], env=env)))
        prefixes.append(prefix)
    port = free_port()
    bridge_config = tmp_path / "bridge.toml"
    bridge_toml(bridge_config, port, prefixes)
    search = " ".join(interface for interface, _ in iocs)
    bridge_env = child_env(EPICS_CA_SERVER_PORT=str(ca_port), EPICS_CA_ADDR_LIST=search)
    beats = [p + "HEARTBEAT" for p in prefixes]
    with (
        iocs[0][1] as first,
        iocs[1][1],
        running(["bridge", str(bridge_config)], ready=("127.0.0.1", port), env=bridge_env),
        connect(f"ws://127.0.0.1:{port}/pvws/pv", open_timeout=10) as ws,
    ):
        watcher = Watcher(ws, beats)
        watcher.until(lambda: all(b in watcher.value for b in beats), "both IOCs' PVs")
        watcher.until(lambda: all(watcher.value.get(b, 0) >= 2 for b in beats), "both heartbeats")
        stop_process(first)  # one IOC goes away
        watcher.until(lambda: watcher.connected.get(beats[0]) is False, "first disconnected")
        last = watcher.value[beats[1]]
        watcher.until(lambda: watcher.value[beats[1]] >= last + 2, "the second beats on")
        assert watcher.connected[beats[1]] is True
