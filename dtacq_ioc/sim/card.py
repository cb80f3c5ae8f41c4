"""One simulated carrier: its knob sites, stream, status console and SSH, on its own address."""

from __future__ import annotations

import logging
import socket
import threading
from functools import partial

import paramiko

from dtacq_ioc.config import CardConfig
from dtacq_ioc.sim.knobs_module import build_module_knobs
from dtacq_ioc.sim.knobs_system import build_system_knobs
from dtacq_ioc.sim.knobserver import KnobSession
from dtacq_ioc.sim.knobtable import KnobTable
from dtacq_ioc.sim.net import TcpService
from dtacq_ioc.sim.shotdata import DATA_PORT, serve_shot
from dtacq_ioc.sim.shots import ShotControl
from dtacq_ioc.sim.signals import TableCache
from dtacq_ioc.sim.ssh import SshService
from dtacq_ioc.sim.state import CardState
from dtacq_ioc.sim.stream import StreamServer

log = logging.getLogger(__name__)

STATUS_PORT = 2235


class SimCard:
    """A card that answers at `config.host`; `reboot()` takes it down and back up."""

    def __init__(self, config: CardConfig, host_key: paramiko.PKey, unthrottled: bool = False):
        self.config = config
        self.name = config.name
        self.host = config.host
        self.state = CardState(config, unthrottled=unthrottled)
        tables = TableCache()
        self.stream = StreamServer(self.state, tables)
        self.shots = ShotControl(self.state, tables, self.stream.wake)
        self.ssh = SshService(self, host_key)
        self._services: list[TcpService] = []
        self._lock = threading.Lock()  # start/stop/reboot one at a time
        self._reboot_lock = threading.Lock()
        self._stopped = threading.Event()
        self._reboot_thread: threading.Thread | None = None
        self.tables: dict[int, KnobTable] = {}

    @property
    def knob_ports(self) -> dict[int, int]:
        return {site: self.config.knob_port_base + site for site in [0, *self.state.sites]}

    def start(self) -> None:
        with self._lock:
            self._stopped.clear()
            self._start_services()

    def _start_services(self) -> None:
        st = self.state
        self.tables = {
            0: build_system_knobs(st, self.shots, self.reboot, lambda n: self.tables.get(n))
        }
        for site, s in st.sites.items():
            self.tables[site] = build_module_knobs(st, s)
        services: list[TcpService] = []
        # Shot data: 53000 raw, 53000+ch per AI channel (as many as every site could give).
        for ch in range(sum(s.spec.nchan for s in st.sites.values()) + 1):
            services.append(
                TcpService(
                    f"{self.name}:data{ch}", self.host, DATA_PORT + ch,
                    partial(serve_shot, st, channel=ch),
                )
            )  # fmt: skip
        services.append(
            TcpService(
                f"{self.name}:stream", self.host, self.config.stream_port,
                self.stream.handle, wake=self.stream.wake,
            )
        )  # fmt: skip
        status = TcpService(
            f"{self.name}:status", self.host, STATUS_PORT, lambda conn: None, self._wake_status
        )
        status.handler = lambda conn: self._status(conn, status)
        services.append(status)
        services.append(self.ssh.service())
        # Knobs last: a card whose knobs answer has every port up (tests wait on a knob port).
        services += [self._knob_service(site, port) for site, port in self.knob_ports.items()]
        started: list[TcpService] = []
        try:
            for service in services:
                service.start()
                started.append(service)
        except OSError:
            for service in reversed(started):
                service.stop()
            raise
        self._services = services

    def _stop_services(self) -> None:
        for service in reversed(self._services):
            service.stop()
        self._services = []
        self.shots.stop()

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            self._stop_services()
        with self._reboot_lock:
            rebooting = self._reboot_thread
        if rebooting is not None and rebooting is not threading.current_thread():
            rebooting.join()

    def reboot(self, seconds: float | None = None) -> None:
        """Take every port down for `seconds` (SIM:REBOOT), then power on afresh."""
        down = self.state.faults.reboot_s if seconds is None else seconds
        # Not self._lock: stop() holds it while it joins the connection threads calling this.
        with self._reboot_lock:
            if self._stopped.is_set():
                return
            if self._reboot_thread is not None and self._reboot_thread.is_alive():
                return  # already rebooting
            self._reboot_thread = threading.Thread(
                target=self._reboot, args=(down,), name=f"{self.name}-reboot", daemon=True
            )
            self._reboot_thread.start()

    def _reboot(self, seconds: float) -> None:
        log.info("%s: rebooting, ports down for %g s", self.name, seconds)
        with self._lock:
            if self._stopped.is_set():
                return
            self._stop_services()
        if self._stopped.wait(seconds):
            return
        with self._lock:
            if self._stopped.is_set():
                return
            self.state.reset()
            try:
                self._start_services()
            except OSError as exc:
                log.error("%s: could not come back after reboot: %s", self.name, exc)
                return
        log.info("%s: back up after reboot", self.name)

    def _knob_service(self, site: int, port: int) -> TcpService:
        service = TcpService(f"{self.name}:knobs{site}", self.host, port, lambda conn: None)
        table = self.tables[site]
        service.handler = lambda conn: KnobSession(
            table, self.state, conn, service.wait_stopping
        ).serve()
        return service

    def _status(self, conn: socket.socket, service: TcpService) -> None:
        """2235: the state line at connect, then one CRLF line per change."""
        st = self.state
        with st.lock:
            seq = st.status_seq
            lines = [st.state_line()]
        while True:
            conn.sendall("".join(f"{line}\r\n" for line in lines).encode())
            with st.lock:
                while st.status_seq == seq and not service.stopping:
                    st.changed.wait()
                if service.stopping:
                    return
                news = st.status_since(seq)
                seq = st.status_seq
            lines = [line for _, line in news]

    def _wake_status(self) -> None:
        with self.state.lock:
            self.state.changed.notify_all()
