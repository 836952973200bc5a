"""QEMU 7.2's own qemu-iotests, run with qemu-io replaced by qio (qemu-img stays the real one).

The runner script (shared with the project, beside the repository) fetches QEMU's Debian source
package on first use; the test is skipped where the script or qemu-img is missing.  qio is run
through a link named ``qemu-io``: like qemu-io, qio names its prompt after argv[0], and the iotests
filter only strips ``qemu-io> `` prompts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT.parent / "shared" / "tools" / "run-qemu-iotests.sh"
RAW_TESTS = ["001", "002", "003", "004", "005", "008", "077"]
# 026: the blkdebug inject-error matrix; 046: break/resume/wait_break races on qcow2.
QCOW2_TESTS = ["001", "002", "003", "004", "005", "008", "026", "046", "089"]


def _qio() -> str:
    """The qio console script of this interpreter (a pyenv shim on PATH would dispatch by link name)."""
    beside = Path(sys.executable).with_name("qio")
    return str(beside) if beside.exists() else shutil.which("qio") or "qio"


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("fmt", "tests"), [("raw", RAW_TESTS), ("qcow2", QCOW2_TESTS)])
def test_qemu_iotests(tmp_path: Path, fmt: str, tests: list[str]) -> None:
    if not RUNNER.exists() or shutil.which("qemu-img") is None:
        pytest.skip("qemu-iotests runner or qemu-img not available")
    link = tmp_path / "qemu-io"
    link.symlink_to(_qio())
    res = subprocess.run(["bash", str(RUNNER), str(link), fmt, *tests], capture_output=True, text=True,
                         timeout=1700)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"iotests {fmt}: {len(tests)} passed, 0 failed" in res.stdout
