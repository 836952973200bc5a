#!/usr/bin/env python3
"""Random differential fuzzer for the event/AIO model (issue 18): seeded blkdebug race scripts,
played through qemu-io (kept only when qemu-io agrees with itself) and compared with qio.

A *case* is a corpus script (``tests/difftest.py`` format) produced by :func:`generate` from
``(seed, fmt, cache)`` alone, so any case can be regenerated from its name, e.g.
``qcow2-writeback-17``.  See ``docs/fuzzing.md`` for the workflow.  Typical uses::

    python tests/aio_fuzz.py --seeds 0-199 --fmt qcow2 --cache writeback -j 2
    python tests/aio_fuzz.py --seeds 0-999 -j 2 --qio-runs 2 --json /tmp/r.jsonl   # all four combos
    python tests/aio_fuzz.py --show qcow2-writeback-17                   # print the script
    python tests/aio_fuzz.py --run qcow2-writeback-17                    # one case, with its diff
    python tests/aio_fuzz.py --minimise qcow2-writeback-17 -o /tmp/m.qio
    python tests/aio_fuzz.py --replay -j 2                               # qio vs the records only
    python tests/aio_fuzz.py --record 75 --record-from /tmp/r.jsonl      # rewrite the records
    python tests/aio_fuzz.py --qio-root /work/wt/other --seeds 0-99      # qio of another tree
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import difftest
from filters import filter_testdir
from oracle import qio_wrapper

_TESTS_DIR = Path(__file__).resolve().parent

FORMATS = ("raw", "qcow2")
CACHES = ("writethrough", "writeback")
RECORDS_PATH = _TESTS_DIR / "aio_fuzz_records.json"
DEFAULT_TIMEOUT = 10.0
# What qio prints when it detects that qemu-io would stand still (see qio/session.py).
STANDSTILL_RE = re.compile(r"would wait forever|wait_break: no request can reach")

# Events that requests of raw over blkdebug really pass (block/io.c, block/raw-format.c).
RAW_EVENTS = ("pwritev", "pwritev_done", "pwritev_zero", "flush_to_os", "flush_to_disk", "read_aio", "write_aio")
RMW_EVENTS = ("pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail")
# ... and those qcow2 raises on its file child (block/qcow2*.c).
QCOW2_EVENTS = (
    "l1_update", "l2_load", "l2_update", "l2_alloc_write", "l2_alloc_cow_read", "cluster_alloc",
    "cluster_alloc_space", "refblock_load", "refblock_update_part", "refblock_alloc", "cluster_free",
    "cow_read", "cow_write", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
)
BACKING_EVENTS = ("read_backing_aio", "cor_write")
TAGS = "ABCD"
PATTERNS = (0x11, 0x22, 0x33, 0x44, 0x5a, 0x66, 0x77, 0xa5, 0xcd)


# ---------------------------------------------------------------------------------------------
# the generator


@dataclass
class Script:
    """A generated case in pieces the minimiser can drop (config sections, body lines)."""

    name: str
    header: list[str]  # "#! ..." directives before the config text
    sections: list[list[str]]  # blkdebug config file sections (each a list of lines)
    body: list[str]
    config: bool = False  # the command line names $DIR/c.cfg

    def render(self) -> str:
        lines = [f"# aio_fuzz {self.name}"]
        lines += self.header
        if self.config:
            lines.append("#! text c.cfg")
            for sec in self.sections:
                lines += [f"#| {x}" if x else "#|" for x in sec]
        lines += self.body
        return "\n".join(lines) + "\n"


def case_name(seed: int, fmt: str, cache: str) -> str:
    return f"{fmt}-{cache}-{seed}"


def parse_name(name: str) -> tuple[int, str, str]:
    """Inverse of :func:`case_name`."""
    parts = name.split("-")
    if len(parts) != 3 or parts[0] not in FORMATS or parts[1] not in CACHES or not parts[2].isdigit():
        raise ValueError(f"bad case name {name!r} (want FMT-CACHE-SEED, e.g. qcow2-writeback-17)")
    return int(parts[2]), parts[0], parts[1]


def _size(n: int) -> str:
    """qemu-io size argument: a short k/M spelling when exact (as a human would write)."""
    if n and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


class _Gen:
    """State of one generation run: an instance per (seed, fmt, cache)."""

    def __init__(self, seed: int, fmt: str, cache: str) -> None:
        self.r = random.Random(f"aio_fuzz/{fmt}/{cache}/{seed}")  # str seeds hash with sha512: stable
        self.fmt = fmt
        self.cache = cache
        self.name = case_name(seed, fmt, cache)
        self.header: list[str] = []
        self.sections: list[list[str]] = []
        self.body: list[str] = []
        self.align = 0
        self.backing = False
        self.cluster = 65536
        self.size = 1 << 20
        self.breaks: dict[str, str] = {}  # tag -> event of rules set and not (known) consumed
        self.armed: set[str] = set()  # tags with a rule set before the latest aio request
        self.used_tags: list[str] = []
        self.writes: list[tuple[int, int, int]] = []  # (offset, length, pattern) in submission order

    # -- geometry ---------------------------------------------------------------------------
    def offsets(self) -> list[int]:
        if self.fmt == "raw":
            return [0, 512, 1024, 1536, 4096, 8192, 12288, 65536, 131072, 524288]
        cs = self.cluster
        return sorted({0, 512, 4096, cs - 512, cs, cs + 4096, 2 * cs, 1 << 20, (1 << 20) + 512,
                       4 << 20, 8 << 20, 15 << 20})

    def lengths(self) -> list[int]:
        if self.fmt == "raw":
            return [512, 1024, 4096, 8192, 65536]
        return sorted({512, 4096, 8192, self.cluster, 65536, min(2 * self.cluster, 131072)})

    def extent(self) -> tuple[int, int]:
        r = self.r
        off = r.choice(self.offsets())
        length = r.choice(self.lengths())
        if self.align and r.random() < 0.3:
            off += r.choice((1, 100, 511))
            length = r.choice((1, 100, 512, 4096))
        length = min(length, self.size - off)
        return off, max(length, 1)

    def events(self) -> list[str]:
        ev = list(RAW_EVENTS)
        if self.align:
            ev += RMW_EVENTS * 2
        if self.fmt == "qcow2":
            ev += list(QCOW2_EVENTS) * 2
            if self.backing:
                ev += list(BACKING_EVENTS) * 2
        return ev

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        r = self.r
        args: list[str] = []
        if self.cache == "writeback":
            args += ["-t", "writeback"]
        if self.fmt == "qcow2":
            self.cluster = r.choice((512, 4096, 65536, 65536, 131072))
            self.size = 16 << 20
            opts = f"cluster_size={self.cluster}"
            self.header.append(f"#! qcow2 16M {opts}")
            if r.random() < 0.15:
                self.backing = True
                self.header.append("#! prep qemu-img create -q -f qcow2 $DIR/base.qcow2 16M")
                pat = r.choice(PATTERNS)
                self.header.append(f"#! prep qemu-io -f qcow2 -c 'write -P {pat:#04x} 0 2M' $DIR/base.qcow2")
                self.header.append(
                    # relative backing name: the header must not depend on the run directory
                    f"#! prep qemu-img create -q -f qcow2 -o {opts} -b base.qcow2 -F qcow2 $IMG 16M"
                )
                if r.random() < 0.6:
                    args.append("-C")
            if r.random() < 0.35:
                cmds = []
                for _ in range(r.randint(1, 3)):
                    off, length = self.extent()
                    cmds.append(f"-c 'write -P {r.choice(PATTERNS):#04x} {off} {length}'")
                self.header.append(f"#! prep qemu-io -f qcow2 {' '.join(cmds)} $IMG")
        else:
            self.header.append("#! image 1M")
            if r.random() < 0.2:
                self.header.append("#! fill 0x5a")
        if r.random() < (0.3 if self.fmt == "raw" else 0.1):
            self.align = r.choice((1024, 4096, 4096))
        use_cfg = r.random() < 0.45
        if use_cfg:
            self.config_sections()
        if self.align:
            opts = f"driver={self.fmt},file.driver=blkdebug,file.align={self.align}"
            if use_cfg:
                opts += ",file.config=$DIR/c.cfg"
            args += ["--image-opts", opts + ",file.image.filename=$IMG"]
        else:
            args += ["-f", self.fmt, f"blkdebug:{'$DIR/c.cfg' if use_cfg else ''}:$IMG"]
        self.header.insert(0, "#! args " + shlex.join(args).replace("'", ""))
        self.header.append("#! timeout 10")
        self.use_cfg = use_cfg

    def config_sections(self) -> None:
        r = self.r
        with_state = r.random() < 0.3
        if with_state:
            self.sections.append(["[set-state]", f'event = "{r.choice(self.events())}"', 'state = "1"',
                                  'new_state = "2"'])
        for _ in range(r.randint(1, 2)):
            sec = ["[inject-error]", f'event = "{r.choice(self.events())}"']
            if r.random() < 0.3:
                sec.append(f'errno = "{r.choice((28, 1, 22))}"')
            if r.random() < 0.6:
                sec.append('once = "on"')
            if r.random() < 0.25:
                sec.append('immediately = "on"')
            if r.random() < 0.25:
                off, _ = self.extent()
                sec.append(f'sector = "{off // 512}"')
            if with_state and r.random() < 0.6:
                sec.append(f'state = "{r.choice((1, 2))}"')
            self.sections.append(sec)
        r.shuffle(self.sections)
        self.sections = [[*s, ""] for s in self.sections]

    # -- commands ---------------------------------------------------------------------------
    def pick_tag(self, fresh: bool) -> str:
        r = self.r
        if fresh:
            free = [t for t in TAGS if t not in self.breaks]
            tag = r.choice(free) if free and r.random() < 0.85 else r.choice(TAGS)
        elif self.breaks and r.random() < 0.75:
            tag = r.choice(sorted(self.breaks))
        elif self.used_tags and r.random() < 0.8:
            tag = r.choice(self.used_tags)
        else:
            tag = r.choice(TAGS)
        if tag not in self.used_tags:
            self.used_tags.append(tag)
        return tag

    def likely(self, kind: str, off: int, length: int) -> set[str]:
        """Events a request of ``kind`` (write, zero, read, flush) probably passes on blkdebug."""
        qcow2 = self.fmt == "qcow2"
        flushes = {"flush_to_os", "flush_to_disk"}
        if kind == "flush":
            return flushes | ({"l2_update", "refblock_update_part"} if qcow2 else set())
        if kind == "read":
            ev = {"read_aio"}
            if qcow2:
                ev |= {"l2_load"} | ({"read_backing_aio", "cor_write"} if self.backing else set())
            return ev
        ev = set() if self.cache == "writeback" else set(flushes)
        if self.align and (off % self.align or length % self.align):
            ev |= set(RMW_EVENTS)
        if qcow2:
            ev |= {"l2_update", "cluster_alloc", "l2_load", "refblock_load", "l2_alloc_write"}
            if kind == "write":
                ev |= {"write_aio", "pwritev", "pwritev_done", "cluster_alloc_space", "cow_read", "cow_write"}
            else:
                ev |= {"pwritev_zero", "pwritev", "pwritev_done", "cluster_free"}
        elif kind == "write":
            ev |= {"write_aio", "pwritev", "pwritev_done"}
        else:
            ev |= {"pwritev_zero", "pwritev_done"}
        return ev

    def submitted(self, kind: str, off: int, length: int) -> None:
        """An aio request was queued: breakpoints it may reach are now worth a wait_break."""
        ev = self.likely(kind, off, length)
        self.armed |= {t for t, e in self.breaks.items() if e in ev}

    def aio_write(self, sync: bool = False, zero: bool | None = None) -> str:
        r = self.r
        off, length = self.extent()
        cmd = "write" if sync else "aio_write"
        if zero if zero is not None else r.random() < 0.25:
            self.writes.append((off, length, 0))
            if not sync:
                self.submitted("zero", off, length)
            extra = " -u" if self.fmt == "qcow2" and r.random() < 0.2 else ""
            return f"{cmd} -z{extra} {_size(off)} {_size(length)}"
        if not sync:
            self.submitted("write", off, length)
        pat = r.choice(PATTERNS)
        self.writes.append((off, length, pat))
        return f"{cmd} -P {pat:#04x} {_size(off)} {_size(length)}"

    def step(self) -> None:
        r = self.r
        # sync requests while one may be parked often make qemu-io wait forever: fewer of them
        quiet = 0.3 if self.breaks else 1.0
        choices: list[tuple[float, Callable[[], str]]] = [
            (3.0, self.c_break),
            (4.0, lambda: self.aio_write()),
            (1.2, self.c_aio_read),
            (2.5 if self.armed else 0.15, self.c_wait_break),
            (2.0 if self.used_tags else 0.2, self.c_resume),
            (1.0 if self.used_tags else 0.1, self.c_remove_break),
            (0.8 * quiet, self.c_read),
            (0.6 * quiet, lambda: self.aio_write(sync=True)),
            (0.4 * quiet, self.c_discard),
            (0.4 * quiet, lambda: "flush"),
            (0.6, lambda: f"sleep {r.choice((1, 10, 50))}"),
            (0.7, self.c_aio_flush),
        ]
        total = sum(w for w, _ in choices)
        x = r.random() * total
        for w, fn in choices:
            x -= w
            if x < 0:
                self.body.extend(fn().split("\n"))
                return
        self.body.append(choices[-1][1]())  # pragma: no cover - float rounding

    def c_break(self) -> str:
        r = self.r
        tag = self.pick_tag(fresh=True)
        if r.random() < 0.3:
            ev = r.choice(self.events())
            self.breaks[tag] = ev
            return f"break {ev} {tag}"
        # a breakpoint for the next request: pick the request, then an event it passes
        kind = r.choice(("write", "write", "write", "zero", "read", "flush"))
        if kind == "flush":
            req, off, length = "aio_flush", 0, 0
        else:
            off, length = self.extent()
            if kind == "read":
                req = f"aio_read {_size(off)} {_size(length)}"
            elif kind == "zero":
                req = f"aio_write -z {_size(off)} {_size(length)}"
                self.writes.append((off, length, 0))
            else:
                pat = r.choice(PATTERNS)
                req = f"aio_write -P {pat:#04x} {_size(off)} {_size(length)}"
                self.writes.append((off, length, pat))
        evs = sorted(self.likely(kind, off, length) & set(self.events()))
        ev = r.choice(evs) if evs else r.choice(self.events())
        self.breaks[tag] = ev
        self.submitted(kind, off, length)
        return f"break {ev} {tag}\n{req}"

    def c_aio_read(self) -> str:
        off, length = self.extent()
        self.submitted("read", off, length)
        return f"aio_read {_size(off)} {_size(length)}"

    def c_aio_flush(self) -> str:
        self.submitted("flush", 0, 0)
        return "aio_flush"

    def c_read(self) -> str:
        off, length = self.extent()
        return f"read {_size(off)} {_size(length)}"

    def c_discard(self) -> str:
        off, length = self.extent()
        if self.align:
            # unaligned discards kill qemu-io 7.2 with SIGFPE (documented in docs/blkdebug.md): avoid
            end = min(-(-(off + length) // self.align) * self.align, self.size)
            off -= off % self.align
            length = max(end - off, self.align)
        return f"discard {_size(off)} {_size(length)}"

    def c_wait_break(self) -> str:
        # mostly a tag some request submitted after its rule may reach (else qemu-io waits forever)
        if self.armed and self.r.random() < 0.9:
            tag = self.r.choice(sorted(self.armed))
            self.armed.discard(tag)
            self.breaks.pop(tag, None)  # a breakpoint rule fires once
            return f"wait_break {tag}"
        return f"wait_break {self.pick_tag(fresh=False)}"

    def c_resume(self) -> str:
        tag = self.pick_tag(fresh=False)
        self.armed.discard(tag)
        return f"resume {tag}"

    def c_remove_break(self) -> str:
        tag = self.pick_tag(fresh=False)
        self.breaks.pop(tag, None)
        self.armed.discard(tag)
        return f"remove_break {tag}"

    def run(self) -> Script:
        r = self.r
        self.setup()
        for _ in range(r.choice((0, 0, 1, 2))):
            self.body.append(self.aio_write(sync=True))
        for _ in range(r.randint(3, 14)):
            self.step()
        if r.random() < 0.95:  # tidy up: let parked requests go (else qemu-io waits forever at exit)
            for tag in sorted(self.used_tags):
                self.body.append(f"{'resume' if r.random() < 0.15 else 'remove_break'} {tag}")
        if r.random() < 0.7:
            self.body.append("aio_flush")
        if self.writes and r.random() < 0.8:
            for off, length, pat in self.writes[-r.randint(1, 3):]:
                self.body.append(f"read -P {pat:#04x} {_size(off)} {_size(length)}")
        return Script(self.name, self.header, self.sections, self.body, self.use_cfg)


def generate(seed: int, fmt: str, cache: str) -> Script:
    """The case of ``(seed, fmt, cache)``: a pure function of its arguments."""
    if fmt not in FORMATS or cache not in CACHES:
        raise ValueError(f"bad format/cache {fmt!r}/{cache!r}")
    return _Gen(seed, fmt, cache).run()


def script_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# running


@dataclass(frozen=True)
class Outcome:
    """Everything compared about one run (filtered)."""

    stdout: str
    stderr: str
    rc: int
    timed_out: bool
    files: tuple[tuple[str, str], ...]  # (name, sha256[:16]) of every file left in the run dir
    check: str  # qemu-img check output of a qcow2 image ("" for raw)

    def to_json(self) -> dict[str, object]:
        return {"stdout": self.stdout, "stderr": self.stderr, "rc": self.rc, "files": dict(self.files),
                "check": self.check}

    @staticmethod
    def from_json(d: dict[str, object]) -> Outcome:
        files = d["files"]
        assert isinstance(files, dict)
        return Outcome(str(d["stdout"]), str(d["stderr"]), int(str(d["rc"])), False,
                       tuple(sorted((str(k), str(v)) for k, v in files.items())), str(d["check"]))


def _sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def qemu_img_check(image: Path, base: Path) -> str:
    """``qemu-img check`` of a qcow2 image (output with paths filtered, plus the exit status)."""
    p = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], capture_output=True, text=True,
                       env=difftest._child_env(), timeout=60)
    text = filter_testdir(p.stdout + p.stderr, str(base / "d"), "TEST_DIR", bare=True)
    return f"{text.strip()} | rc={p.returncode}"


def qio_target(base: Path, qio_root: Path | None) -> str | list[str]:
    """The qio program: difftest's (QIO_PROG or this tree), or a wrapper running qio from qio_root."""
    if qio_root is None:
        return difftest.qio_target(base)
    wrapper = base / "qio-root-wrapper"
    if not wrapper.exists():
        # no __pycache__ written into the other tree (it may be another helper's worktree)
        qio_wrapper(wrapper, qio_root, bytecode=False)
    return str(wrapper)


