"""blkdebug's configuration: QEMU's INI dialect (``qemu_config_parse``) and the rule options.

Rules come from a config file (repeated ``[inject-error]`` / ``[set-state]`` sections, which
configparser cannot represent) and from inline options (``inject-error.0.event=...`` or JSON
arrays).  The file is read line by line exactly as QEMU's ``sscanf`` patterns read it, including
their quirks: ``key="v"`` without spaces is one (invalid) key, an unquoted value is the empty string,
``#`` starts a comment only in column 0.  Every message is QEMU's.
"""

from __future__ import annotations

import errno
import re
from typing import Any, NamedTuple

from qio.block.errors import QemuError
from qio.block.events import EVENT_NAMES

IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
DEFAULT_IOTYPES = frozenset(("read", "write", "write-zeroes", "discard", "flush"))
_TYPES = {
    "inject-error": {"event": "string", "state": "number", "iotype": "string", "errno": "number",
                     "sector": "number", "once": "bool", "immediately": "bool"},
    "set-state": {"event": "string", "state": "number", "new_state": "number"},
}
#: qio's own keys and sections (docs/blkdebug.md, "Fault-injection rules"): QEMU rejects all of them,
#: so accepting them changes nothing for a configuration qemu-io accepts.
_COND = {"probability": "probability", "after": "number", "offset": "size", "length": "size"}
_TYPES["inject-error"] |= _COND | {"count": "number"}
_TYPES["delay"] = {"event": "string", "state": "number", "iotype": "string", "ns": "number",
                   "jitter": "number", "count": "number", "once": "bool"} | _COND
_TYPES["corrupt"] = {"state": "number", "bit": "number", "count": "number", "once": "bool"} | _COND
_TYPES["bad-blocks"] = {"offset": "size", "length": "size"}
#: Sections in the order their rules are added (QEMU: inject-error before set-state).
GROUPS = ("inject-error", "set-state", "delay", "corrupt", "bad-blocks")


def rule_keys(group: str) -> list[str]:
    """The keys a section (and its prompt command) accepts, for completion and help."""
    return sorted(_TYPES[group])
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


# -- the line grammar ----------------------------------------------------------------------------
# Section headers and ``name = "value"`` lines, mirroring QEMU's sscanf formats
# ``[%63s "%63[^"]"]`` / ``[%63[^]]]`` for headers and `` %63s = "%1023[^"]"`` for assignments: a space
# in a scanf format matches any run of white space, ``%s`` stops at white space, and the assignment
# counts as matched once the name was read (an unquoted value reads as empty).  Like scanf, each
# conversion takes what it can and never gives it back: hence the possessive quantifiers.
_GROUP_ID = re.compile(r'\[([^ \t\n\v\f\r]{1,63}+)[ \t\n\v\f\r]*+"([^"]{1,63}+)')
_GROUP = re.compile(r"\[([^\]]{1,63}+)")
_ASSIGNMENT = re.compile(
    r'[ \t\n\v\f\r]*+([^ \t\n\v\f\r]{1,63}+)(?:[ \t\n\v\f\r]*+=[ \t\n\v\f\r]*+(?:"([^"]{0,1023}+))?)?')


class Section(NamedTuple):
    group: str
    values: dict[str, str]
    id: str | None


def parse_config_text(text: str) -> list[Section]:
    """``qemu_config_foreach``: the sections of a config file, validated as they complete."""
    sections: list[Section] = []
    current: Section | None = None
    ids: set[tuple[str, str]] = set()
    for raw in _fgets_lines(text):
        if raw.startswith("\n") or raw.startswith("#"):
            continue
        if raw.startswith("["):
            header = _GROUP_ID.match(raw) or _GROUP.match(raw)
            if header is not None:
                if current is not None:
                    sections.append(_validate(current, ids))
                current = Section(header[1], {}, header[2] if header.re is _GROUP_ID else None)
                continue
        m = _ASSIGNMENT.match(raw)
        if m is None:
            raise QemuError("parse error")
        if current is None:
            raise QemuError("no group defined")
        current.values[m[1]] = m[2] or ""
    if current is not None:
        sections.append(_validate(current, ids))
    return sections


def _fgets_lines(text: str) -> list[str]:
    """Lines as ``fgets(line, 1024, f)`` returns them: with their newline, long ones in pieces."""
    out = []
    for line in text.splitlines(keepends=True):
        while len(line) > 1023:
            out.append(line[:1023])
            line = line[1023:]
        out.append(line)
    return out


_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


