"""Opening an image into a node graph, and the ``BlockBackend`` that qemu-io's commands talk to.

The open logic follows QEMU's ``bdrv_open``: options are one flat dict with dotted keys for
children; a ``driver`` names the node's driver, a filename may carry a protocol prefix
(``blkdebug:``) or be ``json:{...}``; without a driver the format is probed from the first sector.
Unconsumed options are errors with QEMU's wording.  Permissions then flow from the backend down
the graph and the protocol node locks the image.
"""

from __future__ import annotations

import errno
import itertools
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

from qio.aio import AioContext, WaitQueue, current_co, current_request, run_sync
from qio.block import io, registry
from qio.block.driver import (
    REQ_FUA,
    BlockDriver,
    Child,
    IOVec,
)
from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.block.perms import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED
from qio.block.probe import probe_format
from qio.qemuopts import Options, opt_bool, parse_json_filename, sub_options

PROBE_BUF = 512
#: Options every node accepts (``bdrv_runtime_opts`` and friends).
GENERIC_OPTS = frozenset({"node-name", "read-only", "auto-read-only", "cache.direct", "cache.no-flush",
                          "discard", "detect-zeroes", "force-share", "driver", "filename"})

Warn = Callable[[str], None]


def _node_flags(options: Options, flags: OpenFlags, opening: bool = True) -> OpenFlags:
    """Generic per-node options override the inherited flags (``bdrv_open_common``'s checks when
    ``opening``; a reopen checks them its own way)."""
    f = flags.copy()
    f.read_only = opt_bool(options, "read-only", f.read_only)
    f.nocache = opt_bool(options, "cache.direct", f.nocache)
    f.no_flush = opt_bool(options, "cache.no-flush", f.no_flush)
    f.force_share = opt_bool(options, "force-share", f.force_share)
    opt_bool(options, "auto-read-only", False)
    if opening and f.force_share and not f.read_only:
        raise QemuError("force-share=on can only be used with read-only images")
    d = options.get("discard")
    if d is not None:
        if d in ("off", "ignore"):
            f.unmap = False
        elif d in ("on", "unmap"):
            f.unmap = True
        else:
            raise QemuError("Invalid discard option")
    dz = options.get("detect-zeroes")
    if dz is not None:
        if dz not in ("off", "on", "unmap"):
            raise QemuError(f"invalid parameter value: {dz}")
        if opening and dz == "unmap" and not f.unmap:
            raise QemuError("setting detect-zeroes to unmap is not allowed without setting discard operation "
                            "to unmap")
    return f


def parse_detect_zeroes(value: Any, flags: OpenFlags) -> str:
    """``bdrv_parse_detect_zeroes``: off (default), on or unmap; unmap needs discard=unmap on the node."""
    if value is None:
        mode = "off"
    else:
        mode = {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)
        if mode not in ("off", "on", "unmap"):
            raise QemuError(f"invalid parameter value: {mode}")
    if mode == "unmap" and not flags.unmap:
        raise QemuError("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap")
    return mode


_node_ids = itertools.count()


def _name_node(node: BlockDriver, options: Options) -> None:
    """``node-name``, or QEMU's automatic ``#block<N><2 random digits>`` (children are named first)."""
    name = options.get("node-name")
    if name is not None:
        name = str(name)
        if not (name[:1].isascii() and name[:1].isalpha()) or not all(
                c.isascii() and (c.isalnum() or c in "-._") for c in name[1:]):
            raise QemuError(f"Invalid node-name: '{name}'")  # id_wellformed
        if len(name) >= 32:
            raise QemuError("Node name too long")
    # os.urandom rather than the random module: importing random costs more start-up time than it saves
    node.node_name = name if name is not None else f"#block{next(_node_ids)}{int.from_bytes(os.urandom(2)) % 100:02d}"
    node.open_options = {k: v for k, v in options.items() if not (k == "filename" and node.children)}
    node.open_options["driver"] = node.format_name


