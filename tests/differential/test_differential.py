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
