"""docs/api-reference.md is what tools/gen_api_reference.py makes from the docstrings: it cannot drift from
the code, and every public name (qio's API, the pytest plugin) has a documented entry."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import qio
import qio.pytest_plugin
from oracle import ROOT


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_reference", ROOT / "tools" / "gen_api_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_api_reference", module)
    spec.loader.exec_module(module)
    return module


def test_reference_is_up_to_date() -> None:
    text = generator().generate()
    on_disk = (ROOT / "docs" / "api-reference.md").read_text()
    assert on_disk == text, "docs/api-reference.md is out of date: run python tools/gen_api_reference.py"


def test_every_public_name_is_documented() -> None:
    text = (ROOT / "docs" / "api-reference.md").read_text()
    for name in qio.__all__:
        if name != "__version__":
            assert f"`qio.{name}" in text, name
    for name in qio.pytest_plugin.__all__:
        assert f"`{name}`" in text or f"`qio.pytest_plugin.{name}" in text, name
    for method in ("Image.read", "Image.submit_write", "Breakpoint.hit", "Request.wait", "SyncImage.wait",
                   "QioImages.qcow2", "ImageFile.blkdebug", "EventStream.pending"):
        assert f"{method}(" in text, method


def test_missing_docstring_is_an_error() -> None:
    gen = generator()

    class Undocumented:
        def method(self) -> None:
            pass

    Undocumented.__doc__ = "A class."
    try:
        gen.document_class("x.", Undocumented)
    except gen.MissingDoc as e:
        assert str(e) == "Undocumented.method"
    else:
        raise AssertionError("no MissingDoc")