def load_case(text: str, base: Path) -> difftest.Case:
    path = base / "case.qio"
    path.write_text(text)
    return difftest.parse_case(path)


def play(target: str | list[str], case: difftest.Case, base: Path, fmt: str) -> Outcome:
    r = difftest.run_program(target, case, base)
    check = ""
    img = base / "d" / difftest.IMAGE_NAME
    if fmt == "qcow2" and not r.timed_out and img.exists():
        check = qemu_img_check(img, base)
    files = tuple(sorted((n, _sha(v)) for n, v in r.files.items()))
    return Outcome(r.stdout, r.stderr, r.rc, r.timed_out, files, check)


def diff_parts(ref: Outcome, test: Outcome) -> list[str]:
    """Names of the parts that differ: stdout, stderr, rc, image (any file), check, hang."""
    parts = []
    if test.timed_out:
        return ["qio-hang"]
    for part in ("stdout", "stderr", "rc", "files", "check"):
        if getattr(ref, part) != getattr(test, part):
            parts.append("image" if part == "files" else part)
    return parts


@dataclass
class SeedResult:
    name: str
    status: str  # match, mismatch, qemu-unstable, qemu-hang, qio-nondeterministic
    detail: str = ""  # mismatch parts / hang: qio-reported, qio-silent, qio-hang
    ref: Outcome | None = None
    qio: list[Outcome] = field(default_factory=list)
    text: str = ""
    seconds: float = 0.0


