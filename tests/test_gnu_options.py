"""mace-ping's command line read as glibc's getopt_long reads iputils ping's
(cli/gnu_options.py), and the table that drives it matched to ping()'s parameters."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from mace_tools.cli import ping as ping_cli
from mace_tools.cli.gnu_options import Option, OptionTable
from mace_tools.errors import MaceError

TABLE = OptionTable("[OPTIONS] HOST", "A test table.", [
    Option(("-c",), "count", "COUNT", "stop after COUNT replies"),
    Option(("-i",), "interval", "SECONDS"),
    Option(("-q",), "quiet"),
    Option(("-n",), "numeric"),
    Option(("--nonce",), "nonce", "HEX"),
    Option(("--json",), "json_out"),
    Option(("--corrections",), "corrections", "SOURCE", choices=("auto", "none")),
    Option(("-V", "--version"), "version"),
])


@pytest.mark.parametrize(("argv", "given", "operands"), [
    (["-c", "1", "h"], {"count": "1"}, ["h"]),
    (["-c1", "h"], {"count": "1"}, ["h"]),
    (["-qnc1", "h"], {"quiet": True, "numeric": True, "count": "1"}, ["h"]),
    (["-qnc", "1", "h"], {"quiet": True, "numeric": True, "count": "1"}, ["h"]),
    (["h", "-c", "3"], {"count": "3"}, ["h"]),  # options after the operand, as GNU getopt
    (["-c", "1", "-c", "2", "h"], {"count": "2"}, ["h"]),  # the last value counts
    (["-i", "-1", "h"], {"interval": "-1"}, ["h"]),  # a value may begin with "-"
    (["-c", "--json", "h"], {"count": "--json"}, ["h"]),  # ... even "--"
    (["--", "-c", "h"], {}, ["-c", "h"]),  # "--" ends the options
    (["-"], {}, ["-"]),  # a lone "-" is an operand
    (["--nonce=ab", "h"], {"nonce": "ab"}, ["h"]),
    (["--nonce", "ab", "h"], {"nonce": "ab"}, ["h"]),
    (["--nonce="], {"nonce": ""}, []),
    (["--json", "-V"], {"json_out": True, "version": True}, []),
    (["--version"], {"version": True}, []),
    (["--corrections", "none"], {"corrections": "none"}, []),
    (["-h"], {"help": True}, []),
])
def test_read_as_getopt_long(argv: list[str], given: dict, operands: list[str]) -> None:
    assert TABLE.parse(argv) == (given, operands)


@pytest.mark.parametrize(("argv", "message"), [
    (["-x"], "invalid option -- 'x'"),
    (["-qx"], "invalid option -- 'x'"),
    (["-c"], "option requires an argument -- 'c'"),
    (["-qc"], "option requires an argument -- 'c'"),
    (["--bogus"], "unrecognized option '--bogus'"),
    (["--non", "ab"], "unrecognized option '--non'"),  # no abbreviations
    (["--bogus=1"], "unrecognized option '--bogus=1'"),  # the whole word, as glibc
    (["--json=yes"], "option '--json' doesn't allow an argument"),
    (["--nonce"], "option '--nonce' requires an argument"),
    (["--corrections", "some"],
     "invalid --corrections value: 'some' is not one of auto, none"),
])
def test_refused_in_glibc_words(argv: list[str], message: str) -> None:
    with pytest.raises(MaceError) as refused:
        TABLE.parse(argv)
    assert str(refused.value) == message and refused.value.exit_code == 2


@pytest.mark.parametrize("options", [
    [Option(("-c",), "count", "N"), Option(("-c",), "cycles", "N")],
    [Option(("--help",), "more_help")],  # -h and --help belong to every table
    [Option(("-cc",), "count", "N")],
    [Option(("--c",), "count", "N")],
    [Option(("count",), "count", "N")],
])
def test_a_table_refuses_a_name_twice_or_malformed(options: list[Option]) -> None:
    with pytest.raises(ValueError, match=r"defined twice|neither"):
        OptionTable("", "", options)


def test_every_option_sets_a_parameter_of_ping() -> None:
    """The table and ping()'s signature name the same things; a flag defaults to False,
    an option with a value to text or None (numbers are checked as iputils does)."""
    params = inspect.signature(ping_cli.ping).parameters
    options = {o.dest: o for o in ping_cli.OPTIONS.options if o.dest != "help"}
    assert set(options) == set(params) - {"host"}
    for dest, option in options.items():
        default = params[dest].default
        if option.metavar is None:
            assert default is False, dest
        else:
            assert default is None or isinstance(default, str), dest


# iputils ping's getopt string (ping/ping.c, current source): a letter with ":" takes a
# value. -N (IPv6 node information queries) and -? are not mace-ping's.
IPUTILS_OPTSTRING = "h?" "4bRT:" "6F:N:" "3aABc:CdDe:fHi:I:jl:Lm:M:nOp:qQ:rs:S:t:UvVw:W:"
NOT_OURS = {"N", "?"}


def test_each_short_option_takes_a_value_where_iputils_does() -> None:
    iputils = {}
    for at, letter in enumerate(IPUTILS_OPTSTRING):
        if letter != ":":
            iputils[letter] = IPUTILS_OPTSTRING[at + 1:at + 2] == ":"
    ours = {name[1]: option.metavar is not None for option in ping_cli.OPTIONS.options
            for name in option.names if len(name) == 2}
    assert {k: v for k, v in iputils.items() if k not in NOT_OURS} == ours


def test_help_names_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert ping_cli.main(["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Usage: mace-ping [OPTIONS] HOST\n") and err == ""
    for option in ping_cli.OPTIONS.options:
        head = ", ".join(option.names) + (f" {option.metavar}" if option.metavar else "")
        assert f"\n  {head}" in out, head
    assert max(map(len, out.splitlines())) <= 80


def test_extra_operand_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """iputils reads more hosts as an IP source route (IP options: not supported)."""
    assert ping_cli.main(["198.18.0.1", "198.18.0.2"]) == 2
    _, err = capsys.readouterr()
    assert err == ("mace-ping: extra operand '198.18.0.2': one HOST only (IP source routes "
                   "are not supported)\n")


def test_a_ping_imports_no_cli_framework() -> None:
    """mace-ping -c 1 (the console script's way in) never imports typer or click, nor
    rich or scapy: start-up is a feature (bench start-up)."""
    code = ("import sys\n"
            "from mace_tools.cli import launch\n"
            "def report(prog, status):\n"
            "    print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'typer', 'click', 'rich', 'scapy', 'pyroute2'}), file=sys.stderr)\n"
            "    sys.exit(status)\n"
            "launch.exit_now = report  # (the real one ends the process at once)\n"
            "sys.argv = ['mace-ping', '--corrections', 'none', '-c', '1', '-W', '5', '-q', "
            "'127.0.0.1']\n"
            "launch.ping()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr
    assert "1 received" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
