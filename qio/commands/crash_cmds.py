"""qio's ``powerfail`` command: a simulated power failure of the disk under the open image.

Why a command: the interesting states are those a crash leaves *between* two flushes of a real
workload, so the failure must be able to strike at any point of a command script, and the image
must be reopened and read back (or checked) in the same session.  See :mod:`qio.block.powerfail`
for the cache model and docs/crash-consistency.md for the use.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, NamedTuple

from qio.commands.spec import Invocation
from qio.numbers import strtol0

if TYPE_CHECKING:
    from qio.session import Session


HELP = (
    "\n"
    " simulates a power failure of the disk under the open image\n"
    "\n"
    " Example:\n"
    " 'powerfail -a' - from now on the disk has a volatile write cache\n"
    " 'powerfail -m torn -s 7' - cut the power: tear the writes since the last flush\n"
    "\n"
    " The image is closed without flushing, as if the process had died; open it\n"
    " again to read or check what survived.  Flushed data and FUA writes always\n"
    " survive; no sector ever holds data that nobody wrote to it.\n"
    " -a, -- arm: record writes from now on (this image and every image opened later)\n"
    " -m, -- all (lose every unflushed write, the default), random (keep a seeded\n"
    "        subset of them) or torn (keep a seeded subset of their sectors)\n"
    " -s, -- the seed of random and torn\n"
    " -v, -- list every unflushed write and what became of it\n"
    "\n"
)


class Powerfail(NamedTuple):
    arm: bool
    mode: str
    seed: int
    verbose: bool


def parse_powerfail(inv: Invocation) -> Powerfail:
    from qio.block.powerfail import MODES

    def mode(arg: str) -> str:
        if arg not in MODES:
            raise inv.fail(-errno.EINVAL, f"powerfail: unknown mode '{arg}' (all, random or torn)\n")
        return arg

    def seed(arg: str) -> int:
        v = strtol0(arg)
        if v is None or v < 0:
            raise inv.fail(-errno.EINVAL, f"{arg} is not a valid number\n")
        return v

    o, args = inv.options({"a": None, "m": mode, "s": seed, "v": None})
    if args:
        raise inv.usage(-errno.EINVAL)
    m = o.get("m", "all")
    if m != "all" and "s" not in o:
        raise inv.fail(-errno.EINVAL, f"powerfail: mode '{m}' needs a seed (-s SEED)\n")
    return Powerfail("a" in o, m, o.get("s", 0), "v" in o)


async def run_powerfail(sh: Session, cmd: Powerfail) -> int:
    from qio.block import powerfail

    blk = sh.require_blk()
    if cmd.arm:
        powerfail.session_armed = True
        n = powerfail.arm(blk.root)
        sh.out.out(f"powerfail: volatile write cache on {n} file{'s' if n != 1 else ''}; "
                   "writes from now on are lost unless flushed\n")
        return 0
    if not powerfail.armed(blk.root):
        sh.out.out("powerfail: no volatile write cache below this image; arm it with 'powerfail -a' before "
                   "the writes\n")
        return -errno.EINVAL
    await sh.drain("powerfail")  # requests in flight complete first; their writes are in the cache
    outcomes = powerfail.fail(blk.root, cmd.mode, cmd.seed)
    powerfail.drop(blk.root)
    sh.blk = None
    for oc in outcomes:
        detail = f", {oc.torn} torn" if cmd.mode == "torn" else ""
        sh.out.out(f"powerfail: {oc.filename}: {oc.entries} unflushed write{'s' if oc.entries != 1 else ''}, "
                   f"{oc.kept} kept, {oc.lost} lost{detail}\n")
        if cmd.verbose:
            sh.out.out("".join(f"    {line}\n" for line in oc.details))
    sh.out.out("powerfail: image closed without flushing (as if the process died)\n")
    return 0
