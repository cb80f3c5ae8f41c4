"""Knob definitions and the knob server's command language (one site's table).

The grammar follows the card's knob server: ';' separates commands, the first
'=' or space ends a name, any run of '=' and spaces after it is skipped, a
name may be a shell glob, and PV-style knobs (names with ':') answer
"NAME VALUE" where plain knobs answer the bare value.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

Getter = Callable[[], str]
Setter = Callable[[str], "str | AfterReply | None"]
GLOB_CHARS = "*?["


class KnobRejected(Exception):
    """A set the card refuses; the text is the card's one-line ERROR reply."""


@dataclass(frozen=True)
class AfterReply:
    """A set's reply text plus an action to run once the reply is written (e.g. a reboot)."""

    text: str
    action: Callable[[], None]


@dataclass(frozen=True)
class Knob:
    name: str
    get: Getter
    set: Setter | None = None  # None: read-only

    @property
    def pv_style(self) -> bool:
        return ":" in self.name

    def query(self) -> str:
        value = self.get()
        return f"{self.name} {value}" if self.pv_style else value


def numeric(value: str, lo: int, hi: int, base: int = 10) -> int:
    """Parse an integer the way the card's NumericValidator checks it."""
    try:
        n = int(value.strip(), base)
    except ValueError:
        raise KnobRejected(
            f"ERROR: NumericValidator {value.strip()} not in range {lo},{hi}"
        ) from None
    if not lo <= n <= hi:
        raise KnobRejected(f"ERROR: NumericValidator {n} not in range {lo},{hi}")
    return n


def number(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise KnobRejected(f"ERROR: {name}: {value!r} is not a number") from None


@dataclass
class Reply:
    lines: list[str] = field(default_factory=list)
    failed: bool = False  # a set was refused: the prompt shows 1
    after: list[Callable[[], None]] = field(default_factory=list)


class KnobTable:
    """One site's knobs, in help order, and the command interpreter over them."""

    def __init__(self, site: int, knobs: Iterable[Knob] = ()):
        self.site = site
        self.knobs: dict[str, Knob] = {}
        for k in knobs:
            self.add(k)

    def add(self, knob: Knob) -> None:
        if knob.name in self.knobs:
            raise ValueError(f"site {self.site}: knob {knob.name} defined twice")
        self.knobs[knob.name] = knob

    def matches(self, pattern: str) -> list[Knob]:
        exact = self.knobs.get(pattern)
        if exact is not None:
            return [exact]  # an exact match stops the search
        if not any(c in pattern for c in GLOB_CHARS):
            return []
        return [k for name, k in self.knobs.items() if fnmatch.fnmatchcase(name, pattern)]

    def help(self, pattern: str | None, access: bool = False) -> list[str]:
        names = [n for n in self.knobs if pattern is None or fnmatch.fnmatchcase(n, pattern)]
        if not access:
            return names
        return [f"{n} : {'r' if self.knobs[n].set is None else 'rw'}" for n in names]

    def run(self, command: str, reply: Reply) -> None:
        """Execute one command (no ';'), appending its output lines to reply."""
        command = command.strip(" \t\r")
        if not command:
            return
        name, value = split_command(command)
        if name in ("help", "helpA"):
            reply.lines.extend(self.help(value, access=name == "helpA"))
            return
        found = self.matches(name)
        if not found:
            reply.lines.append(f'ERROR:{name}" not found')  # the card's unbalanced quote
            return
        single = len(found) == 1 and found[0].name == name
        if value is None:
            for knob in found:
                text = knob.query()
                # Glob answers say which knob each line is from, unless the value does.
                if not single and knob.name not in text:
                    text = f"{knob.name} {text}"
                reply.lines.extend(text.split("\n"))
            return
        for knob in found:
            if knob.set is None:
                reply.lines.append(f'ERROR: "{knob.name}" is read-only')
                reply.failed = True
                continue
            try:
                out = knob.set(value)
            except KnobRejected as exc:
                reply.lines.append(str(exc))
                reply.failed = True
                continue
            if isinstance(out, AfterReply):
                reply.after.append(out.action)
                out = out.text
            reply.lines.extend(out.split("\n") if out else [""])


def split_command(command: str) -> tuple[str, str | None]:
    """'name=value', 'name value', 'name==  value' -> (name, value); bare name -> (name, None)."""
    for i, c in enumerate(command):
        if c in "= ":
            rest = command[i:].lstrip("= ")
            return command[:i], (rest or None)
    return command, None
