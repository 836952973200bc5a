"""GNU ``getopt``/``getopt_long`` as glibc implements them (argument permutation, exact messages).

qemu-io parses the options of every command with getopt, so option order, permutation
(``read 0 1 -q`` is quiet), ``--`` and the error texts are part of its observable behaviour.
Options are produced one at a time because commands act on each as it comes
(``aio_read -i`` returns before a later bad option is seen).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class LongOpt(NamedTuple):
    name: str
    has_arg: bool
    val: str


class GetOpt:
    """Iterate ``(option, argument)`` pairs; ``'?'`` after printing an error; then read ``args``."""

    def __init__(self, argv: list[str], optstring: str, err: Callable[[str], None],
                 longopts: tuple[LongOpt, ...] = ()) -> None:
        self.prog = argv[0]
        self._argv = argv
        self._shortopts = optstring
        self._long = longopts
        self._err = err
        self._i = 1
        self._cluster = ""  # rest of a "-abc" cluster still to be read
        self._nonopts: list[str] = []
        self.args: list[str] = []

    def _has_arg(self, c: str) -> bool | None:
        i = self._shortopts.find(c)
        if i < 0 or c == ":":
            return None
        return self._shortopts[i + 1 : i + 2] == ":"

    def __iter__(self) -> GetOpt:
        return self

    def __next__(self) -> tuple[str, str | None]:
        argv = self._argv
        if not self._cluster:
            while True:
                if self._i >= len(argv):
                    self.args = self._nonopts
                    raise StopIteration
                a = argv[self._i]
                if a == "--":
                    self.args = self._nonopts + argv[self._i + 1 :]
                    self._i = len(argv)
                    raise StopIteration
                if len(a) > 1 and a[0] == "-":
                    break
                self._nonopts.append(a)
                self._i += 1
            self._i += 1
            if a.startswith("--") and self._long:
                return self._long_option(a[2:])
            self._cluster = a[1:]
        c, self._cluster = self._cluster[0], self._cluster[1:]
        has_arg = self._has_arg(c)
        if has_arg is None:
            self._err(f"{self.prog}: invalid option -- '{c}'\n")
            return "?", None
        if not has_arg:
            return c, None
        if self._cluster:
            arg, self._cluster = self._cluster, ""
            return c, arg
        if self._i < len(argv):
            arg = argv[self._i]
            self._i += 1
            return c, arg
        self._err(f"{self.prog}: option requires an argument -- '{c}'\n")
        return "?", None

    def _long_option(self, text: str) -> tuple[str, str | None]:
        name, eq, value = text.partition("=")
        exact = [o for o in self._long if o.name == name]
        matches = exact or [o for o in self._long if o.name.startswith(name)]
        if not matches:
            self._err(f"{self.prog}: unrecognized option '--{text}'\n")
            return "?", None
        if len(matches) > 1 and len({(o.has_arg, o.val) for o in matches}) > 1:
            poss = "".join(f" '--{o.name}'" for o in matches)
            self._err(f"{self.prog}: option '--{text}' is ambiguous; possibilities:{poss}\n")
            return "?", None
        opt = matches[0]
        if eq:
            if not opt.has_arg:
                self._err(f"{self.prog}: option '--{opt.name}' doesn't allow an argument\n")
                return "?", None
            return opt.val, value
        if opt.has_arg:
            if self._i < len(self._argv):
                arg = self._argv[self._i]
                self._i += 1
                return opt.val, arg
            self._err(f"{self.prog}: option '--{opt.name}' requires an argument\n")
            return "?", None
        return opt.val, None
