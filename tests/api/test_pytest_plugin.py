"""qio's pytest plugin (qio/pytest_plugin.py), run by pytest's own ``pytester``: the fixtures make and open
images, a test that hangs fails with a clear message within its bounded time, a test that corrupts its
image fails the post-test check, and tests that do not use the fixtures are left alone."""

from __future__ import annotations

import os
import re

import pytest

from oracle import ROOT

pytest_plugins = ["pytester"]


def _plugin_args() -> list[str]:
    """``-p qio.pytest_plugin``: also right when the installed entry point of that name would load it (pytest
    then skips the entry point, the name being taken)."""
    return ["-p", "qio.pytest_plugin"]


@pytest.fixture(autouse=True)
def _tree_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pytest that pytester starts imports this tree's qio (and sees what else is on the path)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*_plugin_args(), "-p", "no:cacheprovider", *args, timeout=240)


FIXTURES = '''
import pytest, qio

def test_raw(qio_raw):
    assert qio_raw.path.name == "disk.raw" and qio_raw.path.stat().st_size == 1 << 20
    with qio_raw.open_sync() as img:
        img.write(0, b"x" * 512)
    assert qio_raw.read_bytes()[:512] == b"x" * 512

def test_raw_data(qio_images):
    img = qio_images.raw(size=4096, data=b"\\x01" * 16)
    assert img.read_bytes() == b"\\x01" * 16 + b"\\0" * 4080

async def test_async_qcow2_options(qio_images):
    q = qio_images.qcow2("small.qcow2", "64k", cluster_size=4096, lazy_refcounts=True)
    async with q.open() as img:
        info = await img.info()
        assert info.cluster_size == 4096 and ("lazy-refcounts", True) in info.specific
        await img.write(0, b"y" * 512)
        assert await img.length() == 65536

def test_chain(qio_images):
    base, mid, top = qio_images.chain(3, base_fmt="raw")
    assert (base.fmt, mid.fmt, top.fmt) == ("raw", "qcow2", "qcow2")
    assert top.backing is mid and mid.backing is base
    with base.open_sync() as img:
        img.write(0, b"b" * 512)
    with top.open_sync() as img:
        img.write(512, b"t" * 512)
        assert img.read(0, 1024) == b"b" * 512 + b"t" * 512

def test_chain_under_blkdebug(qio_images):
    base, top = qio_images.chain(2, cluster_size=4096)
    with base.open_sync() as img:
        img.write(0, b"b" * 512)
    stack = top.blkdebug([("inject-error", {"event": "read_aio", "errno": 5, "once": True})])
    assert stack.base is top and stack.backing is base
    with stack.open_sync() as img:
        assert img.read(0, 512) == b"b" * 512  # from the backing file: not through the blkdebug node
        img.write(512, b"t" * 512)  # allocates the cluster in the overlay (copying the backing's bytes)
        with pytest.raises(qio.QioError, match="Input/output error"):
            img.read(0, 512)
        assert img.read(0, 1024) == b"b" * 512 + b"t" * 512
        assert img.info().cluster_size == 4096
    assert stack.check().failed() is False

def test_raw_options(qio_images):
    img = qio_images.raw(size=8192, preallocation="full")
    assert img.path.stat().st_blocks * 512 >= 8192

async def test_blkdebug_rules(qio_images):
    stack = qio_images.qcow2().blkdebug([("inject-error", {"event": "write_aio", "errno": 28, "once": True})])
    async with stack.open() as img:
        with pytest.raises(qio.QioError, match="No space left on device"):
            await img.write(0, b"x" * 512)
        await img.write(0, b"x" * 512)

async def test_blkdebug_align(qio_images):
    stack = qio_images.raw().blkdebug(align=4096)
    async with stack.open() as img:
        bp = img.breakpoint("pwritev_rmw_after_head", "A")
        w = img.submit_write(0x1200, b"\\x0a" * 512)
        assert await bp.hit() is w
        bp.resume()
        await w

async def test_left_open(qio_images):
    """An image the test forgets to close is closed after it (its parked request resumed)."""
    img = await qio_images.qcow2("left.qcow2").blkdebug().open()
    img.breakpoint("write_aio", "A")
    img.submit_write(0, b"z" * 65536)

def test_errors(qio_images):
    with pytest.raises(qio.QioError, match="Cluster size must be a power of two"):
        qio_images.qcow2(cluster_size=1000)
    with pytest.raises(FileExistsError):
        qio_images.raw("a.raw"); qio_images.raw("a.raw")
'''