def _check_leftovers(node: BlockDriver, options: Options, positional: bool = True) -> None:
    for key in options:
        if (key in GENERIC_OPTS and (positional or key != "filename")) or key in node.runtime_opts:
            continue
        if node.is_format or node.protocol_name is None:  # bdrv_open_common: a driver without protocol
            raise QemuError(f"Block format '{node.format_name}' does not support the option '{key}'")
        raise QemuError(f"Block protocol '{node.format_name}' doesn't support the option '{key}'")


def open_node(options: Options, flags: OpenFlags, warn: Warn, *, protocol: bool = False,
              positional: bool = True) -> BlockDriver:
    """Open one node (and, recursively, its children) from flat options.

    Without a ``driver`` a top-level node is a probed format over a protocol child; a child opened
    for a format (``protocol=True``) is the protocol its filename's prefix names, else ``file``.
    ``positional``: ``filename`` is the file name ``bdrv_open`` was called with (the command line's
    image), which a format node hands to its ``file`` child; a ``filename`` *option* (``json:``,
    ``--image-opts``) of a format node is not.
    """
    filename = options.get("filename")
    # bdrv_open_inherit parses json: in the file name argument only, never in a "filename" option
    if positional and isinstance(filename, str) and filename.startswith("json:"):
        parsed = parse_json_filename(filename)
        del options["filename"]
        for k, v in parsed.items():
            options.setdefault(k, v)
        filename = options.get("filename")
        positional = False
    flags = _node_flags(options, flags)
    drvname = options.get("driver")
    cls: type[BlockDriver] | None = None
    if drvname is not None:
        cls = registry.find(str(drvname))
        if cls is None:
            raise QemuError(f"Unknown driver '{drvname}'")
    elif protocol:
        cls = _protocol_class(filename, positional)
    if cls is not None and not cls.is_format:
        return _open_protocol(cls, options, flags, warn, positional)
    # A format node (given or to be probed) over a "file" child.
    ref = options.pop("file", None)  # bdrv_open_child_bs consumes "file" whatever its type
    child_opts = sub_options(options, "file")
    child_positional = False
    if filename is not None and positional:
        if "filename" in child_opts:  # bdrv_fill_options of the child
            raise QemuError("Can't specify 'file' and 'filename' options at the same time")
        child_opts["filename"] = filename
        child_positional = True
    if isinstance(ref, str):  # a node reference; qemu-io has no other nodes
        if child_opts:
            raise QemuError("Cannot reference an existing block device with additional options or a new filename")
        raise QemuError(f"Cannot find device='{ref}' nor node-name='{ref}'")
    if not child_opts:  # no file.* options and no filename: no child (inherited flags do not count)
        if cls is None:
            raise QemuError("Must specify either driver or file")
        raise QemuError('A block device must be specified for "file"')
    for key in ("read-only", "cache.direct", "cache.no-flush", "force-share"):
        if key in options:
            child_opts.setdefault(key, options[key])
    # bdrv_inherited_options: children default to discard=unmap whatever the parent's policy
    cflags = flags.copy()
    cflags.unmap = True
    file = open_node(child_opts, cflags, warn, protocol=True, positional=child_positional)
    probed = False
    node: BlockDriver | None = None
    try:
        if cls is None:
            cls = _probe(file)
            probed = True
        node = cls()
        node.warn = warn
        node.flags = flags
        node.read_only = flags.read_only
        node.filename = file.filename
        node.probed = probed
        node.children.append(Child("file", file))
        node.open_child = lambda opts, fl, pos: open_node(opts, fl, warn, protocol=True, positional=pos)
        _name_node(node, options)
        node.refresh_limits()
        node.detect_zeroes = parse_detect_zeroes(options.get("detect-zeroes"), flags)
        _open_format(node, options, flags)
        _check_leftovers(node, options, positional)
    except BaseException:
        _close_sync(file)
        for c in node.children if node is not None else ():
            if c.node is not file and c.name != "backing":  # a further data child (qcow2's data file)
                _close_sync(c.node)
        raise
    if probed and node.format_name == "raw" and not flags.read_only:
        warn(f"WARNING: Image format was not specified for '{file.filename}' and probing guessed raw.\n"
             "         Automatically detecting the format is dangerous for raw images, write operations "
             "on block 0 will be restricted.\n"
             "         Specify the 'raw' format explicitly to remove the restrictions.\n")
    return node


