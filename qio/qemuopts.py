"""QEMU's option syntaxes: ``key=value,...`` strings (QemuOpts) and ``json:{...}`` filenames.

Both produce one flat dict whose dotted keys address child nodes (``file.filename``), the form the
open code consumes.  The QemuOpts grammar is small but has QEMU's quirks: ``,,`` escapes a comma and
a bare ``key`` means ``key=on`` (deprecated, with QEMU's warning).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qio.block.errors import QemuError

Options = dict[str, Any]


def _grammar() -> Any:
    import pyparsing as pp

    value = pp.Regex(r"(?:[^,]|,,)*").set_parse_action(lambda t: t[0].replace(",,", ","))
    key = pp.Regex(r"[^=,]+")
    pair = pp.Group(key + pp.Opt(pp.Suppress("=") + value, default=None))
    return pp.Opt(pp.DelimitedList(pair, delim=",", allow_trailing_delim=True))


_GRAMMAR: Any = None


def _split_plain(text: str) -> list[tuple[str, str | None]] | None:
    """The grammar's ``key[=value]`` items, scanned by hand for text without white space (the usual
    case: importing pyparsing costs ~40 ms of start-up); None if the grammar rejects the text."""
    items: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        if j == i:
            return None
        key, value, i = text[i:j], None, j
        if i < n and text[i] == "=":
            i = j = i + 1
            while i < n and (text[i] != "," or text.startswith(",,", i)):
                i += 2 if text[i] == "," else 1
            value = text[j:i].replace(",,", ",")
        items.append((key, value))
        if i == n:
            break
        i += 1  # the ',' after an item (a trailing one is allowed)
    return items


def parse_qemuopts(text: str, warn: Callable[[str], None], implied: str | None = None) -> Options:
    """Parse ``driver=raw,file.filename=x``; ``implied`` names a leading bare value (``file``)."""
    global _GRAMMAR
    items: Any
    if not any(c in text for c in " \t\n\r"):  # pyparsing's white space: the grammar skips it
        items = _split_plain(text)
        if items is None:
            raise QemuError(f"Invalid parameter '{text}'")
    else:
        if _GRAMMAR is None:
            _GRAMMAR = _grammar()
        import pyparsing as pp

        try:
            items = _GRAMMAR.parse_string(text, parse_all=True)
        except pp.ParseException:
            raise QemuError(f"Invalid parameter '{text}'") from None
    out: Options = {}
    for i, (k, v) in enumerate(items):
        if v is None:
            if i == 0 and implied:
                k, v = implied, k
            elif k.startswith("no"):
                warn(f"short-form boolean option '{k}' deprecated\nPlease use {k[2:]}=off instead")
                k, v = k[2:], "off"
            else:
                warn(f"short-form boolean option '{k}' deprecated\nPlease use {k}=on instead")
                v = "on"
        out[k] = v
    return out


def flatten(obj: Any, prefix: str = "") -> Options:
    """Nested JSON objects and arrays to dotted keys (``qdict_flatten``)."""
    out: Options = {}
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        items = [(str(i), v) for i, v in enumerate(obj)]
    else:
        return {prefix[:-1]: obj}
    for k, v in items:
        if isinstance(v, (dict, list)) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_json_filename(filename: str) -> Options:
    """``json:{"driver": "raw", "file": {...}}`` to flat options (``parse_json_filename``), each value in
    the form QemuOpts gives it (:func:`qemuopts_value`)."""
    from qio.jsonparse import deep_recursion, qobject_from_json

    try:
        obj = qobject_from_json(filename[5:])
    except QemuError as e:
        raise QemuError(f"Could not parse the JSON options: {e}") from None
    if not isinstance(obj, dict):
        raise QemuError("Invalid JSON object given")
    with deep_recursion():
        flat = flatten(obj)
    return {k: qemuopts_value(k, v) for k, v in flat.items()}


@dataclass(slots=True, eq=False)
class NotString:
    """A child (``file``, ``backing``, ``image``) given as neither a string (a node reference) nor null
    nor options: no code consumes it, so it ends up as an unsupported option, as in QEMU."""

    value: Any

    def __str__(self) -> str:
        return str(self.value)


def qemuopts_value(key: str, value: Any) -> Any:
    """A JSON value as the block layer reads it: QemuOpts turns numbers into their decimal text
    (doubles with ``%.17g``) and booleans into ``on``/``off``, and ignores null, ``[]`` and ``{}``
    (None here: the option is present for the unknown-option check but unset).  ``driver`` and
    ``filename`` are read with ``qdict_get_try_str`` first, so there anything but a string is unset."""
    if isinstance(value, str):
        return value
    last = key.rpartition(".")[2]
    if last in ("driver", "filename"):
        return None
    if last in ("file", "backing", "image") and value is not None:
        return NotString(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "%.17g" % value
    return None


_BOOL = {"on": True, "yes": True, "true": True, "y": True, "off": False, "no": False, "false": False,
         "n": False}


def opt_bool(options: Options, key: str, default: bool) -> bool:
    """A QemuOpts boolean (``on``/``off`` and synonyms, or a JSON boolean)."""
    v = options.get(key)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    b = _BOOL.get(str(v))
    if b is None:
        raise QemuError(f"Parameter '{key}' expects 'on' or 'off'")
    return b


def opt_size(options: Options, key: str, default: int) -> int:
    """A QemuOpts size (``64k``...; ``parse_option_size``), or a JSON integer."""
    from qio.numbers import qemu_strtosz

    v = options.get(key)
    if v is None:
        return default
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    err, val, _ = qemu_strtosz(str(v))
    if err == -34:  # ERANGE
        raise QemuError(f"Value '{v}' is out of range for parameter '{key}'")
    if err:
        raise QemuError(f"Parameter '{key}' expects a non-negative number below 2^64\n"
                        "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                        "and exabytes, respectively.")
    return val


def sub_options(options: Options, prefix: str) -> Options:
    """Extract and remove ``prefix.*`` keys (``qdict_extract_subqdict``)."""
    dot = prefix + "."
    sub = {k[len(dot):]: v for k, v in options.items() if k.startswith(dot)}
    for k in list(options):
        if k.startswith(dot):
            del options[k]
    return sub
