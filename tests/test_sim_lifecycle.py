"""Status console, transient shots, reboot, SSH, and the simulator as a real process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import paramiko
import pytest
from sim_helpers import (
    TIMEOUT,
    Knobs,
    StatusLines,
    recv_all,
    recv_exact,
    sim_card,
    wait_refused,
)
from support import (
    ROOT,
    child_env,
    free_port,
    output,
    random_loopback,
    running,
    sim_card_toml,
    sim_process,
    wait_for_port,
)
from support import write_config as write_test_config


@pytest.fixture
def card(tmp_path, loopback):
    with sim_card(tmp_path, loopback, faults="reboot_s = 0.5") as c:
        yield c


def test_status_console_follows_a_stream(card, loopback):
    status = StatusLines(loopback)
    try:
        assert status.next() == [0, 0, 0, 0, 0]  # the current state at connect
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
            recv_exact(s, 400)
            assert status.next()[0] == 1  # ARM
            assert status.next()[0] == 2  # running
        final = status.next()
        assert final[0] == 0 and final[3] >= 10  # IDLE, elapsed = samples sent
    finally:
        status.close()


def test_transient_shot_walks_the_states(card, loopback):
    status = StatusLines(loopback)
    try:
        assert status.next()[0] == 0
        with Knobs(loopback, 0) as k:
            k.set("transient", "PRE=0 POST=50000 SOFT_TRIGGER=0")
            assert k.ask("set_arm") == ""  # the bare name executes
            assert status.next() == [1, 0, 50000, 0, 1]  # ARM, demux on
            assert k.value("TRANS_ACT:STATE") == "TRANS_ACT:STATE ARM"
            k.set("soft_trigger", 1)
            assert status.states(3) == [3, 4, 0]  # RUN_POST, POST_PROCESS, IDLE
            assert k.value("shot") == "1"
            k.ask("set_arm")
            assert status.next()[0] == 1
            k.ask("set_abort")
            assert status.next()[0] == 0
            assert k.value("shot") == "1"
    finally:
        status.close()


def test_reboot_fault_takes_every_port_down_and_powers_on_afresh(card, loopback):
    with Knobs(loopback, 0) as k:
        k.set("spad1", "0x1234")
        k.set("SIM:NOT_READY", 1)
        assert k.ask("SIM:REBOOT=1.5") == ""  # the reply comes before the card goes down
        assert k.sock.recv(100) == b""  # then the card closes the connection
    for port in (4220, 4221, 4210, 2235, card.config.ssh.port):
        wait_refused(loopback, port)
    wait_for_port(loopback, 4221, timeout=TIMEOUT)
    with Knobs(loopback, 0) as k:
        assert k.value("spad1") == "0x00000000"
        assert k.value("SIM:NOT_READY") == "SIM:NOT_READY 0"
        assert k.value("SIM:REBOOT") == "SIM:REBOOT 0.5"  # the config's value again
    with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
        assert recv_exact(s, 40)[32:36] == b"\x01\x00\x00\x00"


def ssh_client(host: str, port: int, password: str = "sim") -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(host, port=port, username="root", password=password, timeout=TIMEOUT,
                   allow_agent=False, look_for_keys=False)  # fmt: skip
    return client


def run(client: paramiko.SSHClient, command: str) -> tuple[int, str, str]:
    _, out, err = client.exec_command(command, timeout=TIMEOUT)
    status = out.channel.recv_exit_status()
    return status, out.read().decode(), err.read().decode()


def test_ssh_login_commands_and_reboot(card, loopback):
    port = card.config.ssh.port
    with pytest.raises(paramiko.AuthenticationException):
        ssh_client(loopback, port, password="wrong").close()
    client = ssh_client(loopback, port)
    try:
        assert run(client, "hostname") == (0, "acq2106_000\n", "")
        assert run(client, "uptime")[1].startswith(" 12:00:00 up")
        assert run(client, "rm -rf /") == (127, "", "sh: rm: not found\n")
        assert run(client, "reboot")[0] == 0
    finally:
        client.close()
    wait_refused(loopback, 4220)
    wait_for_port(loopback, port, timeout=TIMEOUT)
    wait_for_port(loopback, 4221, timeout=TIMEOUT)
    with Knobs(loopback, 0) as k:
        assert k.value("MODEL") == "acq2106"


def test_sim_as_a_real_process(tmp_path, loopback):
    config = write_test_config(tmp_path, sim_card_toml("P", loopback))
    with sim_process(config, loopback) as proc:
        with Knobs(loopback, 1) as k:
            assert k.value("MODEL") == "ACQ425ELF"
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
            assert recv_exact(s, 40)[32:36] == b"\x01\x00\x00\x00"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
        out = output(proc)
        assert proc.returncode == 0, out
    assert f"simulator ready: P at {loopback}" in out
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((loopback, 4220), timeout=TIMEOUT)


def test_one_sim_process_per_card_side_by_side(tmp_path, loopback):
    """`sim --card B` checks B's ports only: A's, taken by `sim --card A`, are no problem."""
    other = random_loopback()
    config = write_test_config(tmp_path, sim_card_toml("A", loopback) + sim_card_toml("B", other))
    with (
        running(["sim", str(config), "--card", "A"], ready=(loopback, 4221)),
        running(["sim", str(config), "--card", "B"], ready=(other, 4221)) as b,
    ):
        assert b.poll() is None, output(b)


def test_sim_process_errors_are_one_clear_line(tmp_path, loopback):
    config = write_test_config(tmp_path, sim_card_toml("P", loopback))
    proc = subprocess.run(
        [sys.executable, "-m", "dtacq_ioc", "sim", str(config), "--card", "NOPE"],
        cwd=ROOT, env=child_env(), capture_output=True, timeout=60, text=True,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no simulated card named NOPE" in proc.stderr and "(simulated cards: P)" in proc.stderr
    # A port already taken: refused before anything starts, naming the key and the address.
    with socket.socket() as blocker:
        blocker.bind((loopback, 4210))
        blocker.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "dtacq_ioc", "sim", str(config)],
            cwd=ROOT, env=child_env(), capture_output=True, timeout=60, text=True,
        )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == f"{config}: cards[0].stream_port: port 4210 on {loopback} is in use\n"


def test_unthrottled_flag_reaches_the_cards(tmp_path, loopback):
    config = write_test_config(tmp_path, sim_card_toml("P", loopback, ssh_port=free_port()))
    with sim_process(config, loopback, "--unthrottled"), Knobs(loopback, 0) as k:
        assert k.value("SIM:UNTHROTTLED") == "SIM:UNTHROTTLED 1"
        k.set("SIM:CLOSE_AFTER", 4_000_000)
        with socket.create_connection((loopback, 4210), timeout=TIMEOUT) as s:
            assert len(recv_all(s)) == 4_000_000
