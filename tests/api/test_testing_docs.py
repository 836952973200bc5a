"""docs/testing.md runs as written: its test files (the race tutorial as pytest tests, the Hypothesis state
machine) are collected from the page's code blocks and run by pytester with qio's plugin; all must pass.
A block whose first line is ``# test_NAME.py`` starts a file, ``# test_NAME.py, continued`` adds to it."""

from __future__ import annotations

import os
import re

import pytest

from oracle import ROOT

pytest_plugins = ["pytester"]

DOC = ROOT / "docs" / "testing.md"


def doc_files() -> dict[str, str]:
    files: dict[str, str] = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S):
        first, _, body = block.partition("\n")
        m = re.fullmatch(r"# (test_\w+)\.py(, continued)?", first)
        if m is None:
            continue
        name, continued = m[1], m[2]
        assert (name in files) == bool(continued), f"docs/testing.md: {first!r} out of order"
        files[name] = files.get(name, "") + ("\n\n" if continued else "") + body
    return files


def count_tests(files: dict[str, str]) -> int:
    return sum(len(re.findall(r"^(?:async )?def test_", src, re.M)) for src in files.values())


@pytest.fixture(autouse=True)
def _tree_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a subprocess with qio's plugin (``-p``, harmless when the installed entry point has it too)."""
    return pytester.runpytest_subprocess("-p", "qio.pytest_plugin", "-p", "no:cacheprovider", *args, timeout=300)


def test_doc_tests_pass(pytester: pytest.Pytester) -> None:
    files = doc_files()
    assert set(files) == {"test_first", "test_race", "test_rmw", "test_model"}
    pytester.makepyfile(**files)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=count_tests(files))
    assert count_tests(files) == 11


def test_state_machine_finds_a_wrong_model(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state machine can fail: with a model that zeroes the whole discarded range (not only the
    whole clusters in it), Hypothesis finds a read that disagrees (without shrinking, to stay fast; with a
    fixed seed, so that the check does not depend on luck)."""
    src = doc_files()["test_model"]
    right = "start, end = -(-off // CLUSTER) * CLUSTER, (off + n) // CLUSTER * CLUSTER"
    assert right in src and "deadline=None" in src
    wrong = src.replace(right, "start, end = off, off + n").replace(
        "deadline=None", "deadline=None, phases=[Phase.generate], database=None, derandomize=True")
    wrong = wrong.replace("from hypothesis import settings", "from hypothesis import Phase, settings")
    pytester.makepyfile(test_model=wrong)
    monkeypatch.setenv("CI", "true")  # pytest then shows whole diffs, which must stay short
    result = run(pytester, "-k", "not chain")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "AssertionError: assert 'offset 0x" in out and "state.discard(" in out
