"""Number parsing: ``qemu_strtosz``/``cvtnum`` (spec §3.1), ``-P`` pattern bytes (§3.3), ``strtol0`` (§3.4).

Every expectation in the cvtnum tables was also checked against the real qemu-io 7.2 binary
(``qemu-io -f raw -c "alloc 0 <arg>" 1G.raw``) when this file was written.
"""

from __future__ import annotations

import errno

import pytest

from qio.numbers import INT64_MAX, cvtnum, parse_pattern, qemu_strtosz, strtol0

EINVAL, ERANGE = -errno.EINVAL, -errno.ERANGE
KiB, MiB, GiB, TiB, PiB, EiB = (1 << s for s in (10, 20, 30, 40, 50, 60))

VALID = [
    ("0", 0),
    ("1", 1),
    ("512", 512),
    ("08", 8),  # no octal ...
    ("010", 10),  # ... 010 is ten
    ("0x10", 16),
    ("0x10b", 267),  # 'b' is a hex digit here, not the byte suffix
    ("0X1F", 31),
    ("0xe", 14),
    ("+5", 5),
    ("+0x10", 16),
    ("\t5", 5),  # leading whitespace (only reachable with a tab)
    ("1b", 1),
    ("1B", 1),
    ("1k", KiB),
    ("1K", KiB),
    ("1m", MiB),
    ("1M", MiB),
    ("1g", GiB),
    ("1t", TiB),
    ("1p", PiB),
    ("1e", EiB),  # 'e' is the exbibyte suffix, not an exponent
    ("1E", EiB),
    ("1.0", 1),  # a zero fraction needs no multiplier
    ("1.0b", 1),
    ("1.", 1),  # '.' without digits is skipped
    ("1.e", EiB),
    ("5.k", 5 * KiB),
    ("0.k", 0),
    ("1.5k", 1536),
    ("1.5K", 1536),
    ("0.5k", 512),
    ("1.0005k", 1025),  # 1024.512 rounds up
    ("1.999999k", 2048),
    ("0.0001k", 0),  # 0.1024 rounds down
    ("1.5m", 3 * MiB // 2),
    ("7E", 7 * EiB),
    ("9223372036854775807", INT64_MAX),
    ("0x7fffffffffffffff", INT64_MAX),
]

INVALID = [
    "", "abc", "k", ".5k",
    "1.5",  # a real fraction needs a multiplier > 1
    "1.5b",
    "1kb",  # one suffix letter only
    "1.5x",
    "0x",  # strtoull stops after the 0, "x" is left over
    "0xg",
    "00x10",
    "0x1.5",  # no fraction after hex
    "0x0.k",
    "1e3",  # no exponents
    "1.5e1k",
    "-1",  # any minus is invalid
    "-0",
    "-0x10",
    "1 ",
    "12q",
]

TOO_LARGE = [
    "8E",  # 2**63: qemu_strtosz accepts it, cvtnum does not
    "9223372036854775808",
    "0x8000000000000000",
    "0xFFFFFFFFFFFFFFFF",
    "16E",  # 2**64: qemu_strtosz overflows already
    "18446744073709551616",
    "0x10000000000000000",
    "99999999999999999999k",
    "16777216T",
]


@pytest.mark.parametrize(("text", "value"), VALID)
def test_cvtnum_valid(text: str, value: int) -> None:
    assert cvtnum(text) == (0, value, False)
    assert qemu_strtosz(text) == (0, value, False)


@pytest.mark.parametrize("text", INVALID)
def test_cvtnum_invalid(text: str) -> None:
    assert cvtnum(text)[0] == EINVAL
    assert qemu_strtosz(text)[0] == EINVAL


@pytest.mark.parametrize("text", TOO_LARGE)
def test_cvtnum_too_large(text: str) -> None:
    assert cvtnum(text)[0] == ERANGE


def test_strtosz_accepts_up_to_2_64_minus_1_but_cvtnum_stops_at_int64_max() -> None:
    assert qemu_strtosz("8E") == (0, 8 * EiB, False)
    assert qemu_strtosz("0xFFFFFFFFFFFFFFFF") == (0, 2**64 - 1, False)
    assert qemu_strtosz("18446744073709551615") == (0, 2**64 - 1, False)
    assert qemu_strtosz("18446744073709551616")[0] == ERANGE
    assert qemu_strtosz("16E")[0] == ERANGE
    assert cvtnum("9223372036854775807") == (0, INT64_MAX, False)
    assert cvtnum("9223372036854775808")[0] == ERANGE


@pytest.mark.parametrize(("text", "value"), [("0x1k", KiB), ("0x1K", KiB), ("0x2m", 2 * MiB), ("0x10b", None)])
def test_hex_with_suffix_sets_the_deprecation_warning_flag(text: str, value: int | None) -> None:
    err, val, warn = cvtnum(text)
    assert err == 0
    if value is None:  # "b" is a hex digit, so there is no suffix and no warning
        assert (val, warn) == (267, False)
    else:
        assert (val, warn) == (value, True)


@pytest.mark.parametrize("text", ["1k", "0x10", "10", "1.5k", "7E"])
def test_no_warning_without_hex_suffix(text: str) -> None:
    assert cvtnum(text)[2] is False


def test_fast_paths_agree_with_the_full_parser() -> None:
    """cvtnum has shortcuts for plain decimals and "64k"-style sizes; they must not change results."""
    for digits in ("0", "1", "99", "123456789", "99999999999999999", "999999999999999999"):
        for suffix in ("", "k", "K", "m", "g", "t", "p", "e", "E", "b"):
            text = digits + suffix
            err, val, _ = qemu_strtosz(text)
            expect = (err, val) if err else ((ERANGE, 0) if val > INT64_MAX else (0, val))
            assert cvtnum(text)[:2] == expect, text


# -- -P pattern bytes (strtol base 0, 0..255, fully consumed) ------------------------------------
@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("65", 65), ("0x41", 0x41), ("0X41", 0x41), ("065", 0x35), ("0377", 255), ("255", 255),
    ("0xff", 255), ("-0", 0), ("+7", 7), (" 7", 7), ("\t0x10", 16), ("00", 0),
])
def test_pattern_valid(text: str, value: int) -> None:
    assert parse_pattern(text) == value


@pytest.mark.parametrize("text", [
    "09", "08", "256", "0x100", "0400", "-1", "-0x1", "0x", "x", "q", "1k", "7 ", " ", "\t", "1.0", "0b1",
])
def test_pattern_invalid(text: str) -> None:
    assert parse_pattern(text) is None


# -- strtol(s, &end, 0) requiring full consumption (sleep) ----------------------------------------
@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("10", 10), ("010", 8), ("0x10", 16), ("0X1f", 31), ("-5", -5), ("+5", 5), ("-0x10", -16),
    ("  12", 12), ("\t7", 7), ("0777", 511),
    ("9223372036854775807", INT64_MAX),
    ("9223372036854775808", INT64_MAX),  # strtol saturates at LONG_MAX
    ("-9223372036854775809", -(2**63)),
    ("0x" + "f" * 20, INT64_MAX),
])
def test_strtol0_valid(text: str, value: int) -> None:
    assert strtol0(text) == value


@pytest.mark.parametrize("text", ["", " ", "1k", "08", "09", "0x", "0xg", "12 ", "- 5", "--5", "1.5", "abc", "1e3"])
def test_strtol0_invalid(text: str) -> None:
    assert strtol0(text) is None