def _validate(section: Section, ids: set[tuple[str, str]]) -> Section:
    """``qemu_opts_from_qdict``: the group must exist, ids be well formed and unique, values typed."""
    types = _TYPES.get(section.group)
    if types is None:
        raise QemuError(f"There is no option group '{section.group}'")
    if section.id is not None:
        if not _ID.match(section.id):
            raise QemuError("Parameter 'id' expects an identifier\n"
                            "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter.")
        if (section.group, section.id) in ids:
            raise QemuError(f"Duplicate ID '{section.id}' for {section.group}")
        ids.add((section.group, section.id))
    for key, value in section.values.items():
        kind = types.get(key)
        if kind is None:
            raise QemuError(f"Invalid parameter '{key}'")
        check_value(key, value, kind)
    return section


# -- option values ---------------------------------------------------------------------------------
def strtou64(value: str) -> int | None:
    """``qemu_strtou64(value, NULL, 0)``: base 0, leading space, a '-' wraps; None if invalid."""
    s = value.lstrip(" \t\n\v\f\r")
    neg = s.startswith("-")
    if s[:1] in "+-" and s:
        s = s[1:]
    if not s:
        return None
    try:
        if s[:2].lower() == "0x":
            v = int(s[2:], 16) if s[2:] and not s[2:].startswith(("+", "-", "_")) else None
        elif s.startswith("0") and len(s) > 1:
            v = int(s[1:], 8) if not s[1:].startswith(("+", "-", "_")) else None
        else:
            v = int(s, 10) if s.isascii() and s.isdigit() else None
    except ValueError:
        return None
    if v is None:
        return None
    if v >= 2**64:
        return -1  # ERANGE marker
    return (-v) % 2**64 if neg else v


def check_value(key: str, value: Any, kind: str) -> Any:
    """Convert one option value as QemuOpts would, with its error messages."""
    if kind == "string":
        return str(value)
    if kind == "number":
        if isinstance(value, bool):
            raise QemuError(f"Parameter '{key}' expects a number")
        if isinstance(value, int):
            return value % 2**64
        v = strtou64(str(value))
        if v == -1:
            raise QemuError(f"Value '{value}' is too large for parameter '{key}'")
        if v is None:
            raise QemuError(f"Parameter '{key}' expects a number")
        return v
    if kind == "size":
        from qio.qemuopts import opt_size

        return opt_size({key: value}, key, 0)
    if kind == "probability":
        try:
            p = float(value) if not isinstance(value, bool) else -1.0
        except ValueError:
            p = -1.0
        if not 0.0 <= p <= 1.0:  # also NaN
            raise QemuError(f"Parameter '{key}' expects a number between 0 and 1")
        return p
    if isinstance(value, bool):
        return value
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise QemuError(f"Parameter '{key}' expects 'on' or 'off'")


def as_int(v: int) -> int:
    """A uint64 option stored into a C ``int``."""
    v &= 0xFFFFFFFF
    return v - 2**32 if v >= 2**31 else v


