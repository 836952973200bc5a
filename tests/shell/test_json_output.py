"""``--output=json`` (issue 14 point 3): every line a JSON object valid against
docs/json-output.schema.json, the values of each command's results, and text mode left alone.

Each case runs this tree's qio as a process (``python -m qio --output=json ... -c CMD``) on a scratch
image, validates every line, then checks what the command's result lines say."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from oracle import ROOT

SCHEMA = json.loads((ROOT / "docs" / "json-output.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
Obj = dict[str, Any]


def qio(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "qio", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)


def run_json(image: Path | str | None, *cmds: str, fmt: str = "raw", extra: tuple[str, ...] = ()) -> list[Obj]:
    """The objects qio prints for ``cmds`` (each ``-c``); every line is checked against the schema."""
    args = ["--output=json", *extra]
    for c in cmds:
        args += ["-c", c]
    if image is not None:
        args += ["-f", fmt, str(image)]
    res = qio(*args)
    assert res.stderr == "", res.stderr
    objs = []
    for line in res.stdout.splitlines():
        obj = json.loads(line)
        VALIDATOR.validate(obj)
        objs.append(obj)
    return objs


def of(objs: list[Obj], kind: str, **match: Any) -> list[Obj]:
    return [o for o in objs if o["type"] == kind and all(o.get(k) == v for k, v in match.items())]


def ends(objs: list[Obj], command: str, errno: int = 0) -> None:
    """The command line's end record says how it went."""
    done = of(objs, "command", command=command)
    assert done, objs
    assert done[-1]["errno"] == errno, done
    assert done[-1]["status"] == ("ok" if errno == 0 else "error")


@pytest.fixture
def blk(raw_img: Path) -> str:
    return f"blkdebug::{raw_img}"


def ok_result(objs: list[Obj], command: str, op: str, offset: int, nbytes: int) -> Obj:
    res = of(objs, "result", command=command, status="ok")
    assert len(res) == 1, objs
    r = res[0]
    assert (r["op"], r["offset"], r["bytes"], r["errno"]) == (op, offset, nbytes, 0)
    assert r["elapsed_ns"] >= 0 and r["elapsed"] == pytest.approx(r["elapsed_ns"] / 1e9)
    return r


# -- one test per command ---------------------------------------------------------------------------
def test_read(raw_img: Path) -> None:
    objs = run_json(raw_img, "write -P 7 512 512", "read -P 7 512 512", "read -P 8 512 512", "read 2M 512")
    reads = of(objs, "result", command="read")
    assert [(r["status"], r["op"]) for r in reads] == [("ok", "read"), ("mismatch", "verify"), ("ok", "read"),
                                                        ("error", "read")]
    assert reads[1]["errno"] == 22 and reads[1]["offset"] == 512 and reads[1]["bytes"] == 512
    assert reads[3]["errno"] == 5 and reads[3]["message"] == "Input/output error"
    assert [o["errno"] for o in of(objs, "command", command="read")] == [0, 22, 5]


def test_read_verbose_data(raw_img: Path) -> None:
    objs = run_json(raw_img, "write -P 0x41 0 16", "read -v 0 16")
    assert of(objs, "data") == [{"type": "data", "command": "read", "offset": 0, "bytes": 16, "hex": "41" * 16}]


def test_readv(raw_img: Path) -> None:
    objs = run_json(raw_img, "readv -P 0 0 512 1k")
    ok_result(objs, "readv", "read", 0, 1536)
    ends(objs, "readv")


def test_write(raw_img: Path) -> None:
    objs = run_json(raw_img, "write -P 0x11 4k 4k", "write -z 8k 4k", "write -f 0 512", "write -c 0 512")
    writes = of(objs, "result", command="write")
    assert [(w["offset"], w["bytes"], w["status"]) for w in writes[:3]] == [(4096, 4096, "ok"), (8192, 4096, "ok"),
                                                                           (0, 512, "ok")]
    # raw does not compress: the write fails with qemu-io's message
    assert writes[3]["status"] == "error" and writes[3]["errno"] == 95, writes[3]


def test_writev(raw_img: Path) -> None:
    objs = run_json(raw_img, "writev -P 3 0 512 512")
    ok_result(objs, "writev", "wrote", 0, 1024)


def test_aio_read(raw_img: Path) -> None:
    objs = run_json(raw_img, "aio_read -P 0 0 4k", "aio_read 2M 512", "aio_flush")
    ok_result(objs, "aio_read", "read", 0, 4096)
    failed = of(objs, "result", command="aio_read", status="error")
    assert failed and failed[0]["op"] == "readv" and failed[0]["errno"] == 5


