"""Runtime options and reopen (``qcow2_update_options``, ``qcow2_reopen_*``), cache sizing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qio.aio import run_sync
from qio.block.driver import BlockDriver
from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.block.qcow2 import layout as L
from qio.block.qcow2.cache import Qcow2Cache
from qio.block.qcow2.refcount import mark_clean
from qio.block.qcow2.state import (
    DEFAULT_L2_CACHE_MAX_SIZE,
    INT_MAX,
    MIN_L2_CACHE_SIZE,
    MIN_REFCOUNT_CACHE_SIZE,
    OL_ALL,
    OL_CACHED,
    OL_CONSTANT,
    OL_OPTIONS,
    Qcow2State,
    RuntimeOptions,
    _length,
    _round_up,
)
from qio.qemuopts import opt_bool, opt_size

if TYPE_CHECKING:
    pass



def _update_options(s: Qcow2State, options: dict[str, Any], flags: OpenFlags, initial: bool) -> None:
    """``qcow2_update_options_prepare``/``commit`` (cache sizes, lazy refcounts, overlap checks,
    discard passthrough).  Flushing old caches is the caller's job."""
    if initial:
        s.opts = {k: options[k] for k in s.bs.runtime_opts if k in options}
    _commit_options(s, _prepare_options(s, s.opts, flags))