_CPU = threading.Semaphore(2)  # qio runs (CPU bound) at a time; see main(): -j


@dataclass(frozen=True)
class RunOpts:
    qemu_runs: int = 3
    qio_runs: int = 1
    timeout: float = DEFAULT_TIMEOUT
    qio_root: Path | None = None  # run qio from this source tree
    reference: str | None = None  # qemu-io binary (default: difftest.qemu_io_path())
    load: int = 0  # --spread: also play the qemu-io runs again beside this many busy CPU loops


def reference_runs(ref_prog: str, case: difftest.Case, base: Path, fmt: str, runs: int) -> list[Outcome]:
    """``runs`` plays of a case through qemu-io, one after another; once the first one hangs, the
    others run in parallel (a hang only sleeps out the timeout)."""
    refs = [play(ref_prog, case, base, fmt)]
    if refs[0].timed_out and runs > 1:
        subs = []
        for i in range(1, runs):
            sub = base / f"p{i}"  # kept from an earlier batch of the same case (spread --load)
            sub.mkdir(exist_ok=True)
            if (base / "template").exists() and not (sub / "template").exists():
                shutil.copytree(base / "template", sub / "template", symlinks=True)
            subs.append(sub)
        with ThreadPoolExecutor(max_workers=len(subs)) as pool:
            refs += pool.map(lambda b: play(ref_prog, case, b, fmt), subs)
    else:
        refs += [play(ref_prog, case, base, fmt) for _ in range(1, runs)]
    return refs


