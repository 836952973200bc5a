"""The ``blkdebug`` filter driver: error injection, a state machine, and breakpoints that suspend
requests at named events so a race can be replayed step by step.

Rule engine (QEMU 7.2 semantics): every event has a rule list, newest first.  When an event fires,
rules whose state matches the state *at the start of the event* act: the first matching inject-error
rule clears the active list, and every matching one is pushed onto it; set-state rules pick the new
state (the one earliest in the file wins); breakpoints (``break``) print ``Suspended request`` and park
the request, once per breakpoint.  Active inject-error rules then fail every later request reaching
this node whose iotype and sector match, until ``once`` deletes the rule.

Differences from QEMU, all additions (see docs/blkdebug.md): ``debug_state`` lists breakpoints,
suspended requests, the state and active rules; the ``blkdebug_event``/``blkdebug_rule`` trace events
show each event with the request that raised it; the shell never hangs on a suspended request.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from errno import EIO
from typing import TYPE_CHECKING, Any, ClassVar

from qio import trace
from qio.aio import AIO, YIELD, AioContext, current_co, current_request, enter
from qio.block import io
from qio.block.blkdebug_config import GROUPS, RuleSpec, check_value, inline_sections, make_rule, parse_config_text
from qio.block.driver import (
    REQ_FUA,
    REQ_MAY_UNMAP,
    REQ_NO_FALLBACK,
    BlockDriver,
    Child,
    IOVec,
    OpenChild,
)
from qio.block.errors import BlockError, QemuError
from qio.block.events import EVENT_NAMES, Event
from qio.block.modes import OpenFlags
from qio.block.perms import PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED
from qio.numbers import INT_MAX
from qio.qemuopts import opt_size

if TYPE_CHECKING:
    from random import Random

    from qio.aio import Co

INJECT, SET_STATE, SUSPEND, DELAY, CORRUPT, BAD_BLOCKS = 0, 1, 2, 3, 4, 5
_ACTIONS = {"inject-error": INJECT, "set-state": SET_STATE, "delay": DELAY, "corrupt": CORRUPT,
            "bad-blocks": BAD_BLOCKS}
_NAMES = {v: k for k, v in _ACTIONS.items()}


@dataclass(slots=True, eq=False)
class Rule:
    """One rule: QEMU's inject-error/set-state/breakpoint, or one of qio's delay, corrupt and bad-blocks
    rules.  ``matched`` counts the events (requests, for corrupt and bad-blocks) whose state, iotype
    and range matched; ``fired`` how often the rule acted."""

    action: int
    event: Event
    state: int = 0
    tag: str = ""
    errno: int = EIO
    once: bool = False
    immediately: bool = False
    #: The byte range a request must meet: -1 = any.
    offset: int = -1
    length: int = 1
    iotypes: frozenset[str] = frozenset()
    new_state: int = 0
    probability: float = 1.0
    after: int = 0
    #: ``count``: inject-error/delay: act at most this often (0: no limit); corrupt: bits to flip.
    count: int = 0
    ns: int = 0
    jitter: int = 0
    bit: int = -1
    sector_key: bool = False
    id: int = field(default=0, init=False)
    #: How often the rule may act before it is deleted (0: no limit); ``once=on`` is 1.
    limit: int = field(default=0, init=False)
    matched: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)
    rng: Random | None = field(default=None, init=False)
    #: bad-blocks: the bad ranges, as [start, end) pairs.
    bad: list[list[int]] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.limit = 1 if self.once else (self.count if self.action in (INJECT, DELAY) else 0)
        if self.action == BAD_BLOCKS:
            self.bad = [[self.offset, self.offset + self.length]]

    @classmethod
    def from_spec(cls, spec: RuleSpec) -> Rule:
        """A rule of the configuration, the inline options or the prompt's ``rule`` command."""
        return cls(_ACTIONS[spec.action], EVENT_NAMES[spec.event], spec.state, errno=spec.errno, once=spec.once,
                   immediately=spec.immediately, offset=spec.offset, length=spec.length, iotypes=spec.iotypes,
                   new_state=spec.new_state, probability=spec.probability, after=spec.after,
                   count=spec.repeat, ns=spec.ns, jitter=spec.jitter, bit=spec.bit, sector_key=spec.sector_key)

    def overlaps(self, offset: int, nbytes: int) -> bool:
        """The request's bytes meet the rule's range (QEMU's ``sector``: the request holds that byte)."""
        off = self.offset
        return off == -1 or (nbytes > 0 and offset < off + self.length and off < offset + nbytes)

    def passes(self) -> bool:
        """Count a match; True if the rule acts on it (``after`` and ``probability``).  Without qio's
        keys this is always True, so QEMU's rules behave as in QEMU."""
        self.matched += 1
        if self.matched <= self.after:
            return False
        if self.probability < 1.0:
            assert self.rng is not None
            return self.rng.random() < self.probability
        return True

    def describe(self) -> str:
        return f"#{self.id} {self.conditions()}" if self.id else self.conditions()

    def conditions(self) -> str:
        if self.action == SUSPEND:
            return f"break {self.event.value} {self.tag}" + self._predicate()
        if self.action == SET_STATE:
            st = f"state={self.state} " if self.state else ""
            return f"set-state event={self.event.value} {st}new_state={self.new_state}"
        parts = [_NAMES[self.action]]
        if self.action in (INJECT, DELAY):
            parts.append(f"event={self.event.value}")
        if self.state:
            parts.append(f"state={self.state}")
        if self.action == INJECT:
            parts.append(f"errno={self.errno}")
        if self.action == BAD_BLOCKS:
            parts.append("ranges=" + (",".join(f"{a}+{b - a}" for a, b in self.bad) or "none"))
            return " ".join(parts)
        if self.sector_key:
            parts.append(f"sector={self.offset // 512}")
        elif self.offset != -1:
            parts.append(f"offset={self.offset}")
            if self.length != 1:
                parts.append(f"length={self.length}")
        if self.action not in (CORRUPT, BAD_BLOCKS) and self.iotypes and self.iotypes != frozenset(
                ("read", "write", "write-zeroes", "discard", "flush")):
            parts.append("iotype=" + ",".join(sorted(self.iotypes)))
        if self.action == DELAY:
            parts.append(f"ns={self.ns}")
            if self.jitter:
                parts.append(f"jitter={self.jitter}")
        if self.action == CORRUPT:
            parts.append(f"bit={self.bit}" if self.bit != -1 else f"count={self.count}")
        if self.probability < 1.0:
            parts.append(f"probability={self.probability:g}")
        if self.after:
            parts.append(f"after={self.after}")
        if self.once:
            parts.append("once=on")
        elif self.action != CORRUPT and self.count:
            parts.append(f"count={self.count}")
        if self.immediately:
            parts.append("immediately=on")
        return " ".join(parts)

    def _predicate(self) -> str:
        """A predicate breakpoint's conditions (``break -o/-i/-n``)."""
        parts = []
        if self.offset != -1:
            parts.append(f"-o {self.offset},{self.length}")
        if self.iotypes:
            parts.append("-i " + ",".join(sorted(self.iotypes)))
        if self.after:
            parts.append(f"-n {self.after + 1}")
        return (" " + " ".join(parts)) if parts else ""

    def request_matches(self) -> bool:
        """Delay rules and predicate breakpoints: the request that raised the event (as issued by the
        command, the offsets ``trace`` shows) has the rule's iotype and meets its range."""
        if self.offset == -1 and not self.iotypes:
            return True
        req = current_request.get()
        if req is None:
            return False
        if self.iotypes and req[0] not in self.iotypes:
            return False
        return self.overlaps(req[1], req[2])


