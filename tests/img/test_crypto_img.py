"""``qio-img`` with encryption: images it creates (``-f luks``, qcow2 ``encrypt.format=luks|aes``) are
laid out as ``qemu-img create`` lays them out (random keys, salts, iteration counts and the UUID
masked), pass ``qemu-img check`` and are read and written by qemu-io; ``info``/``check``/``map`` on
encrypted images and the option errors of ``create`` match qemu-img."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from luks_layout import crypto_ext, mask_luks
from oracle import QEMU_IMG, QEMU_IO, RUN_QIO_IMG, missing, run

pytestmark = pytest.mark.skipif(bool(missing()), reason="needs qemu-io and qemu-img")

OBJ = ["--object", "secret,id=sec0,data=hunter0"]


def qio_img(args: list[str], cwd: Path) -> tuple[str, str, int]:
    out, err, rc = run([sys.executable, "-c", RUN_QIO_IMG, *args], cwd)
    return out, err, rc


def qemu_img(args: list[str], cwd: Path) -> tuple[str, str, int]:
    assert QEMU_IMG is not None
    return run([QEMU_IMG, *args], cwd)


def qemu_img_create(args: list[str], cwd: Path) -> None:
    """qemu-img create, retried: under load its PBKDF2 timing fails ("Unable to get accurate CPU usage")."""
    for _ in range(30):
        _, err, rc = qemu_img(["create", "-q", *args], cwd)
        if rc == 0:
            return
    raise AssertionError(err)


CREATE_CASES = {
    "qcow2-luks": ["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"],
    "qcow2-luks-4k-cbc-essiv": ["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
                                "cluster_size=4096,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,"
                                "encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1"],
    "qcow2-aes": ["-f", "qcow2", "-o", "encryption=on,encrypt.key-secret=sec0"],
    "qcow2-aes-v2": ["-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=sec0,compat=0.10"],
    "luks": ["-f", "luks", "-o", "key-secret=sec0,iter-time=10"],
    "luks-xts-plain-sha512": ["-f", "luks", "-o", "key-secret=sec0,iter-time=10,cipher-alg=aes-128,"
                              "ivgen-alg=plain,hash-alg=sha512"],
}


@pytest.mark.parametrize("case", sorted(CREATE_CASES))
def test_create_matches_qemu_img_layout_and_qemu_reads_it(tmp_path: Path, case: str) -> None:
    args = [*OBJ, *CREATE_CASES[case]]
    qemu_img_create([*args, "ref.img", "1M"], tmp_path)
    out, err, rc = qio_img(["create", *args, "new.img", "1M"], tmp_path)
    assert (err, rc) == ("", 0)
    ref_out, _, _ = qemu_img(["create", *args, "ref2.img", "1M"], tmp_path)
    assert out.replace("new.img", "X") == ref_out.replace("ref2.img", "X") or "Unable to get" in ref_out
    ref, new = bytearray((tmp_path / "ref.img").read_bytes()), bytearray((tmp_path / "new.img").read_bytes())
    assert len(ref) == len(new)
    if case.startswith("luks"):
        mask_luks(ref, 0)
        mask_luks(new, 0)
    elif "luks" in case:
        assert crypto_ext(ref) == crypto_ext(new)
        mask_luks(ref, crypto_ext(ref)[0])
        mask_luks(new, crypto_ext(new)[0])
    assert ref == new
    fmt = "luks" if case.startswith("luks") else "qcow2"
    key = "key-secret" if fmt == "luks" else "encrypt.key-secret"
    spec = f"driver={fmt},file.filename=new.img,{key}=sec0"
    assert QEMU_IO is not None
    p = subprocess.run([QEMU_IO, *OBJ, "-c", "write -P 7 1000 70000", "-c", "read -P 7 1000 70000",
                        "--image-opts", spec], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "fail" not in p.stdout + p.stderr, p.stdout + p.stderr
    if fmt == "qcow2":
        out, err, rc = qemu_img(["check", *OBJ, "--image-opts", spec], tmp_path)
        assert (err, rc) == ("", 0) and "No errors were found" in out


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Encrypted images written by QEMU: qcow2/luks, qcow2/aes, a luks volume with essiv."""
    d = tmp_path_factory.mktemp("crypt")
    qemu_img_create([*OBJ, "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                     "l.qcow2", "4M"], d)
    qemu_img_create([*OBJ, "-f", "qcow2", "-o", "encryption=on,encrypt.key-secret=sec0", "a.qcow2", "4M"], d)
    qemu_img_create([*OBJ, "-f", "luks", "-o", "key-secret=sec0,iter-time=10,cipher-mode=cbc,ivgen-alg=essiv",
                     "v.luks", "4M"], d)
    assert QEMU_IO is not None
    for name, fmt, key in (("l.qcow2", "qcow2", "encrypt.key-secret"), ("a.qcow2", "qcow2", "encrypt.key-secret"),
                           ("v.luks", "luks", "key-secret")):
        subprocess.run([QEMU_IO, *OBJ, "-c", "write -P 1 0 100k", "-c", "write -z 1M 64k", "-c", "write -P 2 3M 9k",
                        "--image-opts", f"driver={fmt},file.filename={name},{key}=sec0"], cwd=d, check=True,
                       capture_output=True, timeout=60)
    return d


QUERY_CASES = [
    ["info", "l.qcow2"], ["info", "--output=json", "l.qcow2"],
    ["info", "a.qcow2"], ["info", "--output=json", "a.qcow2"],
    ["info", "v.luks"], ["info", "--output=json", "v.luks"],
    ["check", *OBJ, "--image-opts", "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec0"],
    ["check", "--output=json", *OBJ, "--image-opts", "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec0"],
    ["check", *OBJ, "--image-opts", "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=sec0"],
    ["check", "l.qcow2"],
    ["map", "--output=json", *OBJ, "--image-opts", "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec0"],
    ["map", "--output=json", *OBJ, "--image-opts", "driver=luks,file.filename=v.luks,key-secret=sec0"],
    ["map", "--output=json", *OBJ, "--image-opts", "driver=qcow2,file.filename=a.qcow2,encrypt.key-secret=sec0"],
    ["map", *OBJ, "--image-opts", "driver=qcow2,file.filename=l.qcow2,encrypt.key-secret=sec1"],
]


@pytest.mark.parametrize("args", QUERY_CASES, ids=[" ".join(a) for a in QUERY_CASES])
def test_query_encrypted_like_qemu_img(made: Path, args: list[str]) -> None:
    ref = qemu_img(args, made)
    got = qio_img(args, made)
    assert got == ref


CREATE_ERRORS = [
    ["-f", "qcow2", "-o", "encryption=on,encrypt.format=luks,encrypt.key-secret=sec0"],
    ["-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=sec0,encrypt.cipher-alg=aes-128"],
    ["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.cipher-alg=foo"],
    ["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.hash-alg=sha3"],
    ["-f", "qcow2", "-o", "encrypt.format=luks"],
    ["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=nosuch"],
    ["-f", "qcow2", "-o", "encrypt.format=foo"],
    ["-f", "qcow2", "-o", "encryption=on"],
    ["-f", "luks"],
    ["-f", "luks", "-o", "key-secret=nosuch"],
    ["-f", "luks", "-o", "key-secret=sec0,cipher-mode=gcm"],
    ["-f", "luks", "-o", "help"],
]


@pytest.mark.parametrize("args", CREATE_ERRORS, ids=[" ".join(a) for a in CREATE_ERRORS])
def test_create_errors_like_qemu_img(tmp_path: Path, args: list[str]) -> None:
    argv = ["create", *OBJ, *args, "x.img", "1M"]
    ref = qemu_img(argv, tmp_path)
    got = qio_img(argv, tmp_path)
    assert got == ref