def test_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_fixtures=FIXTURES)
    result = run(pytester, "-v")
    result.assert_outcomes(passed=10)


HANGS = '''
import pytest

@pytest.mark.qio(timeout=1)
async def test_request_never_ends(qio_images):
    # a request on a real timer 1000 s away: it could finish, but not in the test's time
    img = await qio_images.open(options={"driver": "raw", "file": {"driver": "null-co", "latency-ns": 10**12}})
    w = img.submit_write(0, b"x" * 512)
    await w

@pytest.mark.qio(timeout=1)
def test_python_loop(qio_raw):
    while True:
        pass

def test_forgot_resume(qio_images):
    """Needs no timeout: the API sees that nothing can ever resume the request."""
    import qio
    with qio_images.raw().blkdebug().open_sync() as img:
        bp = img.breakpoint("write_aio", "A")
        w = img.submit_write(0, b"x" * 512)
        img.wait(w)
'''


def test_hangs_fail_in_bounded_time(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_hangs=HANGS)
    result = run(pytester, "--qio-timeout=30", "--durations=0", "--durations-min=0")
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines([
        "*_ test_request_never_ends _*",
        "qio: the test did not finish within 1 s",
        "  stopped at test_hangs.py:8 in test_request_never_ends: await w",
        "  image null-co* (raw): 1 request(s) in flight:",
        "    write offset 0 length 512 (running)",
        "  (limit: @pytest.mark.qio(timeout=...), --qio-timeout or the qio_timeout ini option)",
        "*closing null-co* (raw) failed: qio: closing the image did not finish within 1 s*",
        "*_ test_python_loop _*",
        "qio: the test did not finish within 1 s",
        "  stopped at test_hangs.py:12 in test_python_loop: while True:",
        "*_ test_forgot_resume _*",
        "*StandstillError: write request at offset 0 can never finish: request(s) 'A' suspended at blkdebug "
        "breakpoints; resume them first",
    ])
    # each test stopped at its 1 s limit (plus a 1 s closing grace), not at --qio-timeout's 30 s
    took = re.findall(r"([0-9.]+)s (?:call|teardown) +test_hangs.py::(\w+)", result.stdout.str())
    assert {name for _, name in took} == {"test_request_never_ends", "test_python_loop", "test_forgot_resume"}
    assert all(float(t) < 15 for t, _ in took), took


TIMEOUT_SOURCES = '''
import pytest

def test_ini(qio_raw):
    while True:
        pass

@pytest.mark.qio(timeout=0)
def test_marker_off(qio_raw, request):
    assert request.config.getini("qio_timeout") == "0.5"
'''


def test_timeout_from_ini_and_marker(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nqio_timeout = 0.5\n")
    pytester.makepyfile(test_sources=TIMEOUT_SOURCES)
    result = run(pytester)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["qio: the test did not finish within 0.5 s"])


PYTEST_TIMEOUT = '''
import time
import pytest
import qio.img.create, qio.block.qcow2  # at collection: pytest-timeout's limit also times fixture set-up

@pytest.mark.timeout(3)
@pytest.mark.qio(timeout=20)
def test_pytest_timeout_first(qio_raw):
    while True:
        pass

@pytest.mark.qio(timeout=20)
def test_quick(qio_raw):
    pass

@pytest.mark.timeout(3)
def test_after_without_qio():
    # pytest-timeout's own limit still works after a qio test restored its timer
    while True:
        pass
'''


def test_shares_the_timer_with_pytest_timeout(pytester: pytest.Pytester) -> None:
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(test_pt=PYTEST_TIMEOUT)
    result = run(pytester, "-p", "timeout", "--timeout-method=signal", "--durations=0", "--durations-min=0")
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*Timeout (>3.0s) from pytest-timeout*"])
    assert "qio: the test did not finish" not in result.stdout.str()
    # pytest-timeout's 3 s stopped the test, not qio's 20 s (the call's own duration: a loaded machine
    # may take long to start the inner pytest, which says nothing about the timers)
    took = re.search(r"([0-9.]+)s call +test_pt.py::test_pytest_timeout_first", result.stdout.str())
    assert took is not None and float(took.group(1)) < 15, result.stdout.str()


