"""Differential tests: every corpus script must behave identically under qemu-io and qio.

One test per ``tests/corpus/**/*.qio`` file (see ``tests/difftest.py`` for the format and for
what is compared).  Needs the real ``qemu-io`` (``QEMU_IO_PROG`` or on PATH); skipped otherwise.
Run a subset with e.g. ``pytest -m oracle -k pipe`` or use ``python tests/difftest.py FILE...``
for readable diffs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import difftest

CORPUS = difftest.corpus_files()


def _param(path: Path) -> object:
    case = difftest.parse_case(path)
    marks = [pytest.mark.xfail(reason=case.xfail, strict=True)] if case.xfail else []
    return pytest.param(path, id=str(path.relative_to(difftest.CORPUS_DIR)), marks=marks)


@pytest.mark.oracle("qemu-io")
@pytest.mark.parametrize("path", [_param(p) for p in CORPUS])
def test_differential(path: Path) -> None:
    result = difftest.run_case(path)
    if not result.ok:
        pytest.fail(result.report(), pytrace=False)


def test_corpus_is_well_formed() -> None:
    """Cheap check (no qemu-io needed): every corpus file parses."""
    assert len(CORPUS) >= 100
    for path in CORPUS:
        case = difftest.parse_case(path)
        assert case.comments, path


def test_text_directive(tmp_path: Path) -> None:
    """``#! text NAME`` + ``#| LINE`` header lines create a text file in the run directory."""
    case_file = tmp_path / "t.qio"
    case_file.write_text(
        "# text files\n"
        "#! text a.cfg\n"
        "#| [inject-error]\n"
        "#|   # indented\n"
        "#|\n"
        "#|    \n"
        '#| $TABevent = "read_aio"\n'
        "#! text empty.cfg\n"
        "#! text b.cfg no-final-newline\n"
        "#| x\n"
        "#| y\n"
        "# a comment ends the block\n"
        "length\n"
    )
    case = difftest.parse_case(case_file)
    assert [t.name for t in case.texts] == ["a.cfg", "empty.cfg", "b.cfg"]
    assert case.body == ["length"]
    run_dir = tmp_path / "d"
    difftest._populate(case, run_dir)
    assert (run_dir / "a.cfg").read_text() == '[inject-error]\n  # indented\n\n   \n\tevent = "read_aio"\n'
    assert (run_dir / "empty.cfg").read_bytes() == b""
    assert (run_dir / "b.cfg").read_text() == "x\ny"

    for bad in ("# c\n#| orphan\n", "# c\n#! text a\n# c\n#| late\n", "# c\n#! text a\n#|x\n", "# c\n#! text a/b\n"):
        case_file.write_text(bad + "length\n")
        with pytest.raises(difftest.CaseError):
            difftest.parse_case(case_file)


def _flaky_reference(tmp_path: Path, right_from: int) -> tuple[Path, Path]:
    """A stand-in for qemu-io that prints qio's answer from its ``right_from``-th run on (0: never),
    and a file that counts its runs."""
    count = tmp_path / "runs"
    count.write_text("0")
    prog = tmp_path / "fake-qemu-io"
    prog.write_text(
        "#!/bin/sh\n"
        f'n=$(( $(cat {count}) + 1 )); echo $n > {count}\n'
        f'if [ {right_from} -ne 0 ] && [ $n -ge {right_from} ]; then :; '
        'else echo "completed in the other order"; fi\n'
    )
    prog.chmod(0o755)
    return prog, count


@pytest.mark.parametrize("right_from, ok, runs", [(2, True, 2), (5, True, 5), (6, False, 5), (0, False, 5)])
def test_reruns_of_an_unstable_reference(tmp_path: Path, right_from: int, ok: bool, runs: int) -> None:
    """A difference counts only when no qemu-io run (the first and up to RERUNS more) gives qio's result;
    the report shows the first run's difference."""
    case_file = tmp_path / "t.qio"
    case_file.write_text("# no image: quit prints nothing\n#! noimage\nquit\n")
    prog, count = _flaky_reference(tmp_path, right_from)
    result = difftest.run_case(case_file, reference=str(prog))
    assert difftest.RERUNS == 4
    assert (result.ok, int(count.read_text())) == (ok, runs)
    if not ok:
        assert "-completed in the other order" in result.report()


def test_determinism_under_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str], busy_loop_pids: list[int]) -> None:
    """``--determinism N --load L``: the qemu-io runs are played beside L busy loops, gone afterwards."""
    case_file = tmp_path / "t.qio"
    case_file.write_text("# no image: quit prints nothing\n#! noimage\nquit\n")
    prog, count = _flaky_reference(tmp_path, 2)
    monkeypatch.setenv("QEMU_IO_PROG", str(prog))
    assert difftest.main(["--determinism", "3", "--load", "1", str(case_file)]) == 1
    assert int(count.read_text()) == 3
    assert "FAIL" in capsys.readouterr().out
    assert len(busy_loop_pids) == 1 and not Path(f"/proc/{busy_loop_pids[0]}").exists()


@pytest.mark.parametrize("argv, message", [
    (["--load", "2"], "--load needs --determinism"),
    (["--determinism", "2", "--load", "-1"], "--load must be 0 or more"),
])
def test_load_is_checked(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        difftest.main(argv)
    assert message in capsys.readouterr().err