def as_int64(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


class RuleSpec(NamedTuple):
    action: str  # "inject-error" | "set-state" | "delay" | "corrupt" | "bad-blocks"
    event: str
    state: int
    errno: int = errno.EIO
    once: bool = False
    immediately: bool = False
    offset: int = -1  # a byte range of the request: -1 = any (``sector`` is ``offset=sector*512,length=1``)
    iotypes: frozenset[str] = DEFAULT_IOTYPES
    new_state: int = 0
    # qio's extensions
    length: int = 1
    probability: float = 1.0
    after: int = 0
    repeat: int = 0  # ``count``: inject-error/delay: fire at most this often (0: no limit); corrupt: bits
    ns: int = 0
    jitter: int = 0
    bit: int = -1
    sector_key: bool = False  # the range came from ``sector`` (shown as it was given)
    extended: bool = False  # uses a key QEMU does not know


def _conflict(group: str, conv: dict[str, Any], a: str, b: str) -> None:
    if a in conv and b in conv:
        raise QemuError(f"Cannot use both '{a}' and '{b}' in [{group}]")


def make_rule(action: str, values: dict[str, Any]) -> RuleSpec:
    """``add_rule``: validate the event and iotype names and apply the defaults.

    qio's keys are checked here for their ranges and conflicts, with messages in QEMU's style."""
    types = _TYPES[action]
    conv = {k: check_value(k, v, types[k]) for k, v in values.items() if k in types}
    extended = any(k not in _QEMU_KEYS.get(action, ()) for k in conv)
    if action in ("corrupt", "bad-blocks"):
        event = "none"
    else:
        event = str(conv.get("event", ""))
        if "event" not in conv:
            raise QemuError("Missing event name for rule")
        if event not in EVENT_NAMES:
            raise QemuError(f"invalid parameter value: {event}")
    state = as_int(conv.get("state", 0))
    if action == "set-state":
        return RuleSpec(action, event, state, new_state=as_int(conv.get("new_state", 0)))
    iotypes = DEFAULT_IOTYPES
    if "iotype" in conv:
        if conv["iotype"] not in IOTYPES:
            raise QemuError(f"invalid parameter value: {conv['iotype']}")
        iotypes = frozenset((conv["iotype"],))
    _conflict(action, conv, "sector", "offset")
    if action != "corrupt":
        _conflict(action, conv, "once", "count")
    if "length" in conv and "offset" not in conv:
        raise QemuError(f"Parameter 'length' needs 'offset' in [{action}]")
    for key in ("length", "count"):
        if key in conv and conv[key] == 0:
            raise QemuError(f"Parameter '{key}' expects a positive number")
    length = conv.get("length", 1)
    if "offset" in conv:
        offset = conv["offset"]
        if offset + length > 2**63:
            raise QemuError(f"Value '{offset + length}' is out of range for parameter 'length'")
    else:
        sector = as_int64(conv.get("sector", 2**64 - 1))
        offset = -1 if sector == -1 else sector * 512
    count = conv.get("count", 1 if conv.get("once") else 0)
    common = {"length": length, "probability": conv.get("probability", 1.0), "after": conv.get("after", 0),
              "sector_key": "sector" in conv, "extended": extended}
    if action == "inject-error":
        return RuleSpec(action, event, state, as_int(conv.get("errno", errno.EIO)), conv.get("once", False),
                        conv.get("immediately", False), offset, iotypes, repeat=count, **common)
    if action == "delay":
        ns, jitter = conv.get("ns", 0), conv.get("jitter", 0)
        if not ns and not jitter:
            raise QemuError("A [delay] rule needs 'ns' or 'jitter'")
        if ns + jitter > 2**63:
            raise QemuError(f"Value '{ns + jitter}' is out of range for parameter 'ns'")
        return RuleSpec(action, event, state, 0, conv.get("once", False), False, offset,
                        iotypes if "iotype" in conv else frozenset(), repeat=count, ns=ns, jitter=jitter, **common)
    if action == "corrupt":
        _conflict(action, conv, "bit", "count")
        bit = conv.get("bit", -1)
        if bit != -1 and "offset" in conv and bit >= length * 8:
            raise QemuError(f"Parameter 'bit' must be below {length * 8} (the bits of 'length')")
        return RuleSpec(action, event, state, 0, conv.get("once", False), False, offset,
                        frozenset(("read",)), repeat=conv.get("count", 1 if bit == -1 else 0), bit=bit,
                        **common)
    if "offset" not in conv or "length" not in conv:
        raise QemuError("A [bad-blocks] range needs 'offset' and 'length'")
    return RuleSpec(action, event, 0, errno.EIO, False, False, offset, frozenset(("read",)), **common)


_QEMU_KEYS = {"inject-error": ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
              "set-state": ("event", "state", "new_state")}


def parse_words(group: str, words: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` words of a prompt command (``inject event=write_aio errno=5``), checked as a
    config section is: unknown keys and badly typed values get the same messages."""
    types = _TYPES[group]
    values: dict[str, str] = {}
    for word in words:
        key, eq, value = word.partition("=")
        if not eq:
            raise QemuError(f"Expected KEY=VALUE, got '{word}'")
        if key not in types:
            raise QemuError(f"[{group}] section doesn't support the option '{key}'")
        if key in values:
            raise QemuError(f"Duplicate option '{key}'")
        check_value(key, value, types[key])
        values[key] = value
    return values


def inline_sections(options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``qemu_config_parse_qdict``: rules given as options (consumed from ``options``).

    ``inject-error.event=...`` is one rule; ``inject-error.0.event=...``, ``inject-error.1...`` a list
    (numbered from 0 without gaps); mixing the two, gaps and unknown keys get QEMU's messages.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for group in GROUPS:
        prefix = group + "."
        sub = {k[len(prefix):]: options.pop(k) for k in [k for k in options if k.startswith(prefix)]}
        if not sub:
            continue
        types = _TYPES[group]
        plain = {k: v for k, v in sub.items() if k in types}
        rest = [k for k in sub if k not in types]
        for k, v in plain.items():
            check_value(k, v, types[k])
        if plain and rest:
            raise QemuError(f"Unknown option '{rest[0]}' for [{group}]")
        if plain:
            out.append((group, plain))
            continue
        entries: list[dict[str, Any]] = []
        while True:
            pre = f"{len(entries)}."
            entry = {k[len(pre):]: sub.pop(k) for k in [k for k in sub if k.startswith(pre)]}
            if not entry:
                break
            entries.append(entry)
        if sub:
            raise QemuError(f"Unused option '{next(iter(sub))}' for [{group}]")
        for entry in entries:
            for k, v in entry.items():
                if k in types:
                    check_value(k, v, types[k])
            unknown = [k for k in entry if k not in types]
            if unknown:
                raise QemuError(f"[{group}] section doesn't support the option '{unknown[0]}'")
            out.append((group, entry))
    return out
