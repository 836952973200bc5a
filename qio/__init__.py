"""qio: a Python re-creation of QEMU 7.2's qemu-io block-I/O debugging shell."""

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # type checkers see the real names; at run time they are imported on first use
    from qio.api import (
        Breakpoint,
        BreakpointError,
        BreakpointTimeout,
        EventStream,
        Extent,
        Image,
        ImageClosedError,
        ImageInfo,
        OpenError,
        QioError,
        ReadOnlyError,
        Request,
        RequestTimeout,
        StandstillError,
        SyncImage,
        TraceEvent,
        open,
        open_sync,
    )

# The public API (qio/api.py, docs/api.md) is imported on first use: the shell never loads it.
__all__ = ["Breakpoint", "BreakpointError", "BreakpointTimeout", "EventStream", "Extent", "Image",
           "ImageClosedError", "ImageInfo", "OpenError", "QioError", "ReadOnlyError", "Request", "RequestTimeout",
           "StandstillError", "SyncImage", "TraceEvent", "__version__", "open", "open_sync"]
_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> object:
    if name in _API:
        from qio import api

        return getattr(api, name)
    raise AttributeError(f"module 'qio' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