def run_text(text: str, name: str, fmt: str, ro: RunOpts) -> SeedResult:
    """Play a case ``qemu_runs`` times through qemu-io and, if stable, ``qio_runs`` times through qio."""
    t0 = time.monotonic()
    qemu_runs, qio_runs, timeout = ro.qemu_runs, ro.qio_runs, ro.timeout
    ref_prog = ro.reference or difftest.qemu_io_path()
    if ref_prog is None:
        raise RuntimeError("qemu-io not found (set QEMU_IO_PROG)")
    with tempfile.TemporaryDirectory(prefix="fuzz-aio-") as tmp:
        base = Path(tmp)
        case = load_case(text, base)
        case.timeout = timeout
        refs = reference_runs(ref_prog, case, base, fmt, qemu_runs)
        for i, r in enumerate(refs):
            if r != refs[0] and not (r.timed_out and refs[0].timed_out):
                return SeedResult(name, "qemu-unstable", f"run {i + 1} differs", refs[0], [], text,
                                  time.monotonic() - t0)
        ref = refs[0]
        target = qio_target(base, ro.qio_root)
        outs = []
        for _ in range(qio_runs):
            with _CPU:
                outs.append(play(target, case, base, fmt))
    res = SeedResult(name, "match", "", ref, outs, text)
    if is_documented_crash(ref):
        res.status, res.detail = "qemu-crash", "SIGFPE"
    elif ref.timed_out:
        res.status = "qemu-hang"
        q = outs[0]
        if q.timed_out:
            res.detail = "qio-hang"
        elif STANDSTILL_RE.search(q.stdout + q.stderr):
            res.detail = "qio-reported"
        else:
            res.detail = "qio-silent"
    elif any(o != outs[0] for o in outs[1:]):
        res.status = "qio-nondeterministic"
        res.detail = ",".join(diff_parts(outs[0], next(o for o in outs if o != outs[0])))
    else:
        parts = diff_parts(ref, outs[0])
        if parts:
            res.status = "mismatch"
            res.detail = ",".join(parts)
    res.seconds = time.monotonic() - t0
    return res


def is_documented_crash(ref: Outcome) -> bool:
    """qemu-io 7.2 dies with SIGFPE on a discard that blkdebug with ``align`` (and no ``opt-discard``)
    gets unaligned, e.g. a qcow2 cluster smaller than ``align`` (docs/blkdebug.md, "known
    differences"): a documented deviation, not a model question."""
    return ref.rc in (128 + signal.SIGFPE, -signal.SIGFPE)


def run_seed(seed: int, fmt: str, cache: str, ro: RunOpts) -> SeedResult:
    script = generate(seed, fmt, cache)
    return run_text(script.render(), script.name, fmt, ro)


@dataclass
class Spread:
    """Where qio stands in qemu-io's own noise on one case: the outcomes of ``runs`` qemu-io runs
    (a hang is one outcome, whatever it printed before) and how many of them qio's outcome is; with
    ``--load``, the same for ``runs`` more qemu-io runs made beside busy CPU loops."""

    name: str
    runs: int
    counts: list[int]  # runs per distinct qemu-io outcome, commonest first
    qio_runs: int  # qemu-io runs that gave qio's outcome (a reported standstill = a hang)
    qio_commonest: bool
    loaded: list[int] = field(default_factory=list)  # as counts, for the runs under load
    qio_loaded: int = 0  # loaded runs that gave qio's outcome

    def line(self) -> str:
        where = "the commonest" if self.qio_commonest else "in no run" if not self.qio_runs else "not the commonest"
        text = (f"{self.name}: {self.runs} qemu-io runs, {len(self.counts)} outcome(s) {self.counts}; "
                f"qio's outcome in {self.qio_runs} ({where})")
        if self.loaded:
            text += f"; under load {len(self.loaded)} outcome(s) {self.loaded}, qio's in {self.qio_loaded}"
        return text


_HANG = "hang"


def _outcome_key(o: Outcome, qio: bool) -> Outcome | str:
    if o.timed_out or (qio and STANDSTILL_RE.search(o.stdout + o.stderr)):
        return _HANG
    return o


def _tally(refs: list[Outcome], mine: Outcome | str) -> tuple[list[int], int]:
    counts = Counter(_outcome_key(r, False) for r in refs)
    return sorted(counts.values(), reverse=True), counts.get(mine, 0)


