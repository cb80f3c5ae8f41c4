"""The stream client: rate and counter over 10 s, faults, NOT READY, close, stop, carry-over."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from card_helpers import Collector, card_config, connected, gaps, simulated
from support import sim_process

from dtacq_ioc.card.errors import CardNotReady, StreamError
from dtacq_ioc.card.stream import StreamClient
from dtacq_ioc.contract import StreamLayout

RATE_CLKDIV = 1000  # ACQ425ELF at 100 MHz: 100 kHz, 4 MB/s


@pytest.fixture
def sim_card(tmp_path, loopback):
    """A connected Card on an in-process simulated ACQ425ELF, streaming at 100 kHz."""
    config = card_config(tmp_path, loopback)
    with simulated(config), connected(config) as card:
        card.set_clkdiv(RATE_CLKDIV)
        yield card


def test_layout_matches_the_card_arithmetic():
    acq425 = StreamLayout((1,), (16,), 2)
    assert (acq425.sample_bytes, acq425.card_nchan) == (40, 20)
    acq437 = StreamLayout((1, 2), (16, 16), 4)
    assert (acq437.sample_bytes, acq437.card_nchan) == (136, 34)
    assert acq437.sample_dtype.itemsize == 136
    assert acq437.site_slice(2) == slice(16, 32)
    with pytest.raises(ValueError, match="word_size 3"):
        StreamLayout((1,), (16,), 3)


def test_ten_seconds_at_the_configured_rate_with_a_gap_free_counter(tmp_path, loopback):
    """Acceptance: over 10 s the stream runs at the configured rate within 1%, no gaps."""
    config = card_config(tmp_path, loopback)
    arrivals: list[tuple[float, int]] = []
    collector = Collector()
    done = threading.Event()

    def on_buffer(samples: np.ndarray) -> None:
        collector.on_buffer(samples)
        arrivals.append((time.monotonic(), int(samples["spad"][-1, 0])))
        if arrivals[-1][0] - arrivals[0][0] >= 10.0:
            done.set()

    with sim_process(config.path, loopback), connected(config) as card:
        assert card.set_clkdiv(RATE_CLKDIV) == RATE_CLKDIV
        rate = card.sample_rate_hz()
        assert rate == pytest.approx(100_000.0)
        layout = card.configure_stream()
        stream = card.open_stream(layout, 1000, on_buffer, collector.on_end)
        assert done.wait(30), "no 10 s of data within 30 s"
        stream.stop()
    assert collector.ends == [None]
    (t0, c0), (t1, c1) = arrivals[0], arrivals[-1]
    measured = (c1 - c0) / (t1 - t0)
    assert measured == pytest.approx(rate, rel=0.01)
    counters = collector.all_counters()
    assert counters[0] == 1
    assert gaps(counters).size == 0
    assert stream.bytes_received >= len(counters) * layout.sample_bytes


def test_every_dropped_run_is_seen_with_its_size(sim_card):
    sim_card.knob(0).set("SIM:DROP", "5000,7")
    collector = Collector()
    enough = threading.Event()

    def on_buffer(samples: np.ndarray) -> None:
        collector.on_buffer(samples)
        if sum(collector.sizes) >= 60_000:
            enough.set()

    layout = sim_card.configure_stream()
    stream = sim_card.open_stream(layout, 2000, on_buffer, collector.on_end)
    assert enough.wait(30)
    stream.stop()
    counters = collector.all_counters()
    found = gaps(counters)
    assert found.size >= 10
    assert np.all(found == 7), f"gap sizes {np.unique(found)}"
    expected = len(counters) / 5000
    assert abs(found.size - expected) <= 1.5


def test_not_ready_ends_the_stream_with_card_not_ready(sim_card):
    sim_card.knob(0).set("SIM:NOT_READY", 1)
    collector = Collector()
    layout = sim_card.configure_stream()
    sim_card.open_stream(layout, 1000, collector.on_buffer, collector.on_end)
    assert collector.ended.wait(10)
    assert len(collector.ends) == 1 and isinstance(collector.ends[0], CardNotReady)
    assert "NOT READY" in str(collector.ends[0])
    assert collector.sizes == []


def test_close_mid_sample_delivers_every_whole_sample_then_stream_error(sim_card):
    layout = sim_card.configure_stream()
    sim_card.knob(0).set("SIM:CLOSE_AFTER", 1000 * layout.sample_bytes + 17)
    collector = Collector()
    stream = sim_card.open_stream(layout, 300, collector.on_buffer, collector.on_end)
    assert collector.ended.wait(10)
    assert collector.sizes == [300, 300, 300, 100]
    assert np.array_equal(collector.all_counters(), np.arange(1, 1001, dtype=np.uint32))
    (end,) = collector.ends
    assert isinstance(end, StreamError)
    assert "17 bytes of an incomplete sample dropped" in str(end)
    assert stream.bytes_received == 1000 * layout.sample_bytes + 17


def test_flush_s_hands_out_partial_buffers_early(sim_card):
    layout = sim_card.configure_stream()
    collector = Collector()
    enough = threading.Event()

    def on_buffer(samples: np.ndarray) -> None:
        collector.on_buffer(samples)
        if len(collector.sizes) >= 5:
            enough.set()

    # a 1 s buffer at 100 kHz; flush_s makes it arrive in pieces of about 50 ms
    stream = sim_card.open_stream(layout, 100_000, on_buffer, collector.on_end, flush_s=0.05)
    assert enough.wait(10)
    stream.stop()
    assert max(collector.sizes[:5]) < 50_000
    counters = collector.all_counters()
    assert counters[0] == 1 and gaps(counters).size == 0


def test_stop_from_another_thread_ends_once_with_none(sim_card):
    layout = sim_card.configure_stream()
    collector = Collector()
    stream = sim_card.open_stream(layout, 500, collector.on_buffer, collector.on_end)
    assert collector.first.wait(10)
    stopper = threading.Thread(target=stream.stop)
    stopper.start()
    stopper.join(10)
    assert collector.ended.is_set() and collector.ends == [None]
    stream.stop()  # a second stop is harmless
    assert collector.ends == [None]
    assert gaps(collector.all_counters()).size == 0


def _serve_once(parts: list[bytes], between: threading.Event) -> tuple[int, threading.Thread]:
    """A one-shot stream peer: sends the parts, waiting for `between` after the first."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.sendall(parts[0])
                between.wait(10)
                for part in parts[1:]:
                    conn.sendall(part)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_a_partial_sample_carries_over_to_the_next_buffer():
    layout = StreamLayout((1,), (4,), 2)
    sent = np.zeros(4, layout.sample_dtype)
    sent["ai"] = np.arange(16, dtype=np.int16).reshape(4, 4) * 1000 - 7000
    sent["spad"][:, 0] = np.arange(1, 5)
    raw = sent.tobytes()
    cut = 2 * layout.sample_bytes + layout.sample_bytes // 2
    collector = Collector(keep_ai=True)
    port, server = _serve_once([raw[:cut], raw[cut:]], collector.first)
    # timeout 0.2 s: the silence after the first part flushes its 2 whole samples
    stream = StreamClient(
        "RAW", "127.0.0.1", port, layout, 100, collector.on_buffer, collector.on_end, 0.2
    )
    stream.start()
    assert collector.ended.wait(10)
    server.join(5)
    assert collector.sizes == [2, 2]
    assert np.array_equal(np.concatenate(collector.ai), sent["ai"])
    assert np.array_equal(collector.all_counters(), [1, 2, 3, 4])
    assert isinstance(collector.ends[0], StreamError) and "closed by the card" in str(
        collector.ends[0]
    )


def test_a_failing_on_buffer_ends_the_stream_with_stream_error():
    layout = StreamLayout((1,), (4,), 2)
    ended: list[Exception | None] = []
    done = threading.Event()
    go_on = threading.Event()

    def on_buffer(samples: np.ndarray) -> None:
        raise RuntimeError("consumer broke")

    def on_end(exc: Exception | None) -> None:
        ended.append(exc)
        go_on.set()
        done.set()

    port, server = _serve_once([bytes(layout.sample_bytes * 10), b""], go_on)
    stream = StreamClient("RAW", "127.0.0.1", port, layout, 10, on_buffer, on_end, 2.0)
    stream.start()
    assert done.wait(10)
    server.join(5)
    (exc,) = ended
    assert isinstance(exc, StreamError) and "consumer broke" in str(exc)
    assert isinstance(exc.__cause__, RuntimeError)
