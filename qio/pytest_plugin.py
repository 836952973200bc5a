"""qio's pytest plugin: images of every format in ``tmp_path``, opened through the API, checked afterwards.

Installed with qio (the ``pytest11`` entry point ``qio.pytest_plugin``; without the installed entry point,
``-p qio.pytest_plugin`` or ``pytest_plugins = ["qio.pytest_plugin"]`` in a conftest).  A test that asks for
``qio_images`` (or ``qio_raw``/``qio_qcow2``) gets:

- a factory of images: raw, qcow2 with any ``qio-img create -o`` option, backing chains and blkdebug stacks
  with rules, made by qio's own ``qio-img create`` in the test's ``tmp_path``;
- images opened through :mod:`qio.api` (``img.open()``/``img.open_sync()``) that are closed after the test
  even if it forgot to (parked requests resumed, as the shell does);
- qio's own checker (``qio-img check``) run on every qcow2 image it made once the test passed: corruption
  or leaked clusters fail the test;
- a watchdog: a test still running after ``qio_timeout`` seconds (60; the ini option ``qio_timeout``,
  ``--qio-timeout`` or ``@pytest.mark.qio(timeout=...)``) fails with what it was waiting for, instead of
  hanging (a request that can never finish fails at once already: the API raises ``StandstillError``);
- ``async def`` tests run on a fresh event loop (unless pytest-asyncio, anyio or trio own them).

Nothing here is imported by the ``qio`` command.  Guide: docs/testing.md.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import pytest

if TYPE_CHECKING:
    from qio.api import Image, SyncImage

__all__ = ["CheckReport", "ImageFile", "QioImages", "QioTimeout", "qio_images", "qio_qcow2", "qio_raw"]

T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0
#: How long closing the images a test left open may take, at most (after a timeout, say).
CLOSE_GRACE = 5.0

_IMAGES = pytest.StashKey["QioImages"]()
_ASYNC_MARKERS = ("asyncio", "anyio", "trio")


# -- configuration ------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("qio_timeout", f"seconds a test using qio's fixtures may run (0: no limit; {DEFAULT_TIMEOUT:g})",
                  default=str(DEFAULT_TIMEOUT))
    parser.getgroup("qio").addoption("--qio-timeout", type=float, default=None, metavar="SECONDS",
                                     help="seconds a test using qio's fixtures may run before it fails "
                                          "(overrides the qio_timeout ini option; 0: no limit)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qio(timeout=None, check=True): qio fixtures' settings for this test: "
                                       "the watchdog's seconds, and the post-test image check (True: "
                                       "corruption and leaks fail, 'corruptions': only corruption, False: off)")


def _settings(item: pytest.Item) -> tuple[float, bool | str]:
    """The test's watchdog seconds and check mode: the marker, else the command line, else the ini file."""
    timeout: float | None = None
    check: bool | str = True
    for mark in reversed(list(item.iter_markers("qio"))):  # the closest marker wins
        timeout = mark.kwargs.get("timeout", timeout)
        check = mark.kwargs.get("check", check)
    if timeout is None:
        timeout = item.config.getoption("qio_timeout", None)
    if timeout is None:
        timeout = float(item.config.getini("qio_timeout") or 0)
    return float(timeout), check


# -- results ------------------------------------------------------------------------------------------
class CheckReport(NamedTuple):
    """qio's check of one image (``qio-img check``): the counts and the text ``qio-img check`` prints."""

    path: Path
    corruptions: int
    leaks: int
    check_errors: int
    text: str

    def failed(self, mode: bool | str = True) -> bool:
        """Whether the report fails a test under ``mode`` (True: corruption or leaks; ``"corruptions"``)."""
        if not mode:
            return False
        bad = self.corruptions or self.check_errors
        return bool(bad or (mode is True and self.leaks))


