"""`.dig` files: the byte layout checked by hand, round trips, runs, truncation, paths."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from dtacq_ioc.archive.dig import (
    DigError,
    DigWriter,
    dig_name,
    file_date,
    header_date,
    read_dig,
    read_run,
    run_files,
    safe_path,
)


def header(channel_list, byte_depth=2, is_float=False, **extra):
    return {
        "channels": 16,
        "channel_list": list(channel_list),
        "byte_depth": byte_depth,
        "bit_shift": 0,
        "is_float": is_float,
        "downsample": 1,
        **extra,
    }


def test_byte_layout_by_hand(tmp_path):
    data = np.array([[1, -2, 3], [4, 5, -32768]], dtype="<i2")
    path = tmp_path / "x-0.dig"
    with DigWriter(path, header([0, 3, 7], measurement_name="naïve")) as w:
        w.write(data)
    raw = path.read_bytes()
    (n,) = struct.unpack("<I", raw[:4])
    assert n % 4 == 0
    text = raw[4 : 4 + n]
    assert text == text.rstrip() + b" " * (len(text) - len(text.rstrip()))
    parsed = json.loads(text)
    assert parsed["channel_list"] == [0, 3, 7] and parsed["measurement_name"] == "naïve"
    body = raw[4 + n :]
    assert body == struct.pack("<6h", 1, -2, 3, 4, 5, -32768)  # sample-major
    assert w.size == len(raw) and w.sha256 == hashlib.sha256(raw).hexdigest()
    rf = w.close()
    assert (rf.name, rf.size, rf.sha256) == (path.name, len(raw), hashlib.sha256(raw).hexdigest())


def test_round_trip_int32_and_float64(tmp_path):
    rng = np.random.default_rng(0)
    ints = rng.integers(-(2**31), 2**31 - 1, size=(1000, 4)).astype("<i4")
    with DigWriter(tmp_path / "a-0.dig", header([2, 0, 1, 5], byte_depth=4)) as w:
        w.write(ints[:300])
        w.write(ints[300:].tobytes())
    h, chans = read_dig(tmp_path / "a-0.dig")
    assert h["byte_depth"] == 4 and list(chans) == [2, 0, 1, 5]
    for i, ch in enumerate([2, 0, 1, 5]):
        np.testing.assert_array_equal(chans[ch], ints[:, i])
    floats = rng.normal(size=(10, 2))
    with DigWriter(tmp_path / "f-0.dig", header([0, 1], byte_depth=8, is_float=True)) as w:
        w.write(floats)
    _, chans = read_dig(tmp_path / "f-0.dig")
    assert chans[1].dtype == np.float64
    np.testing.assert_array_equal(chans[1], floats[:, 1])


def test_writer_refuses_partial_samples_and_wrong_types(tmp_path):
    with DigWriter(tmp_path / "b-0.dig", header([0, 1])) as w:
        with pytest.raises(ValueError, match="not whole samples"):
            w.write(b"\x00\x01\x02")
        with pytest.raises(ValueError, match="data is float64"):
            w.write(np.zeros((2, 2)))


def test_truncated_file_reads_up_to_the_last_whole_sample(tmp_path):
    path = tmp_path / "t-0.dig"
    data = np.arange(30, dtype="<i2").reshape(10, 3)
    with DigWriter(path, header([0, 1, 2])) as w:
        w.write(data)
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])  # 6 bytes = 1 sample, plus 1 byte of the one before
    _, chans = read_dig(path)
    assert len(chans[0]) == 8
    np.testing.assert_array_equal(chans[2], data[:8, 2])
    # cut inside the header: a clear error, naming the file
    path.write_bytes(raw[:10])
    with pytest.raises(DigError, match=r"t-0\.dig: header cut short"):
        read_dig(path)
    path.write_bytes(raw[: len(raw) - len(data.tobytes())])  # header only
    _, chans = read_dig(path)
    assert len(chans[1]) == 0


def test_read_run_follows_the_files_in_order(tmp_path):
    date = file_date(0.0)
    assert date == "1970-01-01_00-00-00.000000"  # needs no percent-encoding in a URL
    assert header_date(0.5) == "1970-01-01 00:00:00.500000"  # str(datetime.utcnow())
    data = np.arange(200, dtype="<i2").reshape(100, 2)
    bounds = [0, 30, 31, 100]
    for i in range(3):
        with DigWriter(tmp_path / dig_name(date, i), header([4, 5])) as w:
            w.write(data[bounds[i] : bounds[i + 1]])
    # 10 sorts before 2 as text; the index decides
    names = [p.name for p in run_files(tmp_path)]
    assert names == [f"{date}-0.dig", f"{date}-1.dig", f"{date}-2.dig"]
    _, chans = read_run(tmp_path)
    np.testing.assert_array_equal(chans[5], data[:, 1])
    _, again = read_run(reversed(run_files(tmp_path)))
    np.testing.assert_array_equal(again[4], data[:, 0])
    with DigWriter(tmp_path / dig_name(date, 3), header([4])) as w:
        pass
    with pytest.raises(DigError, match="differ"):
        read_run(tmp_path)


def test_file_index_order_beyond_ten(tmp_path):
    for i in (10, 2, 1):
        with DigWriter(tmp_path / dig_name("d", i), header([0])):
            pass
    assert [p.name for p in run_files(tmp_path)] == ["d-1.dig", "d-2.dig", "d-10.dig"]


def test_safe_path_never_escapes(tmp_path):
    assert safe_path(tmp_path, "CARD", "run1") == (tmp_path / "CARD" / "run1").resolve()
    for bad in ("..", "a/b", "", "../x", "/etc", " x", "a\\b"):
        with pytest.raises(ValueError, match="unsafe path component"):
            safe_path(tmp_path, "CARD", bad)
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(ValueError, match="outside"):
        safe_path(tmp_path, "link")


def test_existing_files_are_never_overwritten(tmp_path):
    path = tmp_path / "z-0.dig"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        DigWriter(path, header([0]))
    assert path.read_bytes() == b"keep"