def _protocol_class(filename: Any, positional: bool = True) -> type[BlockDriver]:
    """``bdrv_find_protocol``: the driver a ``proto:`` prefix names, else ``file``; only a file name
    given as such (not a ``filename`` option) may carry a prefix (``allow_protocol_prefix``)."""
    name = "file"
    if isinstance(filename, str):
        from qio.block.file import is_host_device

        if is_host_device(filename):
            cls = registry.find("host_device")
            assert cls is not None
            return cls
        proto = registry.protocol_of(filename) if positional else None
        if proto is not None:
            if proto not in registry.PROTOCOL_PREFIXES:
                raise QemuError(f"Unknown protocol '{proto}'")
            name = registry.PROTOCOL_PREFIXES[proto]
    cls = registry.find(name)
    assert cls is not None
    return cls


def _open_protocol(cls: type[BlockDriver], options: Options, flags: OpenFlags, warn: Warn,
                   positional: bool = True) -> BlockDriver:
    filename = options.get("filename")
    if positional and isinstance(filename, str) and cls.parse_filename(filename, options):
        del options["filename"]  # bdrv_parse_filename consumed it (drivers without bdrv_needs_filename)
    node = cls()
    node.flags = flags
    node.read_only = flags.read_only
    try:
        node.open_children(options, flags, lambda opts, fl, pos: open_node(opts, fl, warn, protocol=True,
                                                                          positional=pos))
        _name_node(node, options)
        node.refresh_limits()
        node.detect_zeroes = parse_detect_zeroes(options.get("detect-zeroes"), flags)
        node.open(options, flags)
        _check_leftovers(node, options, positional)
    except BaseException:
        _close_sync(node)
        raise
    return node


def _check_unchanged(node: BlockDriver, key: str, value: Any, new_ro: bool = False) -> None:
    """``bdrv_reopen_prepare``'s leftover check; ``file.X`` is the ``file`` child's option ``X``."""
    prefix, dot, rest = key.partition(".")
    child = node.child(prefix) if dot and key not in GENERIC_OPTS and key not in node.runtime_opts else None
    if child is not None:
        _check_unchanged(child.node, rest, value, new_ro)
    elif key in CHILD_REOPEN_OPTS and node.node_name:
        _reopen_child_generic(node, key, value, new_ro)
    elif key not in node.open_options or str(node.open_options[key]) != str(value):
        raise QemuError(f"Cannot change the option '{key}'")


#: Generic options ``reopen -o CHILD.X=...`` may set on any node (``bdrv_reopen_prepare`` takes them
#: from every node's options, not only the root's).
CHILD_REOPEN_OPTS = frozenset({"read-only", "auto-read-only", "cache.direct", "cache.no-flush", "discard",
                               "detect-zeroes"})


def _reopen_child_generic(node: BlockDriver, key: str, value: Any, new_ro: bool) -> None:
    """A generic option given to a child on reopen: checked as ``bdrv_reopen_prepare`` checks it; a
    child made read-only under a writing parent is refused as ``bdrv_reopen_prepare`` refuses it."""
    if key in ("discard", "detect-zeroes"):
        f = _node_flags({key: value}, node.flags, opening=False)
        if key == "detect-zeroes":
            parse_detect_zeroes(value, f)
        return
    on = opt_bool({key: value}, key, False)
    if key == "read-only" and on and not new_ro and node.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED):
        raise QemuError(f"Read-only block node '{node.node_name}' cannot support read-write users", errno.EPERM)
    if key == "read-only":  # an explicit option of the child: it stays until a reopen changes it
        if on:
            _reopened_ro.add(node)
        else:
            _reopened_ro.discard(node)