def _run(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine of qio's block layer to its end, from sync code or from inside a running loop
    (then on a helper thread while this one waits: nothing else runs meanwhile)."""
    from qio.aio import AIO, AioContext

    saved = AioContext._current, AIO.printf
    try:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(factory())
        box: list[Any] = []

        def thread() -> None:
            try:
                box.append((True, asyncio.run(factory())))
            except BaseException as e:  # handed to the waiting thread
                box.append((False, e))

        t = threading.Thread(target=thread, name="qio-fixture")
        t.start()
        t.join()
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]
    finally:
        AioContext._current, AIO.printf = saved  # type: ignore[method-assign]


async def _check(path: Path, fmt: str) -> CheckReport:
    from qio.img.check import check_file, human

    found = await check_file(str(path), fmt)
    if found.open_error is not None:
        return CheckReport(path, 1, 0, 0, f"could not open the image: {found.open_error}\n")
    if found.result is None:
        return CheckReport(path, 0, 0, 1, f"check failed: {found.check_error}\n")
    res = found.result
    said = "".join(w if w.endswith("\n") else w + "\n" for w in found.warnings)
    return CheckReport(path, res.corruptions, res.leaks, res.check_errors, said + human(res))


def _opt_text(options: Mapping[str, Any]) -> str:
    """``-o`` text of ``qio-img create``: ``cluster_size=4096,lazy_refcounts=on`` (commas doubled)."""
    def value(v: Any) -> str:
        return ("on" if v else "off") if isinstance(v, bool) else str(v).replace(",", ",,")

    return ",".join(f"{k}={value(v)}" for k, v in options.items())


def _config_text(rules: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """A blkdebug configuration file of ``(section, keys)`` pairs (docs/blkdebug.md)."""
    lines = []
    for section, keys in rules:
        lines.append(f"[{section}]")
        for k, v in keys.items():
            text = ("on" if v else "off") if isinstance(v, bool) else str(v)
            lines.append(f'{k} = "{text}"')
        lines.append("")
    return "\n".join(lines)


# -- images -------------------------------------------------------------------------------------------
class ImageFile:
    """An image the fixtures made in ``tmp_path``: its ``path`` and ``fmt``, and how to open it.

    ``filename``/``options`` are what :func:`qio.open` takes for it (a blkdebug stack is options
    only).  Images opened with :meth:`open`/:meth:`open_sync` are closed after the test."""

    def __init__(self, images: QioImages, path: Path, fmt: str, *, filename: str | None = None,
                 options: dict[str, Any] | None = None, backing: ImageFile | None = None,
                 base: ImageFile | None = None) -> None:
        self.images = images
        self.path = path
        self.fmt = fmt
        self.filename = filename
        self.options = options
        #: The backing image (a qcow2 made with ``backing=``).
        self.backing = backing
        #: For a blkdebug stack: the image below it (its file is what the post-test check reads).
        self.base = base

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        stack = " under blkdebug" if self.base is not None else ""
        return f"<ImageFile {self.fmt} {self.path.name}{stack}>"

    def _open_args(self) -> dict[str, Any]:
        if self.options is not None:
            return {"filename": None, "fmt": None, "options": self.options}
        return {"filename": self.filename or str(self.path), "fmt": self.fmt, "options": None}

    def open(self, *, read_only: bool = False, cache: str | None = None, snapshot: bool = False,
             force_share: bool = False) -> _TrackedOpening:
        """:func:`qio.open` of this image: ``async with img.open() as image:`` or ``await img.open()``."""
        return self.images.open(**self._open_args(), read_only=read_only, cache=cache, snapshot=snapshot,
                                force_share=force_share)

    def open_sync(self, *, read_only: bool = False, cache: str | None = None, snapshot: bool = False,
                  force_share: bool = False) -> SyncImage:
        """:func:`qio.open_sync` of this image (for tests without an event loop)."""
        return self.images.open_sync(**self._open_args(), read_only=read_only, cache=cache, snapshot=snapshot,
                                     force_share=force_share)

    def blkdebug(self, rules: Sequence[tuple[str, Mapping[str, Any]]] = (), *, config: str | None = None,
                 align: int | None = None, **options: Any) -> ImageFile:
        """This image with a blkdebug node under its format: :meth:`QioImages.blkdebug`."""
        return self.images.blkdebug(self, rules, config=config, align=align, **options)

    def check(self) -> CheckReport:
        """qio's checker on the image's file now (qcow2; other formats have nothing to check)."""
        target = self.base or self
        if target.fmt != "qcow2":
            return CheckReport(target.path, 0, 0, 0, "")
        return _run(lambda: _check(target.path, target.fmt))

    def read_bytes(self) -> bytes:
        """The image file's bytes."""
        return self.path.read_bytes()


class _TrackedOpening:
    """:func:`qio.open`'s result whose image the fixtures close after the test."""

    def __init__(self, images: QioImages, opening: Any) -> None:
        self._images = images
        self._opening = opening
        self._img: Image | None = None

    async def _open(self) -> Image:
        img: Image = await self._opening
        self._images._track(img)
        return img

    def __await__(self) -> Generator[Any, None, Image]:
        return self._open().__await__()

    async def __aenter__(self) -> Image:
        self._img = await self._open()
        return self._img

    async def __aexit__(self, t: type[BaseException] | None, v: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._img is not None:
            await self._img.close()


class QioImages:
    """The ``qio_images`` fixture: makes images in ``tmp_path`` with qio's ``qio-img create`` and opens
    them through the API; after the test, closes what is still open and checks every qcow2 image it
    made (see the module's docstring)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        #: Every image made, in order (the post-test check covers those with ``check`` set).
        self.made: list[ImageFile] = []
        self._checked: list[tuple[ImageFile, bool | str | None]] = []
        self._opened: list[Image] = []
        self._sync: list[SyncImage] = []
        self._counter = itertools.count(1)

    def _path(self, name: str | None, ext: str) -> Path:
        if name is None:
            name = f"disk{next(self._counter)}.{ext}"
        path = self.tmp_path / name
        if path.exists():
            raise FileExistsError(f"{path} exists already")
        return path

    def _create(self, path: Path, fmt: str, size: int | str | None, options: Mapping[str, Any],
                backing: ImageFile | str | None, backing_fmt: str | None) -> None:
        from qio.api import QioError
        from qio.block.errors import QemuError
        from qio.img.common import Ctx
        from qio.img.create import img_create_file
        from qio.numbers import qemu_strtosz
        from qio.output import Output

        if isinstance(size, str):
            err, value, _ = qemu_strtosz(size)
            if err:
                raise QioError(-err if err < 0 else err, f"Invalid image size specified: {size}")
            size = value
        base = None
        if backing is not None:
            base = str(backing.path if isinstance(backing, ImageFile) else backing)
            if backing_fmt is None and isinstance(backing, ImageFile):
                backing_fmt = backing.fmt
        out = Output("qio-img")
        said: list[bytes] = []
        out.redirect(said.append, said.append)
        text = _opt_text(options) if options else None
        try:
            _run(lambda: img_create_file(Ctx(out), str(path), fmt, base, backing_fmt, text,
                                         -1 if size is None else size, False, True))
        except QemuError as e:
            raise QioError(e.errno, f"{path.name}: {str(e).partition(chr(10))[0]}") from None

    def _made(self, img: ImageFile, check: bool | str | None) -> ImageFile:
        self.made.append(img)
        self._checked.append((img, check))
        return img

    def raw(self, name: str | None = None, size: int | str = "1M", *, data: bytes | None = None,
            check: bool | str | None = None, **options: Any) -> ImageFile:
        """A raw image (``qio-img create -f raw NAME SIZE``, ``options`` as ``-o``), optionally holding
        ``data`` from offset 0."""
        path = self._path(name, "raw")
        self._create(path, "raw", size, options, None, None)
        if data is not None:
            with path.open("r+b") as f:
                f.write(data)
        return self._made(ImageFile(self, path, "raw"), check)

    def qcow2(self, name: str | None = None, size: int | str | None = "1M", *,
              backing: ImageFile | str | None = None, backing_fmt: str | None = None,
              check: bool | str | None = None, **options: Any) -> ImageFile:
        """A qcow2 image: ``qio-img create -f qcow2 [-b BACKING -F FMT] -o OPTIONS NAME SIZE``.

        ``options`` are qemu-img's creation options (``cluster_size=4096``, ``lazy_refcounts=True``,
        ``compat="0.10"``, ``refcount_bits=1``, ...).  With ``backing`` and ``size=None`` the size is the
        backing image's.  ``check`` overrides the test's post-test check mode for this image."""
        path = self._path(name, "qcow2")
        self._create(path, "qcow2", size, options, backing, backing_fmt)
        back = backing if isinstance(backing, ImageFile) else None
        return self._made(ImageFile(self, path, "qcow2", backing=back), check)

    def chain(self, length: int, size: int | str = "1M", *, base_fmt: str = "qcow2",
              **options: Any) -> list[ImageFile]:
        """A backing chain of ``length`` images, base first: ``base_fmt`` at the bottom, qcow2 overlays
        on top (each made with ``backing=`` the previous one)."""
        if length < 1:
            raise ValueError("a chain has at least one image")
        first = self.raw(size=size) if base_fmt == "raw" else self.qcow2(size=size, **options)
        images = [first]
        for _ in range(length - 1):
            images.append(self.qcow2(size=None, backing=images[-1], **options))
        return images

    def blkdebug(self, image: ImageFile, rules: Sequence[tuple[str, Mapping[str, Any]]] = (), *,
                 config: str | None = None, align: int | None = None, **options: Any) -> ImageFile:
        """``image`` with a blkdebug node between its format and its file (``blkdebug:CFG:IMAGE``).

        ``rules`` are configuration sections, ``[("inject-error", {"event": "write_aio", "errno": 5})]``
        (or ``config`` as the file's text); ``align`` is blkdebug's request alignment (for
        read-modify-write); more ``options`` go to the blkdebug node (``{"set-state.0.event": ...}``)."""
        base = image.base or image
        node: dict[str, Any] = {"driver": "blkdebug", "image": {"driver": "file", "filename": str(base.path)}}
        if rules or config is not None:
            cfg = self._path(None, "cfg")
            cfg.write_text((config or "") + _config_text(rules))
            node["config"] = str(cfg)
        if align is not None:
            node["align"] = align
        node.update(options)
        return ImageFile(self, base.path, base.fmt, options={"driver": base.fmt, "file": node},
                         backing=base.backing, base=base)

    def open(self, filename: str | None = None, fmt: str | None = None,
             options: Mapping[str, Any] | str | None = None, read_only: bool = False, cache: str | None = None,
             *, snapshot: bool = False, force_share: bool = False) -> _TrackedOpening:
        """:func:`qio.open` (the same arguments) whose image is closed after the test if still open, and
        watched by the timeout's report."""
        import qio.api

        return _TrackedOpening(self, qio.api.open(filename, fmt, options, read_only, cache, snapshot=snapshot,
                                                  force_share=force_share))

    def open_sync(self, filename: str | None = None, fmt: str | None = None,
                  options: Mapping[str, Any] | str | None = None, read_only: bool = False,
                  cache: str | None = None, *, snapshot: bool = False, force_share: bool = False) -> SyncImage:
        """:func:`qio.open_sync`, closed after the test if still open."""
        import qio.api

        img = qio.api.open_sync(filename, fmt, options, read_only, cache, snapshot=snapshot, force_share=force_share)
        self._track(img.image, img)
        return img

    def _track(self, img: Image, sync: SyncImage | None = None) -> None:
        """Remember an open image for the clean-up (and forget closed ones: a Hypothesis test opens many)."""
        self._opened = [i for i in self._opened if not i.closed]
        self._sync = [s for s in self._sync if not s.image.closed]
        self._opened.append(img)
        if sync is not None:
            self._sync.append(sync)

    # -- after the test -------------------------------------------------------------------------------
    def describe(self) -> str:
        """The images still open and their requests in flight (for the timeout's message)."""
        lines = []
        for img in self._opened:
            if img.closed:
                continue
            name = _image_name(img)
            reqs = img.requests
            inflight = len(img.session.aio.inflight)
            lines.append(f"  image {name}: {inflight} request(s) in flight"
                         + (":" if reqs else ""))
            for req in reqs:
                where = f" (suspended under {req.tag!r})" if req.tag is not None else f" ({req.state})"
                lines.append(f"    {req.kind} offset {req.offset} length {req.length}{where}")
        return "\n".join(lines) if lines else "  no image is open"

    def close_all(self, grace: float = CLOSE_GRACE) -> list[str]:
        """Close every image the test left open (bounded by ``grace`` seconds); the problems found."""
        problems = []
        for sync in self._sync:
            if not sync.image.closed:
                try:
                    with _Watchdog(grace, lambda: "closing the image", None):
                        sync.close()
                except (Exception, QioTimeout) as e:  # not KeyboardInterrupt
                    problems.append(f"closing {_image_name(sync.image)} failed: {_message(e)}")
        self._sync.clear()
        for img in self._opened:
            if not img.closed:
                aio = img.session.aio
                if getattr(aio, "_wake", None) is not None:
                    aio._wake = None  # bound to the test's event loop, which has ended
                try:
                    with _Watchdog(grace, lambda: "closing the image", None):
                        _run(img.close)
                except (Exception, QioTimeout) as e:
                    problems.append(f"closing {_image_name(img)} failed: {_message(e)}")
        self._opened.clear()
        return problems

    def check_all(self, mode: bool | str = True) -> list[CheckReport]:
        """qio's check of every qcow2 image made; the reports that fail under ``mode`` (or their own)."""
        failed = []
        for img, own in self._checked:
            m = mode if own is None else own
            if not m or img.fmt != "qcow2" or not img.path.exists():
                continue
            report = img.check()
            if report.failed(m):
                failed.append(report)
        return failed


def _image_name(img: Image) -> str:
    blk = img.session.blk
    if blk is None:
        return "(closed)"
    node = blk.root
    while not node.filename and node.children:  # a filter or a format over a protocol node
        node = node.children[0].node
    name = (os.path.basename(node.filename) or node.filename) if node.filename else node.format_name
    return f"{name} ({blk.root.format_name})"


def _message(e: BaseException) -> str:
    return str(getattr(e, "msg", None) or e) or type(e).__name__


# -- the watchdog -------------------------------------------------------------------------------------
class QioTimeout(pytest.fail.Exception):  # type: ignore[misc, name-defined]
    """A test using qio's fixtures ran past its time limit (a failure, not an error)."""


class _Watchdog:
    """Fails the running code with :class:`QioTimeout` after ``seconds`` (SIGALRM; main thread only).

    Shares the interval timer with pytest-timeout: whichever limit is nearer fires first, the other's
    handler and time left are restored afterwards."""

    def __init__(self, seconds: float, what: Callable[[], str], item: pytest.Item | None,
                 coro: list[Any] | None = None) -> None:
        self.seconds = seconds
        self.what = what
        self.item = item
        self.coro = coro
        self.active = False

    def __enter__(self) -> _Watchdog:
        if (self.seconds <= 0 or not hasattr(signal, "SIGALRM")
                or threading.current_thread() is not threading.main_thread()):
            return self
        self.start = time.monotonic()
        self.deadline = self.start + self.seconds
        old_left, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        # None: a handler installed from C, which Python cannot put back; the default is the closest
        self.old_handler = signal.signal(signal.SIGALRM, self._fire) or signal.SIG_DFL
        self.old_deadline = self.start + old_left if old_left > 0 else None
        first = self.seconds if self.old_deadline is None else min(self.seconds, old_left)
        signal.setitimer(signal.ITIMER_REAL, first)
        self.active = True
        return self

    def _restore(self, rearm: bool = True) -> None:
        """The other user's handler back, and its timer with the time it has left (``rearm``)."""
        self.active = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old_handler)
        if rearm and self.old_deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, max(self.old_deadline - time.monotonic(), 1e-3))

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        if time.monotonic() < self.deadline - 1e-3:  # the other limit (pytest-timeout) came first
            handler = self.old_handler
            self._restore(rearm=False)  # its time is up: its handler runs now, once
            if callable(handler):
                handler(signum, frame)
            return
        self._restore()
        where = _where(frame, self.item, self.coro)
        raise QioTimeout(f"qio: {self.what()} did not finish within {self.seconds:g} s"
                         + (f"\n  stopped at {where}" if where else ""), pytrace=False)

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        if self.active:
            self._restore()


