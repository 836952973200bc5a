"""Secret objects (``--object secret,...``: ``crypto/secret.c``, ``crypto/secret_common.c``).

qemu-io creates each object while it parses its command line: a secret is loaded (read from its file,
base64-decoded, decrypted with its ``keyid`` secret) at once, and errors end the program.  Block drivers
look secrets up by id when they open an encrypted image.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

from qio.block.errors import QemuError


@dataclass
class Secret:
    """A loaded secret: the bytes that ``qcrypto_secret_lookup`` hands out."""

    id: str
    data: bytes


#: The objects root: id -> secret (qio knows only the secret object type).
_OBJECTS: dict[str, Secret] = {}

_OBJECT_TYPES = ("authz-list", "authz-list-file", "authz-simple", "main-loop", "pr-manager-helper", "secret",
                 "secret_keyring", "thread-context", "throttle-group", "tls-cipher-suites", "tls-creds-anon",
                 "tls-creds-psk", "tls-creds-x509")
_SECRET_PROPS = ("data", "file", "format", "iv", "keyid")
_B64_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n")
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def clear() -> None:
    """Forget every object (tests; a fresh program starts empty)."""
    _OBJECTS.clear()


def _keyval(text: str) -> list[tuple[str, str]]:
    """``keyval_parse`` with the implied key ``qom-type``: ``key=value`` pairs, ``,,`` escapes a comma."""
    out: list[tuple[str, str]] = []
    if not text:
        return out
    pos, n = 0, len(text)
    first = True
    while pos < n or first:
        key_end = pos
        while key_end < n and text[key_end] not in "=,":
            key_end += 1
        if key_end >= n or text[key_end] == ",":
            if first:  # the implied key
                key, vstart = "qom-type", pos
            else:
                raise QemuError(f"Expected '=' after parameter '{text[pos:key_end]}'")
        else:
            key, vstart = text[pos:key_end], key_end + 1
        val: list[str] = []
        i = vstart
        while i < n:
            if text[i] == ",":
                if i + 1 < n and text[i + 1] == ",":
                    val.append(",")
                    i += 2
                    continue
                break
            val.append(text[i])
            i += 1
        out.append((key, "".join(val)))
        pos = i + 1
        first = False
        if i >= n:
            break
    return out


def object_help(text: str) -> str | None:
    """The help text of ``--object help`` / ``--object secret,help``, or None."""
    if text == "help":
        return "List of user creatable objects:\n" + "".join(f"  {t}\n" for t in _OBJECT_TYPES)
    if text in ("secret,help", "secret,?"):
        return ("secret options:\n  data=<string>\n  file=<string>\n  format=<QCryptoSecretFormat>\n"
                "  iv=<string>\n  keyid=<string>\n")
    return None


def add_object(text: str) -> None:
    """``user_creatable_process_cmdline`` for one ``--object`` argument: create (and load) a secret."""
    if text.startswith("{"):
        raise QemuError("qio does not support JSON --object arguments")
    pairs = _keyval(text)
    props: dict[str, str] = {}
    for k, v in pairs:
        props[k] = v  # the last of a repeated key wins
    qom_type = props.pop("qom-type", None)
    if qom_type is None:
        raise QemuError("Parameter 'qom-type' is missing")
    if qom_type not in _OBJECT_TYPES:
        raise QemuError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    obj_id = props.pop("id", None)
    if obj_id is None:
        raise QemuError("Parameter 'id' is missing")
    if not _ID_RE.match(obj_id):
        raise QemuError("Parameter 'id' expects an identifier\n"
                        "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
    if qom_type != "secret":
        raise QemuError(f"qio does not support objects of type '{qom_type}'")
    for k in props:
        if k == "loaded":
            raise QemuError("Property 'secret.loaded' is not writable")
        if k not in _SECRET_PROPS:
            raise QemuError(f"Parameter '{k}' is unexpected")
    fmt = props.get("format", "raw")
    if fmt not in ("raw", "base64"):
        raise QemuError(f"Parameter 'format' does not accept value '{fmt}'")
    data = _load(props, fmt)
    if obj_id in _OBJECTS:
        raise QemuError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
    _OBJECTS[obj_id] = Secret(obj_id, data)


def _load(props: dict[str, str], fmt: str) -> bytes:
    """``qcrypto_secret_complete``: the raw input, then decryption (keyid) or base64 decoding."""
    path, text = props.get("file"), props.get("data")
    if path is not None:
        if text is not None:
            raise QemuError("'file' and 'data' are mutually exclusive")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise QemuError(f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                            f"{e.strerror}") from None
    elif text is not None:
        raw = text.encode("utf-8", "surrogateescape").split(b"\0", 1)[0]
    else:
        raise QemuError("Either 'file' or 'data' must be provided")
    keyid = props.get("keyid")
    if keyid is not None:
        return _decrypt(raw, keyid, props.get("iv"), fmt)
    if fmt == "base64":
        return base64_decode(raw)
    return raw


def base64_decode(raw: bytes) -> bytes:
    """``qbase64_decode``: strict about the alphabet, then glib's lenient decoding."""
    if b"\0" in raw:
        raise QemuError("Base64 data contains embedded NUL characters")
    if any(c not in _B64_CHARS for c in raw):
        raise QemuError("Base64 data contains invalid characters")
    chars = raw.replace(b"\n", b"")
    pad = len(chars) - len(chars.rstrip(b"="))
    body = chars.replace(b"=", b"A")
    whole = len(body) // 4 * 4
    out = binascii.a2b_base64(body[:whole]) if whole else b""
    if pad and whole == len(body):
        out = out[:len(out) - min(pad, 2)]
    return out


def _decrypt(raw: bytes, keyid: str, iv: str | None, fmt: str) -> bytes:
    """``qcrypto_secret_decrypt``: AES-256-CBC with the key secret ``keyid`` and a base64 IV."""
    key = lookup(keyid)
    if len(key) != 32:
        raise QemuError("Key should be 32 bytes in length")
    if iv is None:
        raise QemuError("IV is required to decrypt secret")
    ivb = base64_decode(iv.encode())
    if len(ivb) != 16:
        raise QemuError(f"IV should be 16 bytes in length not {len(ivb)}")
    ct = base64_decode(raw) if fmt == "base64" else raw
    from qio.crypto.cipher import Cipher

    if not ct or len(ct) % 16:
        raise QemuError("Length of data must be a multiple of the block size")
    pt = Cipher("aes-256", "cbc", key).decrypt(ct, ivb)
    padn = pt[-1]
    if padn > 16 or padn > len(pt):
        raise QemuError(f"Incorrect number of padding bytes ({padn}) found on decrypted data")
    return pt[:len(pt) - padn]


def lookup(secret_id: str) -> bytes:
    """``qcrypto_secret_lookup``."""
    sec = _OBJECTS.get(secret_id)
    if sec is None:
        raise QemuError(f"No secret with id '{secret_id}'")
    return sec.data


def lookup_as_utf8(secret_id: str) -> bytes:
    """``qcrypto_secret_lookup_as_utf8``: the bytes (as C's ``strlen`` sees them) of valid UTF-8 data."""
    data = lookup(secret_id)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        raise QemuError(f"Data from secret {secret_id} is not valid UTF-8") from None
    if b"\0" in data:
        raise QemuError(f"Data from secret {secret_id} is not valid UTF-8")
    return data
