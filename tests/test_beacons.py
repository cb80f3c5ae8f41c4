"""Beacons go where EPICS base's server sends them, so a host's caRepeater hears a
restarted IOC and its clients reconnect at once."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from epics_base import epics_base, soft_ioc
from ioc_support import ioc_process, ioc_toml, new_prefix
from support import child_env, free_port

from dtacq_ioc.caproto_adapter import beacon_environment

RSRV_IS_UP = 13  # a beacon: its header's data count is the server's TCP port
HEADER = struct.Struct(">HHHHII")


@contextlib.contextmanager
def repeater_port() -> Iterator[tuple[int, socket.socket]]:
    """A UDP port standing where the host's caRepeater would, and its socket."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", port))
        yield port, sock


def beacon_ports(sock: socket.socket, timeout: float = 30.0) -> set[int]:
    """The server ports of the beacons heard within `timeout`, once one has been."""
    deadline = time.monotonic() + timeout
    ports: set[int] = set()
    while not ports and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        with contextlib.suppress(TimeoutError):
            data = sock.recv(1024)
            command, _, _, count, _, _ = HEADER.unpack_from(data)
            if command == RSRV_IS_UP:
                ports.add(count)
    return ports


@pytest.mark.parametrize(
    ("environ", "added"),
    [
        ({"EPICS_CA_REPEATER_PORT": "6065"}, {"EPICS_CAS_BEACON_PORT": "6065"}),
        ({"EPICS_CA_REPEATER_PORT": "6065", "EPICS_CAS_BEACON_PORT": "7065"}, {}),
        ({"EPICS_CA_AUTO_ADDR_LIST": "NO"}, {"EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO"}),
        ({"EPICS_CA_ADDR_LIST": "10.0.0.255"}, {"EPICS_CAS_BEACON_ADDR_LIST": "10.0.0.255"}),
        # A server bound to chosen interfaces beacons only to EPICS_CAS_BEACON_ADDR_LIST.
        ({"EPICS_CA_ADDR_LIST": "10.0.0.255", "EPICS_CAS_INTF_ADDR_LIST": "10.0.0.1"}, {}),
        ({"EPICS_CA_ADDR_LIST": "10.0.0.255", "EPICS_CAS_BEACON_ADDR_LIST": "10.0.1.255"}, {}),
    ],
)
def test_beacon_settings_follow_epics_bases_fallbacks(environ, added):
    assert beacon_environment(environ) == added


def test_the_ioc_beacons_to_the_repeater_port_as_softioc_does(tmp_path, loopback):
    """EPICS_CA_REPEATER_PORT set, EPICS_CAS_BEACON_PORT not: both servers beacon there."""
    with repeater_port() as (port, sock):
        db = 'record(ai, "BEACON:PROBE") { field(VAL, "1") }\n'
        with soft_ioc(epics_base(), db, tmp_path, "BEACON:PROBE",
                      env_extra={"EPICS_CA_REPEATER_PORT": str(port)}) as ref:  # fmt: skip
            assert ref.port in beacon_ports(sock)
    with repeater_port() as (port, sock):
        prefix = new_prefix()
        config = ioc_toml(tmp_path, loopback, prefix)
        env = child_env(EPICS_CA_REPEATER_PORT=str(port))
        with ioc_process(config, prefix, loopback, env=env):
            heard = beacon_ports(sock)
    assert heard == {int(env["EPICS_CA_SERVER_PORT"])}
