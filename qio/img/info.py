"""``qio-img info`` and ``qio-img map``: qemu-img 7.2's ``img_info`` (``bdrv_query_image_info``,
``bdrv_image_info_dump``) and ``img_map`` (``get_block_status``, ``dump_map_entry``)."""

from __future__ import annotations

import math
import time
from typing import Any, NamedTuple

from qio import render
from qio.block import io
from qio.block.driver import BLOCK_ALLOCATED, BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO, BlockDriver
from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.getopt import LongOpt
from qio.img.common import Ctx, Options, close_image, define_object, open_image, output_format
from qio.img.qjson import to_json_pretty

_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
_LONG = (LongOpt("format", True, "f"), LongOpt("output", True, "output"), LongOpt("object", True, "object"),
         LongOpt("image-opts", False, "image-opts"), LongOpt("force-share", False, "U"))


def size_to_str(val: int) -> str:
    """``size_to_str``: three significant digits, switching unit once the integer part reaches 1000."""
    _, exp = math.frexp(val / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C division truncates toward zero
    return "%0.3g %sB" % (val / (1 << (i * 10)), _SUFFIXES[i])


def _read_only() -> OpenFlags:
    flags = OpenFlags()
    flags.read_only = True
    flags.writethrough = False
    return flags


class Query(NamedTuple):
    """The options ``info`` and ``map`` share."""

    filename: str
    fmt: str | None
    ofmt: str
    force_share: bool
    chain: bool
    image_opts: bool


def _parse_query_options(ctx: Ctx, argv: list[str], with_chain: bool) -> Query | None:
    """The options ``info`` and ``map`` share; None after an error was reported."""
    fmt: str | None = None
    output: str | None = None
    chain = force_share = image_opts = False
    longs = (*_LONG, LongOpt("backing-chain", False, "backing-chain")) if with_chain else _LONG
    opts = Options(ctx, argv, "f:hU", longs)
    for c, arg in opts:
        if c == "f":
            fmt = arg
        elif c == "U":
            force_share = True
        elif c == "output":
            output = arg
        elif c == "backing-chain":
            chain = True
        elif c == "image-opts":
            image_opts = True
        elif c == "object" and not define_object(ctx, arg):
            return None
    filename = opts.one_filename()
    ofmt = output_format(ctx, output)
    if ofmt is None:
        return None
    return Query(filename, fmt, ofmt, force_share, chain, image_opts)


# ================================================================================== info
def image_info(root: BlockDriver) -> list[tuple[str, Any]]:
    """``bdrv_query_image_info``: the QAPI ImageInfo members, in field order, absent ones left out."""
    from qio.block.backend import full_backing_filename

    info: list[tuple[str, Any]] = [("filename", root.filename), ("format", root.format_name)]
    bdi = root.get_info()
    if bdi is not None:
        info.append(("dirty-flag", root.is_dirty()))
    actual = io.allocated_file_size(root)
    if actual is not None:
        info.append(("actual-size", actual))
    info.append(("virtual-size", io.getlength(root)))
    if bdi is not None and bdi.cluster_size:
        info.append(("cluster-size", bdi.cluster_size))
    if _encrypted(root):
        info.append(("encrypted", True))
    backing, bfmt = root.backing_file_info()
    if backing:
        info.append(("backing-filename", backing))
        try:
            info.append(("full-backing-filename", full_backing_filename(root, backing)))
        except QemuError:
            pass
        if bfmt:
            info.append(("backing-filename-format", bfmt))
    snapshots = snapshot_infos(root)
    if snapshots:
        info.append(("snapshots", snapshots))
    spec = root.get_specific_info()
    if spec is not None:
        info.append(("format-specific", [("type", root.format_name), ("data", spec)]))
    return info


def _encrypted(root: BlockDriver) -> bool:
    """``bs->encrypted``: a luks node, or qcow2 with a crypt method in its header."""
    return root.format_name == "luks" or bool(getattr(getattr(root, "s", None), "crypt_method_header", 0))


def _s64(v: int) -> int:
    """A uint64_t stored in a QAPI 'int' (int64_t)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _cstr(text: str, size: int) -> str:
    """``pstrcpy`` into a ``char[size]``: at most size - 1 bytes."""
    return text.encode("utf-8", "surrogateescape")[:size - 1].decode("utf-8", "surrogateescape")


def snapshot_infos(root: BlockDriver) -> list[list[tuple[str, Any]]]:
    """``bdrv_query_snapshot_info_list``: the QAPI SnapshotInfo of each internal snapshot (qcow2 only;
    other formats answer ENOTSUP, which leaves the list out)."""
    out = []
    for sn in root.snapshot_list():
        item: list[tuple[str, Any]] = [
            ("id", _cstr(sn.id_str, 128)), ("name", _cstr(sn.name, 256)), ("vm-state-size", _s64(sn.vm_state_size)),
            ("date-sec", sn.date_sec), ("date-nsec", sn.date_nsec), ("vm-clock-sec", sn.vm_clock_nsec // 10**9),
            ("vm-clock-nsec", sn.vm_clock_nsec % 10**9)]
        if sn.icount != (1 << 64) - 1:
            item.append(("icount", _s64(sn.icount)))
        out.append(item)
    return out


def _pad(text: str, width: int, left: bool) -> str:
    """printf's ``%-Ns``/``%Ns``: padding counts bytes, not characters."""
    fill = " " * max(0, width - len(text.encode("utf-8", "surrogateescape")))
    return text + fill if left else fill + text


def _c_int(v: int) -> int:
    """A C cast to ``int``: the low 32 bits, signed."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def dump_snapshot(sn: dict[str, Any] | None) -> str:
    """``bdrv_snapshot_dump``: the header line (None) or one snapshot, without the newline."""
    if sn is None:
        return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
    clock = (sn["vm-clock-sec"] * 10**9 + sn["vm-clock-nsec"]) & ((1 << 64) - 1)
    secs = clock // 10**9
    clock_buf = "%02d:%02d:%02d.%03d" % (_c_int(secs // 3600), _c_int(secs // 60 % 60), _c_int(secs % 60),
                                         _c_int(clock // 10**6 % 1000))
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
    icount = str(sn["icount"]) if "icount" in sn else ""
    return (_pad(sn["id"], 9, True) + " " + _pad(sn["name"], 16, True) + " "
            + _pad(size_to_str(sn["vm-state-size"] & ((1 << 64) - 1)), 8, False)
            + "%20s%13s%11s" % (date, clock_buf, icount))


def dump_human(info: list[tuple[str, Any]]) -> str:
    """``bdrv_image_info_dump``."""
    d = dict(info)
    out = [f"image: {d['filename']}\nfile format: {d['format']}\n"
           f"virtual size: {size_to_str(d['virtual-size'])} ({d['virtual-size']} bytes)\n"
           f"disk size: {size_to_str(d['actual-size']) if 'actual-size' in d else 'unavailable'}\n"]
    if d.get("encrypted"):
        out.append("encrypted: yes\n")
    if "cluster-size" in d:
        out.append(f"cluster_size: {d['cluster-size']}\n")
    if d.get("dirty-flag"):
        out.append("cleanly shut down: no\n")
    if "backing-filename" in d:
        name, full = d["backing-filename"], d.get("full-backing-filename")
        suffix = " (cannot determine actual path)" if full is None else (
            f" (actual path: {full})" if full != name else "")
        out.append(f"backing file: {name}{suffix}\n")
        if "backing-filename-format" in d:
            out.append(f"backing file format: {d['backing-filename-format']}\n")
    if "snapshots" in d:
        out.append("Snapshot list:\n" + dump_snapshot(None) + "\n")
        out += [dump_snapshot(dict(sn)) + "\n" for sn in d["snapshots"]]
    if "format-specific" in d:
        out.append("Format specific information:\n" + render.dump_specific(dict(d["format-specific"])["data"], 1))
    return "".join(out)


async def img_info(ctx: Ctx, argv: list[str]) -> int:
    parsed = _parse_query_options(ctx, argv, with_chain=True)
    if parsed is None:
        return 1
    name, fmt, ofmt, force_share, chain, image_opts = parsed
    filename: str | None = name
    infos: list[list[tuple[str, Any]]] = []
    seen: set[str] = set()
    while filename is not None:
        if filename in seen:
            ctx.out.error_report(f"Backing file '{filename}' creates an infinite loop.")
            return 1
        seen.add(filename)
        flags = _read_only()
        flags.no_io = True  # BDRV_O_NO_IO: an encrypted image opens without its key, no data file is opened
        blk = open_image(ctx, filename, fmt, flags, force_share=force_share, no_backing=True,
                         image_opts=image_opts)
        if blk is None:
            return 1
        try:
            info = image_info(blk.root)
        finally:
            await close_image(ctx, blk)
        infos.append(info)
        filename = fmt = None
        image_opts = False
        if chain:
            d = dict(info)
            filename = d.get("full-backing-filename")
            if filename is None and "backing-filename" in d:
                ctx.out.error_report("Could not determine absolute backing filename, but backing filename "
                                     f"'{d['backing-filename']}' present")
                return 1
            fmt = d.get("backing-filename-format")
    if ofmt == "human":
        ctx.out.out("\n".join(dump_human(i) for i in infos))
    else:
        ctx.out.out(to_json_pretty(infos if chain else infos[0]) + "\n")
    return 0


# =================================================================================== map
class MapEntry(NamedTuple):
    start: int
    length: int
    data: bool
    zero: bool
    offset: int | None
    depth: int
    present: bool
    filename: str | None


async def get_block_status(bs: BlockDriver, offset: int, nbytes: int) -> MapEntry:
    """qemu-img's ``get_block_status``: the first layer of the chain that knows the range."""
    depth = 0
    node: BlockDriver | None = bs
    while True:
        assert node is not None
        while node.is_filter and node.children:  # bdrv_skip_filters
            node = node.children[0].node
        ret, nbytes, mapped, file = await io.co_block_status(node, True, offset, nbytes)
        if ret & (BLOCK_ZERO | BLOCK_DATA):
            break
        node = node.backing
        if node is None:
            ret = 0
            break
        depth += 1
    has_offset = bool(ret & BLOCK_OFFSET_VALID)
    return MapEntry(offset, nbytes, bool(ret & BLOCK_DATA), bool(ret & BLOCK_ZERO), mapped if has_offset else None,
                    depth, bool(ret & BLOCK_ALLOCATED), file.filename if file is not None and has_offset else None)


def _mergeable(curr: MapEntry, nxt: MapEntry) -> bool:
    if curr.length == 0:
        return False
    if (curr.zero, curr.data, curr.depth, curr.present, curr.filename is None, curr.offset is None) != \
            (nxt.zero, nxt.data, nxt.depth, nxt.present, nxt.filename is None, nxt.offset is None):
        return False
    if curr.filename is not None and curr.filename != nxt.filename:
        return False
    return curr.offset is None or nxt.offset == curr.offset + curr.length


def _hx(v: int) -> str:
    """``%#-16x``: no ``0x`` prefix for zero."""
    return ("0x%x" % v if v else "0").ljust(16)


def _dump_entry(ctx: Ctx, ofmt: str, e: MapEntry, nxt: MapEntry | None) -> tuple[bool, MapEntry | None]:
    """``dump_map_entry``: (ok, the next entry as the human format rewrites it)."""
    if ofmt == "human":
        if e.data and e.offset is None:
            ctx.out.flush()
            ctx.out.error_report("File contains external, encrypted or compressed clusters.")
            return False, nxt
        if e.data and not e.zero:
            ctx.out.out(f"{_hx(e.start)}{_hx(e.length)}{_hx(e.offset or 0)}{e.filename or ''}\n")
        if nxt is not None and (not nxt.data or nxt.zero):
            nxt = nxt._replace(data=False, zero=True)
        return True, nxt
    text = (f'{{ "start": {e.start}, "length": {e.length}, "depth": {e.depth}, '
            f'"present": {str(e.present).lower()}, "zero": {str(e.zero).lower()}, "data": {str(e.data).lower()}')
    if e.offset is not None:
        text += f', "offset": {e.offset}'
    ctx.out.out(text + "}" + (",\n" if nxt is not None else ""))
    return True, nxt


async def img_map(ctx: Ctx, argv: list[str]) -> int:
    parsed = _parse_query_options(ctx, argv, with_chain=False)
    if parsed is None:
        return 1
    filename, fmt, ofmt, force_share, _, image_opts = parsed
    blk = open_image(ctx, filename, fmt, _read_only(), force_share=force_share, image_opts=image_opts)
    if blk is None:
        return 1
    try:
        return await _map(ctx, blk.root, ofmt)
    finally:
        await close_image(ctx, blk)


async def _map(ctx: Ctx, root: BlockDriver, ofmt: str) -> int:
    if ofmt == "human":
        ctx.out.out("%-16s%-16s%-16s%s\n" % ("Offset", "Length", "Mapped to", "File"))
    else:
        ctx.out.out("[")
    length = io.getlength(root)
    curr = MapEntry(0, 0, False, False, None, 0, False, None)
    while curr.start + curr.length < length:
        offset = curr.start + curr.length
        try:
            nxt = await get_block_status(root, offset, length - offset)
        except BlockError as e:
            ctx.out.flush()
            ctx.out.error_report(f"Could not read file metadata: {e}")
            return 1
        if _mergeable(curr, nxt):
            curr = curr._replace(length=curr.length + nxt.length)
            continue
        if curr.length > 0:
            ok, rewritten = _dump_entry(ctx, ofmt, curr, nxt)
            if not ok:
                return 1
            assert rewritten is not None
            nxt = rewritten
        curr = nxt
    ok, _ = _dump_entry(ctx, ofmt, curr, None)
    if ofmt == "json":
        ctx.out.out("]\n")
    return 0 if ok else 1
