"""A command line read as glibc's getopt_long reads iputils ping's, and its --help text,
from one table of options.

As getopt_long: short options cluster (`-qn`), take their value attached or as the next
word (`-c1`, `-c 1`, `-i -1`), and may follow the operands (`HOST -c 1`); `--` ends the
options; a long option takes `--name=value` or `--name value`. A refusal is glibc's
line (`invalid option -- 'x'`), raised as a MaceError. Two differences on purpose: a
long option must be named in full (glibc takes a unique prefix; mace-ping's long
options are its own, and a prefix that is unique today may not be tomorrow), and
POSIXLY_CORRECT is not read (options after HOST always count, as mace-ping always had).

Why not typer/click: importing them and building the command is ~40 ms of a `mace-ping
-c 1` start-up, most of it, where cron jobs start it by the thousand (bench start-up).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from mace_tools.errors import MaceError

HELP_NAMES = ("-h", "--help")


class Option(NamedTuple):
    """One option: its names (`-c`, `--count`), the parameter it sets, the name of its
    value in --help (None: a flag, set to True), its help line, and the values it may
    take (empty: any)."""

    names: tuple[str, ...]
    dest: str
    metavar: str | None = None
    help: str = ""
    choices: tuple[str, ...] = ()


class OptionTable:
    """A command's options, checked once: no name given twice, every name `-x` or
    `--word`."""

    def __init__(self, usage: str, description: str, options: Iterable[Option]) -> None:
        self.usage = usage
        self.description = description
        self.options = (*options, Option(HELP_NAMES, "help", help="show this help and exit"))
        self._by_name: dict[str, Option] = {}
        for option in self.options:
            for name in option.names:
                if not ((len(name) == 2 and name[0] == "-" and name[1] != "-")
                        or (len(name) > 3 and name.startswith("--"))):
                    raise ValueError(f"option name {name!r}: neither -x nor --word")
                if name in self._by_name:
                    raise ValueError(f"option {name} is defined twice")
                self._by_name[name] = option

    def parse(self, argv: Sequence[str]) -> tuple[dict[str, str | bool], list[str]]:
        """The options given (by dest: the last value, or True for a flag) and the
        operands, in order."""
        given: dict[str, str | bool] = {}
        operands: list[str] = []
        words = iter(argv)
        for word in words:
            if word == "--":
                operands.extend(words)
            elif word.startswith("--"):
                self._long(word, words, given)
            elif word.startswith("-") and word != "-":
                self._cluster(word, words, given)
            else:
                operands.append(word)
        return given, operands

    def _long(self, word: str, words: Iterator[str], given: dict[str, str | bool]) -> None:
        name, has_value, value = word.partition("=")
        option = self._by_name.get(name)
        if option is None:
            raise MaceError(f"unrecognized option '{word}'")
        if option.metavar is None:
            if has_value:
                raise MaceError(f"option '{name}' doesn't allow an argument")
            given[option.dest] = True
            return
        if not has_value:
            following = next(words, None)
            if following is None:
                raise MaceError(f"option '{name}' requires an argument")
            value = following
        given[option.dest] = _checked(option, name, value)

    def _cluster(self, word: str, words: Iterator[str], given: dict[str, str | bool]) -> None:
        for at in range(1, len(word)):
            option = self._by_name.get("-" + word[at])
            if option is None:
                raise MaceError(f"invalid option -- '{word[at]}'")
            if option.metavar is None:
                given[option.dest] = True
                continue
            value = word[at + 1:] or next(words, None)
            if value is None:
                raise MaceError(f"option requires an argument -- '{word[at]}'")
            given[option.dest] = _checked(option, "-" + word[at], value)
            return

    def help_text(self, prog: str) -> str:
        """--help: usage, description, then each option with its help."""
        import textwrap

        heads = [", ".join(o.names) + (f" {o.metavar}" if o.metavar else "")
                 for o in self.options]
        width = min(max(map(len, heads)) + 2, 26)
        lines = [f"Usage: {prog} {self.usage}", "",
                 *textwrap.wrap(self.description, 78, initial_indent="  ",
                                subsequent_indent="  ", break_on_hyphens=False), "",
                 "Options:"]
        for head, option in zip(heads, self.options, strict=True):
            wrapped = textwrap.wrap(option.help, 78 - 2 - width,
                                    break_on_hyphens=False) or [""]
            if len(head) + 2 > width:  # a long head: its help on the lines below
                lines.append(f"  {head}")
                lines.extend(f"  {'':{width}}{line}" for line in wrapped)
            else:
                lines.append(f"  {head:{width}}{wrapped[0]}")
                lines.extend(f"  {'':{width}}{line}" for line in wrapped[1:])
        return "\n".join(lines)


def _checked(option: Option, name: str, value: str) -> str:
    if option.choices and value not in option.choices:
        raise MaceError(f"invalid {name} value: '{value}' is not one of "
                        f"{', '.join(option.choices)}")
    return value