def _frames(frame: FrameType | None, coro: list[Any] | None) -> Iterator[tuple[str, int, str]]:
    """(file, line, function) of the stack, innermost first, then of the test's suspended coroutine."""
    while frame is not None:
        yield frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back
    awaited = []
    c = coro[0] if coro else None
    while c is not None:
        f = getattr(c, "cr_frame", None) or getattr(c, "gi_frame", None)
        if f is not None:
            awaited.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
        c = getattr(c, "cr_await", None) or getattr(c, "gi_yieldfrom", None)
    yield from reversed(awaited)


def _where(frame: FrameType | None, item: pytest.Item | None, coro: list[Any] | None) -> str:
    """The innermost line of the test's file that was running (or awaiting)."""
    if item is None:
        return ""
    path = str(item.path)
    for filename, line, func in _frames(frame, coro):
        if filename == path:
            lines = Path(filename).read_text().splitlines()
            text = lines[line - 1].strip() if 0 < line <= len(lines) else ""
            return f"{item.path.name}:{line} in {func}: {text}"
    return ""


# -- fixtures and hooks -------------------------------------------------------------------------------
@pytest.fixture
def qio_images(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QioImages]:
    """A factory of images in ``tmp_path`` (raw, qcow2, chains, blkdebug stacks), opened through qio's API,
    closed and checked after the test, under a watchdog (docs/testing.md)."""
    images = QioImages(tmp_path)
    request.node.stash[_IMAGES] = images
    yield images
    images.close_all()  # the test's setup failed, or a fixture opened images after the call