#: Child nodes a reopen made read-only with their own ``read-only=on`` (QEMU keeps it in the node's
#: explicit options: a later ``reopen -w`` of the parent leaves them read-only, and fails only where
#: the parent's new permissions need writing on them).
_reopened_ro: weakref.WeakSet[BlockDriver] = weakref.WeakSet()


def _probe(file: BlockDriver) -> type[BlockDriver]:
    name = "raw"
    if io.getlength(file) > 0:
        buf = bytearray(PROBE_BUF)
        try:
            run_sync(io.preadv(file, 0, PROBE_BUF, [memoryview(buf)]))
        except BlockError as e:
            raise QemuError.wrap(e, "Could not read image for determining its format") from None
        name = probe_format(bytes(buf), file.filename)
    cls = registry.find(name)
    if cls is None:
        raise QemuError(f"Unknown driver '{name}'")
    return cls


def _close_sync(node: BlockDriver) -> None:
    for c in node.children:
        _close_sync(c.node)
    node.closed()


def _apply_perms(node: BlockDriver, perm: int, shared: int) -> None:
    if node.flags.force_share:
        shared = PERM_ALL
    if perm & (PERM_WRITE | PERM_WRITE_UNCHANGED) and node.read_only:
        raise QemuError("Block node is read-only", errno.EPERM)  # e.g. read-only=on under a writer
    if perm & (PERM_WRITE | PERM_WRITE_UNCHANGED) and not perm & PERM_RESIZE \
            and io.getlength(node) % node.request_alignment:
        # padding an unaligned request could write past the end, which needs the resize permission
        raise QemuError("Cannot get 'write' permission without 'resize': "
                        "Image size is not a multiple of request alignment", errno.EPERM)
    node.perm, node.shared = perm, shared
    for c in node.children:
        c.perm, c.shared = node.child_perm(c, perm, shared)
        _apply_perms(c.node, c.perm, c.shared)
    node.set_perm(perm, shared)


def iter_nodes(node: BlockDriver) -> list[BlockDriver]:
    out = [node]
    for c in node.children:
        out.extend(iter_nodes(c.node))
    return out


def _primary_nodes(node: BlockDriver) -> list[BlockDriver]:
    """The node and its data children, without backing files (which stay read-only)."""
    out = [node]
    for c in node.children:
        if c.role_primary:
            out.extend(_primary_nodes(c.node))
    return out


class PauseGate:
    """qio's ``pause`` (nbdkit's pause filter): requests arriving while paused wait in submission order."""

    def __init__(self) -> None:
        self.queue = WaitQueue()
        self.held = 0

    async def hold(self) -> None:
        if current_co() is None:
            return  # not under the scheduler (open/close-time I/O): nothing to hold
        self.held += 1
        AioContext.current().notify()
        await self.queue.wait()

    def release(self) -> int:
        """Let the held requests go, oldest first, each running until it next waits."""
        n, self.held = self.held, 0
        self.queue.restart_all()
        return n


# -- backing files (bdrv_open_backing_file) ----------------------------------------------------
#: Deepest backing chain qio opens (each level costs Python stack frames).
MAX_BACKING_DEPTH = 64

#: (st_dev, st_ino) of the qcow2 images being opened, outermost first (backing-chain cycles).
_opening: list[tuple[int, int]] = []
_opening_ro: list[bool] = []


def _protocol_node(node: BlockDriver) -> BlockDriver:
    while node.children:
        primary = node.primary_child()
        if primary is None:
            break
        node = primary
    return node



def _file_identity(node: BlockDriver) -> tuple[int, int] | None:
    fd = getattr(_protocol_node(node), "fd", -1)
    if not isinstance(fd, int) or fd < 0:
        return None
    st = os.fstat(fd)
    return st.st_dev, st.st_ino





