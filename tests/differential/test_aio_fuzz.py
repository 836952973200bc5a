"""Random blkdebug/AIO race scripts (tests/aio_fuzz.py) replayed against qio.

The qemu-io 7.2 results of a fixed set of generated cases are recorded in
``tests/aio_fuzz_records.json`` (``python tests/aio_fuzz.py --record N`` rewrites it, ``--record-add``
adds cases; only cases that qemu-io reproduced identically in 10 runs).  Each record
is replayed through qio and
must match: stdout, stderr, exit status, the sha256 of every file in the run directory and, for
qcow2, ``qemu-img check`` of the image.  Cases listed in ``known_failures`` are strict xfails, so
a model fix that makes one match fails here until it is removed from the list.  See docs/fuzzing.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import aio_fuzz

if aio_fuzz.RECORDS_PATH.exists():
    RECORDS, KNOWN = aio_fuzz.load_records()
else:  # pragma: no cover - the file is committed
    RECORDS, KNOWN = [], {}


def test_generator_is_deterministic(tmp_path: Path) -> None:
    """Same (seed, format, cache) -> same script; the scripts parse as corpus cases."""
    seen = set()
    for fmt in aio_fuzz.FORMATS:
        for cache in aio_fuzz.CACHES:
            for seed in range(25):
                text = aio_fuzz.generate(seed, fmt, cache).render()
                assert text == aio_fuzz.generate(seed, fmt, cache).render()
                seen.add(text)
                case = aio_fuzz.load_case(text, tmp_path)
                assert case.body, text
                assert ("-t" in case.args) == (cache == "writeback")
    assert len(seen) == 100


def test_records_match_generator() -> None:
    """Every record was made from the script the generator makes today (else: --record again)."""
    assert len(RECORDS) >= 100
    assert set(KNOWN) <= {r["name"] for r in RECORDS}
    dropped = json.loads(aio_fuzz.RECORDS_PATH.read_text()).get("dropped", {})
    assert not set(dropped) & {r["name"] for r in RECORDS}
    for rec in RECORDS:
        seed, fmt, cache = aio_fuzz.parse_name(str(rec["name"]))
        assert aio_fuzz.script_sha(aio_fuzz.generate(seed, fmt, cache).render()) == rec["script"], rec["name"]


def test_minimiser_drops_irrelevant_lines() -> None:
    """ddmin keeps exactly the lines the predicate needs."""
    script = aio_fuzz.Script("x", [], [["[a]", ""], ["[b]", ""]], [f"l{i}" for i in range(12)], True)

    def keep(s: aio_fuzz.Script) -> bool:
        return "l3" in s.body and "l7" in s.body and ["[b]", ""] in s.sections

    small = aio_fuzz.minimise(script, "raw", keep, lambda _m: None)
    assert small.body == ["l3", "l7"]
    assert small.sections == [["[b]", ""]]


def _param(rec: dict[str, object]) -> object:
    name = str(rec["name"])
    marks = [pytest.mark.xfail(reason=KNOWN[name], strict=True)] if name in KNOWN else []
    return pytest.param(rec, id=name, marks=marks)


@pytest.mark.oracle  # qemu-io replayed, qemu-img for image set-up and check
@pytest.mark.parametrize("record", [_param(r) for r in RECORDS])
def test_recorded_case(record: dict[str, object]) -> None:
    parts, diff = aio_fuzz.replay(record)
    if parts:
        pytest.fail(f"{record['name']}: {','.join(parts)} differ\n{diff}", pytrace=False)


def _fake_reference(tmp_path: Path, plan: str) -> Path:
    """A stand-in for qemu-io whose n-th run (1-based) follows ``plan[n - 1]``: ``q`` runs qio (so it
    gives qio's outcome), ``o`` runs qio and prints one more line (another outcome), ``h`` hangs."""
    count = tmp_path / "runs"
    count.write_text("0")
    prog = tmp_path / "fake-qemu-io"
    qio = f"env PYTHONPATH={Path(aio_fuzz.__file__).resolve().parent.parent} {sys.executable} -m qio"
    prog.write_text(
        "#!/bin/sh\n"
        f'n=$(( $(cat {count}) + 1 )); echo $n > {count}\n'
        f'step=$(echo {plan} | cut -c$n)\n'
        f'case $step in q) exec {qio} "$@";; o) {qio} "$@"; rc=$?; echo other; exit $rc;; '
        "*) exec sleep 60;; esac\n"
    )
    prog.chmod(0o755)
    return prog


@pytest.mark.oracle  # qemu-img makes the image
@pytest.mark.parametrize("plan, counts, mine, commonest",
                         [("qoqhq", [3, 1, 1], 3, True), ("oqoo", [3, 1], 1, False), ("ooh", [2, 1], 0, False)])
def test_spread_counts_qemu_io_outcomes(tmp_path: Path, plan: str, counts: list[int], mine: int,
                                        commonest: bool) -> None:
    """``--spread`` plays every qemu-io run (no early stop), counts its distinct outcomes (a hang is one)
    and how many of them are qio's: the measure of qemu-io's own noise around qio."""
    ro = aio_fuzz.RunOpts(qemu_runs=len(plan), timeout=3, reference=str(_fake_reference(tmp_path, plan)))
    sp = aio_fuzz.spread(4000, "raw", "writethrough", ro)
    assert (sp.name, sp.runs, sp.counts, sp.qio_runs, sp.qio_commonest) == (
        "raw-writethrough-4000", len(plan), counts, mine, commonest)
    assert (tmp_path / "runs").read_text().strip() == str(len(plan))


@pytest.mark.oracle  # qemu-img makes the image
def test_spread_under_load_counts_those_runs_apart(tmp_path: Path, busy_loop_pids: list[int]) -> None:
    """``--spread --load N``: the qemu-io runs are played again beside N busy loops, counted apart from
    the quiet ones, and the loops are gone afterwards."""
    ro = aio_fuzz.RunOpts(qemu_runs=3, timeout=3, reference=str(_fake_reference(tmp_path, "oooqoq")), load=1)
    sp = aio_fuzz.spread(4000, "raw", "writethrough", ro)
    assert (sp.counts, sp.qio_runs, sp.qio_commonest, sp.loaded, sp.qio_loaded) == ([3], 0, False, [2, 1], 2)
    assert "under load 2 outcome(s) [2, 1], qio's in 2" in sp.line()
    assert len(busy_loop_pids) == 1 and not Path(f"/proc/{busy_loop_pids[0]}").exists()


@pytest.mark.oracle  # qemu-img makes the image
def test_spread_under_load_after_a_hang(tmp_path: Path) -> None:
    """A hang in both batches: the loaded batch reuses the directories of the quiet batch's parallel runs."""
    ro = aio_fuzz.RunOpts(qemu_runs=2, timeout=2, reference=str(_fake_reference(tmp_path, "hqho")), load=1)
    sp = aio_fuzz.spread(4000, "raw", "writethrough", ro)
    assert (sp.counts, sp.qio_runs, sp.loaded, sp.qio_loaded) == ([1, 1], 1, [1, 1], 0)


@pytest.mark.parametrize("argv, message", [
    (["--load", "2", "--names", "raw-writethrough-1"], "--load only applies to --spread"),
    (["--spread", "--load", "-1", "--names", "raw-writethrough-1"], "cannot be negative"),
])
def test_load_is_checked(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        aio_fuzz.main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.oracle  # qemu-img makes the image
def test_recheck_rerecords_or_drops(tmp_path: Path) -> None:
    """``--recheck``: a case qemu-io reproduces in every run gets that result as its record (here qio's,
    so it is no longer a known failure); one it does not reproduce is dropped, with the reason kept."""
    names = ["raw-writethrough-4000", "raw-writethrough-4001"]
    stale = {"stdout": "stale", "stderr": "", "rc": 0, "files": {}, "check": ""}
    recs: list[dict[str, object]] = [
        {"name": n, "script": aio_fuzz.script_sha(aio_fuzz.generate(*aio_fuzz.parse_name(n)).render()), **stale}
        for n in names]
    path = tmp_path / "records.json"
    aio_fuzz.dump_records(path, 5.0, dict.fromkeys(names, "differs: stdout"), recs)
    ro = aio_fuzz.RunOpts(qemu_runs=3, timeout=3, reference=str(_fake_reference(tmp_path, "qqqqoq")))
    summary = aio_fuzz.recheck_records(path, names, ro, log=lambda _m: None)
    assert summary == "dropped 1, re-recorded, matches qio 1"
    records, known = aio_fuzz.load_records(path)
    assert ([r["name"] for r in records], known) == (names[:1], {})
    assert records[0]["stdout"] != "stale" and "wrote" in str(records[0]["stdout"])
    assert list(json.loads(path.read_text())["dropped"]) == names[1:]
