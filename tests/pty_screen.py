"""A terminal for the prompt tests: qio runs on a real pseudo-terminal (pexpect) and its output is
rendered by a VT100 emulator (pyte), so tests assert on the screen a person would see."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pyte

ROOT = Path(__file__).resolve().parent.parent


class Term:
    """qio at a terminal of ``rows`` x ``cols``; ``wait`` reads output until the screen satisfies a
    condition (no sleeps: every wait is for something to appear)."""

    def __init__(self, args: list[str], tmp: Path, *, rows: int = 24, cols: int = 100,
                 env: dict[str, str] | None = None, timeout: float = 20, cpr: bool = True) -> None:
        full = dict(os.environ, PYTHONPATH=str(ROOT), XDG_STATE_HOME=str(tmp / "state"), TERM="xterm",
                    LC_ALL="C.UTF-8")
        full.pop("NO_COLOR", None)
        full.update(env or {})
        self.screen = pyte.Screen(cols, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self.timeout = timeout
        self.child = pexpect.spawn(sys.executable, ["-m", "qio", *args], env=full, cwd=str(tmp),
                                   dimensions=(rows, cols), timeout=timeout)
        if cpr:  # answer cursor-position requests as a real terminal does
            self.screen.write_process_input = lambda data: self.child.send(data)  # type: ignore[method-assign]

    def _pump(self, wait: float) -> bool:
        try:
            data = self.child.read_nonblocking(65536, timeout=wait)
        except pexpect.TIMEOUT:
            return False
        except pexpect.EOF:
            raise
        self.raw += data
        self.stream.feed(data)
        return True

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def lines(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def cursor_line(self) -> str:
        return self.screen.display[self.screen.cursor.y].rstrip()

    def wait(self, cond: Callable[[Term], bool] | str, timeout: float | None = None) -> None:
        """Read output until ``cond`` holds (a string: appears on the screen)."""
        check = (lambda t: cond in t.text()) if isinstance(cond, str) else cond
        deadline = time.monotonic() + (timeout or self.timeout)
        while not check(self):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {cond!r}; screen:\n{self.text()}")
            try:
                self._pump(min(left, 0.5))
            except pexpect.EOF:
                if check(self):
                    return
                raise AssertionError(f"qio exited while waiting for {cond!r}; screen:\n{self.text()}") from None

    def settle(self) -> None:
        """Drain what qio has written so far (output that is already on its way)."""
        while self._pump(0.05):
            pass

    def prompt_line(self, prefix: str = "qio>") -> str:
        """The last screen line starting with the prompt."""
        for line in reversed(self.lines()):
            if line.startswith(prefix):
                return line
        return ""

    def send(self, keys: str) -> None:
        self.child.send(keys)

    def sendline(self, line: str) -> None:
        self.child.send(line + "\r")

    def close(self) -> int | None:
        if self.child.closed:
            return self.child.exitstatus
        try:
            self.child.sendeof()
            self.child.expect(pexpect.EOF, timeout=10)
        except (pexpect.EOF, pexpect.TIMEOUT, OSError):
            pass
        self.child.close(force=True)
        return self.child.exitstatus


def ready(t: Term, n: int) -> None:
    """Wait for the n-th prompt line (a command ended and the next prompt is up)."""
    t.wait(lambda t: sum(1 for line in t.lines() if line.startswith("qio>")) >= n)