def _has_protocol(name: str) -> bool:
    for ch in name:
        if ch == "/":
            return False
        if ch == ":":
            return True
    return False

def full_backing_filename(bs: BlockDriver, name: str) -> str:
    """``bdrv_get_full_backing_filename``: relative names are relative to the image's directory."""
    if name.startswith("/") or name.startswith("json:") or _has_protocol(name):
        return name
    base = _protocol_node(bs.file).filename
    if base.startswith("json:"):
        raise QemuError(f"Cannot use relative backing file names for '{base}'")
    return base[: base.rfind("/") + 1] + name



def _take_backing_options(options: dict[str, Any]) -> dict[str, Any] | None:
    """Remove ``backing``/``backing.*``; None means ``"backing": null`` (no backing file)."""
    sub = sub_options(options, "backing")
    ref = options.get("backing")
    if "backing" in options and (ref is None or ref == ""):
        del options["backing"]
        return None
    if isinstance(ref, str):  # a node reference; qemu-io's only nodes are this image's own
        raise QemuError(f"Could not open backing file: Cannot find device='{ref}' nor node-name='{ref}'")
    return sub  # any other value stays in options: "does not support the option 'backing'"



def _open_format(node: BlockDriver, options: Options, flags: OpenFlags) -> None:
    """``bdrv_open_driver`` then, for a format with a backing file, ``bdrv_open_backing_file``;
    a chain that loops or is too deep is refused (QEMU notices the loop by its image locks)."""
    if not node.supports_backing:
        node.open(options, flags)
        return
    ident = _file_identity(node.file)
    if ident is not None and ident in _opening:
        # QEMU finds the loop when the second instance of the image wants its lock (and recurses
        # forever when every instance is read-only).
        if _opening_ro[_opening.index(ident)]:
            raise QemuError("Backing file chain contains a loop")
        raise QemuError(f'Failed to get shared "write" lock\nIs another process using the image '
                        f"[{node.filename}]?", errno.EAGAIN)
    if len(_opening) >= MAX_BACKING_DEPTH:
        raise QemuError(f"Backing file chain is too deep (more than {MAX_BACKING_DEPTH} images)")
    backing_opts = _take_backing_options(options)
    _opening.append(ident or (-1, -1))
    _opening_ro.append(flags.read_only)
    try:
        node.open(options, flags)
        try:
            open_backing(node, backing_opts, flags)
        except BlockError as e:
            raise QemuError(str(e), e.code) from None
    finally:
        _opening.pop()
        _opening_ro.pop()


def open_backing(bs: BlockDriver, backing_opts: dict[str, Any] | None, flags: OpenFlags) -> None:
    """``bdrv_open_backing_file``: the backing image, read-only, relative to this image's directory."""
    if backing_opts is None:
        return
    backing_file, backing_format = bs.backing_file_info()
    if not backing_file and not backing_opts:
        return
    child_opts = dict(backing_opts)
    if "file.filename" not in child_opts and backing_file:
        child_opts.setdefault("filename", full_backing_filename(bs, backing_file))
    if backing_format and "driver" not in child_opts:
        child_opts["driver"] = backing_format
    child_opts.setdefault("read-only", "on")
    bflags = flags.copy()
    bflags.read_only = True
    bflags.snapshot = False
    bflags.copy_on_read = False
    bflags.unmap = True
    warn = bs.warn if callable(bs.warn) else (lambda _msg: None)
    try:
        node = open_node(child_opts, bflags, warn)
    except QemuError as e:
        raise QemuError(f"Could not open backing file: {e}", e.errno) from None
    bs.backing = node
    bs.children.append(Child("backing", node, role_primary=False))
    # bdrv_set_backing_hd refreshes the limits: a COW child's transfer limit counts too
    if node.max_transfer and (not bs.max_transfer or node.max_transfer < bs.max_transfer):
        bs.max_transfer = node.max_transfer