def spread(seed: int, fmt: str, cache: str, ro: RunOpts) -> Spread:
    """Play a case ``ro.qemu_runs`` times through qemu-io (all runs, no early stop) and once through
    qio: the measure of "within the noise of qemu-io's own re-runs" (issue 18).  With ``ro.load``, play
    the qemu-io runs again beside that many busy CPU loops."""
    script = generate(seed, fmt, cache)
    ref_prog = ro.reference or difftest.qemu_io_path()
    if ref_prog is None:
        raise RuntimeError("qemu-io not found (set QEMU_IO_PROG)")
    with tempfile.TemporaryDirectory(prefix="fuzz-aio-") as tmp:
        base = Path(tmp)
        case = load_case(script.render(), base)
        case.timeout = ro.timeout
        refs = reference_runs(ref_prog, case, base, fmt, ro.qemu_runs)
        loaded: list[Outcome] = []
        if ro.load:
            with difftest.cpu_load(ro.load):
                loaded = reference_runs(ref_prog, case, base, fmt, ro.qemu_runs)
        with _CPU:
            q = play(qio_target(base, ro.qio_root), case, base, fmt)
    key = _outcome_key(q, True)
    ranked, mine = _tally(refs, key)
    sp = Spread(script.name, len(refs), ranked, mine, mine == ranked[0])
    if loaded:
        sp.loaded, sp.qio_loaded = _tally(loaded, key)
    return sp


def replay(record: dict[str, object], qio_root: Path | None = None, timeout: float = DEFAULT_TIMEOUT
           ) -> tuple[list[str], str]:
    """Play a recorded case through qio only: (differing parts, readable diff); [] = match."""
    seed, fmt, cache = parse_name(str(record["name"]))
    text = generate(seed, fmt, cache).render()
    if script_sha(text) != record["script"]:
        return ["script"], f"{record['name']}: the generator changed; regenerate the records (--record)"
    with tempfile.TemporaryDirectory(prefix="fuzz-aio-") as tmp:
        base = Path(tmp)
        case = load_case(text, base)
        case.timeout = timeout
        out = play(qio_target(base, qio_root), case, base, fmt)
    if record.get("hang"):
        if out.timed_out:
            return ["qio-hang"], "qemu-io waits forever; qio hangs too instead of reporting it"
        if not STANDSTILL_RE.search(out.stdout + out.stderr):
            return ["qio-silent"], ("qemu-io waits forever; qio does not report the standstill:\n"
                                    f"stdout:\n{out.stdout}stderr:\n{out.stderr}")
        return [], ""
    ref = Outcome.from_json(record)
    parts = diff_parts(ref, out)
    return parts, (format_diff(ref, out) if parts else "")


def rescore(result: dict[str, object], ro: RunOpts) -> SeedResult:
    """Score qio again against the qemu-io result a measurement run stored (``--json``), without
    running qemu-io: ``ro.qio_runs`` qio runs, classified as :func:`run_text` does."""
    name = str(result["name"])
    seed, fmt, cache = parse_name(name)
    text = generate(seed, fmt, cache).render()
    status = str(result["status"])
    if script_sha(text) != result["script"] or status == "qemu-unstable":
        return SeedResult(name, status, str(result.get("detail", "")), None, [], text)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fuzz-aio-") as tmp:
        base = Path(tmp)
        case = load_case(text, base)
        case.timeout = ro.timeout
        target = qio_target(base, ro.qio_root)
        outs = []
        for _ in range(max(1, ro.qio_runs)):
            with _CPU:
                outs.append(play(target, case, base, fmt))
    q = outs[0]
    if status == "qemu-hang":
        detail = ("qio-hang" if q.timed_out else "qio-reported" if STANDSTILL_RE.search(q.stdout + q.stderr)
                  else "qio-silent")
        return SeedResult(name, "qemu-hang", detail, None, outs, text, time.monotonic() - t0)
    ref_json = result["ref"]
    assert isinstance(ref_json, dict)
    ref = Outcome.from_json(ref_json)
    res = SeedResult(name, "match", "", ref, outs, text)
    if is_documented_crash(ref):
        res.status, res.detail = "qemu-crash", "SIGFPE"
    elif any(o != q for o in outs[1:]):
        res.status = "qio-nondeterministic"
        res.detail = ",".join(diff_parts(q, next(o for o in outs if o != q)))
    elif parts := diff_parts(ref, q):
        res.status, res.detail = "mismatch", ",".join(parts)
    res.seconds = time.monotonic() - t0
    return res


def format_diff(ref: Outcome, test: Outcome) -> str:
    """Readable differences between two outcomes (unified diffs of the texts)."""
    out = []
    for part in ("stdout", "stderr", "check"):
        a, b = getattr(ref, part), getattr(test, part)
        if a != b:
            out.append(difftest._diff(a, b, part, ("qemu-io", "qio")))
    if ref.rc != test.rc:
        out.append(f"exit status: qemu-io {ref.rc}, qio {test.rc}")
    if ref.files != test.files:
        out.append(f"files: qemu-io {dict(ref.files)}, qio {dict(test.files)}")
    if test.timed_out:
        out.append("qio timed out")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# minimiser


