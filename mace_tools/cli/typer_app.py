"""What the typer commands (mace-traceroute, mace-agent, mace-lab) do around their app:
one line on stderr and ping's exit codes for any failure, never a traceback; and the
options they share. (mace-ping reads its options without typer: gnu_options.py.)"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated

import click
import typer
from click.exceptions import ClickException

from mace_tools.cli.common import (
    AGENT_HELP,
    CONTAINER_HELP,
    CORRECTIONS,
    CORRECTIONS_HELP,
    LIST_CONTAINERS_HELP,
    RUNTIME_HELP,
)
from mace_tools.cli.stdio import closed_stdio_to_devnull
from mace_tools.errors import Finished, MaceError

# The container options, the same in every mace command.
ContainerOption = Annotated[str | None, typer.Option("--container", help=CONTAINER_HELP)]
RuntimeOption = Annotated[str, typer.Option("--runtime", help=RUNTIME_HELP)]
ListContainersOption = Annotated[bool, typer.Option("--list-containers",
                                                    help=LIST_CONTAINERS_HELP)]
CorrectionsOption = Annotated[str, typer.Option(
    "--corrections", click_type=click.Choice(CORRECTIONS), help=CORRECTIONS_HELP)]
AgentOption = Annotated[str | None, typer.Option("--agent", metavar="PATH", help=AGENT_HELP)]


def run_app(app: typer.Typer, prog: str, argv: list[str] | None = None,
            errors: tuple[type[Exception], ...] = (),
            usage: Callable[[ClickException], str] | None = None) -> int:
    """Run app; MaceError and `errors` print `prog: message` and exit 2 (or their code).
    usage: words a refused command line as the tool being replaced does (default:
    click's words)."""
    command = typer.main.get_command(app)
    closed_stdio_to_devnull()
    try:
        # Without standalone mode click returns (not raises) the code of typer.Exit.
        status = command.main(args=argv if argv is not None else sys.argv[1:], prog_name=prog,
                              standalone_mode=False)
    except (typer.Exit, Finished) as exc:
        return exc.exit_code
    except (MaceError, *errors) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except ClickException as exc:  # bad option or value: one line, as ping's usage errors
        print(f"{prog}: {usage(exc) if usage else exc.format_message()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return status if isinstance(status, int) else 0
