"""Seeded random block geometries against qemu-io: raw and qcow2 over a blkdebug node with odd
``align``, ``max-transfer``, ``opt-write-zero``, ``max-write-zero``, ``opt-discard`` and
``max-discard`` values, driven by random writes, zero writes, discards and pattern reads.

Every generated script is a differential corpus case (``tests/difftest.py`` format) run through
both programs; output, exit status and the image bytes must match.  QEMU 7.2 itself aborts on some
geometries (blkdebug's alignment assertions, a division by zero for an unset discard alignment);
those scripts are skipped, qio has no business reproducing a crash.  ``QIO_GEOMETRY_COUNT`` and
``QIO_GEOMETRY_SEED`` widen the search (failing shapes found that way go into
``tests/corpus/blkdebug/28x-geometry-*.qio``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

import difftest

COUNT = int(os.environ.get("QIO_GEOMETRY_COUNT", "16"))
SEED = int(os.environ.get("QIO_GEOMETRY_SEED", "100"))
CRASH_STATUSES = (128 + 6, 128 + 8)  # SIGABRT (assertion), SIGFPE


def make_script(seed: int) -> str:
    """One random case; the pattern reads follow a byte model of what was written."""
    r = random.Random(seed)
    fmt = r.choice(["qcow2", "qcow2", "qcow2", "raw"])
    align = r.choice([1, 1, 2, 8, 64, 512, 1024, 4096])
    mt = r.choice([0, align * r.randint(1, 7), max(align, 512) * r.randint(1, 9)])
    if mt and mt < 64:
        mt = 64 * align
    owz = r.choice([0, align * r.randint(1, 5), max(align, 512) * r.randint(1, 6)])
    mwz = r.choice([0, max(owz, align) * r.randint(1, 4)])
    od = r.choice([0, align * r.randint(1, 5), max(align, 512) * r.randint(1, 6)])
    md = r.choice([0, max(od, align) * r.randint(1, 4)])
    size = r.choice([1 << 20, (1 << 20) + 512, 2 << 20, 3 * 65536 + 1536])
    cs = r.choice([512, 4096, 65536])
    opts = [f"driver={fmt}"] + (["discard=unmap"] if fmt == "qcow2" else [])
    opts += ["file.driver=blkdebug", "file.image.filename=$IMG"]
    for name, v in (("align", align), ("max-transfer", mt), ("opt-write-zero", owz),
                    ("max-write-zero", mwz), ("opt-discard", od), ("max-discard", md)):
        if v > 1:
            opts.append(f"file.{name}={v}")
    head = [f"# random blkdebug geometry, seed {seed}"]
    if fmt == "qcow2":
        head.append(f"#! prep qemu-img create -f qcow2 -o cluster_size={cs} $IMG {size} >/dev/null")
    else:
        head.append(f"#! image {size}")
    head.append("#! noimgarg")
    body = ["open -o " + ",".join(opts)]
    model = bytearray(size)
    known = bytearray(b"\x01") * size
    bounds: list[tuple[int, int]] = []
    gran = r.choice([1, 512, 4096, cs, cs // 2])
    for _ in range(r.randint(8, 20)):
        op = r.choice(["w", "w", "z", "zu", "d", "aio"])
        off = r.randrange(0, size) // gran * gran
        n = max(1, min(size - off, r.choice([1, 100, 512, 1000, 4096, cs, 3 * cs + 7, 70000]) // gran * gran or gran))
        bounds.append((off, off + n))
        if op in ("w", "aio"):
            p = r.randint(1, 255)
            if op == "w":
                body.append(f"write -P {p} {off} {n}")
            else:
                body += [f"aio_write -P {p} {off} {n}", "aio_flush"]
            model[off : off + n] = bytes([p]) * n
        elif op in ("z", "zu"):
            body.append(f"write -z {'-u ' if op == 'zu' else ''}{off} {n}")
            model[off : off + n] = bytes(n)
        else:
            body.append(f"discard {off} {n}")
            known[off : off + n] = bytes(n)  # discarded bytes may read as old data or zeroes
    body.append(f"read -q 0 {size}")
    for a, b in bounds:
        for x in (a, b):
            j, hi = max(0, x - 700), min(size, x + 700)
            while j < hi:
                if not known[j]:
                    j += 1
                    continue
                k = j
                while k < hi and known[k] and model[k] == model[j]:
                    k += 1
                body.append(f"read -P {model[j]} {j} {k - j}")
                j = k
        if len(body) > 400:
            break
    for a, _ in bounds[-4:]:
        start = max(0, a - 48)
        body.append(f"read -v {start} {min(96, size - start)}")
    body.append("map")
    return "\n".join(head + body) + "\n"


def test_make_script_is_deterministic() -> None:
    assert make_script(SEED) == make_script(SEED)
    assert make_script(SEED) != make_script(SEED + 1)


@pytest.mark.oracle("qemu-io")
@pytest.mark.parametrize("seed", range(SEED, SEED + COUNT))
def test_random_geometry(tmp_path: Path, seed: int) -> None:
    case_file = tmp_path / f"{seed}-geometry.qio"
    case_file.write_text(make_script(seed))
    result = difftest.run_case(case_file)
    if result.ref.rc in CRASH_STATUSES:
        pytest.skip(f"qemu-io crashes on this geometry (status {result.ref.rc})")
    if not result.ok:
        pytest.fail(result.report(), pytrace=False)
