#!/usr/bin/env python3
"""Differential test harness: run a corpus script against real qemu-io and against qio.

Corpus file format (``tests/corpus/<fmt>/NNN-name.qio``)
=========================================================

A script is a *header* followed by a *body*.  The header is every leading line that starts
with ``#``; the body starts at the first line that does not (later lines starting with ``#`` are
ordinary body lines).  Plain ``# ...`` header lines are comments (the first one should say
what the script checks).  ``#! KEYWORD ARGS`` lines are directives:

``#! image SIZE``
    Create the image ``$IMG`` (= ``$DIR/test.img``) with SIZE bytes (plain integer or a
    binary ``K``/``M``/``G`` suffix).  Default: ``1M``.
``#! qcow2 SIZE [OPTIONS]``
    Create ``$IMG`` as a qcow2 image with the real ``qemu-img create -f qcow2 [-o OPTIONS] $IMG SIZE``
    (SIZE as for ``image``; OPTIONS a comma-separated ``-o`` list, e.g. ``cluster_size=512,compat=0.10``;
    ``$DIR`` is substituted).  Replaces ``image``/``fill``.
``#! prep COMMAND``
    A shell command run in ``$DIR`` after the files are created (``$IMG``, ``$DIR`` substituted), e.g.
    ``qemu-io -c 'write -P 1 0 64k' $IMG`` or ``qemu-img snapshot -c s1 $IMG``.  Any number, in order.
    The directory is prepared once and copied for each program, so both start from identical bytes.
``#! fill BYTE|seq|hex:HEX``
    Initial image content: every byte = BYTE (e.g. ``0x5a``), ``seq`` (byte i = i & 0xff) or
    the bytes HEX (e.g. ``hex:514649fb``) repeated cyclically.  Default: zeroes (sparse).
``#! noimage``
    Do not create ``test.img`` and do not append an image argument.
``#! noimgarg``
    Create the image but do not append it to the command line (e.g. for ``open``).
``#! file NAME BYTE|seq|hex:HEX COUNT``
    Create the helper file ``$DIR/NAME`` with COUNT bytes filled like ``fill``
    (``#! file empty.bin 0 0`` makes an empty file).  Any number of these.
``#! text NAME [no-final-newline]``
    Create the text file ``$DIR/NAME`` (e.g. a blkdebug config file).  Its content is given by
    the ``#| LINE`` header lines that follow the directive: each line with its ``#| `` prefix
    (``#|`` plus one space) stripped and a ``\\n`` appended (a bare ``#|`` is an empty line; any
    further leading blanks are kept, so indented and blank-only lines can be written).  ``$TAB``,
    ``$DIR`` and ``$IMG`` are substituted in the lines.  With ``no-final-newline`` the last line
    gets no ``\\n``.  No ``#|`` lines: an empty file.  Any number of these; ``#|`` lines
    anywhere else are an error.
``#! args ARG...``
    qemu-io options, split with ``shlex``.  The command line is
    ``qemu-io ARGS [-c LINE]... [$IMG]``; ``$IMG`` is appended unless an argument already
    contains ``$IMG`` or ``noimage``/``noimgarg`` is given.  Default: no options.
``#! mode c|pipe``
    ``c`` (default): every body line becomes one ``-c`` argument, stdin is empty.
    ``pipe``: the body is piped to stdin (lines joined with ``\\n``, plus a final ``\\n``).
``#! no-final-newline``
    pipe mode: do not add the newline after the last body line.
``#! merge``
    Run with ``2>&1`` and compare the single merged stream (exercises the 4096-byte stdout
    block-buffering emulation).  Default: compare stdout and stderr separately.
``#! keep-prompts``
    Apply the iotests filter *without* its ``s/qemu-io> //g`` expression, so the prompts
    (including the final prompt without newline) are compared too.
``#! mask-csv``
    Also mask the timing/rate fields of ``-C`` report lines
    (``512,1,0:00:00.00,782121.198,1527.580`` -> ``512,1,H:MM:SS.SS,RATE,OPS``); the iotests
    filter does not touch them.
``#! timeout SECONDS``
    Per-process timeout (default 60).
``#! xfail REASON``
    qio is known not to match yet (a missing feature, e.g. one needing the qcow2 driver); pytest
    runs it as a strict xfail, so the marker must go when the feature lands.

Substitutions in ``args`` tokens and body lines: ``$IMG`` (absolute image path), ``$DIR``
(absolute run directory, also the cwd of the process), ``$TAB`` (a tab character) and
``$REPEAT{N,TEXT}`` (TEXT repeated N times, for over-long lines).

What is compared
================

Both programs run in a fresh directory with the *same absolute path* (``<tmp>/d``, recreated
between the two runs) through a symlink ``<tmp>/bin/qemu-io`` that is executed with
``argv[0]`` = that path, so ``g_get_prgname()`` is ``qemu-io`` for both and getopt messages of
the main options (which use argv[0] verbatim) are identical.  For qio the symlink points to a
small wrapper script (``#!<sys.executable>``, ``from qio.cli import main``); set ``QIO_PROG``
to use another executable instead (it is symlinked the same way; if it contains whitespace it
is split with shlex and run as is).  ``QEMU_IO_PROG`` overrides the reference binary.

Outputs are decoded (UTF-8, surrogateescape), paths are filtered (``<tmp>/d/`` ->
``TEST_DIR/``, ``<tmp>/bin/`` -> ``BIN_DIR/``), then ``filters.filter_qemu_io`` (and
``filter_csv_stats`` with ``mask-csv``) is applied.  Compared: stdout and stderr (or the merged
stream), the exit status (death by signal N is normalised to 128+N, as a shell reports it)
and the bytes of every file left in the run directory (the image and helper files).  Every
process has a timeout; a timeout is reported as a failure.

qemu-io's host I/O runs in a thread pool, so on a loaded machine two requests in flight can
complete in either order.  A race script belongs in the corpus only when qemu-io is stable on a
quiet machine and gives the same result on a loaded one (``--determinism 10``, then
``--determinism 10 --load 2``): CI runs two test workers on two cores, and a case decided by a few
microseconds of thread timing went the other way there in five runs of five (docs/fuzzing.md).
When qio differs, qemu-io runs again, up to ``RERUNS`` times: a difference counts only when no
qemu-io run gives qio's result.

CLI::

    python tests/difftest.py [options] FILE_OR_DIR...

prints a unified diff per mismatch and a summary line (``97 passed, 3 failed``).
``--determinism N`` runs only qemu-io N times per script and checks the filtered results are
identical (``--load N``: beside N busy CPU loops); ``--show`` prints the filtered qemu-io result
of each script.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from filters import filter_csv_stats, filter_qemu_io, filter_testdir
from oracle import qio_wrapper

_TESTS_DIR = Path(__file__).resolve().parent
CORPUS_DIR = _TESTS_DIR / "corpus"
DEFAULT_TIMEOUT = 60.0
PROGRAM_NAME = "qemu-io"
IMAGE_NAME = "test.img"

__all__ = [
    "CORPUS_DIR",
    "Case",
    "CaseError",
    "Comparison",
    "RunResult",
    "compare",
    "corpus_files",
    "parse_case",
    "qemu_io_path",
    "run_case",
    "run_program",
]


class CaseError(ValueError):
    """A corpus file is malformed."""


@dataclass(frozen=True)
class HelperFile:
    name: str
    fill: str  # "seq", "hex:..." or a byte value as text
    count: int


@dataclass
class TextFile:
    name: str
    lines: list[str] = field(default_factory=list)
    final_newline: bool = True


@dataclass
class Case:
    path: Path
    comments: list[str] = field(default_factory=list)
    image_size: int = 1 << 20
    image_fill: str | None = None
    qcow2: tuple[int, str] | None = None
    prep: list[str] = field(default_factory=list)
    create_image: bool = True
    append_image: bool = True
    files: list[HelperFile] = field(default_factory=list)
    texts: list[TextFile] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    mode: str = "c"
    final_newline: bool = True
    merge: bool = False
    keep_prompts: bool = False
    mask_csv: bool = False
    timeout: float = DEFAULT_TIMEOUT
    xfail: str | None = None
    body: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name


@dataclass
class RunResult:
    """Filtered result of one program run."""

    stdout: str
    stderr: str  # empty when merged
    rc: int  # normalised: killed by signal N -> 128 + N
    files: dict[str, bytes | str]
    timed_out: bool = False
    argv: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    case: Case
    ref: RunResult
    test: RunResult
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self) -> str:
        head = f"FAIL {self.case.path}\n  argv: {shlex.join(self.ref.argv)}\n"
        return head + "\n".join(self.problems)


# ---------------------------------------------------------------------------------------------
# parsing

_SIZE_RE = re.compile(r"^([0-9]+)([KMGT]?)$", re.IGNORECASE)


def _parse_size(text: str, path: Path) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise CaseError(f"{path}: bad size {text!r}")
    return int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))


def _parse_fill(text: str, path: Path) -> str:
    if text == "seq":
        return text
    if text.startswith("hex:"):
        try:
            if not bytes.fromhex(text[4:]):
                raise ValueError
        except ValueError:
            raise CaseError(f"{path}: bad hex fill {text!r}") from None
        return text
    try:
        value = int(text, 0)
    except ValueError:
        raise CaseError(f"{path}: bad fill byte {text!r}") from None
    if not 0 <= value <= 255:
        raise CaseError(f"{path}: fill byte out of range {text!r}")
    return str(value)


def parse_case(path: str | os.PathLike[str]) -> Case:
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    case = Case(path=p)
    i = 0
    last_key: str | None = None
    while i < len(lines) and lines[i].startswith("#"):
        line = lines[i]
        i += 1
        if line.startswith("#|"):
            if line != "#|" and not line.startswith("#| "):
                raise CaseError(f"{p}: text lines must start with '#| ' (or be a bare '#|')")
            if last_key != "text":
                raise CaseError(f"{p}: '#|' line outside a '#! text' block")
            case.texts[-1].lines.append(line[3:])
            continue
        last_key = None
        if not line.startswith("#!"):
            case.comments.append(line[1:].strip())
            continue
        words = line[2:].split(None, 1)
        if not words:
            raise CaseError(f"{p}: empty directive")
        key, rest = words[0], (words[1] if len(words) > 1 else "")
        parts = rest.split()
        last_key = key
        if key == "image":
            if len(parts) != 1:
                raise CaseError(f"{p}: usage: #! image SIZE")
            case.image_size = _parse_size(parts[0], p)
        elif key == "qcow2":
            if not 1 <= len(parts) <= 2:
                raise CaseError(f"{p}: usage: #! qcow2 SIZE [OPTIONS]")
            case.qcow2 = (_parse_size(parts[0], p), parts[1] if len(parts) > 1 else "")
        elif key == "prep":
            if not rest:
                raise CaseError(f"{p}: usage: #! prep COMMAND")
            case.prep.append(rest)
        elif key == "fill":
            if len(parts) != 1:
                raise CaseError(f"{p}: usage: #! fill BYTE|seq|hex:HEX")
            case.image_fill = _parse_fill(parts[0], p)
        elif key == "noimage":
            case.create_image = False
            case.append_image = False
        elif key == "noimgarg":
            case.append_image = False
        elif key == "file":
            if len(parts) != 3 or "/" in parts[0] or parts[0] in (".", ".."):
                raise CaseError(f"{p}: usage: #! file NAME BYTE|seq|hex:HEX COUNT")
            case.files.append(HelperFile(parts[0], _parse_fill(parts[1], p), _parse_size(parts[2], p)))
        elif key == "text":
            if (
                not 1 <= len(parts) <= 2
                or "/" in parts[0]
                or parts[0] in (".", "..", IMAGE_NAME)
                or parts[1:] not in ([], ["no-final-newline"])
            ):
                raise CaseError(f"{p}: usage: #! text NAME [no-final-newline]")
            case.texts.append(TextFile(parts[0], final_newline=len(parts) == 1))
        elif key == "args":
            case.args = shlex.split(rest)
        elif key == "mode":
            if parts not in (["c"], ["pipe"]):
                raise CaseError(f"{p}: usage: #! mode c|pipe")
            case.mode = parts[0]
        elif key == "no-final-newline":
            case.final_newline = False
        elif key == "merge":
            case.merge = True
        elif key == "keep-prompts":
            case.keep_prompts = True
        elif key == "mask-csv":
            case.mask_csv = True
        elif key == "timeout":
            case.timeout = float(rest)
        elif key == "xfail":
            case.xfail = rest or "known difference"
        else:
            raise CaseError(f"{p}: unknown directive {key!r}")
    case.body = lines[i:]
    if not case.comments:
        raise CaseError(f"{p}: missing '# what this checks' comment")
    return case


_REPEAT_RE = re.compile(r"\$REPEAT\{([0-9]+),([^}]*)\}")


def substitute(text: str, run_dir: str) -> str:
    text = _REPEAT_RE.sub(lambda m: m.group(2) * int(m.group(1)), text)
    return (
        text.replace("$IMG", os.path.join(run_dir, IMAGE_NAME)).replace("$DIR", run_dir).replace("$TAB", "\t")
    )


def build_argv(case: Case, prog: str, run_dir: str) -> tuple[list[str], bytes]:
    """Command line (argv[0] = ``prog``) and stdin bytes for a case."""
    argv = [prog] + [substitute(a, run_dir) for a in case.args]
    body = [substitute(line, run_dir) for line in case.body]
    stdin = b""
    if case.mode == "c":
        for line in body:
            argv += ["-c", line]
    else:
        data = "\n".join(body)
        if body and case.final_newline:
            data += "\n"
        stdin = data.encode("utf-8", "surrogateescape")
    if case.append_image and not any("$IMG" in a for a in case.args):
        argv.append(os.path.join(run_dir, IMAGE_NAME))
    return argv, stdin


# ---------------------------------------------------------------------------------------------
# running


def qemu_io_path() -> str | None:
    """The reference binary (``QEMU_IO_PROG`` or ``qemu-io`` on PATH)."""
    env = os.environ.get("QEMU_IO_PROG")
    if env:
        return env
    return shutil.which("qemu-io")


def _fill_bytes(fill: str, count: int) -> bytes:
    if fill == "seq":
        return bytes(range(256)) * (count // 256) + bytes(range(count % 256))
    if fill.startswith("hex:"):
        unit = bytes.fromhex(fill[4:])
        return (unit * (count // len(unit) + 1))[:count]
    return bytes([int(fill)]) * count


def _populate(case: Case, run_dir: Path) -> None:
    run_dir.mkdir()
    if case.create_image and case.qcow2 is not None:
        size, opts = case.qcow2
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if opts:
            cmd += ["-o", substitute(opts, str(run_dir))]
        subprocess.run([*cmd, str(run_dir / IMAGE_NAME), str(size)], cwd=run_dir, env=_child_env(), check=True,
                       stdout=subprocess.DEVNULL)
    elif case.create_image:
        img = run_dir / IMAGE_NAME
        with open(img, "wb") as f:
            if case.image_fill is None:
                f.truncate(case.image_size)
            else:
                f.write(_fill_bytes(case.image_fill, case.image_size))
    for hf in case.files:
        (run_dir / hf.name).write_bytes(_fill_bytes(hf.fill, hf.count))
    for tf in case.texts:
        text = "\n".join(substitute(line, str(run_dir)) for line in tf.lines)
        if tf.lines and tf.final_newline:
            text += "\n"
        (run_dir / tf.name).write_bytes(text.encode("utf-8", "surrogateescape"))
    for line in case.prep:
        subprocess.run(substitute(line, str(run_dir)), shell=True, cwd=run_dir, env=_child_env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=case.timeout)


SNAPSHOT_INLINE_LIMIT = 16 << 20


def _digest_large(path: Path) -> str:
    """Content digest of a (possibly sparse) big file; holes and zero chunks hash alike."""
    h = hashlib.sha256()
    chunk = 1 << 20
    size = path.stat().st_size
    with open(path, "rb") as f:
        fd = f.fileno()
        off = 0
        while off < size:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            off -= off % chunk
            data = os.pread(fd, chunk, off)
            if data.count(0) != len(data):
                h.update(off.to_bytes(8, "little") + data)
            off += chunk
    return f"<{size} bytes, sha256 of non-zero 1 MiB chunks {h.hexdigest()[:16]}>"


def _snapshot(run_dir: Path) -> dict[str, bytes | str]:
    """Regular files of the run directory: bytes, or a digest string for files > 16 MiB."""
    out: dict[str, bytes | str] = {}
    for entry in sorted(run_dir.iterdir()):
        if entry.is_file() and not entry.is_symlink():
            if entry.stat().st_size > SNAPSHOT_INLINE_LIMIT:
                out[entry.name] = _digest_large(entry)
            else:
                out[entry.name] = entry.read_bytes()
        else:
            out[entry.name + "/"] = "<not a regular file>"
    return out


def _child_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("POSIXLY_CORRECT", "LANGUAGE") and not k.startswith("LC_")
    }
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    env.pop("QEMU_IO_PROG", None)
    env.pop("QIO_PROG", None)
    return env


def _disable_core_dumps() -> None:
    # Inherited by the children (abort/sigraise tests must not write core files).  Set on the
    # harness process itself instead of using preexec_fn, which is unsafe with threads (-j).
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if soft != 0:
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def run_program(target: str | list[str], case: Case, base: Path) -> RunResult:
    """Run one program on a fresh ``base/d``.  ``target`` is an executable to be symlinked as
    ``base/bin/qemu-io`` or an explicit argv prefix (list) run as is."""
    _disable_core_dumps()
    run_dir = base / "d"
    bin_dir = base / "bin"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    bin_dir.mkdir(exist_ok=True)
    if case.qcow2 is None and not case.prep:
        _populate(case, run_dir)
    else:
        # qemu-img/qemu-io output carries timestamps (snapshots): prepare once, copy for each program
        template = base / "template"
        if not template.exists():
            _populate(case, run_dir)
            shutil.copytree(run_dir, template, symlinks=True)
        else:
            shutil.copytree(template, run_dir, symlinks=True)
    link = bin_dir / PROGRAM_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    if isinstance(target, list):
        prefix = target
        argv, stdin = build_argv(case, str(link), str(run_dir))
        cmd = prefix + argv[1:]
        executable = None
    else:
        link.symlink_to(target)
        argv, stdin = build_argv(case, str(link), str(run_dir))
        cmd = argv
        executable = str(link)
    proc = subprocess.Popen(
        cmd,
        executable=executable,
        cwd=run_dir,
        env=_child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if case.merge else subprocess.PIPE,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=case.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
    rc = proc.returncode
    if rc < 0:
        rc = 128 - rc

    def filt(data: bytes | None) -> str:
        text = _decode(data or b"")
        text = filter_testdir(text, str(run_dir), "TEST_DIR", bare=True)
        text = filter_testdir(text, str(bin_dir), "BIN_DIR", bare=True)
        text = filter_qemu_io(text, strip_prompts=not case.keep_prompts)
        if case.mask_csv:
            text = filter_csv_stats(text)
        return text

    files = _snapshot(run_dir)
    return RunResult(
        stdout=filt(out),
        stderr=filt(err),
        rc=rc,
        files=files,
        timed_out=timed_out,
        argv=[
            filter_testdir(filter_testdir(a, str(run_dir), bare=True), str(bin_dir), "BIN_DIR", bare=True)
            for a in argv
        ],
    )


def qio_target(base: Path) -> str | list[str]:
    """What to run for qio: ``QIO_PROG`` or a wrapper script written into ``base``."""
    env = os.environ.get("QIO_PROG")
    if env:
        if any(c.isspace() for c in env):
            return shlex.split(env)
        return os.path.abspath(env)
    wrapper = base / "qio-wrapper"
    if not wrapper.exists():
        qio_wrapper(wrapper)
    return str(wrapper)


# ---------------------------------------------------------------------------------------------
# comparing


def _diff(a: str, b: str, what: str, names: tuple[str, str]) -> str:
    lines = difflib.unified_diff(
        a.splitlines(keepends=True),
        b.splitlines(keepends=True),
        fromfile=f"{names[0]} {what}",
        tofile=f"{names[1]} {what}",
    )
    out = []
    for line in lines:
        if not line.endswith("\n"):
            line += "\n\\ No newline at end of file\n"
        out.append(line.encode("utf-8", "backslashreplace").decode("utf-8"))
    return "".join(out).rstrip("\n")


def _file_diff(name: str, a: bytes | str | None, b: bytes | str | None, names: tuple[str, str]) -> str | None:
    if a == b:
        return None
    if a is None:
        return f"file {name}: only created by {names[1]} ({len(b or b'')} bytes)"
    if b is None:
        return f"file {name}: only created by {names[0]} ({len(a)} bytes)"
    if isinstance(a, str) or isinstance(b, str):
        da = a if isinstance(a, str) else f"{len(a)} bytes"
        db = b if isinstance(b, str) else f"{len(b)} bytes"
        return f"file {name}: {names[0]} {da}, {names[1]} {db}"
    if len(a) != len(b):
        msg = f"file {name}: size {names[0]} {len(a)}, {names[1]} {len(b)}"
    else:
        msg = f"file {name}: contents differ"
    n = min(len(a), len(b))
    for off in range(n):
        if a[off] != b[off]:
            msg += (
                f"; first difference at offset {off:#x} ({names[0]} {a[off]:#04x}, {names[1]} {b[off]:#04x})"
            )
            break
    ha = hashlib.sha256(a).hexdigest()[:12]
    hb = hashlib.sha256(b).hexdigest()[:12]
    return msg + f" [sha256 {ha} vs {hb}]"


def compare(
    case: Case, ref: RunResult, test: RunResult, names: tuple[str, str] = ("qemu-io", "qio")
) -> Comparison:
    problems: list[str] = []
    for r, n in ((ref, names[0]), (test, names[1])):
        if r.timed_out:
            problems.append(f"{n} timed out after {case.timeout:g} s")
    streams = [("stdout+stderr" if case.merge else "stdout", ref.stdout, test.stdout)]
    if not case.merge:
        streams.append(("stderr", ref.stderr, test.stderr))
    for what, a, b in streams:
        if a != b:
            problems.append(_diff(a, b, what, names))
    if ref.rc != test.rc:
        problems.append(f"exit status: {names[0]} {ref.rc}, {names[1]} {test.rc}")
    for fname in sorted(set(ref.files) | set(test.files)):
        msg = _file_diff(fname, ref.files.get(fname), test.files.get(fname), names)
        if msg:
            problems.append(msg)
    return Comparison(case, ref, test, problems)


RERUNS = 4


def run_case(path: str | os.PathLike[str], reference: str | None = None, reruns: int = RERUNS) -> Comparison:
    """Run a corpus file against qemu-io and qio and compare the results (qemu-io again, up to
    ``reruns`` times, while qio differs: see "What is compared")."""
    case = parse_case(path)
    ref_prog = reference or qemu_io_path()
    if ref_prog is None:
        raise RuntimeError("qemu-io not found (set QEMU_IO_PROG)")
    with tempfile.TemporaryDirectory(prefix="qio-diff-") as tmp:
        base = Path(tmp)
        ref = run_program(ref_prog, case, base)
        test = run_program(qio_target(base), case, base)
        result = compare(case, ref, test)
        for _ in range(0 if ref.timed_out or test.timed_out else reruns):
            if result.ok:
                break
            again = compare(case, run_program(ref_prog, case, base), test)
            if again.ok:
                result = again
        return result


class cpu_load:
    """``n`` busy loops in child processes for the duration of a ``with``: qemu-io decides many races
    differently on a loaded machine (docs/fuzzing.md), and CI's machine is loaded by its other test
    worker."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> cpu_load:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def run_reference(path: str | os.PathLike[str], times: int = 1) -> tuple[Case, list[RunResult]]:
    case = parse_case(path)
    ref_prog = qemu_io_path()
    if ref_prog is None:
        raise RuntimeError("qemu-io not found (set QEMU_IO_PROG)")
    results = []
    with tempfile.TemporaryDirectory(prefix="qio-diff-") as tmp:
        for _ in range(times):
            results.append(run_program(ref_prog, case, Path(tmp)))
    return case, results


