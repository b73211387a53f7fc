"""The command line's error boundary: a problem the user can fix is one line, a bug says it is one.

Every error whose message is meant for the user derives from ExpoError (expo_eval's
too: imports flow mergekit_expo -> expo_eval). `report_errors` turns it, and an
OSError (a full disk, a read-only or forbidden path), into click's one-line error;
anything else is a bug: its traceback once, and where to report it.
"""

import functools
import os
import traceback
from typing import Callable, TypeVar

import click

ISSUES_URL = "https://github.com/mergekit-expo/mergekit-expo/issues"  # pyproject.toml [project.urls] Issues
EXIT_BUG = 70  # EX_SOFTWARE (sysexits.h): an internal error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

T = TypeVar("T")


class ExpoError(Exception):
    """Bad input or an unusable environment; the message names the problem (file, flag, tensor...)."""


class Interrupted(click.ClickException):
    """Ctrl-C: one line saying what survives, and exit code 130."""

    exit_code = EXIT_INTERRUPTED


def describe_os_error(error: OSError) -> str:
    """`PATH: No space left on device`: the path(s) and the system's reason, on one line."""
    paths = [os.fsdecode(p) for p in (error.filename, error.filename2) if p is not None]
    reason = error.strerror or str(error) or type(error).__name__
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def report_errors(command: Callable[[], T]) -> T:
    """Run `command`; its errors leave as click exceptions (one line) or, for a bug, exit 70."""
    try:
        return command()
    except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except ExpoError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(describe_os_error(error)) from None
    except KeyboardInterrupt:
        raise Interrupted("interrupted") from None
    except Exception as error:
        traceback.print_exc()
        click.echo(
            f"mergekit-expo: unexpected error (a bug): {type(error).__name__}: {error}\n"
            f"Please report it at {ISSUES_URL}, with the traceback above and the command you ran.",
            err=True,
        )
        raise click.exceptions.Exit(EXIT_BUG) from None


class ReportingGroup(click.Group):
    """A click group whose every subcommand runs inside `report_errors`."""

    def invoke(self, ctx: click.Context):
        return report_errors(functools.partial(super().invoke, ctx))