def test_aio_write(raw_img: Path) -> None:
    objs = run_json(raw_img, "aio_write -P 1 0 4k", "aio_flush", "aio_write -i 0 512")
    ok_result(objs, "aio_write", "wrote", 0, 4096)
    assert of(objs, "message", command="aio_write", text="injecting invalid write request")


def test_aio_flush(raw_img: Path) -> None:
    objs = run_json(raw_img, "aio_write 0 512", "aio_flush")
    # the completion is printed while aio_flush drains, before aio_flush's own end record
    kinds = [(o["type"], o["command"]) for o in objs]
    assert kinds.index(("result", "aio_write")) < kinds.index(("command", "aio_flush"))


def test_aio_discard(raw_img: Path) -> None:
    objs = run_json(raw_img, "aio_discard 0 4k", "aio_flush")
    ok_result(objs, "aio_discard", "discard", 0, 4096)


def test_discard(raw_img: Path) -> None:
    objs = run_json(raw_img, "discard 0 64k", "discard -q 0 4k")
    ok_result(objs, "discard", "discard", 0, 65536)
    assert len(of(objs, "command", command="discard")) == 2


def test_flush(raw_img: Path) -> None:
    objs = run_json(raw_img, "flush")
    assert objs == [{"type": "command", "command": "flush", "args": [], "status": "ok", "errno": 0}]


def test_truncate(raw_img: Path) -> None:
    objs = run_json(raw_img, "truncate 2M", "length", "truncate -m bogus 1M")
    assert of(objs, "result", command="length")[0]["bytes"] == 2 << 20
    assert of(objs, "message", command="truncate", stream="stderr",
              text="qio: Invalid preallocation mode 'bogus'")
    ends(objs, "truncate", 22)


def test_length(raw_img: Path) -> None:
    objs = run_json(raw_img, "length")
    assert of(objs, "result", command="length") == [
        {"type": "result", "command": "length", "op": "length", "offset": 0, "bytes": 1 << 20, "status": "ok",
         "errno": 0}]


def test_info(raw_img: Path) -> None:
    objs = run_json(raw_img, "info")
    assert of(objs, "message", command="info", text="format name: raw")


def test_map(raw_img: Path) -> None:
    objs = run_json(raw_img, "write 0 64k", "map", fmt="file")
    extents = of(objs, "extent")
    assert extents[0]["offset"] == 0 and extents[0]["allocated"] is True
    assert sum(e["bytes"] for e in extents) == 1 << 20
    assert all(a["offset"] + a["bytes"] == b["offset"] for a, b in itertools.pairwise(extents))


def test_alloc(raw_img: Path) -> None:
    objs = run_json(raw_img, "write 0 4k", "alloc 0 8k", fmt="file")
    res = of(objs, "result", command="alloc")[0]
    text = qio("-c", "alloc 0 8k", "-f", "file", str(raw_img)).stdout
    assert text == f"{res['allocated_bytes']}/8192 bytes allocated at offset 0 bytes\n"
    assert (res["offset"], res["bytes"]) == (0, 8192)


def test_break_resume_events(blk: str) -> None:
    objs = run_json(blk, "break write_aio A", "aio_write 0 512", "wait_break A", "resume A", "aio_flush",
                    "remove_break B")
    events = of(objs, "event")
    assert events == [{"type": "event", "event": "suspend", "tag": "A"},
                      {"type": "event", "event": "resume", "tag": "A"}]
    ends(objs, "break")
    ends(objs, "wait_break")
    ends(objs, "resume")
    ends(objs, "remove_break", 2)
    assert of(objs, "message", command="remove_break", text="Could not remove breakpoint B: No such file or directory")


def test_trace_events(blk: str) -> None:
    objs = run_json(blk, "write 0 512", extra=("-T", "blkdebug_event"))
    traces = of(objs, "event", event="trace")
    assert traces and all(t["name"] == "blkdebug_event" for t in traces)
    assert any(t["text"] == "write_aio request write offset 0 bytes 512 state 1" for t in traces), traces


def test_trace_command(blk: str) -> None:
    objs = run_json(blk, "trace blkdebug_event", "write 0 512")
    assert of(objs, "event", event="trace", name="blkdebug_event")


def test_rule_commands(blk: str) -> None:
    objs = run_json(blk, "inject event=write_aio errno=28 once=on", "write 0 512", "rules", "unrule 1",
                    "unrule 9", "set_state event=none new_state=2", "delay event=read_aio ns=1000",
                    "corrupt offset=0 length=512 count=1",
                    "bad_blocks offset=1M length=512")
    failed = of(objs, "result", command="write", status="error")
    assert failed and failed[0]["errno"] == 28 and failed[0]["message"] == "No space left on device"
    ends(objs, "unrule", 2)
    for name in ("inject", "rules", "set_state", "delay", "corrupt", "bad_blocks"):
        ends(objs, name)