def minimise(script: Script, fmt: str, keep: Callable[[Script], bool], log: Callable[[str], None]) -> Script:
    """Delta debugging: drop chunks of body lines, then config sections, while ``keep`` holds."""

    def ddmin(items: list[str], make: Callable[[list[str]], Script]) -> list[str]:
        n = 2
        while len(items) >= 1:
            chunk = max(1, len(items) // n)
            reduced = False
            i = 0
            while i < len(items):
                cand = items[:i] + items[i + chunk:]
                if keep(make(cand)):
                    items = cand
                    reduced = True
                    log(f"  {len(items)} lines")
                else:
                    i += chunk
            if not reduced:
                if chunk == 1:
                    break
                n = min(len(items), n * 2)
        return items

    def with_body(body: list[str]) -> Script:
        return Script(script.name, script.header, script.sections, body, script.config)

    body = ddmin(list(script.body), with_body)
    script = with_body(body)
    if script.sections:
        idx = [str(i) for i in range(len(script.sections))]

        def with_secs(keep_idx: list[str]) -> Script:
            return Script(script.name, script.header, [script.sections[int(i)] for i in keep_idx], script.body,
                          script.config)

        script = with_secs(ddmin(idx, with_secs))
    # header lines that are optional (prep, fill, -C)
    for line in list(script.header):
        if line.startswith(("#! prep qemu-io", "#! fill")):
            cand = Script(script.name, [h for h in script.header if h != line], script.sections, script.body,
                          script.config)
            if keep(cand):
                script = cand
    return script


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _combos(fmts: Iterable[str], caches: Iterable[str]) -> list[tuple[str, str]]:
    return [(f, c) for f in fmts for c in caches]


def summarise(results: Sequence[SeedResult]) -> str:
    lines = []
    groups: dict[str, list[SeedResult]] = {}
    for r in results:
        fmt, cache, _ = r.name.split("-")
        groups.setdefault(f"{fmt}/{cache}", []).append(r)
    groups["total"] = list(results)
    for key, rs in groups.items():
        c = Counter(r.status for r in rs)
        hang = Counter(r.detail for r in rs if r.status == "qemu-hang")
        repro = c["match"] + c["mismatch"] + c["qio-nondeterministic"]
        pct = f"{100 * c['match'] / repro:.1f}%" if repro else "-"
        lines.append(
            f"{key:22} seeds {len(rs):5}  qemu-unstable {c['qemu-unstable']:4}  reproducible {repro:5}: "
            f"match {c['match']:5} ({pct})  mismatch {c['mismatch']:4}  qio-nondet {c['qio-nondeterministic']:3}"
            f"  | qemu-hang {c['qemu-hang']:4}: qio reported {hang['qio-reported']}, silent {hang['qio-silent']},"
            f" qio hang {hang['qio-hang']}  | qemu SIGFPE {c['qemu-crash']}"
        )
    parts = Counter(p for r in results if r.status == "mismatch" for p in r.detail.split(","))
    lines.append("mismatch parts: " + ", ".join(f"{k} {v}" for k, v in parts.most_common()))
    return "\n".join(lines)


def _result_json(res: SeedResult) -> dict[str, object]:
    d: dict[str, object] = {"name": res.name, "status": res.status, "detail": res.detail,
                            "seconds": round(res.seconds, 2), "script": script_sha(res.text)}
    if res.ref is not None and res.status != "qemu-hang":
        d["ref"] = res.ref.to_json()
    return d


def write_records(path: Path, results: Iterable[dict[str, object]], per_combo: int, hangs_per_combo: int,
                  timeout: float) -> str:
    """Keep the first ``per_combo`` reproducible (and ``hangs_per_combo`` hanging) cases of each
    combo, in seed order, from runner results (``_result_json`` dicts)."""
    latest: dict[str, dict[str, object]] = {}  # a case run again replaces its earlier result
    for r in results:
        seed, fmt, cache = parse_name(str(r["name"]))
        script = generate(seed, fmt, cache)
        if script_sha(script.render()) != r["script"]:
            continue  # made by an older generator
        latest[str(r["name"])] = r
    by_combo: dict[str, list[dict[str, object]]] = {}
    for r in latest.values():
        by_combo.setdefault(str(r["name"]).rsplit("-", 1)[0], []).append(r)
    records: list[dict[str, object]] = []
    known: dict[str, str] = {}
    for combo in sorted(by_combo):
        rs = sorted(by_combo[combo], key=lambda r: int(str(r["name"]).rsplit("-", 1)[1]))
        ok = [r for r in rs if r["status"] in ("match", "mismatch")][:per_combo]
        hangs = [r for r in rs if r["status"] == "qemu-hang"][:hangs_per_combo]
        for r in sorted(ok + hangs, key=lambda r: int(str(r["name"]).rsplit("-", 1)[1])):
            name = str(r["name"])
            if r["status"] == "qemu-hang":
                records.append({"name": name, "script": r["script"], "hang": True})
                if r["detail"] != "qio-reported":
                    known[name] = f"qemu-io hangs; qio: {r['detail']}"
            else:
                ref = r["ref"]
                assert isinstance(ref, dict)
                records.append({"name": name, "script": r["script"], **ref})
                if r["status"] == "mismatch":
                    known[name] = f"differs: {r['detail']}"
    dump_records(path, timeout, known, records)
    return f"wrote {len(records)} records ({len(known)} known failures) to {path}"


def add_records(path: Path, results: Iterable[dict[str, object]]) -> str:
    """Add cases to the records (runner results, e.g. of a ``--names ... --qemu-runs 10`` run): the
    reproduced and hanging ones not recorded yet; those qio does not match become known failures."""
    data = json.loads(path.read_text())
    records: list[dict[str, object]] = data["records"]
    known: dict[str, str] = data["known_failures"]
    have = {str(r["name"]) for r in records}
    latest: dict[str, dict[str, object]] = {}
    for r in results:
        seed, fmt, cache = parse_name(str(r["name"]))
        if script_sha(generate(seed, fmt, cache).render()) == r["script"]:
            latest[str(r["name"])] = r
    added = 0
    for name, r in latest.items():
        if name in have:
            continue
        if r["status"] == "qemu-hang":
            records.append({"name": name, "script": r["script"], "hang": True})
            if r["detail"] != "qio-reported":
                known[name] = f"qemu-io hangs; qio: {r['detail']}"
        elif r["status"] in ("match", "mismatch"):
            ref = r["ref"]
            assert isinstance(ref, dict)
            records.append({"name": name, "script": r["script"], **ref})
            if r["status"] == "mismatch":
                known[name] = f"differs: {r['detail']}"
        else:
            continue
        added += 1
    records.sort(key=lambda r: (str(r["name"]).rsplit("-", 1)[0], int(str(r["name"]).rsplit("-", 1)[1])))
    dump_records(path, float(data["timeout"]), known, records, data.get("dropped"))
    return f"added {added} records to {path} ({len(records)} records, {len(known)} known failures)"


def recheck_records(path: Path, names: Iterable[str], ro: RunOpts,
                    log: Callable[[str], None] = print) -> str:
    """Play recorded cases through qemu-io again (``ro.qemu_runs`` runs, which must all agree) and
    update their records: a reproduced result replaces the old one (a known failure if qio differs
    from it), a case qemu-io no longer reproduces is dropped, with the reason kept under "dropped".
    For the records qio does not match: qemu-io's timing on a race can drift between machines and
    days, and a known failure is only worth keeping while qemu-io really does what it records."""
    data = json.loads(path.read_text())
    records: list[dict[str, object]] = data["records"]
    known: dict[str, str] = data["known_failures"]
    dropped: dict[str, str] = data.get("dropped", {})
    by_name = {str(r["name"]): i for i, r in enumerate(records)}
    counts = Counter[str]()
    for name in names:
        if name not in by_name:
            raise ValueError(f"{name} is not recorded")
        seed, fmt, cache = parse_name(name)
        res = run_seed(seed, fmt, cache, ro)
        if res.status == "qemu-crash":
            counts["kept (qemu-io crashes)"] += 1
            continue
        known.pop(name, None)
        if res.status == "qemu-unstable":
            dropped[name] = f"qemu-io unstable in {ro.qemu_runs} runs ({res.detail})"
            counts["dropped"] += 1
            log(f"{name}: dropped, qemu-io {res.detail}")
            continue
        rec: dict[str, object] = {"name": name, "script": script_sha(res.text)}
        if res.status == "qemu-hang":
            rec["hang"] = True
            if res.detail != "qio-reported":
                known[name] = f"qemu-io hangs; qio: {res.detail}"
        else:
            assert res.ref is not None
            rec.update(res.ref.to_json())
            if res.status != "match":
                known[name] = f"differs: {res.detail}"
        records[by_name[name]] = rec
        verdict = "known failure" if name in known else "matches qio"
        counts[f"re-recorded, {verdict}"] += 1
        log(f"{name}: re-recorded ({res.status} {res.detail}), {verdict}")
    dump_records(path, float(data["timeout"]), known, [r for r in records if r["name"] not in dropped], dropped)
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def dump_records(path: Path, timeout: float, known: dict[str, str], records: list[dict[str, object]],
                 dropped: dict[str, str] | None = None) -> None:
    """Write the records file: JSON, one record a line (small diffs when it is regenerated)."""
    with open(path, "w") as f:
        f.write("{\n")
        about = ("qemu-io 7.2 results of tests/aio_fuzz.py cases (filtered, sha256[:16] of files); made by "
                 "'python tests/aio_fuzz.py --record N' (see docs/fuzzing.md). hang: qemu-io waits forever "
                 "(qio must report the standstill). known_failures: qio differs today (strict xfail). "
                 "dropped: records that qemu-io no longer reproduced when --recheck ran them again.")
        f.write(f'"about": {json.dumps(about)},\n"timeout": {json.dumps(timeout)},\n')
        f.write(f'"known_failures": {json.dumps(dict(sorted(known.items())), indent=0)},\n')
        f.write(f'"dropped": {json.dumps(dict(sorted((dropped or {}).items())), indent=0)},\n')
        f.write('"records": [\n')
        f.write(",\n".join(json.dumps(r, sort_keys=True) for r in records))
        f.write("\n]\n}\n")


def _record(opts: argparse.Namespace, ro: RunOpts) -> int:
    """Regenerate the records from the seeds given (qemu-io >= 5 runs, qio 2 runs)."""
    if opts.record_from:
        with open(opts.record_from) as f:
            results = [json.loads(line) for line in f if line.strip()]
    else:
        ro = dataclasses.replace(ro, qemu_runs=max(5, ro.qemu_runs), qio_runs=max(2, ro.qio_runs))
        jobs = [(s, f, c) for f, c in _combos(opts.fmt, opts.cache) for s in _parse_seeds(opts.seeds)]
        with ThreadPoolExecutor(max_workers=max(1, opts.jobs) * 3) as pool:
            results = [_result_json(r) for r in pool.map(lambda j: run_seed(j[0], j[1], j[2], ro), jobs)]
    print(write_records(opts.records, results, opts.record, opts.record_hangs, ro.timeout))
    return 0


def load_records(path: Path = RECORDS_PATH) -> tuple[list[dict[str, object]], dict[str, str]]:
    data = json.loads(path.read_text())
    return data["records"], data["known_failures"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except ValueError as e:  # a bad case name or seed list
        print(f"aio_fuzz: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into head: stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _main(argv: Sequence[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", help="seed list, e.g. 0-999 or 3,17,40-49 (default 0-99)")
    ap.add_argument("--fmt", action="append", choices=FORMATS, help="format (repeatable; default both)")
    ap.add_argument("--cache", action="append", choices=CACHES, help="cache mode (repeatable; default both)")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--qemu-runs", type=int, default=3, help="qemu-io runs per case (must all agree)")
    ap.add_argument("--qio-runs", type=int, default=1, help="qio runs per case (2+: check determinism)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-run timeout = hang (s)")
    ap.add_argument("--qio-root", type=Path, help="run qio from this source tree (default: this one)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the diff of every mismatch")
    ap.add_argument("--show", metavar="NAME", help="print the case NAME (e.g. qcow2-writeback-17) and exit")
    ap.add_argument("--run", metavar="NAME", nargs="+", help="run these cases verbosely")
    ap.add_argument("--names", metavar="NAME", nargs="+",
                    help="run these cases (or the names listed in a file) instead of --seeds")
    ap.add_argument("--minimise", metavar="NAME", help="minimise a mismatching case (or a silent hang)")
    ap.add_argument("-o", "--output", type=Path, help="minimise: write the result here")
    ap.add_argument("--record", type=int, metavar="N",
                    help="rewrite the records: the first N reproducible cases per combo among --seeds")
    ap.add_argument("--record-hangs", type=int, default=10, metavar="N", help="... and N qemu-io hangs")
    ap.add_argument("--record-from", type=Path, metavar="JSONL",
                    help="--record from the --json output of an earlier run instead of running again")
    ap.add_argument("--records", type=Path, default=RECORDS_PATH)
    ap.add_argument("--record-add", type=Path, metavar="JSONL",
                    help="add the cases of an earlier --json run (confirm them with --qemu-runs 10 first) "
                         "to the records; those qio does not match become known failures")
    ap.add_argument("--replay", action="store_true",
                    help="run qio only against the recorded qemu-io results (what the pytest test does)")
    ap.add_argument("--drop-fixed", action="store_true",
                    help="--replay: remove the cases that now match from known_failures in the records file")
    ap.add_argument("--spread", action="store_true",
                    help="with --names: run qemu-io --qemu-runs times (all of them) and qio once per case, "
                         "and count how many qemu-io runs give qio's outcome (qemu-io's own noise)")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="--spread: run qemu-io --qemu-runs more times beside N busy CPU loops, and count "
                         "those runs apart")
    ap.add_argument("--recheck", metavar="NAME", nargs="+",
                    help="play these recorded cases (or the names listed in a file) through qemu-io again, "
                         "--qemu-runs times: re-record the reproduced ones, drop the others")
    ap.add_argument("--json", type=Path, help="write per-seed results as JSON lines here")
    ap.add_argument("--rescore", type=Path, metavar="JSONL",
                    help="score qio again against the qemu-io results stored by an earlier --json run "
                         "(qemu-io is not run; its unstable cases stay discarded)")
    opts = ap.parse_args(argv)
    if opts.load and not opts.spread:
        ap.error("--load only applies to --spread")
    if opts.load < 0:
        ap.error("--load: the number of busy loops cannot be negative")
    opts.seeds_given = opts.seeds is not None
    opts.seeds = opts.seeds or "0-99"
    opts.fmt = opts.fmt or list(FORMATS)
    opts.cache = opts.cache or list(CACHES)
    root = opts.qio_root.resolve() if opts.qio_root else None
    kw = RunOpts(opts.qemu_runs, opts.qio_runs, opts.timeout, root, load=opts.load)
    if opts.show:
        print(generate(*parse_name(opts.show)).render(), end="")
        return 0
    if opts.record:
        return _record(opts, kw)
    if opts.record_add:
        with open(opts.record_add) as f:
            print(add_records(opts.records, (json.loads(line) for line in f if line.strip())))
        return 0
    if opts.minimise:
        return _minimise_cli(opts, kw)
    if opts.recheck:
        opts.names = opts.recheck
        names = [case_name(*j) for j in _names(opts)]
        print(recheck_records(opts.records, names, kw))
        return 0
    if opts.replay:
        return _replay_cli(opts, kw)
    if opts.run:
        bad = 0
        for name in opts.run:
            seed, fmt, cache = parse_name(name)
            res = run_seed(seed, fmt, cache, kw)
            print(f"== {name}: {res.status} {res.detail}\n{res.text}")
            if res.ref and res.qio:
                print(format_diff(res.ref, res.qio[0]) or "(identical)")
            bad += res.status != "match"
        return 1 if bad else 0
    if opts.rescore:
        return _rescore_cli(opts, kw)
    if opts.spread:
        return _spread_cli(opts, kw)
    jobs = _names(opts)
    results: list[SeedResult] = []
    t0 = time.monotonic()
    jf = open(opts.json, "w") if opts.json else None  # noqa: SIM115
    global _CPU
    _CPU = threading.Semaphore(max(1, opts.jobs))
    # more workers than CPUs: a qemu-io hang only sleeps until the timeout
    with ThreadPoolExecutor(max_workers=max(1, opts.jobs) * 3) as pool:
        for res in pool.map(lambda j: run_seed(j[0], j[1], j[2], kw), jobs):
            results.append(res)
            if res.status != "match":
                print(f"{res.name}: {res.status} {res.detail}", flush=True)
                if opts.verbose and res.ref and res.qio:
                    print(format_diff(res.ref, res.qio[0]))
            if jf:
                jf.write(json.dumps(_result_json(res)) + "\n")
                jf.flush()
    if jf:
        jf.close()
    dt = time.monotonic() - t0
    print(summarise(results))
    print(f"{len(results)} cases in {dt:.0f} s ({len(results) / dt:.2f} cases/s, -j {opts.jobs})")
    return 0


def _names(opts: argparse.Namespace) -> list[tuple[int, str, str]]:
    """The cases of ``--names`` (names, or one file of names) or else of ``--seeds``."""
    if not opts.names:
        return [(s, f, c) for f, c in _combos(opts.fmt, opts.cache) for s in _parse_seeds(opts.seeds)]
    names = [n for n in opts.names if n.strip()]
    if len(names) == 1 and os.path.exists(names[0]):  # a file of names, one a line
        names = Path(names[0]).read_text().split()
    return [parse_name(n) for n in names]


def _spread_cli(opts: argparse.Namespace, ro: RunOpts) -> int:
    global _CPU
    _CPU = threading.Semaphore(max(1, opts.jobs))
    jf = open(opts.json, "w") if opts.json else None  # noqa: SIM115
    seen = commonest = either = 0
    total = 0
    with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        for sp in pool.map(lambda j: spread(j[0], j[1], j[2], ro), _names(opts)):
            print(sp.line(), flush=True)
            total += 1
            seen += sp.qio_runs > 0
            commonest += sp.qio_commonest
            either += sp.qio_runs + sp.qio_loaded > 0
            if jf:
                jf.write(json.dumps(asdict(sp)) + "\n")
    if jf:
        jf.close()
    loaded = f"; with the runs under load, seen in {either}" if ro.load else ""
    print(f"{total} cases: qio's outcome seen in qemu-io's runs in {seen}, the commonest in {commonest}{loaded}")
    return 0


def _rescore_cli(opts: argparse.Namespace, ro: RunOpts) -> int:
    latest: dict[str, dict[str, object]] = {}
    with open(opts.rescore) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                latest[str(r["name"])] = r
    global _CPU
    _CPU = threading.Semaphore(max(1, opts.jobs))
    results: list[SeedResult] = []
    t0 = time.monotonic()
    jf = open(opts.json, "w") if opts.json else None  # noqa: SIM115
    with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        for res in pool.map(lambda r: rescore(r, ro), latest.values()):
            results.append(res)
            if res.status not in ("match", "qemu-unstable") and res.detail != "qio-reported":
                print(f"{res.name}: {res.status} {res.detail}", flush=True)
                if opts.verbose and res.ref and res.qio:
                    print(format_diff(res.ref, res.qio[0]))
            if jf:
                d = _result_json(res)
                if res.status == "qemu-unstable":
                    d.pop("ref", None)
                jf.write(json.dumps(d) + "\n")
    if jf:
        jf.close()
    dt = time.monotonic() - t0
    print(summarise(results))
    print(f"{len(results)} cases rescored in {dt:.0f} s (-j {opts.jobs}, qio runs {ro.qio_runs})")
    return 0


def _replay_cli(opts: argparse.Namespace, ro: RunOpts) -> int:
    records, known = load_records(opts.records)
    want = {case_name(s, f, c) for f, c in _combos(opts.fmt, opts.cache) for s in _parse_seeds(opts.seeds)} \
        if opts.seeds_given else None
    todo = [r for r in records if want is None or r["name"] in want]
    counts = Counter[str]()
    fixed: set[str] = set()
    with ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        for rec, (parts, diff) in zip(todo, pool.map(lambda r: replay(r, ro.qio_root, ro.timeout), todo),
                                      strict=True):
            name = str(rec["name"])
            if not parts:
                counts["fixed (remove from known_failures)" if name in known else "match"] += 1
                if name in known:
                    fixed.add(name)
                    print(f"{name}: now matches (known failure {known[name]})")
            elif name in known:
                counts["known failure"] += 1
            else:
                counts["NEW FAILURE"] += 1
                print(f"{name}: NEW FAILURE {','.join(parts)}")
                if opts.verbose:
                    print(diff)
    print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if opts.drop_fixed and fixed:
        # the records themselves stay as qemu-io made them
        data = json.loads(opts.records.read_text())
        dump_records(opts.records, float(data["timeout"]),
                     {k: v for k, v in known.items() if k not in fixed}, data["records"], data.get("dropped"))
        print(f"removed {len(fixed)} fixed cases from known_failures in {opts.records}")
    return 1 if counts["NEW FAILURE"] else 0


def _minimise_cli(opts: argparse.Namespace, kw: RunOpts) -> int:
    src = opts.minimise
    seed, fmt, cache = parse_name(src)
    script = generate(seed, fmt, cache)
    kw5 = dataclasses.replace(kw, qemu_runs=max(10, kw.qemu_runs))
    first = run_text(script.render(), script.name, fmt, kw5)
    print(f"{src}: {first.status} {first.detail}")
    if first.status not in ("mismatch", "qemu-hang"):
        return 1
    want_status, want_detail = first.status, first.detail

    def keep(s: Script) -> bool:
        res = run_text(s.render(), s.name, fmt, kw5)
        if want_status == "qemu-hang":
            return res.status == "qemu-hang" and res.detail == want_detail
        return res.status == "mismatch" and bool(set(res.detail.split(",")) & set(want_detail.split(",")))

    small = minimise(script, fmt, keep, lambda m: print(m, flush=True))
    text = small.render()
    final = run_text(text, small.name, fmt, kw)
    print(text)
    if final.ref and final.qio:
        print(format_diff(final.ref, final.qio[0]))
    if opts.output:
        opts.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
