"""The prompt tests' pseudo-terminal: ``term(*argv)`` starts qio at a terminal and waits for its prompt;
every terminal started is closed after the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from pty_screen import Term


@pytest.fixture
def term(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Term] = []

    def make(*args: str, **kw: object) -> Term:
        t = Term(list(args), tmp_path, **kw)  # type: ignore[arg-type]
        made.append(t)
        t.wait(lambda t: t.prompt_line().startswith("qio>"))
        return t

    yield make
    for t in made:
        t.close()

