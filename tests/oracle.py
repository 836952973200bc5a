"""The oracle side of the tests: where the real QEMU 7.2 tools are, how to run them, and how to run this
tree's qio beside them.  One copy for every test directory and for the hand-run tools (``difftest.py``,
``aio_fuzz.py``); pytest finds it through ``pythonpath = ["tests"]`` in pyproject.toml, a script run as
``python tests/X.py`` through its own directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose qio is under test
QEMU_IO = os.environ.get("QEMU_IO_PROG") or shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
QEMU_NBD = shutil.which("qemu-nbd")
TOOLS = {"qemu-io": QEMU_IO, "qemu-img": QEMU_IMG, "qemu-nbd": QEMU_NBD}

# ``python -c`` program running this tree's qio-img under qemu-img's name (its messages carry it).
RUN_QIO_IMG = "import sys; from qio.img.cli import main; sys.exit(main(['qemu-img'] + sys.argv[1:]))"


def missing(*tools: str) -> list[str]:
    """The named tools (default qemu-io and qemu-img) that are not installed."""
    return [t for t in tools or ("qemu-io", "qemu-img") if not TOOLS.get(t)]


def qio_wrapper(path: Path, root: Path = ROOT, bytecode: bool = True) -> Path:
    """An executable at ``path`` running ``root``'s qio under the current interpreter; name it ``qemu-io``
    and qio's prompt and messages carry that name.  The installed ``qio`` may be another tree's, so the
    wrapper puts ``root`` first on its own path.  ``bytecode=False``: no ``__pycache__`` written into
    ``root`` (another checkout)."""
    nocache = "" if bytecode else "sys.dont_write_bytecode = True\n"
    path.write_text(f"#!{sys.executable}\nimport sys\n{nocache}sys.path.insert(0, {str(root)!r})\n"
                    "from qio.cli import main\nraise SystemExit(main())\n")
    path.chmod(0o755)
    return path


def env_with_root() -> dict[str, str]:
    """The environment for a child that imports this tree's qio, whatever its cwd."""
    return dict(os.environ, PYTHONPATH=str(ROOT))


def sh(cmd: list[str], cwd: Path | None = None, check: bool = True,
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a command with this tree's qio importable; text output (surrogateescape)."""
    return subprocess.run(cmd, cwd=cwd, check=check, capture_output=True, text=True, errors="surrogateescape",
                          timeout=timeout, env=env_with_root())


def run(argv: list[str], cwd: Path, timeout: float = 60) -> tuple[str, str, int]:
    """Run a program with this tree's qio importable: (stdout, stderr, exit status)."""
    p = sh(argv, cwd=cwd, check=False, timeout=timeout)
    return p.stdout, p.stderr, p.returncode


def qio_img_run(args: list[str], cwd: Path) -> tuple[str, str, int]:
    """qio-img (named qemu-img, so that messages compare) run with ``args`` in ``cwd``: (stdout, stderr, status)."""
    return run([sys.executable, "-c", RUN_QIO_IMG, *args], cwd)


def qemu_img_run(args: list[str], cwd: Path) -> tuple[str, str, int]:
    """Real qemu-img run with ``args`` in ``cwd``: (stdout, stderr, status), to compare with :func:`qio_img_run`."""
    assert QEMU_IMG is not None
    return run([QEMU_IMG, *args], cwd)


def qemu_img(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real qemu-img."""
    assert QEMU_IMG is not None
    return sh([QEMU_IMG, *args], cwd=cwd, check=check)


def qemu_io(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real qemu-io."""
    assert QEMU_IO is not None
    return sh([QEMU_IO, *args], cwd=cwd, check=check)


def qio_img(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """This tree's qio-img under the program name qemu-img."""
    return sh([sys.executable, "-c", RUN_QIO_IMG, *args], cwd=cwd, check=check)
