"""Every scenario of docs/tutorial-race.md through the API, compared with what the shell prints for it.

The shell run (this tree's qio, and real qemu-io where it does not hang) gives the facts a reader sees:
the ``blkdebug:`` lines, the order of the ``wrote ... at offset X`` completions, the bytes ``read -v``
dumps and the image file afterwards.  The API run of the same scenario must give the same facts: its
``img.log``, the order its writes completed (each write in the default write-through mode completes right
after its ``flush_to_os`` event, recorded with ``img.events()``), what ``img.read`` returns, the file.
Where qemu-io would hang (a forgotten ``resume``, a synchronous write behind a parked request) the shell
of qio resumes and the API raises ``StandstillError``; after the explicit resume both end the same."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import qio
from oracle import QEMU_IO, ROOT, env_with_root

ALIGNED = "driver=raw,file.driver=blkdebug,file.align=4k,file.image.filename={}"
WROTE = re.compile(r"wrote \d+/\d+ bytes at offset (\d+)$")
READ = re.compile(r"read (\d+)/\d+ bytes at offset (\d+)$")
DUMP = re.compile(r"^[0-9a-f]{8}:  ((?:[0-9a-f]{2} )+)")


@dataclass
class Facts:
    """What a run of a scenario shows."""

    log: list[str] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    reads: dict[int, bytes] = field(default_factory=dict)
    image: bytes = b""


def shell_facts(prog: list[str], commands: list[str], image_args: list[str], path: Path) -> Facts:
    out = subprocess.run([*prog, *[a for c in commands for a in ("-c", c)], *image_args], capture_output=True,
                         text=True, cwd=path.parent, env=env_with_root(), timeout=120)
    facts = Facts()
    dump = bytearray()
    for line in out.stdout.splitlines():
        if line.startswith("blkdebug: "):
            facts.log.append(line + "\n")
        elif m := WROTE.match(line):
            facts.order.append(int(m[1]))
        elif m := DUMP.match(line):
            dump += bytes.fromhex(m[1].replace(" ", ""))
        elif (m := READ.match(line)) and dump:
            facts.reads[int(m[2])] = bytes(dump)
            dump.clear()
    facts.image = path.read_bytes()
    return facts


def fresh(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return path


Scenario = Callable[[qio.Image, Facts], Awaitable[None]]


async def order1(img: qio.Image, facts: Facts) -> None:
    bp = img.breakpoint("write_aio", "A")
    w1 = img.submit_write(0, b"\x11" * 8192)
    await bp.hit()
    await img.submit_write(4096, b"\x22" * 8192)
    assert w1.state == "suspended"
    bp.resume()
    await img.drain()
    facts.reads = {4088: await img.read(4088, 16), 8184: await img.read(8184, 16)}


async def order2(img: qio.Image, facts: Facts) -> None:
    bp = img.breakpoint("pwritev_done", "A")
    w1 = img.submit_write(0, b"\x11" * 8192)
    assert await bp.hit() is w1
    await img.submit_write(4096, b"\x22" * 8192)
    bp.resume()
    await img.drain()
    facts.reads = {4088: await img.read(4088, 16)}


async def forgot_resume(img: qio.Image, facts: Facts) -> None:
    bp = img.breakpoint("write_aio", "A")
    img.submit_write(0, b"\x11" * 8192)
    await img.submit_write(4096, b"\x22" * 8192)
    with pytest.raises(qio.StandstillError):
        await img.drain()  # the shell's aio_flush reports this and resumes; the API raises
    bp.resume()
    await img.drain()
    facts.reads = {4088: await img.read(4088, 16)}


async def rmw(img: qio.Image, facts: Facts) -> None:
    bp = img.breakpoint("pwritev_rmw_after_head", "A")
    img.submit_write(0x1200, bytes([10]) * 0x200)
    await bp.hit()
    w2 = img.submit_write(0x1400, bytes([11]) * 0x200)
    with pytest.raises(qio.StandstillError):
        await w2  # serialised behind W1: it does not complete during the shell's sleep either
    bp.resume()
    await img.drain()
    facts.reads = {0x1000: await img.read(0x1000, 0x1000)}


async def other_block(img: qio.Image, facts: Facts) -> None:
    bp = img.breakpoint("pwritev_rmw_after_head", "A")
    w1 = img.submit_write(0x1200, bytes([10]) * 0x200)
    await bp.hit()
    await img.submit_write(0x2200, bytes([12]) * 0x200)
    assert w1.state == "suspended"
    bp.resume()
    await img.drain()


async def chained(img: qio.Image, facts: Facts) -> None:
    bp = img.breakpoint("pwritev_rmw_after_tail", "A")
    img.submit_write(0x5000, bytes([10]) * 0x200)
    await bp.hit()
    for i in (1, 2, 3):
        img.submit_write(0x5000 + 0x200 * i, bytes([10 + i]) * 0x200)
    bp.resume()
    await img.drain()
    facts.reads = {off: await img.read(off, 8) for off in (0x51FC, 0x53FC, 0x55FC)}


async def sync_behind(img: qio.Image, facts: Facts) -> None:
    bp = img.breakpoint("pwritev_rmw_after_head", "A")
    img.submit_write(0x1200, bytes([10]) * 0x200)
    with pytest.raises(qio.StandstillError):
        await img.write(0x1400, bytes([11]) * 0x200)  # the shell reports and resumes; the API raises
    bp.resume()
    await img.drain()
    facts.reads = {0x1200: await img.read(0x1200, 0x200)}


BREAK_W1 = ["break write_aio A", "aio_write -P 0x11 0 8k", "aio_write -P 0x22 4k 8k", "sleep 100"]
RMW_W1 = ["break pwritev_rmw_after_head A", "aio_write -P 10 0x1200 0x200", "wait_break A"]
# name: (the tutorial's commands, the API's scenario, aligned blkdebug (Part 2), qemu-io finishes it)
SCENARIOS: dict[str, tuple[list[str], Scenario, bool, bool]] = {
    "order1": ([*BREAK_W1, "resume A", "aio_flush", "read -v 4088 16", "read -v 8184 16"], order1, False, True),
    "order2": (["break pwritev_done A", "aio_write -P 0x11 0 8k", "wait_break A", "aio_write -P 0x22 4k 8k",
                "sleep 100", "resume A", "aio_flush", "read -v 4088 16"], order2, False, True),
    "forgot_resume": ([*BREAK_W1, "aio_flush", "read -v 4088 16"], forgot_resume, False, False),
    "rmw": ([*RMW_W1, "aio_write -P 11 0x1400 0x200", "sleep 100", "resume A", "aio_flush",
             "read -v 0x1000 0x1000"], rmw, True, True),
    "other_block": ([*RMW_W1, "aio_write -P 12 0x2200 0x200", "sleep 100", "resume A", "aio_flush"],
                    other_block, True, True),
    "chained": (["break pwritev_rmw_after_tail A", "aio_write -P 10 0x5000 0x200", "wait_break A",
                 "aio_write -P 11 0x5200 0x200", "aio_write -P 12 0x5400 0x200", "aio_write -P 13 0x5600 0x200",
                 "sleep 100", "resume A", "aio_flush", "read -v 0x51fc 8", "read -v 0x53fc 8", "read -v 0x55fc 8"],
                chained, True, True),
    "sync_behind": (["break pwritev_rmw_after_head A", "aio_write -P 10 0x1200 0x200", "write -P 11 0x1400 0x200",
                     "read -v 0x1200 0x200"], sync_behind, True, False),
}


def api_facts(scenario: Scenario, aligned: bool, path: Path) -> Facts:
    facts = Facts()

    async def go() -> None:
        opening = (qio.open(options=ALIGNED.format(path)) if aligned else qio.open(f"blkdebug::{path}", "raw"))
        async with opening as img:
            with img.events() as events:
                await scenario(img, facts)
                facts.order = [ev.offset for ev in events.pending()
                               if ev.event == "flush_to_os" and ev.op == "write" and ev.offset is not None]
            facts.log = list(img.log)

    import asyncio

    asyncio.run(go())
    facts.image = path.read_bytes()
    return facts


def image_args(aligned: bool, path: Path) -> list[str]:
    return ["--image-opts", ALIGNED.format(path)] if aligned else ["-f", "raw", f"blkdebug::{path}"]


@pytest.mark.parametrize("name", SCENARIOS)
def test_api_matches_qio_shell(tmp_path: Path, name: str) -> None:
    commands, scenario, aligned, _ = SCENARIOS[name]
    a, b = fresh(tmp_path, "api.raw"), fresh(tmp_path, "shell.raw")
    api = api_facts(scenario, aligned, a)
    shell = shell_facts([sys.executable, "-m", "qio"], commands, image_args(aligned, b), b)
    assert shell.order and shell.log  # the shell did run the scenario
    assert api.log == shell.log
    assert api.order == shell.order
    for offset, data in api.reads.items():
        assert shell.reads[offset] == data, hex(offset)
    assert set(api.reads) == set(shell.reads)
    assert api.image == shell.image


@pytest.mark.oracle
@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if s[3]])
def test_api_matches_qemu_io(tmp_path: Path, name: str) -> None:
    """The scenarios real qemu-io finishes: the same messages, completion order, dumps and image bytes."""
    commands, scenario, aligned, _ = SCENARIOS[name]
    a, b = fresh(tmp_path, "api.raw"), fresh(tmp_path, "qemu.raw")
    api = api_facts(scenario, aligned, a)
    assert QEMU_IO is not None
    shell = shell_facts([QEMU_IO], commands, image_args(aligned, b), b)
    assert (api.log, api.order, api.reads, api.image) == (shell.log, shell.order, shell.reads, shell.image)


def _num(text: str) -> int:
    return int(text, 0) if not text.endswith("k") else int(text[:-1]) * 1024


def test_every_tutorial_scenario_is_covered(tmp_path: Path) -> None:
    """Each qio command line of docs/tutorial-race.md that sets a breakpoint is one of the scenarios here
    (up to its ``read`` commands), and the API's image passes the tutorial's ``read -P`` checks."""
    text = (ROOT / "docs" / "tutorial-race.md").read_text()
    runs = [line for line in text.splitlines() if line.startswith("$ qio ") and "break " in line
            and "-T blkdebug_event" not in line and "debug_state" not in line]
    assert len(runs) == 8

    def steps(cmds: list[str]) -> list[str]:
        return [c for c in cmds if not c.startswith("read ")]

    for line in runs:
        cmds = re.findall(r"-c '([^']*)'", line)
        names = [n for n, s in SCENARIOS.items() if steps(s[0]) == steps(cmds)]
        assert len(names) == 1, line
        _, scenario, aligned, _ = SCENARIOS[names[0]]
        path = fresh(tmp_path, f"{len(list(tmp_path.iterdir()))}.raw")
        image = api_facts(scenario, aligned, path).image
        for c in cmds:
            if m := re.fullmatch(r"read (?:-q )?-P (\w+) (\w+) (\w+)", c):
                pattern, offset, length = int(m[1], 0), _num(m[2]), _num(m[3])
                assert image[offset:offset + length] == bytes([pattern]) * length, (names[0], c)
