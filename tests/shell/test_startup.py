"""What qio's start-up loads: a guard for issue 10 (start-up + open + quit under 100 ms).

Performance is measured by ``benchmarks/bench.py`` (W1n, W1, W1-qcow2), never by timed tests.  These
tests check the deterministic cause instead: the modules a non-interactive run imports.  Each run is a
fresh ``python -S`` process (no site-packages, so no ``.pth`` file can import anything on qio's
behalf; a third-party import then fails the run outright) that prints ``sys.modules`` after
``qio.cli.main`` returns.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from oracle import ROOT as REPO

#: Never needed by ``-c``/piped runs of the plain commands below; each costs measurable start-up time.
HEAVY = {
    "prompt_toolkit",  # the interactive prompt only
    "pyparsing",  # QemuOpts grammars: --image-opts, blkdebug config files
    "concurrent.futures.thread",  # the file driver's thread pool, for large transfers only
    "ssl",  # asyncio's optional TLS support (qio.cli imports asyncio without it)
    "random",  # node names use os.urandom
    "qio.interactive",
    "qio.trace",  # -T only
    "qio.block.blkdebug",
}

PROBE = (
    "import sys\n"
    "from qio.cli import main\n"
    "rc = main(['qio', *sys.argv[1:]])\n"
    "sys.stdout.flush()\n"
    "print('\\nMODULES', ' '.join(sorted(sys.modules)))\n"
    "raise SystemExit(rc)\n"
)


def loaded_modules(args: list[str], stdin: str = "") -> set[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # ``-c`` puts the cwd first on sys.path: this tree's qio, not an installed one
    res = subprocess.run([sys.executable, "-S", "-c", PROBE, *args], input=stdin, cwd=REPO,
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stdout.splitlines()[-1]
    assert last.startswith("MODULES ")
    return set(last.split()[1:])


def heavy(mods: set[str]) -> set[str]:
    return {m for m in mods if m in HEAVY or m.split(".")[0] in HEAVY}


@pytest.fixture()
def raw_image(tmp_path: Path) -> str:
    img = tmp_path / "t.raw"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    return str(img)


def test_quit_without_image_loads_nothing_heavy() -> None:
    mods = loaded_modules(["-c", "quit"])
    assert "asyncio" in mods  # the probe really ran qio's event loop
    assert heavy(mods) == set()
    assert "qio.block.backend" not in mods  # no image: no block layer
    assert "qio.qemuopts" not in mods  # nor its option parsing


def test_raw_open_quit_loads_nothing_heavy(raw_image: str) -> None:
    mods = loaded_modules(["-f", "raw", "-c", "quit", raw_image])
    assert "qio.block.raw" in mods
    assert heavy(mods) == set()
    assert "qio.block.qcow2" not in mods  # drivers load only when an image needs them
    assert "json" not in mods or "qio.qemuopts" in mods  # json comes only with QemuOpts, if at all


def test_probed_open_and_small_read_load_nothing_heavy(raw_image: str) -> None:
    mods = loaded_modules(["-c", "read -q 0 4k", raw_image])
    assert "qio.block.raw" in mods
    assert heavy(mods) == set()


def test_piped_commands_load_nothing_heavy(raw_image: str) -> None:
    mods = loaded_modules(["-f", "raw", raw_image], stdin="write -q 0 4k\nquit\n")
    assert "qio.lines" in mods
    assert heavy(mods) == set()


def test_blkdebug_without_config_file_needs_no_pyparsing(raw_image: str) -> None:
    mods = loaded_modules(["-c", "read -q 0 4k", f"blkdebug::{raw_image}"])
    assert "qio.block.blkdebug" in mods
    assert heavy(mods - {"qio.block.blkdebug", "qio.trace"}) == set()  # trace: its events


def test_qcow2_open_quit_loads_nothing_heavy(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    res = subprocess.run([sys.executable, "-m", "qio.img", "create", "-q", "-f", "qcow2", str(img), "1M"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    mods = loaded_modules(["-f", "qcow2", "-c", "quit", str(img)])
    assert "qio.block.qcow2" in mods
    assert heavy(mods) == set()


def test_ssl_still_importable_after_main() -> None:
    """qio imports asyncio without ssl, but leaves ``import ssl`` working for code that runs later."""
    code = ("import sys\nfrom qio.cli import main\n"
            "rc = main(['qio', '-c', 'quit'])\nassert 'ssl' not in sys.modules\n"
            "import ssl\nprint(rc, ssl.OPENSSL_VERSION.split()[0])\n")
    res = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "OpenSSL"]


def test_qemuopts_without_white_space_need_no_pyparsing(tmp_path: Path) -> None:
    img = tmp_path / "t.qcow2"
    res = subprocess.run([sys.executable, "-m", "qio.img", "create", "-q", "-f", "qcow2", str(img), "1M"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    mods = loaded_modules(["--image-opts", "-c", "quit", f"driver=qcow2,file.filename={img}"])
    assert "qio.block.qcow2" in mods
    assert heavy(mods) == set()
    mods = loaded_modules(["-c", f"open -o driver=qcow2,lazy-refcounts=on {img}", "-c", "quit"])
    assert "qio.block.qcow2" in mods
    assert heavy(mods) == set()


def test_qemuopts_hand_scan_matches_the_grammar() -> None:
    """Every string of up to 8 characters over ``a=,`` (each class of character the grammar tells
    apart, white space aside) splits exactly as the pyparsing grammar splits it, or both reject it."""
    import itertools

    import pyparsing as pp

    from qio import qemuopts

    grammar = qemuopts._grammar()
    for length in range(9):
        for text in map("".join, itertools.product("a=,", repeat=length)):
            try:
                want: list[tuple[str, str | None]] | None = [
                    (k, v) for k, v in grammar.parse_string(text, parse_all=True)]
            except pp.ParseException:
                want = None
            assert qemuopts._split_plain(text) == want, text


def test_blkdebug_config_scan_matches_the_former_grammar() -> None:
    """The config line patterns read every line of up to 5 characters over ``[]" =a`` (plus one tab)
    exactly as the pyparsing grammar they replace did (with tabs kept, as QEMU's scanf keeps them)."""
    import itertools

    import pyparsing as pp

    from qio.block import blkdebug_config as bc

    ws = pp.Regex(r"[ \t\n\v\f\r]*").suppress()
    token = pp.Regex(r"[^ \t\n\v\f\r]{1,63}")
    group_id = (pp.Literal("[").suppress() + token("group") + ws + pp.Literal('"').suppress()
                + pp.Regex(r'[^"]{1,63}')("id"))
    group = pp.Literal("[").suppress() + pp.Regex(r"[^\]]{1,63}")("group")
    quoted = pp.Literal('"').suppress() + pp.Regex(r'[^"]{0,1023}')("value")
    assignment = ws + token("name") + pp.Opt(ws + pp.Literal("=").suppress() + ws + pp.Opt(quoted))
    grammars = []
    for g in (group_id, group, assignment):
        g.leave_whitespace()
        grammars.append(g.parse_with_tabs())

    def old(g: pp.ParserElement, text: str, names: tuple[str, ...]) -> tuple[str | None, ...] | None:
        try:
            r = g.parse_string(text)
        except pp.ParseException:
            return None
        return tuple(r[n] if n in r else None for n in names)  # noqa: SIM401

    def new(p: re.Pattern[str], text: str) -> tuple[str | None, ...] | None:
        m = p.match(text)
        return None if m is None else m.groups()

    lines = ["[a\t\"b", "a\t=\t\"b\"", "\ta", "[\ta]"]
    for length in range(6):
        lines += map("".join, itertools.product('[]" =a', repeat=length))
    for text in lines:
        assert new(bc._GROUP_ID, text) == old(grammars[0], text, ("group", "id")), text
        assert new(bc._GROUP, text) == (old(grammars[1], text, ("group",))), text
        want = old(grammars[2], text, ("name", "value"))
        got = new(bc._ASSIGNMENT, text)
        assert got == want, text
