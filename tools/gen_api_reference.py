"""Write docs/api-reference.md from the docstrings of qio's public API and its pytest plugin.

``python tools/gen_api_reference.py`` rewrites the file; ``--check`` exits 1 (with a diff) when it is out
of date.  tests/api/test_api_reference.py runs the check, so the reference cannot drift from the code.
Every public name must have a docstring (a method of ``SyncImage`` may borrow the one of ``Image``).
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "api-reference.md"

HEADER = """# API reference

Generated from the docstrings by `python tools/gen_api_reference.py`; do not edit by hand
(`tests/api/test_api_reference.py` fails when this file and the code disagree). The guides:
[api.md](api.md) (the asyncio API, with a tutorial) and [testing.md](testing.md) (the pytest plugin).
"""


#: Return types that are private helper classes, named by what the caller does with them.
OPENING = "Image (awaitable, or async with)"
PRIVATE_RETURNS = {"_Opening": OPENING, "_TrackedOpening": OPENING}


class MissingDoc(Exception):
    """A public name without a docstring."""


def _text(doc: str) -> str:
    """reST roles and double backquotes as Markdown code."""
    doc = re.sub(r":(?:class|meth|func|attr|mod|exc):`~?([^`]+)`", r"`\1`", doc)
    return doc.replace("``", "`")


def _doc(obj: Any, name: str, fallback: str | None = None) -> str:
    doc = inspect.getdoc(obj) if obj.__doc__ is not None else None
    if not doc:
        if fallback is None:
            raise MissingDoc(name)
        doc = fallback
    return _text(doc)


def _param(p: inspect.Parameter) -> str:
    text = p.name
    if p.kind is p.VAR_POSITIONAL:
        text = "*" + text
    elif p.kind is p.VAR_KEYWORD:
        text = "**" + text
    if p.annotation is not p.empty:
        text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
    if p.default is not p.empty:
        text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
    return text


def signature(fn: Any, skip_self: bool) -> str:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if skip_self and params and params[0].name in ("self", "cls"):
        params = params[1:]
    out: list[str] = []
    star = False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        if p.kind is p.VAR_POSITIONAL:
            star = True
        out.append(_param(p))
    ret = sig.return_annotation
    ret = PRIVATE_RETURNS.get(ret, ret)
    arrow = f" -> {ret}" if ret is not sig.empty and ret != "None" else ""
    return f"({', '.join(out)}){arrow}"


def _kind(fn: Any) -> str:
    return "async " if inspect.iscoroutinefunction(fn) else ""


def _members(cls: type) -> list[tuple[str, Any]]:
    """The public methods and properties a class defines itself, in source order."""
    out = []
    for name, value in cls.__dict__.items():
        if name.startswith("_") or name in getattr(cls, "_fields", ()):
            continue
        if isinstance(value, property | staticmethod | classmethod) or inspect.isfunction(value):
            out.append((name, value))
    return out


def document_class(prefix: str, cls: type, borrow: type | None = None) -> list[str]:
    bases = [b.__name__ for b in cls.__bases__ if b is not object and b.__name__ != "NamedTuple"]
    if getattr(cls, "_fields", None):
        head = f"### class `{prefix}{cls.__name__}({', '.join(cls._fields)})`"  # type: ignore[attr-defined]
        bases = ["a named tuple"]
    else:
        head = f"### class `{prefix}{cls.__name__}`"
    lines = [head, ""]
    if bases:
        lines += [f"Derived from {', '.join(f'`{b}`' if b != 'a named tuple' else b for b in bases)}.", ""]
    lines += [_doc(cls, cls.__name__), ""]
    if "__await__" in cls.__dict__:
        lines += ["Awaitable (`await obj`).", ""]
    if "__aenter__" in cls.__dict__:
        lines += ["An asynchronous context manager (`async with`).", ""]
    elif "__enter__" in cls.__dict__:
        lines += ["A context manager (`with`).", ""]
    if "__aiter__" in cls.__dict__:
        lines += ["An asynchronous iterator (`async for`).", ""]
    for name, value in _members(cls):
        qual = f"{cls.__name__}.{name}"
        fallback = None
        if borrow is not None and hasattr(borrow, name):
            fallback = f"As `{borrow.__name__}.{name}`, as a plain call: " + _doc(getattr(borrow, name), name,
                                                                                   "")
        if isinstance(value, property):
            lines += [f"#### property `{qual}`", "", _doc(value, qual, fallback), ""]
        else:
            fn = value.__func__ if isinstance(value, staticmethod | classmethod) else value
            lines += [f"#### `{_kind(fn)}{qual}{signature(fn, True)}`", "", _doc(fn, qual, fallback), ""]
    return lines


def document_function(prefix: str, name: str, fn: Any) -> list[str]:
    return [f"### `{_kind(fn)}{prefix}{name}{signature(fn, False)}`", "", _doc(fn, name), ""]


def generate() -> str:
    sys.path.insert(0, str(ROOT))
    import qio.api as api
    import qio.pytest_plugin as plugin

    lines = [HEADER, "## `qio`: the asyncio API (qio/api.py)", "",
             "Every name is importable from `qio` itself (`qio.open`, `qio.Image`, ...).", ""]
    lines += [_text(inspect.getdoc(api) or ""), ""]
    for name in api.__all__:
        obj = getattr(api, name)
        if inspect.isclass(obj):
            borrow = api.Image if obj is api.SyncImage else None
            lines += document_class("qio.", obj, borrow)
        else:
            lines += document_function("qio.", name, obj)
    lines += ["## `qio.pytest_plugin`: the pytest plugin (qio/pytest_plugin.py)", "",
              _text(inspect.getdoc(plugin) or ""), "", "### Fixtures", ""]
    for name in plugin.__all__:
        obj = getattr(plugin, name)
        if not inspect.isclass(obj):  # a fixture
            wrapped = getattr(obj, "_get_wrapped_function", None)  # pytest's fixture definition
            fn = wrapped() if wrapped is not None else obj
            lines += [f"#### fixture `{name}`", "", _doc(fn, name), ""]
    lines += ["### Classes", ""]
    for name in plugin.__all__:
        obj = getattr(plugin, name)
        if inspect.isclass(obj):
            lines += [line.replace("### ", "#### ", 1) if line.startswith("### ") else
                      line.replace("#### ", "##### ", 1) if line.startswith("#### ") else line
                      for line in document_class("qio.pytest_plugin.", obj)]
    lines += ["### Markers and options", "",
              "- `@pytest.mark.qio(timeout=None, check=True)`: the watchdog's seconds for this test and its "
              "post-test check (`True`: corruption and leaks fail, `\"corruptions\"`, `False`).",
              "- `--qio-timeout=SECONDS`, ini option `qio_timeout` (default "
              f"{plugin.DEFAULT_TIMEOUT:g}; 0: no limit).", ""]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"
    return text


def main(argv: list[str]) -> int:
    text = generate()
    if "--check" in argv:
        old = TARGET.read_text() if TARGET.exists() else ""
        if old != text:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                       str(TARGET), "generated"))
            print("docs/api-reference.md is out of date: run python tools/gen_api_reference.py")
            return 1
        return 0
    TARGET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