CHECKS = '''
import pytest

def corrupt(image):
    """Give the first L2 table (cluster 4) refcount 0: qemu-img check reports errors."""
    with image.open_sync() as img:
        img.write(0, b"x" * 512)
    with open(image, "r+b") as f:   # the refcount block of a fresh 1 MiB image is at 0x20000
        f.seek(0x20000 + 2 * 4)
        f.write(b"\\0\\0")

def leak(image):
    """A cluster allocated in the refcount table that nothing uses: a leak, no corruption."""
    corrupt_bytes = b"\\0\\x01"
    with open(image, "r+b") as f:
        f.seek(0x20000 + 2 * 9)
        f.write(corrupt_bytes)
    with open(image, "r+b") as f:  # the image must reach that cluster's offset
        f.truncate(10 * 65536)

def test_corrupted(qio_qcow2):
    corrupt(qio_qcow2)

@pytest.mark.qio(check=False)
def test_corrupted_unchecked(qio_qcow2):
    corrupt(qio_qcow2)

def test_corrupted_image_unchecked(qio_images):
    corrupt(qio_images.qcow2(check=False))

def test_leaked(qio_qcow2):
    leak(qio_qcow2)

@pytest.mark.qio(check="corruptions")
def test_leaked_allowed(qio_qcow2):
    leak(qio_qcow2)

@pytest.mark.qio(check="corruptions")
def test_check_now(qio_qcow2):
    assert qio_qcow2.check().failed() is False
    leak(qio_qcow2)
    report = qio_qcow2.check()
    assert (report.corruptions, report.leaks) == (0, 1) and report.failed() and not report.failed("corruptions")
    assert "1 leaked clusters were found on the image." in report.text

def test_failing_test_is_not_checked(qio_qcow2):
    corrupt(qio_qcow2)
    assert False, "the test's own failure"
'''


def test_post_test_check(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=CHECKS)
    result = run(pytester, "-v", "-p", "no:randomly")
    result.assert_outcomes(passed=4, failed=3)
    result.stdout.fnmatch_lines([
        "*test_corrupted FAILED*",
        "*test_corrupted_unchecked PASSED*",
        "*test_corrupted_image_unchecked PASSED*",
        "*test_leaked FAILED*",
        "*test_leaked_allowed PASSED*",
        "*test_check_now PASSED*",
        "*test_failing_test_is_not_checked FAILED*",
    ])
    result.stdout.fnmatch_lines([
        "*_ test_corrupted _*",
        "qio: the images failed the post-test check:",
        "qio-img check disk.qcow2: * corruptions, 0 leaked clusters, 0 check errors",
        "    * errors were found on the image.",
        "*_ test_leaked _*",
        "qio-img check disk.qcow2: 0 corruptions, 1 leaked clusters, 0 check errors",
        "*_ test_failing_test_is_not_checked _*",
        "*AssertionError: the test's own failure*",
    ])
    # the report's own first line: the short summary repeats the message in full when CI is set
    assert result.stdout.lines.count("qio: the images failed the post-test check:") == 2


UNRELATED = '''
import pytest

async def test_async_without_qio():
    pass

@pytest.mark.asyncio
async def test_owned_by_pytest_asyncio(qio_raw):
    pass

def test_plain(tmp_path):
    pass
'''


def test_other_tests_untouched(pytester: pytest.Pytester) -> None:
    """Tests that use none of the fixtures: no watchdog, no check, and async tests are not taken over."""
    pytester.makepyfile(test_other=UNRELATED)
    pytester.makeini("[pytest]\nmarkers = asyncio: pytest-asyncio's (absent here)\n")
    result = run(pytester)
    result.assert_outcomes(passed=1, failed=2)  # the asyncio-marked test is left to pytest-asyncio
    result.stdout.fnmatch_lines(["*async def functions are not natively supported*"])


def test_not_imported_by_the_cli() -> None:
    """The qio command never imports the plugin (nor pytest): start-up stays small."""
    import subprocess
    import sys

    from oracle import env_with_root

    code = ("import sys; from qio.cli import main; rc = main(['qio', '-c', 'help', '-c', 'quit']); "
            "print('qio.pytest_plugin' in sys.modules, 'pytest' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env_with_root())
    assert out.stderr.strip().endswith("False False"), out.stderr