@pytest.fixture
def qio_raw(qio_images: QioImages) -> ImageFile:
    """An empty 1 MiB raw image, ``disk.raw`` in ``tmp_path``."""
    return qio_images.raw("disk.raw")


@pytest.fixture
def qio_qcow2(qio_images: QioImages) -> ImageFile:
    """An empty 1 MiB qcow2 image (64 KiB clusters), ``disk.qcow2`` in ``tmp_path``; checked after the test."""
    return qio_images.qcow2("disk.qcow2")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """The test under the watchdog; then close its images and check them (a failed check fails it)."""
    images = item.stash.get(_IMAGES, None)
    if images is None:
        return (yield)
    timeout, check = _settings(item)
    coro: list[Any] = []
    item.stash[_CORO] = coro
    failure: BaseException | None = None
    result: object = None
    try:
        with _Watchdog(timeout, lambda: "the test", item, coro):
            try:
                result = yield
            except QioTimeout as e:
                raise QioTimeout(f"{e.msg}\n{images.describe()}\n"
                                 f"  (limit: @pytest.mark.qio(timeout=...), --qio-timeout or the qio_timeout "
                                 "ini option)", pytrace=False) from None
    except BaseException as e:
        failure = e
    problems = images.close_all(min(CLOSE_GRACE, timeout) if failure is not None and timeout > 0 else CLOSE_GRACE)
    if failure is not None:
        if problems:
            item.add_report_section("call", "qio", "\n".join(problems))
        raise failure
    reports = images.check_all(check)
    if problems or reports:
        text = [*problems]
        for r in reports:
            text.append(f"qio-img check {r.path.name}: {r.corruptions} corruptions, {r.leaks} leaked clusters, "
                        f"{r.check_errors} check errors\n"
                        + "".join(("    " + line).rstrip() + "\n" for line in r.text.strip().splitlines()))
        pytest.fail("qio: the images failed the post-test check:\n" + "\n".join(text), pytrace=False)
    return result


_CORO = pytest.StashKey[list[Any]]()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """``async def`` tests using qio's fixtures run on a fresh event loop (unless an async plugin owns them)."""
    if _IMAGES not in pyfuncitem.stash or not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    if any(pyfuncitem.get_closest_marker(m) is not None for m in _ASYNC_MARKERS):
        return None
    funcargs = pyfuncitem.funcargs
    coro = pyfuncitem.obj(**{arg: funcargs[arg] for arg in pyfuncitem._fixtureinfo.argnames})
    holder = pyfuncitem.stash.get(_CORO, None)
    if holder is not None:
        holder.append(coro)
    asyncio.run(coro)
    return True