@dataclass(slots=True, eq=False)
class Parker:
    """Where a suspended request waits; one per event that suspended it (``suspend_request``)."""

    #: The suspended request (the one running when the event fired).
    co: Co | None = field(default_factory=current_co)
    #: Resumes that came before the request parked (``resume`` from a completion callback).
    wakeups: int = 0

    async def park(self) -> None:
        """``qemu_coroutine_yield`` once per suspend rule that fired."""
        if self.wakeups or self.co is None:
            self.wakeups = max(self.wakeups - 1, 0)
            return
        AioContext.current().notify()  # a poller (wait_break) may be waiting for exactly this
        await YIELD

    def wake(self) -> None:
        """``resume_req_by_tag``: enter the suspended coroutine right now (``qemu_coroutine_enter``)."""
        co = self.co
        if co is not None and co.waiting:
            enter(co)
        else:
            self.wakeups += 1


class BlkdebugDriver(BlockDriver):
    format_name = "blkdebug"
    protocol_name = "blkdebug"
    is_filter = True
    has_debug_hooks = True
    runtime_opts: ClassVar[frozenset[str]] = frozenset(
        {"config", "x-image", "align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
         "max-discard", "seed"})

    def __init__(self) -> None:
        super().__init__()
        self.state = 1
        self.rules: dict[Event, list[Rule]] = {}
        self.active: list[Rule] = []
        self.suspended: list[tuple[str, Parker]] = []
        self.config: str | None = None
        self.take_perms = 0
        self.unshare_perms = 0
        self.pwrite_zeroes_alignment = 0
        self.max_pwrite_zeroes = 0
        self.max_pdiscard = 0
        # qio's extensions: the seed of the probabilistic rules, rule ids, rules acting on requests
        self.seed = 0
        self.seed_chosen = False
        self.next_id = 1
        self.request_rules: list[Rule] = []  # corrupt and bad-blocks rules, in the order added

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def parse_filename(cls, filename: str, options: dict[str, Any]) -> bool:
        """``blkdebug:CONFIG:IMAGE``, or a plain file name that is the image itself."""
        if not filename.startswith("blkdebug:"):
            options["x-image"] = filename
            return True
        cfg, colon, img = filename[len("blkdebug:"):].partition(":")
        if not colon:
            raise QemuError("blkdebug requires both config file and image path")
        if cfg:
            options["config"] = cfg
        options["x-image"] = img
        return True

    def open_children(self, options: dict[str, Any], flags: OpenFlags, open_child: OpenChild) -> None:
        """Read the rules, then open the ``image`` child."""
        from qio.qemuopts import sub_options

        cfg_opt = options.get("config")
        self.config = None if cfg_opt is None else str(cfg_opt)
        seed = options.get("seed")
        if seed is None:
            # os.urandom, not the random module: importing random costs start-up time
            self.seed, self.seed_chosen = int.from_bytes(os.urandom(4)), True
        else:
            self.seed = check_value("seed", seed, "number")
        self._read_config(options)
        self.state = 1
        self.take_perms = _perm_list(options, "take-child-perms")
        self.unshare_perms = _perm_list(options, "unshare-child-perms")
        child_opts = sub_options(options, "image")
        x_image = options.get("x-image")
        positional = x_image is not None  # bdrv_open_file_child(x-image): a file name, parsed as such
        if positional:
            if "filename" in child_opts:
                raise QemuError("Can't specify 'file' and 'filename' options at the same time")
            child_opts["filename"] = x_image
        if "image" in options and isinstance(options["image"], str):
            raise QemuError("Node references are not supported by qio; give the image's options instead")
        if not child_opts:
            raise QemuError('A block device must be specified for "image"')
        self.children.append(Child("image", open_child(child_opts, flags, positional)))

    def _read_config(self, options: dict[str, Any]) -> None:
        sections: list[tuple[str, dict[str, Any]]] = []
        if self.config is not None:
            try:
                with open(self.config, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
            except IsADirectoryError:
                # fopen() succeeds on a directory; the first fgets() fails
                raise QemuError("Cannot read config file: Is a directory", errno.EISDIR) from None
            except OSError as e:
                err = e.errno or errno.EIO
                raise QemuError(f"Could not read blkdebug config file: {os.strerror(err)}", err) from None
            sections = [(s.group, dict(s.values)) for s in parse_config_text(text)]
        sections += inline_sections(options)
        specs = [make_rule(g, v) for group in GROUPS for g, v in sections if g == group]
        for spec in specs:
            self.add_rule(spec)

    def add_rule(self, spec: RuleSpec) -> Rule:
        """Add a rule (from the configuration, inline options or the prompt); it gets the next id."""
        rule = Rule.from_spec(spec)
        self._add(rule)
        return rule

    def _add(self, rule: Rule) -> None:
        rule.id = self.next_id
        self.next_id += 1
        if rule.probability < 1.0 or rule.action == CORRUPT or rule.jitter:
            from random import Random  # only rules with chance need it (start-up time)

            rule.rng = Random(f"{self.seed}/{rule.id}")  # str seeds hash the same in every run
        if rule.action in (CORRUPT, BAD_BLOCKS):
            self.request_rules.append(rule)
        else:
            self.rules.setdefault(rule.event, []).insert(0, rule)

    def remove_rule(self, rule_id: int) -> bool:
        """``unrule``: delete a rule of any kind (an armed inject-error rule is disarmed)."""
        for rules in (*self.rules.values(), self.request_rules):
            for rule in rules:
                if rule.id == rule_id:
                    rules.remove(rule)
                    if rule in self.active:
                        self.active.remove(rule)
                    return True
        return False

    def all_rules(self) -> list[Rule]:
        """Every rule, by id."""
        found = [r for rs in self.rules.values() for r in rs] + self.request_rules
        return sorted(found, key=lambda r: r.id)

    def open(self, options: dict[str, Any], flags: OpenFlags) -> None:
        self.flags = flags
        self.read_only = flags.read_only
        child = self.file
        self.filename = f"blkdebug:{self.config or ''}:{child.filename}"  # blkdebug_refresh_filename
        self.supported_write_flags = REQ_FUA & child.supported_write_flags
        self.supported_zero_flags = (REQ_FUA | REQ_MAY_UNMAP | REQ_NO_FALLBACK) & child.supported_zero_flags
        align = opt_size(options, "align", 0)
        if align and (align >= INT_MAX or align & (align - 1)):
            raise QemuError(f"Cannot meet constraints with align {align}")
        base = max(align, child.request_alignment)
        self.request_alignment = align or 1
        limits: dict[str, int] = {}
        for key, multiple_of in (("max-transfer", base), ("opt-write-zero", base), ("max-write-zero", None),
                                 ("opt-discard", base), ("max-discard", None)):
            v = opt_size(options, key, 0)
            if multiple_of is None:
                multiple_of = max(limits["opt-write-zero" if key == "max-write-zero" else "opt-discard"], base)
            if v and (v >= INT_MAX or v % multiple_of):
                raise QemuError(f"Cannot meet constraints with {key} {v}")
            limits[key] = v
        self.max_transfer = limits["max-transfer"]
        self.pwrite_zeroes_alignment = limits["opt-write-zero"]
        self.max_pwrite_zeroes = limits["max-write-zero"]
        self.pdiscard_alignment = max(limits["opt-discard"], 1)
        self.max_pdiscard = limits["max-discard"]
        AIO.yield_on_io = True
        _run_none_event(self)

    def getlength(self) -> int:
        return io.getlength(self.file)

    # -- the rule engine ---------------------------------------------------------------------------
    async def debug_event(self, event: Event) -> None:
        if "blkdebug_event" in trace.enabled:
            req = current_request.get()
            who = f"{req[0]} offset {req[1]} bytes {req[2]}" if req else "(no request: open/close)"
            trace.emit("blkdebug_event", f"{event.value} request {who} state {self.state}")
        rules = self.rules.get(event)
        if not rules:
            return
        new_state = self.state
        suspends = 0
        injects = 0
        delay = 0
        parker: Parker | None = None
        for rule in list(rules):
            if rule.state and rule.state != self.state:
                continue
            action = rule.action
            if action in (SUSPEND, DELAY) and not rule.request_matches():
                continue
            if not rule.passes():
                if action == INJECT and rule in self.active:
                    self.active.remove(rule)  # a probabilistic rule is re-drawn at each event
                continue
            trace.emit("blkdebug_rule", f"{event.value}: {rule.describe()}")
            if action == INJECT:
                injects += 1
                if injects == 1:
                    self.active.clear()
                self.active.insert(0, rule)
            elif action == SET_STATE:
                rule.fired += 1
                new_state = rule.new_state
            elif action == DELAY:
                ns = rule.ns + (rule.rng.randint(0, rule.jitter) if rule.rng is not None and rule.jitter else 0)
                delay += ns
                self._fired(rule, f"held request {_who()} for {ns} ns")
            else:
                suspends += 1
                rule.fired += 1
                parker = parker or Parker()
                rules.remove(rule)
                self.suspended.insert(0, (rule.tag, parker))
                AIO.printf(f"blkdebug: Suspended request '{rule.tag}'\n")
        self.state = new_state
        if delay and current_co() is not None:  # not at open time (run without an event loop)
            await AioContext.current().pool.sleep(delay / 1000)
        for _ in range(suspends):
            assert parker is not None
            await parker.park()

    def _fired(self, rule: Rule, what: str) -> None:
        """A rule acted on a request: count it, trace it, delete it when its ``count`` is used up."""
        rule.fired += 1
        if "blkdebug_fire" in trace.enabled:
            trace.emit("blkdebug_fire", f"{rule.describe()}: {what}")
        if rule.probability < 1.0 and rule in self.active:
            self.active.remove(rule)  # drawn per event: one request per successful draw
        if rule.limit and rule.fired >= rule.limit:
            if rule in self.active:
                self.active.remove(rule)
            for rules in (self.rules.get(rule.event), self.request_rules):
                if rules and rule in rules:
                    rules.remove(rule)

    async def _check(self, offset: int, nbytes: int, iotype: str) -> bool:
        """``rule_check``: fail the request if an active inject-error rule matches it.

        Returns True if the request must be skipped: a negative ``errno`` makes QEMU's handler return a
        positive value, i.e. "success" without doing the I/O.
        """
        if not self.active:
            return False
        for rule in self.active:
            if rule.overlaps(offset, nbytes) and iotype in rule.iotypes:
                break
        else:
            return False
        if not rule.errno:
            return False
        err = rule.errno
        self._fired(rule, f"failed request {_who()} at {iotype} offset {offset} bytes {nbytes} with errno {err}")
        if not rule.immediately:
            AIO.yields += 1
            await AioContext.current().co_schedule()
        if err < 0:
            return True
        raise BlockError(err)

    # -- breakpoints ----------------------------------------------------------------------------
    def debug_breakpoint(self, event: str, tag: str) -> int:
        ev = EVENT_NAMES.get(event)
        if ev is None:
            return -errno.ENOENT
        self._add(Rule(SUSPEND, ev, 0, tag))
        return 0

    def debug_break_if(self, event: str, tag: str, offset: int, length: int, iotype: str | None,
                       nth: int) -> int:
        """``break -o OFFSET[,LEN] -i IOTYPE -n NTH EVENT TAG``: suspend only a matching request, the
        NTH one to match."""
        ev = EVENT_NAMES.get(event)
        if ev is None:
            return -errno.ENOENT
        self._add(Rule(SUSPEND, ev, 0, tag, offset=offset, length=length,
                       iotypes=frozenset((iotype,)) if iotype else frozenset(), after=nth - 1))
        return 0

    def _resume(self, tag: str, all_: bool) -> int:
        ret = -errno.ENOENT
        for entry in list(self.suspended):
            if entry[0] != tag:
                continue
            AIO.printf(f"blkdebug: Resuming request '{tag}'\n")
            self.suspended.remove(entry)
            entry[1].wake()
            ret = 0
            if not all_:
                break
        # QEMU's resume_req_by_tag() with all=true retries until nothing matches and then reports
        # -ENOENT, so remove_break only succeeds if it deleted a breakpoint rule.  Kept for output parity.
        return -errno.ENOENT if all_ else ret

    def debug_resume(self, tag: str) -> int:
        return self._resume(tag, False)

    def debug_remove_breakpoint(self, tag: str) -> int:
        ret = -errno.ENOENT
        for rules in self.rules.values():
            for rule in list(rules):
                if rule.action == SUSPEND and rule.tag == tag:
                    rules.remove(rule)
                    ret = 0
        if self._resume(tag, True) == 0:
            ret = 0
        return ret

    def debug_is_suspended(self, tag: str) -> bool:
        return any(t == tag for t, _ in self.suspended)

    def debug_can_suspend(self, tag: str, inflight: bool) -> bool:
        if self.debug_is_suspended(tag):
            return True
        return inflight and any(r.action == SUSPEND and r.tag == tag for rs in self.rules.values() for r in rs)

    def debug_suspended_tags(self) -> list[str]:
        return [t for t, _ in self.suspended]

    def debug_state(self) -> list[str]:
        """Human-readable state for the ``debug_state`` command."""
        lines = [f"blkdebug state: {self.state}"]
        lines.append(f"seed: {self.seed}" + (f" (chosen at open; give seed={self.seed} to reproduce)"
                                             if self.seed_chosen else ""))
        breaks = [r for rs in self.rules.values() for r in rs if r.action == SUSPEND]
        lines.append("breakpoints:" + ("" if breaks else " none"))
        lines += [f"    #{r.id} {r.event.value} {r.tag}{r._predicate()} (hits {r.matched})" for r in breaks]
        lines.append("suspended requests:" + ("" if self.suspended else " none"))
        lines += [f"    {t}" for t, _ in self.suspended]
        lines.append("rules:" + ("" if self.has_rules() else " none"))
        lines += [f"    {line}" for line in self.rule_lines()]
        lines.append("active inject-error rules:" + ("" if self.active else " none"))
        lines += [f"    {r.describe()}" for r in self.active]
        return lines

    def has_rules(self) -> bool:
        return any(r.action != SUSPEND for rs in self.rules.values() for r in rs) or bool(self.request_rules)

    def rule_lines(self, breakpoints: bool = False) -> list[str]:
        """One line per rule: id, conditions, and how often it matched and fired."""
        return [f"{r.describe()} (matched {r.matched}, fired {r.fired})" for r in self.all_rules()
                if breakpoints or r.action != SUSPEND]

    # -- I/O: check the active rules, then pass through -----------------------------------------
    async def co_preadv(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        if not await self._check(offset, nbytes, "read"):
            if self.request_rules:
                self._bad_blocks(offset, nbytes)
            await io.preadv(self.file, offset, nbytes, qiov)
            if self.request_rules:
                self._corrupt(offset, nbytes, qiov)

    async def co_pwritev(self, offset: int, nbytes: int, qiov: IOVec, flags: int) -> None:
        if not await self._check(offset, nbytes, "write"):
            await io.pwritev(self.file, offset, nbytes, qiov, flags)
            if self.request_rules:
                self._rewritten(offset, nbytes)

    # -- qio's request rules: bad blocks (dm-dust) and bit flips in read data -----------------------
    def _bad_blocks(self, offset: int, nbytes: int) -> None:
        """A read meeting a bad range fails with EIO (before any data is read)."""
        for rule in self.request_rules:
            if rule.action != BAD_BLOCKS:
                continue
            hit = next(((a, b) for a, b in rule.bad if a < offset + nbytes and offset < b), None)
            if hit is not None:
                rule.matched += 1
                self._fired(rule, f"failed request {_who()} at read offset {offset} bytes {nbytes}: bad "
                                  f"range {hit[0]}+{hit[1] - hit[0]}")
                raise BlockError(errno.EIO)

    def _rewritten(self, offset: int, nbytes: int) -> None:
        """A successful write repairs the bad bytes it covers (dm-dust forgets a rewritten block)."""
        end = offset + nbytes
        for rule in self.request_rules:
            if rule.action != BAD_BLOCKS:
                continue
            left: list[list[int]] = []
            for a, b in rule.bad:
                if b <= offset or a >= end:
                    left.append([a, b])
                    continue
                if a < offset:
                    left.append([a, offset])
                if b > end:
                    left.append([end, b])
            rule.bad = left

    def _corrupt(self, offset: int, nbytes: int, qiov: IOVec) -> None:
        """Flip bits of the data a matching read returns (the image itself is never changed)."""
        for rule in list(self.request_rules):
            if rule.action != CORRUPT or (rule.state and rule.state != self.state):
                continue
            if not rule.overlaps(offset, nbytes) or not rule.passes():
                continue
            if rule.offset == -1:
                lo, hi = offset, offset + nbytes
            else:
                lo, hi = max(offset, rule.offset), min(offset + nbytes, rule.offset + rule.length)
            if rule.bit != -1:
                base = rule.offset if rule.offset != -1 else offset
                bits = [base * 8 + rule.bit] if lo * 8 <= base * 8 + rule.bit < hi * 8 else []
            else:
                assert rule.rng is not None
                picked = rule.rng.sample(range((hi - lo) * 8), min(rule.count, (hi - lo) * 8))
                bits = sorted(lo * 8 + b for b in picked)
            if not bits:
                continue
            for bit in bits:
                _flip(qiov, bit // 8 - offset, 1 << (bit % 8))
            self._fired(rule, f"flipped {len(bits)} bit(s) of request {_who()} at read offset {offset} "
                              f"bytes {nbytes}: " + ",".join(f"{b // 8}.{b % 8}" for b in bits))

    async def co_pwrite_zeroes(self, offset: int, nbytes: int, flags: int) -> None:
        align = max(self.request_alignment, self.pwrite_zeroes_alignment)
        if nbytes < align:
            raise BlockError(errno.ENOTSUP)  # exercise the generic layer's fallback to writes
        if not await self._check(offset, nbytes, "write-zeroes"):
            await io.pwrite_zeroes(self.file, offset, nbytes, flags)
            if self.request_rules:
                self._rewritten(offset, nbytes)

    async def co_pdiscard(self, offset: int, nbytes: int) -> None:
        if nbytes < self.request_alignment:
            raise BlockError(errno.ENOTSUP)
        if not await self._check(offset, nbytes, "discard"):
            await io.pdiscard(self.file, offset, nbytes)

    has_co_flush = True

    async def co_flush(self) -> None:
        if not await self._check(0, 0, "flush"):
            await io.flush(self.file)

    async def co_block_status(self, offset: int, nbytes: int) -> tuple[int, int]:
        await self._check(offset, nbytes, "block-status")
        return await io.block_status(self.file, offset, nbytes)  # BDRV_BLOCK_RAW: the child answers

    async def co_truncate(self, offset: int, exact: bool, prealloc: str, flags: int = 0) -> None:
        await io.truncate(self.file, offset, exact, prealloc, flags)  # filters pass resizes through

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        return perm | self.take_perms, shared & ~self.unshare_perms

    def closed(self) -> None:
        if not any(isinstance(n, BlkdebugDriver) for n in _open_nodes if n is not self):
            AIO.yield_on_io = False
        _open_nodes.discard(self)


def _who() -> str:
    """The request being processed, as the trace events name it."""
    req = current_request.get()
    return f"{req[0]} offset {req[1]} bytes {req[2]}" if req else "(no request: open/close)"


def _flip(qiov: IOVec, pos: int, mask: int) -> None:
    """XOR ``mask`` into byte ``pos`` of the vector."""
    for buf in qiov:
        if pos < len(buf):
            buf[pos] ^= mask
            return
        pos -= len(buf)


_open_nodes: set[BlkdebugDriver] = set()
_PERMS = {"consistent-read": PERM_CONSISTENT_READ, "write": PERM_WRITE, "write-unchanged": PERM_WRITE_UNCHANGED,
          "resize": PERM_RESIZE}


def _perm_list(options: dict[str, Any], name: str) -> int:
    """``take-child-perms.N`` / ``unshare-child-perms.N``: a list of permission names (consumed)."""
    prefix = name + "."
    mask = 0
    for key in sorted((k for k in options if k.startswith(prefix)), key=lambda k: k[len(prefix):]):
        value = options.pop(key)
        if str(value) not in _PERMS:
            raise QemuError(f"Parameter 'null' does not accept value '{value}'")
        mask |= _PERMS[str(value)]
    return mask


def _run_none_event(node: BlkdebugDriver) -> None:
    """The ``none`` event fires once at open; rules on it take effect at once."""
    _open_nodes.add(node)
    coro = node.debug_event(Event.NONE)
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
