"""``qio-img create``: qemu-img 7.2's ``img_create`` and ``bdrv_img_create``.

The ``-o`` list is parsed against the merged QemuOpts description of the format and the ``file``
protocol, so values are checked and the ``Formatting ...`` line is printed in QEMU's option order and
spelling.  The image itself is made by :func:`qio.block.qcow2.create.create` (the code behind ``qio -s``)
or, for raw, by the ``file`` driver's truncate with preallocation.
"""

from __future__ import annotations

import errno
import os

from qio.block.errors import BlockError, QemuError
from qio.block.modes import OpenFlags
from qio.block.registry import protocol_of
from qio.getopt import LongOpt
from qio.img.common import Ctx, Options, UsageError, define_object
from qio.numbers import INT64_MAX, qemu_strtosz, strtol0
from qio.qemuopts import opt_bool, opt_size

BOOL, STRING, SIZE, NUMBER = "bool", "str", "size", "number"
_FILE_OPTS: list[tuple[str, str, str | None]] = [
    ("size", SIZE, None), ("nocow", BOOL, None), ("preallocation", STRING, None), ("extent_size_hint", SIZE, None)]
_ENCRYPT = ["encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
            "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg"]
_QCOW2_OPTS: list[tuple[str, str, str | None]] = [
    ("encryption", BOOL, None), *[(n, STRING, None) for n in _ENCRYPT], ("encrypt.iter-time", NUMBER, None),
    ("cluster_size", SIZE, "65536"), ("extended_l2", BOOL, "off"), ("preallocation", STRING, None),
    ("compression_type", STRING, "zlib"), ("size", SIZE, None), ("compat", STRING, None),
    ("backing_file", STRING, None), ("backing_fmt", STRING, None), ("data_file", STRING, None),
    ("data_file_raw", BOOL, None), ("lazy_refcounts", BOOL, "off"), ("refcount_bits", NUMBER, "16")]
#: The ``.help`` texts of the options (the raw format's ``size`` is the protocol's).
_HELP = {
    "size": "Virtual disk size", "nocow": "Turn off copy-on-write (valid only on btrfs)",
    "extent_size_hint": "Extent size hint for the image file, 0 to disable",
    "encryption": "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    "encrypt.format": "Encrypt the image, format choices: 'aes', 'luks'",
    "encrypt.key-secret": "ID of secret providing qcow AES key or LUKS passphrase",
    "encrypt.cipher-alg": "Name of encryption cipher algorithm",
    "encrypt.cipher-mode": "Name of encryption cipher mode", "encrypt.ivgen-alg": "Name of IV generator algorithm",
    "encrypt.ivgen-hash-alg": "Name of IV generator hash algorithm",
    "encrypt.hash-alg": "Name of encryption hash algorithm",
    "encrypt.iter-time": "Time to spend in PBKDF in milliseconds", "cluster_size": "qcow2 cluster size",
    "extended_l2": "Extended L2 tables", "compression_type": "Compression method used for image cluster compression",
    "compat": "Compatibility level (v2 [0.10] or v3 [1.1])", "backing_file": "File name of a base image",
    "backing_fmt": "Image format of the base image", "data_file": "File name of an external data file",
    "data_file_raw": "The external data file must stay valid as a raw image",
    "lazy_refcounts": "Postpone refcount updates", "refcount_bits": "Width of a reference count entry in bits"}
_PREALLOC_HELP = {"qcow2": "off, metadata, falloc, full", "file": "off, falloc, full"}
_TYPE_NAMES = {BOOL: "bool (on/off)", STRING: "str", SIZE: "size", NUMBER: "num"}


def _option_help(desc: list[tuple[str, str, str | None]], owner: dict[str, str]) -> str:
    """``qemu_opts_print_help(list, false)``: ``  name=<type>``, the help text from column 24, sorted."""
    lines = []
    for name, typ, _ in desc:
        line = f"  {name}=<{_TYPE_NAMES[typ]}>"
        text = f"Preallocation mode (allowed values: {_PREALLOC_HELP[owner[name]]})" if name == "preallocation" \
            else _HELP.get(name) or _luks_help(name)
        lines.append(f"{line:<24} - {text}")
    return "".join(f"{line}\n" for line in sorted(lines))


def _luks_opts() -> list[tuple[str, str, str | None]]:
    from qio.img.crypt import LUKS_OPTS

    return LUKS_OPTS


def _luks_help(name: str) -> str:
    from qio.img.crypt import LUKS_HELP

    return LUKS_HELP[name]


