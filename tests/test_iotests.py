"""QEMU 7.2's own qemu-iotests, run with qemu-io replaced by qio (qemu-img stays the real one).

The runner script (shared with the project, beside the repository) fetches QEMU's Debian source
package on first use; the test is skipped where the script or qemu-img is missing.
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


def _qio() -> str:
    found = shutil.which("qio")
    if found:
        return found
    return str(Path(sys.executable).with_name("qio"))


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_qemu_iotests_raw() -> None:
    if not RUNNER.exists() or shutil.which("qemu-img") is None:
        pytest.skip("qemu-iotests runner or qemu-img not available")
    res = subprocess.run(["bash", str(RUNNER), _qio(), "raw", *RAW_TESTS], capture_output=True, text=True,
                         timeout=1700)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"iotests raw: {len(RAW_TESTS)} passed, 0 failed" in res.stdout