def corpus_files(root: str | os.PathLike[str] = CORPUS_DIR) -> list[Path]:
    return sorted(Path(root).rglob("*.qio"))


# ---------------------------------------------------------------------------------------------
# CLI


def _expand(items: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for item in items:
        p = Path(item)
        out.extend(corpus_files(p) if p.is_dir() else [p])
    return out


def _format_result(r: RunResult, merged: bool) -> str:
    parts = [f"$ {shlex.join(r.argv)}", f"[rc {r.rc}{' TIMEOUT' if r.timed_out else ''}]"]
    parts.append("--- stdout+stderr ---" if merged else "--- stdout ---")
    parts.append(r.stdout.encode("utf-8", "backslashreplace").decode())
    if not merged:
        parts.append("--- stderr ---")
        parts.append(r.stderr.encode("utf-8", "backslashreplace").decode())
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="corpus files or directories (default: whole corpus)")
    ap.add_argument(
        "--determinism", type=int, metavar="N", help="only run qemu-io N times per file and compare"
    )
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="--determinism: run qemu-io beside N busy CPU loops (a corpus race must hold there too)")
    ap.add_argument("--show", action="store_true", help="print the filtered qemu-io result of each file")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel jobs")
    ap.add_argument("-q", "--quiet", action="store_true", help="no diffs, only FAIL lines and the summary")
    opts = ap.parse_args(argv)
    if opts.load and not opts.determinism:
        ap.error("--load needs --determinism")
    if opts.load < 0:
        ap.error("--load must be 0 or more")
    files = _expand(opts.files) if opts.files else corpus_files()
    if not files:
        print("no corpus files", file=sys.stderr)
        return 2

    def work(path: Path) -> tuple[bool, str]:
        try:
            if opts.show or opts.determinism:
                case, results = run_reference(path, max(1, opts.determinism or 1))
                if opts.show:
                    return True, f"=== {path}\n{_format_result(results[0], case.merge)}"
                first = results[0]
                for i, r in enumerate(results[1:], 2):
                    cmp = compare(case, first, r, ("run 1", f"run {i}"))
                    if not cmp.ok:
                        return False, cmp.report()
                    if r.timed_out:
                        return False, f"FAIL {path}: timeout"
                return True, ""
            cmp = run_case(path)
            return cmp.ok, ("" if cmp.ok else cmp.report())
        except (CaseError, RuntimeError, OSError) as e:
            return False, f"ERROR {path}: {e}"

    passed = failed = 0
    with cpu_load(opts.load), ThreadPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        for path, (ok, text) in zip(files, pool.map(work, files), strict=True):
            if ok:
                passed += 1
                if text:
                    print(text)
            else:
                failed += 1
                print(text.split("\n")[0] if opts.quiet else text)
            sys.stdout.flush()
            _ = path
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