def has_help_option(text: str) -> bool:
    """``has_help_option``: an item without ``=`` named ``help`` or ``?``."""
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        if j >= n or text[j] != "=":
            if text[i:j] in ("help", "?"):
                return True
            i = j
        else:
            i = j + 1
            while i < n:  # the value: ',,' is an escaped comma
                if text[i] == ",":
                    if i + 1 < n and text[i + 1] == ",":
                        i += 2
                        continue
                    break
                i += 1
        if i < n and text[i] == ",":
            i += 1
    return False


def print_option_help(ctx: Ctx, filename: str | None, fmt: str) -> int:
    """``print_block_option_help``: the format's creation options, merged with the protocol's when a
    file name is given."""
    if fmt not in ("raw", "qcow2", "luks"):
        ctx.out.error_report(f"Unknown file format '{fmt}'")
        return 1
    desc = create_opts(fmt)[:len(_luks_opts())] if fmt == "luks" else (
        _QCOW2_OPTS if fmt == "qcow2" else [_FILE_OPTS[0]])
    owner = {n: "qcow2" for n, _, _ in desc}
    if filename is not None:
        if protocol_of(filename) not in (None, "file"):
            ctx.out.error_report(f"Unknown protocol '{filename.split(':', 1)[0]}'")
            return 1
        desc = create_opts(fmt)
        owner.update({n: "file" for n, _, _ in _FILE_OPTS if n not in owner})
        ctx.out.out("Supported options:\n" + _option_help(desc, owner))
    else:
        ctx.out.out(f"Supported {fmt} options:\n" + _option_help(desc, owner) + "\nThe protocol level may support "
                    "further options.\nSpecify the target filename to include those options.\n")
    return 0


def create_opts(fmt: str) -> list[tuple[str, str, str | None]]:
    """``qemu_opts_append(format opts, protocol opts)``: names already present are skipped."""
    if fmt == "luks":
        from qio.img.crypt import LUKS_OPTS

        own = LUKS_OPTS
    else:
        own = _QCOW2_OPTS if fmt == "qcow2" else [_FILE_OPTS[0]]
    names = {n for n, _, _ in own}
    return own + [d for d in _FILE_OPTS if d[0] not in names]


#: QEMU 7.2's BlockdevDriver enum (what ``backing_fmt`` may name).
_DRIVER_NAMES = (
    "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write copy-on-read dmg file "
    "snapshot-access ftp ftps gluster host_cdrom host_device http https iscsi luks nbd nfs null-aio null-co nvme "
    "nvme-io_uring parallels preallocate qcow qcow2 qed quorum raw rbd replication ssh throttle vdi vhdx "
    "virtio-blk-vfio-pci virtio-blk-vhost-user virtio-blk-vhost-vdpa vmdk vpc vvfat")
BLOCKDEV_DRIVERS = frozenset(_DRIVER_NAMES.split(" "))


class CreateOpts:
    """A parsed ``-o`` list: raw strings as given (last one wins) and their typed values."""

    def __init__(self, desc: list[tuple[str, str, str | None]]) -> None:
        self.desc = desc
        self.types = {n: t for n, t, _ in desc}
        self.str: dict[str, str] = {}
        self.num: dict[str, int] = {}

    def parse(self, text: str) -> None:
        """``qemu_opts_do_parse``: unknown names and badly typed values fail here."""
        from qio.qemuopts import parse_qemuopts

        for key, value in parse_qemuopts(text, lambda _m: None).items():
            self.set(key, value)

    def set(self, key: str, value: str) -> None:
        typ = self.types.get(key)
        if typ is None:
            raise QemuError(f"Invalid parameter '{key}'")
        if typ == BOOL:
            opt_bool({key: value}, key, False)
        elif typ == SIZE:
            self.num[key] = opt_size({key: value}, key, 0)
        elif typ == NUMBER:
            v = strtol0(value)
            if v is None:
                raise QemuError(f"Parameter '{key}' expects a number")
            self.num[key] = v & (2**64 - 1)
        self.str[key] = value

    def get(self, key: str) -> str | None:
        return self.str.get(key)

    def print_line(self) -> str:
        """``qemu_opts_print(opts, " ")``: set options and defaults, in description order."""
        parts = []
        for name, typ, default in self.desc:
            value = self.str.get(name, default)
            if value is None:
                continue
            if typ == STRING:
                parts.append(f"{name}={value.replace(',', ',,')}")
            elif typ in (SIZE, NUMBER) and name in self.str:
                n = self.num[name]
                parts.append(f"{name}={n - 2**64 if n >= 2**63 else n}")
            else:
                parts.append(f"{name}={value}")
        return " ".join(parts)


