"""The knob client against the simulated card's site services, and against a silent peer."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from card_helpers import card_config, simulated
from support import wait_for_port

from dtacq_ioc.card.errors import CardError, KnobError, KnobTimeout
from dtacq_ioc.card.knobs import KnobClient


@pytest.fixture
def sim_host(tmp_path, loopback):
    """A simulated ACQ425ELF on acq2106 at the test's loopback address."""
    with simulated(card_config(tmp_path, loopback)):
        yield loopback


def client(host: str, site: int, timeout: float = 3.0) -> KnobClient:
    return KnobClient("DIG", host, site, 4220 + site, timeout)


def test_query_set_and_reuse_one_connection(sim_host):
    k = client(sim_host, 1)
    try:
        assert k.query("MODEL") == "ACQ425ELF"
        assert k.query("NCHAN") == "16"
        sock = k._sock
        assert k.set("clkdiv", 200) == ""
        assert k.query("clkdiv") == "200"
        assert k._sock is sock, "each request must reuse the site's connection"
    finally:
        k.close()


def test_name_value_reply_gives_the_value(sim_host):
    k = client(sim_host, 0)
    try:
        line = k.query_lines("SIG:CLK_MB:FIN")
        assert len(line) == 1 and line[0].startswith("SIG:CLK_MB:FIN ")
        assert float(k.query("SIG:CLK_MB:FIN")) > 0
    finally:
        k.close()


def test_glob_multi_line_help_and_semicolons(sim_host):
    k = client(sim_host, 1)
    try:
        names = k.command("help")
        assert {"MODEL", "NCHAN", "clkdiv", "gain1", "gain16"} <= set(names)
        gains = k.query_lines("gain1?")
        assert len(gains) == 7  # gain10..gain16, one "NAME VALUE" line each
        assert all(ln.split()[0].startswith("gain") and ln.split()[1].isdigit() for ln in gains)
        assert k.command("MODEL;NCHAN;clkdiv=300;clkdiv") == ["ACQ425ELF", "16", "", "300"]
    finally:
        k.close()


def test_error_replies_raise_knob_error_and_the_connection_survives(sim_host):
    k = client(sim_host, 1)
    try:
        with pytest.raises(KnobError) as err:
            k.query("no_such_knob")
        e = err.value
        assert (e.card, e.site, e.knob) == ("DIG", 1, "no_such_knob")
        assert e.text.startswith("ERROR") and "no_such_knob" in e.text
        assert str(e) == f"DIG site 1: no_such_knob: {e.text}"
        # the card's own validator, reached by bypassing the driver's range check
        with pytest.raises(KnobError, match=r"DIG site 1: gain3: ERROR"):
            k.set("gain3", 9)
        with pytest.raises(KnobError, match="read-only"):
            k.set("MODEL", "x")
        assert k.query("MODEL") == "ACQ425ELF"
    finally:
        k.close()


def test_bad_input_is_refused_before_sending(sim_host):
    k = client(sim_host, 1)
    try:
        with pytest.raises(ValueError, match="';'"):
            k.set("clkdiv", "100;gain=3")
        with pytest.raises(ValueError, match="'\\\\n'"):
            k.query("MODEL\nNCHAN")
        with pytest.raises(ValueError, match="empty"):
            k.query("")
        assert k.query("gain1") == "0"
    finally:
        k.close()


def test_concurrent_callers_each_get_their_own_reply(sim_host):
    k = client(sim_host, 1)
    answers = {"MODEL": "ACQ425ELF", "NCHAN": "16", "data32": "0"}
    wrong: list[str] = []

    def ask(knob: str) -> None:
        for _ in range(40):
            got = k.query(knob)
            if got != answers[knob]:
                wrong.append(f"{knob} -> {got!r}")

    threads = [threading.Thread(target=ask, args=(name,)) for name in answers for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not wrong
    finally:
        k.close()


def test_silent_card_times_out_within_the_timeout():
    """A peer that accepts and never answers: KnobTimeout, in time, naming what hung."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        k = KnobClient("SILENT", "127.0.0.1", 3, port, timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(KnobTimeout) as err:
            k.query("clkdiv")
        elapsed = time.monotonic() - t0
        assert 0.45 <= elapsed < 1.5
        assert (err.value.card, err.value.site, err.value.knob) == ("SILENT", 3, "clkdiv")
        assert str(err.value) == "SILENT site 3: clkdiv: no reply within 0.5 s"
        k.close()


def test_a_peer_that_accepts_then_closes_is_a_card_error():
    """A card going down for a reboot accepts, then closes before the prompt: the
    caller gets a lost connection (a CardError, which wait_ready retries)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def close_each() -> None:
            conn, _ = server.accept()
            conn.close()

        closer = threading.Thread(target=close_each, daemon=True)
        closer.start()
        k = KnobClient("GOING", "127.0.0.1", 0, port, timeout=2.0)
        with pytest.raises(CardError, match="GOING site 0: MODEL: connection lost"):
            k.query("MODEL")
        closer.join(2)
        k.close()


def test_knob_delay_times_out_then_recovers(sim_host):
    slow = client(sim_host, 0, timeout=10.0)
    fast = client(sim_host, 1, timeout=0.5)
    try:
        slow.set("SIM:KNOB_DELAY", 1.5)
        t0 = time.monotonic()
        with pytest.raises(KnobTimeout, match="DIG site 1: NCHAN"):
            fast.query("NCHAN")
        assert time.monotonic() - t0 < 1.2
        slow.set("SIM:KNOB_DELAY", 0)
        # the timed-out connection was dropped: the late reply can't answer this query
        assert fast.query("MODEL") == "ACQ425ELF"
    finally:
        slow.close()
        fast.close()


def test_refused_connection_is_a_card_error(loopback):
    k = client(loopback, 1, timeout=1.0)
    with pytest.raises(CardError, match=f"DIG site 1: cannot connect to {loopback}:4221"):
        k.query("MODEL")


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True


def test_a_reused_connection_reconnects_after_the_card_restarts(sim_host, caplog):
    k = client(sim_host, 1)
    admin = client(sim_host, 0)
    try:
        assert k.set("clkdiv", 300) == ""
        old = k._sock
        admin.set("SIM:REBOOT", 0.5)
        deadline = time.monotonic() + 5
        while not _refused(sim_host, 4221):
            assert time.monotonic() < deadline, "the knob port never went down"
            time.sleep(0.02)
        wait_for_port(sim_host, 4221)
        # the same client, on its now-dead connection: it reconnects and asks again
        with caplog.at_level(logging.INFO, logger="dtacq_ioc.card.knobs"):
            assert k.query("clkdiv") == "100"
        assert k._sock is not old
        assert "DIG site 1: connection lost, reconnecting" in caplog.messages
    finally:
        k.close()
        admin.close()