def _prepare_options(s: Qcow2State, opts: dict[str, Any], flags: OpenFlags) -> RuntimeOptions:
    """The checking half of ``qcow2_update_options_prepare``: QEMU's errors in QEMU's order."""
    cs = s.cluster_size
    l2_size, entry_size, rc_size = _read_cache_sizes(s, opts)
    l2_entries = max(l2_size // entry_size, MIN_L2_CACHE_SIZE)
    if l2_entries > INT_MAX:
        raise QemuError("L2 cache size too big")
    rc_entries = max(rc_size // cs, MIN_REFCOUNT_CACHE_SIZE)
    if rc_entries > INT_MAX:
        raise QemuError("Refcount cache size too big")
    interval = opts.get("cache-clean-interval")
    if interval is not None:
        try:
            ival = int(str(interval), 0)
        except ValueError:
            raise QemuError("Parameter 'cache-clean-interval' expects a number") from None
        if ival > 0xFFFFFFFF or ival < 0:
            raise QemuError("Cache clean interval too big")
    lazy = opt_bool(opts, "lazy-refcounts", bool(s.compatible_features & L.COMPAT_LAZY_REFCOUNTS))
    if lazy and s.qcow_version < 3:
        raise QemuError("Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level")
    ol = opts.get("overlap-check")
    olt = opts.get("overlap-check.template")
    if ol is not None and olt is not None and ol != olt:
        raise QemuError(f"Conflicting values for qcow2 options 'overlap-check' ('{ol}') and "
                        f"'overlap-check.template' ('{olt}')")
    template_name = ol if ol is not None else (olt if olt is not None else "cached")
    templates = {"none": 0, "constant": OL_CONSTANT, "cached": OL_CACHED, "all": OL_ALL}
    if template_name not in templates:
        raise QemuError(f"Unsupported value '{template_name}' for qcow2 option 'overlap-check'. Allowed are "
                        "any of the following: none, constant, cached, all")
    template = templates[template_name]
    overlap = 0
    for name, bit in OL_OPTIONS.items():
        if opt_bool(opts, f"overlap-check.{name}", bool(template & bit)):
            overlap |= bit
    passthrough = [False, True,
                   opt_bool(opts, "pass-discard-request", flags.unmap),
                   opt_bool(opts, "pass-discard-snapshot", True),
                   opt_bool(opts, "pass-discard-other", False)]
    return RuntimeOptions(entry_size, l2_entries, rc_entries, overlap, lazy, passthrough)


def _commit_options(s: Qcow2State, new: RuntimeOptions) -> None:
    s.l2_cache_entry_size = new.l2_entry_size
    s.l2_slice_size = new.l2_entry_size >> s.l2e_shift
    s.l2_cache = Qcow2Cache(s, new.l2_entries, new.l2_entry_size, True)
    s.refblock_cache = Qcow2Cache(s, new.refcount_entries, s.cluster_size, False)
    s.overlap_check = new.overlap_check
    s.use_lazy_refcounts = new.lazy_refcounts
    s.discard_passthrough = new.discard_passthrough


def _read_cache_sizes(s: Qcow2State, opts: dict[str, Any]) -> tuple[int, int, int]:
    """``read_cache_sizes``: (L2 cache bytes, L2 cache entry size, refcount cache bytes)."""
    def size(key: str, default: int) -> int:
        return opt_size(opts, key, default)

    cs = s.cluster_size
    min_rc = MIN_REFCOUNT_CACHE_SIZE * cs
    max_l2_entries = -(-_length(s) // cs)
    max_l2_cache = _round_up(max_l2_entries << s.l2e_shift, cs)
    combined_set = "cache-size" in opts
    l2_set = "l2-cache-size" in opts
    rc_set = "refcount-cache-size" in opts
    entry_set = "l2-cache-entry-size" in opts
    combined = size("cache-size", 0)
    l2_max = size("l2-cache-size", DEFAULT_L2_CACHE_MAX_SIZE)
    rc = size("refcount-cache-size", 0)
    entry = size("l2-cache-entry-size", cs)
    l2 = min(max_l2_cache, l2_max)
    if combined_set:
        if l2_set and rc_set:
            raise QemuError("cache-size, l2-cache-size and refcount-cache-size may not be set at the same time")
        if l2_set and l2_max > combined:
            raise QemuError("l2-cache-size may not exceed cache-size")
        if rc > combined:
            raise QemuError("refcount-cache-size may not exceed cache-size")
        if l2_set:
            rc = combined - l2
        elif rc_set:
            l2 = combined - rc
        elif combined >= max_l2_cache + min_rc:
            l2 = max_l2_cache
            rc = combined - l2
        else:
            rc = min(combined, min_rc)
            l2 = combined - rc
    if l2 < max_l2_cache and not entry_set:
        entry = min(cs, 4096)
    if entry < 512 or entry > cs or entry & (entry - 1):
        raise QemuError(f"L2 cache entry size must be a power of two between 512 and the cluster size ({cs})")
    return l2, entry, rc


def _join_options(s: Qcow2State, new: dict[str, Any]) -> dict[str, Any]:
    """``qcow2_join_options``: a new overlap template replaces all old overlap options, a new
    ``cache-size`` the old split sizes; an old ``cache-size`` is always dropped (QEMU tests ``||``
    where it means ``&&``, so ``cache-size`` never survives a reopen that does not repeat it)."""
    old = dict(s.opts)
    if "overlap-check" in new or "overlap-check.template" in new:
        old = {k: v for k, v in old.items() if not k.startswith("overlap-check")}
    if "cache-size" in new:
        old.pop("l2-cache-size", None)
        old.pop("refcount-cache-size", None)
    else:
        old.pop("cache-size", None)
    return {**old, **new}


def check_reopen(s: Qcow2State, flags: OpenFlags, options: dict[str, Any]) -> None:
    if s.l2_cache is not None:
        _prepare_options(s, _join_options(s, options), flags)


def reopen(s: Qcow2State, flags: OpenFlags, options: dict[str, Any]) -> None:
    """``qcow2_reopen_prepare``/``commit``: new caches and runtime options (explicit ones are kept
    from open and earlier reopens); lazy refcounts turned off or going read-only mark the image clean."""
    going_ro = flags.read_only and not s.bs.read_only
    opts = _join_options(s, options)
    new = _prepare_options(s, opts, flags) if s.l2_cache is not None else None

    async def flush() -> None:
        await _flush_caches(s)
        if new is not None and s.use_lazy_refcounts and not new.lazy_refcounts:
            try:
                await mark_clean(s)
            except BlockError as e:
                raise QemuError.wrap(e, "Failed to disable lazy refcounts") from None
        if going_ro:
            try:
                await mark_clean(s)
            except BlockError:
                raise QemuError(f"failed while preparing to reopen image '{s.bs.filename}'") from None

    if s.l2_cache is not None and not s.broken:
        run_sync(flush())
    BlockDriver.reopen(s.bs, flags, options)
    if new is not None:
        s.opts = opts
        _commit_options(s, new)


async def _flush_caches(s: Qcow2State) -> None:
    """Write back the L2 and refcount-block caches, with ``qcow2_update_options_prepare``'s messages."""
    try:
        await s.l2c.flush()
    except BlockError as e:
        raise QemuError.wrap(e, "Failed to flush the L2 table cache") from None
    try:
        await s.rbc.flush()
    except BlockError as e:
        raise QemuError.wrap(e, "Failed to flush the refcount block cache") from None


async def _recreate_caches(s: Qcow2State) -> None:
    """The cache part of ``qcow2_update_options``: flush the old caches, size new ones."""
    await _flush_caches(s)
    _update_options(s, {}, s.bs.flags, initial=False)