def _valid_option_list(text: str) -> bool:
    """``is_valid_option_list``: not empty, no leading comma, no odd run of trailing commas."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


async def img_create(ctx: Ctx, argv: list[str]) -> int:
    fmt, base_fmt, base_filename, quiet, no_backing = "raw", None, None, False, False
    opt_text: str | None = None
    opts = Options(ctx, argv, "F:b:f:ho:qu", (LongOpt("object", True, "object"),))
    for c, arg in opts:
        if c == "object":
            if not define_object(ctx, arg):
                return 1
        elif c == "F":
            base_fmt = arg
        elif c == "b":
            base_filename = arg
        elif c == "f":
            fmt = arg
        elif c == "o":
            if not _valid_option_list(arg):
                ctx.out.error_report(f"Invalid option list: {arg}")
                return 1
            opt_text = arg if opt_text is None else f"{opt_text},{arg}"
        elif c == "q":
            quiet = True
        elif c == "u":
            no_backing = True
    args = opts.args
    if opt_text is not None and has_help_option(opt_text):
        return print_option_help(ctx, args[0] if args else None, fmt)
    if not args:
        raise UsageError("Expecting image file name")
    filename = args[0]
    img_size = -1
    if len(args) > 1:
        err, val, _ = qemu_strtosz(args[1])
        if err and err != -errno.ERANGE:
            ctx.out.error_report("Invalid image size specified. You may use k, M, G, T, P or E suffixes for")
            ctx.out.error_report("kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
            return 1
        if err or val > INT64_MAX:
            ctx.out.error_report(f"Invalid image size specified. Must be between 0 and {INT64_MAX}.")
            return 1
        img_size = val
    if len(args) > 2:
        raise UsageError(f"Unexpected argument: {args[2]}")
    try:
        await img_create_file(ctx, filename, fmt, base_filename, base_fmt, opt_text, img_size, no_backing, quiet)
    except QemuError as e:
        msg, _, hint = str(e).partition("\n\x00")
        ctx.out.flush()
        ctx.out.error_report(f"{filename}: {msg}")
        if hint:
            ctx.out.err(hint)
        return 1
    return 0


def _hinted(message: str, hint: str, code: int = errno.EINVAL) -> QemuError:
    """An error with an ``error_append_hint`` text, printed raw after the message line."""
    return QemuError(f"{message}\n\x00{hint}", code)


async def img_create_file(ctx: Ctx, filename: str, fmt: str, base_filename: str | None, base_fmt: str | None,
                    opt_text: str | None, img_size: int, no_backing: bool, quiet: bool) -> None:
    """``bdrv_img_create``."""
    if fmt not in ("raw", "qcow2", "luks"):
        raise QemuError(f"Unknown file format '{fmt}'")
    o = CreateOpts(create_opts(fmt))
    if opt_text is not None:
        o.parse(opt_text)
    if o.get("size") is None:
        o.str["size"], o.num["size"] = str(img_size), img_size & (2**64 - 1)
    elif img_size != -1:
        raise QemuError("The image size must be specified only once")
    for key, value, what in (("backing_file", base_filename, "Backing file"),
                             ("backing_fmt", base_fmt, "Backing file format")):
        if value is not None:
            if key not in o.types:
                raise QemuError(f"{what} not supported for file format '{fmt}'")
            o.set(key, value)
    backing_file, backing_fmt = o.get("backing_file"), o.get("backing_fmt")
    if backing_file is not None:
        if backing_file == filename:
            raise QemuError("Error: Trying to create an image with the same filename as the backing file")
        if not backing_file:
            raise QemuError("Expected backing file name, got empty string")
    size = o.num["size"]
    size = size - 2**64 if size >= 2**63 else size
    if backing_file is not None and not no_backing:
        size = _probe_backing(ctx, filename, backing_file, backing_fmt, size)
        if o.num["size"] != size & (2**64 - 1):
            o.str["size"], o.num["size"] = str(size), size
    elif backing_file is not None and backing_fmt is None:
        raise QemuError("Backing file specified without backing format")
    if size == -1:
        raise QemuError("Image creation needs a size parameter")
    if not quiet:
        ctx.out.out(f"Formatting '{filename}', fmt={fmt} {o.print_line()}\n")
        ctx.out.flush()
    try:
        if fmt == "raw":
            create_raw(filename, size, o.get("preallocation"))
        elif fmt == "luks":
            from qio.img.crypt import create_luks

            create_luks(filename, size, o.str, o.num)
        else:
            await _create_qcow2(ctx, filename, size, o)
    except QemuError as e:
        if e.errno == errno.EFBIG:
            hint = " (try using a larger cluster size)" if "cluster_size" in o.types else ""
            raise QemuError(f"The image size is too large for file format '{fmt}'{hint}", errno.EFBIG) from None
        raise


def _probe_backing(ctx: Ctx, filename: str, backing_file: str, backing_fmt: str | None, size: int) -> int:
    """Open the backing image (read-only, shared, without its own backing) to check it and take its size."""
    from qio.block.backend import _close_sync
    from qio.img.common import open_backend

    full = backing_file
    if not (backing_file.startswith("/") or protocol_of(backing_file) is not None) and "/" in filename:
        full = filename[: filename.rfind("/") + 1] + backing_file
    flags = OpenFlags()
    flags.read_only = True
    flags.no_io = True  # bdrv_img_create opens the backing image with BDRV_O_NO_IO
    try:
        blk = open_backend(ctx, full, backing_fmt, flags, force_share=True, no_backing=True)
    except QemuError as e:
        raise _hinted(str(e), "Could not open backing image.\n", e.errno) from None
    try:
        if backing_fmt is None:
            raise _hinted("Backing file specified without backing format",
                          f"Detected format of {blk.root.format_name}.")
        if size == -1:
            size = blk.getlength()
    finally:
        _close_sync(blk.root)
    return size


async def _create_qcow2(ctx: Ctx, filename: str, size: int, o: CreateOpts) -> None:
    """``qcow2_co_create_opts``: the file is created first; option values are then checked as the QAPI
    visitor and ``qcow2_co_create`` check them, and the file is removed again on failure."""
    from qio.block.qcow2.create import PREALLOC_MODES, create_async, delete_file_noerr

    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.close(fd)
    except OSError as e:
        code = e.errno or errno.EIO
        raise QemuError(f"Could not create '{filename}': {os.strerror(code)}", code) from None
    data_file = o.get("data_file")
    if data_file is not None:
        # bdrv_create_file of the data file: created empty (qcow2's truncate gives it its size)
        try:
            create_raw(data_file, 0, None)
        except QemuError:
            delete_file_noerr(filename, ctx.out.reporter())
            raise
    try:
        version = 3
        compat = o.get("compat")
        if compat is not None:
            v = {"0.10": "v2", "1.1": "v3"}.get(compat, compat)
            if v not in ("v2", "v3"):
                raise QemuError(f"Parameter 'version' does not accept value '{compat}'")
            version = 2 if v == "v2" else 3
        backing_fmt = o.get("backing_fmt")
        if backing_fmt is not None and backing_fmt not in BLOCKDEV_DRIVERS:
            raise QemuError(f"Parameter 'backing-fmt' does not accept value '{backing_fmt}'")
        prealloc = o.get("preallocation") or "off"
        if prealloc not in PREALLOC_MODES:
            raise QemuError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
        ctype = o.get("compression_type") or "zlib"
        if ctype not in ("zlib", "zstd"):
            raise QemuError(f"Parameter 'compression-type' does not accept value '{ctype}'")
        from qio.img.crypt import qcow2_encrypt_spec

        encrypt = qcow2_encrypt_spec(o.str, o.num)
    except QemuError:
        delete_file_noerr(filename, ctx.out.reporter())
        if data_file is not None:
            delete_file_noerr(data_file, ctx.out.reporter())
        raise
    rc = o.num.get("refcount_bits", 16)
    await create_async(filename, (size + 511) // 512 * 512, cluster_size=o.num.get("cluster_size", 65536),
                       version=version, refcount_bits=rc - 2**64 if rc >= 2**63 else rc,
                       lazy_refcounts=opt_bool(o.str, "lazy_refcounts", False), backing_file=o.get("backing_file"),
                       backing_fmt=backing_fmt, preallocation=prealloc, warn=ctx.out.reporter(),
                       extended_l2=opt_bool({"x": o.get("extended_l2") or "off"}, "x", False),
                       compression_type=ctype, encrypt=encrypt,
                       data_file=data_file, data_file_raw=opt_bool(o.str, "data_file_raw", False))


def opt_bool_or_str(value: str | None) -> bool:
    """Whether an option that may be a boolean (``encrypt=off``) asks for the feature at all."""
    return value not in (None, "off", "no", "false", "n")


def create_raw(filename: str, size: int, prealloc: str | None) -> None:
    """file-posix ``raw_co_create``: create, empty, then grow to the size (rounded up to a sector) with
    the ``file`` driver's preallocation."""
    from qio.aio import run_sync
    from qio.block.backend import _close_sync, open_node
    from qio.block.qcow2.create import PREALLOC_MODES

    mode = prealloc or "off"
    if mode not in PREALLOC_MODES:
        raise QemuError(f"invalid parameter value: {mode}")
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    except OSError as e:
        code = e.errno or errno.EIO
        raise QemuError(f"Could not create '{filename}': {os.strerror(code)}", code) from None
    node = open_node({"driver": "file", "filename": filename}, OpenFlags(), lambda _m: None)
    try:
        from qio.block import io

        run_sync(io.truncate(node, (size + 511) // 512 * 512, False, mode))
    except BlockError as e:
        raise QemuError.wrap(e) from None
    finally:
        _close_sync(node)