def test_pause_unpause(raw_img: Path) -> None:
    objs = run_json(raw_img, "pause", "unpause", "unpause")
    assert of(objs, "message", command="pause", text="pause: quiet, no request in flight")
    ends(objs, "unpause", 22)


def test_debug_state(raw_img: Path) -> None:
    objs = run_json(raw_img, "debug_state")
    ends(objs, "debug_state", 95)


def test_open_close_reopen(raw_img: Path) -> None:
    objs = run_json(None, "open -o driver=raw " + str(raw_img), "reopen -r", "write 0 512", "close", "read 0 512")
    ends(objs, "open")
    ends(objs, "reopen")
    assert of(objs, "message", command="write", stream="stderr")
    assert of(objs, "message", command="read", stream="stderr", text="no file open, try 'help open'")


def test_help_quit_sleep(raw_img: Path) -> None:
    objs = run_json(raw_img, "help sleep", "sleep 1", "quit", "length")
    assert of(objs, "message", command="help")
    ends(objs, "sleep")
    assert [o["command"] for o in of(objs, "command")] == ["help", "sleep", "quit"]


def test_unknown_command(raw_img: Path) -> None:
    objs = run_json(raw_img, "nosuch")
    assert of(objs, "message", stream="stderr", text='command "nosuch" not found')
    ends(objs, "nosuch", 22)


def test_powerfail_record_nbd(raw_img: Path, tmp_path: Path) -> None:
    objs = run_json(raw_img, "powerfail", "record", "nbd_server_stop")
    for name in ("powerfail", "record", "nbd_server_stop"):
        assert of(objs, "command", command=name), name


def test_sigraise_abort_flush_partial_output(raw_img: Path) -> None:
    """Objects printed before the process is killed by its own signal are complete lines."""
    res = qio("--output=json", "-c", "write 0 512", "-c", "sigraise 15", "-f", "raw", str(raw_img))
    assert res.returncode == -15
    for line in res.stdout.splitlines():
        VALIDATOR.validate(json.loads(line))


def test_piped_input_has_no_prompt(raw_img: Path) -> None:
    res = qio("--output=json", "-f", "raw", str(raw_img), stdin="write 0 512\nlength\n")
    objs = [json.loads(line) for line in res.stdout.splitlines()]
    for o in objs:
        VALIDATOR.validate(o)
    assert [o["command"] for o in of(objs, "command")] == ["write", "length"]


def test_bad_output_value() -> None:
    res = qio("--output=yaml", "-c", "quit")
    assert res.returncode == 1
    assert res.stderr == "qio: --output must be used with human or json as argument.\n"


@pytest.mark.parametrize("cmds", [("write -P 1 0 4k", "read -v 0 32", "map", "length", "nosuch")])
def test_human_is_the_default(raw_img: Path, cmds: tuple[str, ...]) -> None:
    """``--output=human`` changes nothing: the same bytes as without the option."""
    def run(*extra: str) -> tuple[str, str, int]:
        args = [*extra]
        for c in cmds:
            args += ["-c", c]
        res = qio(*args, "-f", "raw", str(raw_img))
        return _mask(res.stdout), res.stderr, res.returncode

    assert run("--output=human") == run()


def _mask(text: str) -> str:
    import re

    return re.sub(r"[0-9.]+ sec \([^)]*\)", "T", text)


def test_schema_rejects_inconsistent_status() -> None:
    """The schema is strict enough to fail: success with an errno, failure without a message."""
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate({"type": "result", "command": "read", "op": "read", "offset": 0, "bytes": 1,
                            "status": "ok", "errno": 5})
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate({"type": "command", "command": "read", "args": [], "status": "error", "errno": 5})


def test_text_mode_never_loads_the_json_renderer(raw_img: Path) -> None:
    """Start-up of qemu-io's text mode stays as it was: no ``json``, no ``qio.render_json``."""
    probe = ("import sys\nfrom qio.cli import main\nrc = main(['qio', *sys.argv[1:]])\nsys.stdout.flush()\n"
             "print('\\nMODULES', ' '.join(sorted(sys.modules)))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    res = subprocess.run([sys.executable, "-S", "-c", probe, "-c", "write 0 512", "-c", "read 0 512", "-f", "raw",
                          str(raw_img)], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    mods = set(res.stdout.splitlines()[-1].split()[1:])
    assert "qio.ops" in mods  # sanity: the probe sees qio's modules
    assert not {"json", "qio.render_json"} & mods
