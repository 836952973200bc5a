"""Helpers shared by the in-process tests: a Shell whose stdout/stderr go to temporary files."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from qio.block.modes import OpenFlags
from qio.output import Output
from qio.shell import Shell


class InProc:
    """A Shell with captured streams; ``run`` executes lines and returns (return values, stdout, stderr)
    produced by those lines (stdout flushed after the last one)."""

    def __init__(self, tmp_path: Path, prgname: str = "qio", image: Path | None = None) -> None:
        self._out_path = tmp_path / f"{prgname}.stdout"
        self._err_path = tmp_path / f"{prgname}.stderr"
        self._fo = os.open(self._out_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._fe = os.open(self._err_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.out = Output(prgname, self._fo, self._fe)
        self.sh = Shell(self.out, prgname)
        self._seen_out = self._seen_err = 0
        self.loop = asyncio.new_event_loop()  # one loop for the Shell's whole life (its AIO state binds to it)
        if image is not None:
            assert not self.sh.session.open_image(str(image), OpenFlags(), {"driver": "raw"})

    def run(self, *lines: str) -> tuple[list[int], str, str]:
        async def go() -> list[int]:
            return [await self.sh.execute(line) for line in lines]

        rets = self.loop.run_until_complete(go())
        self.out.flush()
        out = self._out_path.read_bytes()[self._seen_out:]
        err = self._err_path.read_bytes()[self._seen_err:]
        self._seen_out += len(out)
        self._seen_err += len(err)
        return rets, out.decode("utf-8", "surrogateescape"), err.decode("utf-8", "surrogateescape")

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.sh.session.drain())
            self.loop.run_until_complete(self.sh.session.close_image())
        finally:
            self.loop.close()
            os.close(self._fo)
            os.close(self._fe)