def temp_overlay(base: BlockDriver, flags: OpenFlags, warn: Warn) -> BlockDriver:
    """``bdrv_append_temp_snapshot``: a temporary qcow2 image (deleted at once, as QEMU's
    BDRV_O_TEMPORARY does) whose backing node is ``base``; made and opened through the registry."""
    import tempfile  # only -s needs it (tempfile imports random: start-up time)

    size = io.getlength(base)
    tmpdir = tempfile.gettempdir()
    if tmpdir == "/tmp":
        tmpdir = "/var/tmp"
    try:
        fd, name = tempfile.mkstemp(prefix="vl.", dir=tmpdir)
    except OSError as e:
        raise QemuError(f"Could not open temporary file '{tmpdir}/vl.XXXXXX': "
                        f"{os.strerror(e.errno or errno.EIO)}") from None
    os.close(fd)
    try:
        try:
            registry.create("qcow2", name, size)
        except QemuError as e:
            raise QemuError(f"Could not create temporary overlay '{name}': {e}", e.errno) from None
        oflags = flags.copy()
        oflags.snapshot = False
        oflags.no_flush = True
        oflags.nocache = False
        opts: dict[str, Any] = {"driver": "qcow2", "file.driver": "file", "file.filename": name}
        node = open_node(opts, oflags, warn)
    finally:
        try:
            os.unlink(name)
        except OSError:
            pass
    node.backing = base
    node.children.append(Child("backing", base, role_primary=False))
    return node


