"""``--object secret,...`` on the command line: every accepted form and every refusal gives qemu-io's
output and exit status (objects are created while the options are parsed, before any image opens)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from oracle import QEMU_IO, missing, qio_wrapper

pytestmark = pytest.mark.skipif(bool(missing("qemu-io")), reason="needs qemu-io")

CASES = [
    ["secret,id=s,data=x"],
    ["secret,id=s"],
    ["secret,data=x"],
    ["foo,id=x"],
    ["id=x"],
    [""],
    ["secret,id=s,file=/nonexistent/pw"],
    ["secret,id=s,data=x,file=y"],
    ["secret,id=s,data=x,bogus=1"],
    ["secret,id=s,data=x,format=foo"],
    ["secret,id=s,data=x,format=base64"],
    ["secret,id=s,data=a!b,format=base64"],
    ["secret,id=s,data=x", "secret,id=s,data=y"],
    ["secret,id=s,data=x,keyid=nosuch"],
    ["secret,id=k,data=x", "secret,id=s,data=x,keyid=k,iv=AAAAAAAAAAAAAAAAAAAAAA=="],
    ["secret,id=k,data=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=,format=base64", "secret,id=s,data=x,keyid=k"],
    ["secret,id=k,data=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=,format=base64",
     "secret,id=s,data=x,keyid=k,iv=AAAA"],
    ["secret,id=k,data=MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=,format=base64",
     "secret,id=s,data=8pPpKcYbXAqtw3RYo/FXDA==,format=base64,keyid=k,iv=AAECAwQFBgcICQoLDA0ODw=="],
    ["secret,id=s,data=x,loaded=on"],
    ["secret,id=1s,data=x"],
    ["secret,id=s,data=x,data=y"],
    ["secret,id=s,data=a,,b"],
    ["help"],
    ["secret,help"],
    ["secret,id=s,data=x", "secret,id=t,data=y", "secret,id=u,file=/dev/null"],
]


def _run(prog: str, objs: list[str]) -> tuple[str, str, int]:
    argv = [prog]
    for o in objs:
        argv += ["--object", o]
    p = subprocess.run([*argv, "-c", "quit"], capture_output=True, text=True, timeout=60)
    return p.stdout, p.stderr, p.returncode


@pytest.mark.parametrize("objs", CASES, ids=["|".join(c) or "empty" for c in CASES])
def test_object_option_like_qemu_io(tmp_path: Path, objs: list[str]) -> None:
    assert QEMU_IO is not None
    qio = qio_wrapper(tmp_path / "qemu-io")
    got = _run(str(qio), objs)
    assert "Traceback" not in got[1]
    assert got == _run(QEMU_IO, objs)
