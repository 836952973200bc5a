"""qio's fault-injection rules (issue 13, docs/blkdebug.md "Fault-injection rules"): probability with a
seed, after/count, byte ranges, [delay], [corrupt] and [bad-blocks], in config files, inline options and
json: alike.  QEMU's own forms are covered by the differential corpus (tests/corpus/blkdebug)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qio.block.blkdebug_config import inline_sections, make_rule, parse_config_text
from qio.block.errors import QemuError


def qio(*cmds: str, image: str, image_opts: bool = True,
        args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qio", *args]
    for c in cmds:
        argv += ["-c", c]
    argv += ["--image-opts", image] if image_opts else [image]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def lines(res: subprocess.CompletedProcess[str]) -> list[str]:
    """stdout without the timing lines."""
    return [ln for ln in res.stdout.splitlines() if "ops/sec" not in ln]


def opts(img: Path, *rules: str, seed: int | None = 7) -> str:
    s = "driver=raw,file.driver=blkdebug,file.image.filename=" + str(img)
    if seed is not None:
        s += f",file.seed={seed}"
    return s + "".join("," + r for r in rules)


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "t.raw"
    p.write_bytes(bytes(1 << 20))
    return p


def no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr


WRITES = [f"write -P {i + 1} {i * 512} 512" for i in range(16)]


def failures(res: subprocess.CompletedProcess[str], n: int = 16) -> list[int]:
    """Which of the first ``n`` WRITES failed (their indices)."""
    out = lines(res)
    ok = {int(ln.split()[-1]) // 512 for ln in out if ln.startswith("wrote ")}
    return [i for i in range(n) if i not in ok]


# -- probability and seed ---------------------------------------------------------------------------
def test_probability_same_seed_same_failures(img: Path) -> None:
    rule = ("file.inject-error.0.event=write_aio,file.inject-error.0.iotype=write,"
            "file.inject-error.0.probability=0.5")
    first = qio(*WRITES, image=opts(img, rule, seed=1))
    second = qio(*WRITES, image=opts(img, rule, seed=1))
    other = qio(*WRITES, image=opts(img, rule, seed=2))
    assert failures(first) == failures(second)
    assert 0 < len(failures(first)) < 16  # some, not all
    assert failures(first) != failures(other)
    assert first.returncode == 1
    # the data of exactly the writes that succeeded reached the image
    data = img.read_bytes()
    for i in range(16):
        block = data[i * 512 : (i + 1) * 512]
        ever = any(i not in failures(r) for r in (first, second, other))
        assert block == (bytes([i + 1]) * 512 if ever else bytes(512))


def test_seed_is_chosen_and_shown_and_reproduces(img: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "p.cfg"
    cfg.write_text('[inject-error]\nevent = "write_aio"\niotype = "write"\nprobability = "0.5"\n')
    res = qio(*WRITES, "debug_state", image=f"blkdebug:{cfg}:{img}", image_opts=False, args=("-f", "raw"))
    seed_line = next(ln for ln in res.stdout.splitlines() if ln.startswith("seed: "))
    seed = int(seed_line.split()[1])
    assert seed_line == f"seed: {seed} (chosen at open; give seed={seed} to reproduce)"
    again = qio(*WRITES, "debug_state", image=f"driver=raw,file.driver=blkdebug,file.config={cfg},"
                f"file.seed={seed},file.image.filename={img}")
    assert failures(again) == failures(res)
    assert f"seed: {seed}\n" in again.stdout


def test_probability_zero_and_one(img: Path) -> None:
    never = qio(*WRITES[:4], image=opts(img, "file.inject-error.0.event=write_aio,file.inject-error.0.probability=0"))
    assert failures(never, 4) == [] and never.returncode == 0
    always = qio(*WRITES[:4], image=opts(img, "file.inject-error.0.event=write_aio,file.inject-error.0.probability=1"))
    assert failures(always, 4) == [0, 1, 2, 3]


def test_probabilistic_rule_fails_one_request_per_draw(img: Path) -> None:
    """Armed by the write's event, the rule fails the next read only: QEMU's rules stay armed."""
    rule = ("file.inject-error.0.event=write_aio,file.inject-error.0.iotype=read,"
            "file.inject-error.0.probability=0.999999")
    res = qio("write 0 512", "read 0 512", "read 0 512", "rules", image=opts(img, rule))
    assert lines(res)[1:] == ["read failed: Input/output error", "read 512/512 bytes at offset 0",
                              "#1 inject-error event=write_aio errno=5 iotype=read probability=0.999999"
                              " (matched 1, fired 1)"]
    plain = qio("write 0 512", "read 0 512", "read 0 512", image=opts(
        img, "file.inject-error.0.event=write_aio,file.inject-error.0.iotype=read"))
    assert lines(plain)[1:] == ["read failed: Input/output error", "read failed: Input/output error"]


def test_trace_rule_lines_carry_the_rule_id(img: Path) -> None:
    res = qio("break write_aio A", "write 0 512", args=("-T", "blkdebug_rule"), image=opts(
        img, "file.set-state.0.event=write_aio,file.set-state.0.new_state=2"))
    assert res.stderr.splitlines()[:2] == ["blkdebug_rule write_aio: #2 break write_aio A",
                                           "blkdebug_rule write_aio: #1 set-state event=write_aio new_state=2"]


# -- after / count / once ---------------------------------------------------------------------------
def test_after_and_count(img: Path) -> None:
    res = qio(*WRITES[:8], "debug_state", image=opts(
        img, "file.inject-error.0.event=write_aio,file.inject-error.0.after=2,file.inject-error.0.count=3"))
    assert failures(res, 8) == [2, 3, 4]
    assert "    #1 inject-error event=write_aio errno=5 after=2 count=3" not in res.stdout  # used up: deleted
    assert "rules: none" in res.stdout


def test_once_is_count_one(img: Path) -> None:
    a = qio(*WRITES[:4], image=opts(img, "file.inject-error.0.event=write_aio,file.inject-error.0.once=on"))
    b = qio(*WRITES[:4], image=opts(img, "file.inject-error.0.event=write_aio,file.inject-error.0.count=1"))
    assert failures(a, 4) == failures(b, 4) == [0]


def test_json_form(img: Path) -> None:
    spec = {"driver": "raw", "file": {"driver": "blkdebug", "seed": 3,
                                      "inject-error": [{"event": "write_aio", "after": 1, "count": 1,
                                                        "errno": 28}],
                                      "image": {"driver": "file", "filename": str(img)}}}
    res = qio(*WRITES[:3], image="json:" + json.dumps(spec), image_opts=False)
    assert lines(res) == ["wrote 512/512 bytes at offset 0", "write failed: No space left on device",
                          "wrote 512/512 bytes at offset 1024"]


# -- byte ranges ------------------------------------------------------------------------------------
def test_offset_and_length(img: Path) -> None:
    res = qio(*WRITES[:8], image=opts(img, "file.inject-error.0.event=write_aio,file.inject-error.0.offset=1k,"
                                      "file.inject-error.0.length=1k"))
    assert failures(res, 8) == [2, 3]


def test_offset_alone_is_one_byte(img: Path) -> None:
    res = qio("write 0 1024", "write 1024 1024", "write 2048 1024",
              image=opts(img, "file.inject-error.0.event=write_aio,file.inject-error.0.offset=1535"))
    assert lines(res) == ["wrote 1024/1024 bytes at offset 0", "write failed: Input/output error",
                          "wrote 1024/1024 bytes at offset 2048"]


# -- delay ------------------------------------------------------------------------------------------
def test_delay_reorders_completions_deterministically(img: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "d.cfg"
    cfg.write_text('[delay]\nevent = "write_aio"\noffset = "1024"\nlength = "512"\nns = "5000000"\n')
    cmds = ("aio_write -P 1 0 512", "aio_write -P 2 512 512", "aio_write -P 3 1024 512", "aio_flush")
    base = qio(*cmds, image=f"blkdebug::{img}", image_opts=False, args=("-f", "raw", "-t", "writeback"))
    runs = [qio(*cmds, image=f"blkdebug:{cfg}:{img}", image_opts=False, args=("-f", "raw", "-t", "writeback"))
            for _ in range(2)]
    assert lines(runs[0]) == lines(runs[1])
    order = [ln.split()[-1] for ln in lines(runs[0])]
    assert order[-1] == "1024"  # the delayed request completes last
    assert [ln.split()[-1] for ln in lines(base)][-1] != "1024"
    assert img.read_bytes()[:1536] == b"\x01" * 512 + b"\x02" * 512 + b"\x03" * 512


def test_delay_with_jitter_is_seeded(img: Path) -> None:
    rule = ("file.delay.0.event=write_aio,file.delay.0.ns=1000,file.delay.0.jitter=10000000,"
            "file.delay.0.iotype=write")
    cmds = [f"aio_write -P {i + 1} {i * 512} 512" for i in range(6)] + ["aio_flush"]
    a = qio(*cmds, image=opts(img, rule, seed=11))
    b = qio(*cmds, image=opts(img, rule, seed=11))
    assert lines(a) == lines(b)
    assert sorted(lines(a)) == sorted(f"wrote 512/512 bytes at offset {i * 512}" for i in range(6))


# -- corrupt ----------------------------------------------------------------------------------------
def test_corrupt_bit_flips_read_data_only(img: Path) -> None:
    res = qio("write -P 0 0 4k", "read -v 1024 4", "read -P 0 0 4k",
              image=opts(img, "file.corrupt.0.offset=1024,file.corrupt.0.length=4,file.corrupt.0.bit=9"))
    assert lines(res)[1] == "00000400:  00 02 00 00  ...."
    assert "Pattern verification failed at offset 0, 4096 bytes" in res.stdout
    assert img.read_bytes()[:4096] == bytes(4096)  # writes and the image are never altered


def test_corrupt_count_random_bits_seeded(img: Path) -> None:
    rule = "file.corrupt.0.offset=0,file.corrupt.0.length=64,file.corrupt.0.count=5"
    a = qio("read -v 0 64", image=opts(img, rule, seed=5))
    b = qio("read -v 0 64", image=opts(img, rule, seed=5))
    assert lines(a) == lines(b)
    dump = bytes.fromhex("".join(ln[11:58].replace(" ", "") for ln in lines(a)[:4]))
    assert sum(bin(x).count("1") for x in dump) == 5


def test_corrupt_once(img: Path) -> None:
    res = qio("read -P 0 0 512", "read -P 0 0 512",
              image=opts(img, "file.corrupt.0.bit=0,file.corrupt.0.once=on"))
    assert lines(res) == ["Pattern verification failed at offset 0, 512 bytes", "read 512/512 bytes at offset 0",
                          "read 512/512 bytes at offset 0"]


# -- bad blocks -------------------------------------------------------------------------------------
def test_bad_blocks_fail_reads_until_rewritten(img: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "b.cfg"
    cfg.write_text('[bad-blocks]\noffset = "4096"\nlength = "8192"\n')
    res = qio("read 0 4096", "read 4096 512", "write -P 7 4096 4096", "read -P 7 4096 4096", "read 8192 512",
              "read 12288 512", "debug_state", image=f"blkdebug:{cfg}:{img}", image_opts=False,
              args=("-f", "raw"))
    assert lines(res)[:6] == ["read 4096/4096 bytes at offset 0", "read failed: Input/output error",
                              "wrote 4096/4096 bytes at offset 4096", "read 4096/4096 bytes at offset 4096",
                              "read failed: Input/output error", "read 512/512 bytes at offset 12288"]
    assert "    #1 bad-blocks ranges=8192+4096 (matched 2, fired 2)" in res.stdout
    assert res.returncode == 1


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rule", "message"), [
    ("file.inject-error.0.event=write_aio,file.inject-error.0.probability=1.5",
     "Parameter 'probability' expects a number between 0 and 1"),
    ("file.inject-error.0.event=write_aio,file.inject-error.0.probability=x",
     "Parameter 'probability' expects a number between 0 and 1"),
    ("file.inject-error.0.event=write_aio,file.inject-error.0.count=0", "Parameter 'count' expects a positive number"),
    ("file.inject-error.0.event=write_aio,file.inject-error.0.after=x", "Parameter 'after' expects a number"),
    ("file.inject-error.0.event=write_aio,file.inject-error.0.once=on,file.inject-error.0.count=2",
     "Cannot use both 'once' and 'count' in [inject-error]"),
    ("file.inject-error.0.event=write_aio,file.inject-error.0.sector=1,file.inject-error.0.offset=0",
     "Cannot use both 'sector' and 'offset' in [inject-error]"),
    ("file.inject-error.0.event=write_aio,file.inject-error.0.length=4k",
     "Parameter 'length' needs 'offset' in [inject-error]"),
    ("file.inject-error.0.event=write_aio,file.inject-error.0.bogus=1",
     "[inject-error] section doesn't support the option 'bogus'"),
    ("file.delay.0.event=write_aio", "A [delay] rule needs 'ns' or 'jitter'"),
    ("file.delay.0.ns=5", "Missing event name for rule"),
    ("file.delay.0.event=nosuch,file.delay.0.ns=5", "invalid parameter value: nosuch"),
    ("file.corrupt.0.bit=1,file.corrupt.0.count=2", "Cannot use both 'bit' and 'count' in [corrupt]"),
    ("file.corrupt.0.offset=0,file.corrupt.0.length=1,file.corrupt.0.bit=8",
     "Parameter 'bit' must be below 8 (the bits of 'length')"),
    ("file.corrupt.0.event=read_aio", "[corrupt] section doesn't support the option 'event'"),
    ("file.bad-blocks.0.offset=0", "A [bad-blocks] range needs 'offset' and 'length'"),
    ("file.seed=-x", "Parameter 'seed' expects a number"),
])
def test_bad_rules_are_refused_at_open(img: Path, rule: str, message: str) -> None:
    res = qio("quit", image=opts(img, rule, seed=None))
    assert res.returncode == 1
    assert res.stderr == f"qio: can't open: {message}\n"
    no_traceback(res)


def test_bad_config_section_keys(img: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "x.cfg"
    cfg.write_text('[delay]\nevent = "write_aio"\nns = "1"\nbogus = "1"\n')
    res = qio("quit", image=f"blkdebug:{cfg}:{img}", image_opts=False, args=("-f", "raw"))
    assert res.stderr == f"qio: can't open device blkdebug:{cfg}:{img}: Invalid parameter 'bogus'\n"
    cfg.write_text('[corrupt]\nprobability = "2"\n')
    res = qio("quit", image=f"blkdebug:{cfg}:{img}", image_opts=False, args=("-f", "raw"))
    assert res.stderr.endswith(": Parameter 'probability' expects a number between 0 and 1\n")


def test_trace_names_the_rule_that_fired(img: Path) -> None:
    res = qio("write 0 512", "write 512 512", args=("-T", "blkdebug_fire"), image=opts(
        img, "file.inject-error.0.event=write_aio,file.inject-error.0.after=1,file.inject-error.0.errno=28,"
        "file.inject-error.0.iotype=write"))
    assert res.stderr.splitlines() == [
        "blkdebug_fire #1 inject-error event=write_aio errno=28 iotype=write after=1: failed request write offset"
        " 512 bytes 512 at write offset 512 bytes 512 with errno 28"]


# -- hostile input: never a traceback, never a hang ------------------------------------------------------
NEW_KEYS = ["event", "state", "iotype", "errno", "sector", "once", "probability", "after", "count", "offset",
            "length", "ns", "jitter", "bit", "bogus"]
NEW_VALUES = st.one_of(st.sampled_from(["write_aio", "read_aio", "l2_update", "none", "read", "write", "on", "0",
                                        "1", "0.5", "1.5", "-1", "nan", "4k", "1E", "99E", "0x10", "", "x"]),
                       st.text(max_size=8))
SECTIONS = ["[inject-error]", "[delay]", "[corrupt]", "[bad-blocks]", "[set-state]"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.sampled_from(SECTIONS),
                          st.builds(lambda k, v: f'{k} = "{v}"', st.sampled_from(NEW_KEYS), NEW_VALUES)),
                max_size=10))
def test_random_extended_configs_parse_or_fail_cleanly(lines: list[str]) -> None:
    try:
        for s in parse_config_text("\n".join(lines) + "\n"):
            make_rule(s.group, s.values)
    except QemuError as e:
        assert str(e)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.builds(lambda g, i, k: f"{g}.{i}.{k}", st.sampled_from(["inject-error", "delay", "corrupt",
                                                                                  "bad-blocks"]),
                                 st.integers(0, 1), st.sampled_from(NEW_KEYS)),
                       st.one_of(NEW_VALUES, st.integers(-10, 2**65), st.floats(), st.booleans()), max_size=6))
def test_random_extended_inline_rules(options: dict[str, object]) -> None:
    try:
        for group, values in inline_sections(dict(options)):
            make_rule(group, values)
    except QemuError as e:
        assert str(e)


COMMANDS = st.one_of(
    st.sampled_from(["inject event=write_aio iotype=write probability=0.5", "inject event=read_aio count=1",
                     "delay event=write_aio ns=1000000 jitter=500000", "delay event=read_aio ns=2000",
                     "corrupt count=2", "corrupt offset=0 length=512 bit=7 once=on",
                     "set_state event=pwritev new_state=2",
                     "rules", "unrule 1", "unrule 2", "pause", "unpause", "aio_flush", "flush", "debug_state",
                     "break -o 0,4k -n 2 write_aio A", "break -i read read_aio B", "resume A", "resume B",
                     "wait_break -t 0 A", "close"]),
    st.builds(lambda c, o: f"{c} {o} 512", st.sampled_from(["aio_write", "aio_read", "write", "read", "aio_discard"]),
              st.sampled_from(["0", "512", "4k"])),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(COMMANDS, min_size=1, max_size=12), st.sampled_from(["writeback", "writethrough"]))
def test_random_fault_command_sequences_never_hang(img: Path, cmds: list[str], cache: str) -> None:
    res = qio(*cmds, args=("-t", cache), image=opts(img, "file.bad-blocks.0.offset=8k,file.bad-blocks.0.length=4k"))
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    assert res.returncode in (0, 1), (res.returncode, res.stderr)