class BlockBackend:
    """The image as qemu-io sees it: byte-range checks, write-through FUA, permissions."""

    def __init__(self, root: BlockDriver, flags: OpenFlags) -> None:
        self.root = root
        self.flags = flags
        self.writethrough = flags.writethrough
        self.perm = PERM_CONSISTENT_READ | (0 if flags.read_only else PERM_WRITE)
        self.shared = PERM_ALL
        #: qio's ``pause``: new requests wait here, at the top of the graph, until ``unpause``
        self.gate: PauseGate | None = None

    @classmethod
    def open(cls, filename: str | None, options: Options, flags: OpenFlags, warn: Warn) -> BlockBackend:
        options = dict(options)
        positional = filename is not None and not filename.startswith("json:")
        if filename is not None:
            if filename.startswith("json:"):
                parsed = parse_json_filename(filename)
                for k, v in parsed.items():
                    options.setdefault(k, v)
            else:
                options["filename"] = filename
        want_ro = flags.read_only
        flags = _node_flags(options, flags)
        if flags.force_share and not flags.read_only:
            raise QemuError("force-share=on can only be used with read-only images")
        if flags.copy_on_read and flags.read_only:
            raise QemuError("Can't use copy-on-read on read-only device")
        if flags.snapshot:  # -s: the image becomes the read-only backing node of a temporary overlay
            base_flags = flags.copy()
            base_flags.read_only, base_flags.snapshot, base_flags.copy_on_read = True, False, False
            base = open_node(options, base_flags, warn, positional=positional)
            try:
                root = temp_overlay(base, flags, warn)
            except BaseException:
                _close_sync(base)
                raise
        else:
            root = open_node(options, flags, warn, positional=positional)
        root.copy_on_read = flags.copy_on_read
        if not want_ro and any(n.read_only for n in _primary_nodes(root)):
            # blk_new_open asked for WRITE (no -r) but an option made a node read-only.
            _close_sync(root)
            raise QemuError("Block node is read-only", errno.EPERM)
        blk = cls(root, flags)
        try:
            _apply_perms(root, blk.perm, blk.shared)
        except BaseException:
            _close_sync(root)
            raise
        pf = sys.modules.get("qio.block.powerfail")
        if pf is not None and pf.session_armed:  # the session's disk has a volatile write cache
            pf.arm(root)
        return blk

    def set_perm(self, perm: int) -> None:
        """Take more permissions for a command (``write`` needs WRITE, ``truncate`` RESIZE too)."""
        if perm & ~self.perm == 0:
            return
        if perm & (PERM_WRITE | PERM_RESIZE) and any(n.read_only for n in _primary_nodes(self.root)
                                                     if n is self.root or n.children):
            raise QemuError("Block node is read-only", errno.EPERM)
        old = self.perm
        try:
            _apply_perms(self.root, perm, self.shared)
        except QemuError:
            _apply_perms(self.root, old, self.shared)
            raise
        self.perm = perm

    # -- requests --------------------------------------------------------------------------------
    def getlength(self) -> int:
        """``blk_getlength``: ENOMEDIUM once the root lost its driver."""
        if not self.root.is_inserted():
            raise BlockError(errno.ENOMEDIUM)
        return io.getlength(self.root)

    def _check(self, offset: int, nbytes: int) -> None:
        if nbytes < 0 or offset < 0:
            raise BlockError(errno.EIO)
        total = io.getlength(self.root)
        if offset > total or total - offset < nbytes:
            raise BlockError(errno.EIO)

    async def preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        current_request.set(("read", offset, nbytes))
        if self.gate is not None:
            await self.gate.hold()
        self._check(offset, nbytes)
        await io.preadv(self.root, offset, nbytes, qiov)

    async def pwritev(self, offset: int, nbytes: int, qiov: IOVec | None, flags: int = 0) -> None:
        current_request.set(("write-zeroes" if qiov is None else "write", offset, nbytes))
        if self.gate is not None:
            await self.gate.hold()
        self._check(offset, nbytes)
        if self.writethrough:
            flags |= REQ_FUA
        root = self.root
        if io.can_pwritev_inline(root, offset, nbytes, qiov, flags):
            assert qiov is not None
            io.pwritev_inline(root, offset, nbytes, qiov, flags)
            return
        await io.pwritev(root, offset, nbytes, qiov, flags)

    def can_write_inline(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> bool:
        """Whether :meth:`pwritev` of this request would pass every check and take the inline write path
        (``io.can_pwritev_inline``) without waiting for a pause gate: then :meth:`write_inline` is the
        whole request.  A pure test; writes through a write-through cache are left to :meth:`pwritev`."""
        if self.gate is not None or self.writethrough or nbytes < 0 or offset < 0:
            return False
        total = io.getlength(self.root)
        if offset > total or total - offset < nbytes:
            return False
        return io.can_pwritev_inline(self.root, offset, nbytes, qiov, flags)

    def write_inline(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        """:meth:`pwritev` of a request :meth:`can_write_inline` accepted."""
        io.pwritev_inline(self.root, offset, nbytes, qiov, flags)

    async def pdiscard(self, offset: int, nbytes: int) -> None:
        current_request.set(("discard", offset, nbytes))
        if self.gate is not None:
            await self.gate.hold()
        self._check(offset, nbytes)
        await io.pdiscard(self.root, offset, nbytes)

    async def flush(self) -> None:
        current_request.set(("flush", 0, 0))
        if self.gate is not None:
            await self.gate.hold()
        await io.flush(self.root)

    async def truncate(self, offset: int, prealloc: str) -> None:
        if not self.root.is_inserted():
            raise QemuError("No medium inserted", errno.ENOMEDIUM)
        await io.truncate(self.root, offset, False, prealloc)

    async def is_allocated(self, offset: int, nbytes: int) -> tuple[bool, int]:
        return await io.is_allocated(self.root, offset, nbytes)

    async def load_vmstate(self, pos: int, nbytes: int, qiov: IOVec) -> None:
        await self.root.co_load_vmstate(pos, nbytes, qiov)

    async def save_vmstate(self, pos: int, nbytes: int, qiov: IOVec) -> None:
        await self.root.co_save_vmstate(pos, nbytes, qiov)
        if self.writethrough:  # blk_save_vmstate flushes when the write cache is off
            await io.flush(self.root)

    def reopen(self, flags: OpenFlags, options: Options) -> None:
        """``bdrv_reopen`` of the whole graph with new flags and options.

        The root's driver validates what it may change (``reopen_opts``) first; every other option, of
        the root or of a child (``file.locking``), must keep the value the node was opened with."""
        options = dict(options)
        flags = _node_flags(options, flags, opening=False)
        if flags.read_only and self.root.copy_on_read:
            raise QemuError(f"Can't set node '{self.root.node_name}' to r/o with copy-on-read enabled")
        root_opts = {k: v for k, v in options.items() if k in self.root.reopen_opts}
        detect_zeroes = parse_detect_zeroes(options.get("detect-zeroes", self.root.detect_zeroes), flags)
        self.root.check_reopen(flags, root_opts)
        for node in _primary_nodes(self.root)[1:]:
            if not node.is_format:  # protocols may refuse the new flags (a read-only nbd export)
                node.check_reopen(flags, {})
        for key, value in options.items():
            if key in root_opts or (key in GENERIC_OPTS
                                    and key not in ("driver", "filename", "node-name", "force-share")):
                continue
            _check_unchanged(self.root, key, value, flags.read_only)
        perm = self.perm if not flags.read_only else self.perm & ~(PERM_WRITE | PERM_RESIZE)
        primary = _primary_nodes(self.root)
        backing_flags = flags.copy()
        backing_flags.read_only = True
        nodes = iter_nodes(self.root)
        targets = [backing_flags if node in _reopened_ro or not any(node is n for n in primary) else flags
                   for node in nodes]
        self._reopen_check_perms(nodes, targets, perm)
        try:
            for node, target in zip(nodes, targets, strict=True):
                node.reopen(target, root_opts if node is self.root else {})
        except BaseException:
            try:  # the checked permissions are locked already: give the old ones back
                _apply_perms(self.root, self.perm, self.shared)
            except QemuError:
                pass
            raise
        _apply_perms(self.root, perm, self.shared)
        self.root.detect_zeroes = detect_zeroes
        self.perm = perm
        self.flags = flags
        self.writethrough = flags.writethrough

    def _reopen_check_perms(self, nodes: list[BlockDriver], targets: list[OpenFlags], perm: int) -> None:
        """``bdrv_reopen_multiple`` refreshes the permissions of the reopened graph before it commits:
        each node's new permissions are locked while the nodes after it still hold their old locks
        (the old descriptors), and a failure leaves the graph as it was.  A child that stays read-only
        (its own ``read-only=on``) fails here only if the parent's new permissions need writing on it
        (qcow2's metadata child); a pure data child is only refused at the next write."""
        old_ro = [node.read_only for node in nodes]
        try:
            for node, target in zip(nodes, targets, strict=True):
                node.read_only = target.read_only
            _apply_perms(self.root, perm, self.shared)
        except QemuError:
            for node, ro in zip(nodes, old_ro, strict=True):
                node.read_only = ro
            try:
                _apply_perms(self.root, self.perm, self.shared)
            except QemuError:
                pass
            raise
        finally:
            for node, ro in zip(nodes, old_ro, strict=True):
                node.read_only = ro

    async def close(self, report: Callable[[str], None]) -> None:
        """``bdrv_close``: flush, let drivers write back their caches, then release the files."""
        try:
            try:
                await io.flush(self.root)
            except BlockError:
                pass
            for node in iter_nodes(self.root):
                if node is not self.root:
                    # bdrv_close of a child runs after its parent's driver closed (bdrv_unref_child) and
                    # starts with bdrv_flush: what the parent wrote while closing (qcow2's caches, the
                    # cleared dirty bit) is flushed too
                    try:
                        await io.flush(node)
                    except BlockError:
                        pass
                node.report = report
                await node.close()
        finally:
            _close_sync(self.root)


def debug_node(root: BlockDriver) -> BlockDriver | None:
    """``bdrv_find_debug_node``: follow primary children to the first node with debug hooks."""
    node: BlockDriver | None = root
    while node is not None and not node.has_debug_hooks:
        node = node.primary_child()
    return node
