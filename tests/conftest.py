"""Shared pytest set-up: the ``oracle`` marker skips a test when the real QEMU tools it compares with are
missing, and fixtures for this tree's qio under qemu-io's name and for small scratch images.

``@pytest.mark.oracle`` needs qemu-io and qemu-img; ``@pytest.mark.oracle("qemu-nbd", ...)`` names the
tools instead.  Paths and run helpers live in ``oracle.py`` (importable from every test directory)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from oracle import missing, qemu_img, qio_wrapper

# qio's own pytest plugin (qio_images, qio_raw, qio_qcow2; docs/testing.md), also when this tree is not
# installed; installed, its entry point has the same name, so it is registered once.  (Absent when the
# qio imported is an older installed one: pytest started outside the tree's root.)
pytest_plugins = ["qio.pytest_plugin"] if importlib.util.find_spec("qio.pytest_plugin") else []


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("oracle"):
        absent = missing(*mark.args)
        if absent:
            pytest.skip(f"{', '.join(absent)} not installed (apt-get install qemu-utils)")


@pytest.fixture(scope="module")
def qio_as_qemu_io(tmp_path_factory: pytest.TempPathFactory) -> str:
    """This tree's qio as an executable named ``qemu-io`` (its prompt and messages carry the name)."""
    return str(qio_wrapper(tmp_path_factory.mktemp("bin") / "qemu-io"))


@pytest.fixture
def raw_img(tmp_path: Path) -> Path:
    """A sparse 1 MiB raw image."""
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    return img


@pytest.fixture
def qcow2_img(tmp_path: Path) -> Path:
    """An empty 1 MiB qcow2 image made by the real qemu-img (the test needs ``@pytest.mark.oracle``)."""
    img = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "1M")
    return img


@pytest.fixture
def busy_loop_pids(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of the busy loops that ``difftest.cpu_load`` starts during the test (``--load``), so the
    test can check that they ran and are gone."""
    import difftest

    seen: list[int] = []
    real = difftest.cpu_load.__enter__

    def enter(self: difftest.cpu_load) -> difftest.cpu_load:
        out = real(self)
        seen.extend(p.pid for p in self.procs)
        return out

    monkeypatch.setattr(difftest.cpu_load, "__enter__", enter)
    return seen
