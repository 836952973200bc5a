"""Output primitives: cvtstr (spec §4.1), timestr (§4.2), the statistics report (§4.3), the hex dump (§4.4)."""

from __future__ import annotations

import math

import pytest

from qio.render import cvtstr, dump_buffer, report_lines, timestr

KiB, MiB, GiB, EiB = 1 << 10, 1 << 20, 1 << 30, 1 << 60
SEC = 1_000_000_000


@pytest.mark.parametrize(("value", "text"), [
    (0, "0 bytes"),
    (1, "1 bytes"),  # no singular
    (42, "42 bytes"),
    (512, "512 bytes"),
    (1000, "1000 bytes"),
    (1023, "1023 bytes"),
    (1024, "1 KiB"),
    (1025, "1.001 KiB"),
    (1536, "1.500 KiB"),
    (1539, "1.503 KiB"),
    (8190, "7.998 KiB"),
    (65535, "63.999 KiB"),
    (64 * KiB, "64 KiB"),
    (1048575, "1023.999 KiB"),
    (MiB, "1 MiB"),
    (3 * MiB // 2, "1.500 MiB"),
    (4000 * KiB, "3.906 MiB"),
    (2147483136, "2 GiB"),  # 1.9999995 GiB prints as 2.000 and is trimmed
    (GiB, "1 GiB"),
    (1 << 40, "1 TiB"),
    (1 << 50, "1 PiB"),
    (EiB, "1 EiB"),
    (2**63 - 1, "8 EiB"),
    # rates keep the fraction
    (464.753862, "464.753862 bytes"),
    (16.207858, "16.207858 bytes"),
    (47.904732, "47.904732 bytes"),
    (0.5, "0.500000 bytes"),
    # the first ".000" anywhere is cut (C strstr): 100.0004 -> "100.000400" -> "100"
    (100.0004, "100 bytes"),
    (1000.0001 * KiB, "1000 KiB"),
    (math.inf, "inf EiB"),
    (math.nan, "nan bytes"),
])
def test_cvtstr(value: float, text: str) -> None:
    assert cvtstr(value) == text


@pytest.mark.parametrize(("ns", "verbose", "text"), [
    (0, False, "00.00 sec"),
    (120_000_000, False, "00.12 sec"),
    (370_000_000, False, "00.37 sec"),
    (4_999_999, False, "00.00 sec"),
    (999_000_000, False, "01.00 sec"),  # %05.2f rounding, still the sub-second form
    (SEC, False, "0:00:01.00"),  # no " sec" suffix once a whole second has passed
    (1_100_000_000, False, "0:00:01.10"),
    (59_999_000_000, False, "0:00:60.00"),  # C rounds the seconds field on its own
    (61 * SEC + 250_000_000, False, "0:01:01.25"),
    ((22 * 60 + 48) * SEC + 50_000_000, False, "0:22:48.05"),
    (3723 * SEC + 500_000_000, False, "1:02:03.50"),
    (100 * 3600 * SEC, False, "100:00:00.00"),
    (0, True, "0:00:00.00"),  # -C always uses the long form
    (120_000_000, True, "0:00:00.12"),
    (1_100_000_000, True, "0:00:01.10"),
])
def test_timestr(ns: int, verbose: bool, text: str) -> None:
    assert timestr(ns, verbose) == text


def test_report_normal() -> None:
    assert report_lines("wrote", 250_000_000, 0, 4096, 4096, 1, False) == [
        "wrote 4096/4096 bytes at offset 0\n",
        "4 KiB, 1 ops; 00.25 sec (16 KiB/sec and 4.0000 ops/sec)\n",
    ]


def test_report_over_one_second() -> None:
    assert report_lines("read", 2 * SEC, 512, 1536, 1536, 1, False) == [
        "read 1536/1536 bytes at offset 512\n",
        "1.500 KiB, 1 ops; 0:00:02.00 (768 bytes/sec and 0.5000 ops/sec)\n",
    ]


def test_report_zero_bytes() -> None:
    lines = report_lines("read", 143_113, 0, 0, 0, 1, False)
    assert lines == ["read 0/0 bytes at offset 0\n",
                     "0 bytes, 1 ops; 00.00 sec (0 bytes/sec and 6987.4854 ops/sec)\n"]


def test_report_zero_time() -> None:
    assert report_lines("discard", 0, 65536, 65536, 65536, 1, False)[1] == \
        "64 KiB, 1 ops; 00.00 sec (inf EiB/sec and inf ops/sec)\n"


def test_report_total_differs_from_count() -> None:
    """``<op> <total>/<count>``: the two numbers are printed as given, offsets in decimal."""
    assert report_lines("read", SEC, 2**40, 4096, 1024, 1, False)[0] == "read 1024/4096 bytes at offset 1099511627776\n"


def test_report_csv() -> None:
    assert report_lines("read", 500_000_000, 0, 512, 512, 1, True) == ["512,1,0:00:00.50,1024.000,2.000\n"]
    assert report_lines("wrote", 4 * SEC, 7, 4096, 4096, 1, True) == ["4096,1,0:00:04.00,1024.000,0.250\n"]
    assert report_lines("wrote", 0, 0, 4, 4, 1, True) == ["4,1,0:00:00.00,inf,inf\n"]


def test_report_csv_is_one_line_and_normal_is_two() -> None:
    assert len(report_lines("read", 1, 0, 1, 1, 1, True)) == 1
    assert len(report_lines("read", 1, 0, 1, 1, 1, False)) == 2


# -- hex dump ----------------------------------------------------------------------------------------
def test_dump_spec_example() -> None:
    buf = b"A" * 20 + b"\n" * 12 + b"\0" * 8
    assert dump_buffer(buf, 0) == (
        "00000000:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA\n"
        "00000010:  41 41 41 41 0a 0a 0a 0a 0a 0a 0a 0a 0a 0a 0a 0a  AAAA............\n"
        "00000020:  00 00 00 00 00 00 00 00  ........\n"
    )


def test_dump_short_rows_are_not_padded() -> None:
    assert dump_buffer(b"AAAAA", 3) == "00000003:  41 41 41 41 41  AAAAA\n"
    assert dump_buffer(b"\x11\x11\x11\x00", 0x600) == "00000600:  11 11 11 00  ....\n"
    assert dump_buffer(b"z", 0) == "00000000:  7a  z\n"


def test_dump_empty() -> None:
    assert dump_buffer(b"", 0) == ""


def test_dump_offsets_are_absolute_and_grow_past_eight_digits() -> None:
    out = dump_buffer(b"0123456789abcdefXY", 0xFFFFFFF8)
    assert out == (
        "fffffff8:  30 31 32 33 34 35 36 37 38 39 61 62 63 64 65 66  0123456789abcdef\n"
        "100000008:  58 59  XY\n"
    )
    assert dump_buffer(b"Q", 0x123456789AB).startswith("123456789ab:  51  Q")


def test_dump_rows_are_not_aligned_to_16() -> None:
    lines = dump_buffer(bytes(33), 5).splitlines()
    assert [line.split(":")[0] for line in lines] == ["00000005", "00000015", "00000025"]


def test_dump_only_ascii_alnum_is_printable() -> None:
    out = dump_buffer(bytes(range(256)), 0)
    text = "".join(line.split("  ")[-1] for line in out.splitlines())
    expect = "".join(chr(b) if chr(b).isascii() and chr(b).isalnum() else "." for b in range(256))
    assert text == expect
    assert text.count(".") == 256 - 62
    # punctuation, space, DEL and Latin-1 letters (isalnum in other locales) are dots
    assert dump_buffer(b" !~\x7f\xe9\xc0_-", 0) == "00000000:  20 21 7e 7f e9 c0 5f 2d  ........\n"


def test_dump_accepts_memoryview_and_bytearray() -> None:
    data = bytearray(b"AB\x00")
    assert dump_buffer(memoryview(data), 0) == dump_buffer(data, 0) == "00000000:  41 42 00  AB.\n"
