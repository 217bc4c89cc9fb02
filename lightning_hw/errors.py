"""How every subcommand reports a user's mistake: one line on stderr and an exit status, no traceback.

The line reads `error: <what> (<file or value>): <what to do>`. The exit status is 2 for a
usage mistake (an option, a config, a command line) and 1 for a failure with the data or a
checkpoint, or a run that failed. `--debug` anywhere on the command line, or
LIGHTNING_HW_DEBUG=1 in the environment, lets the exception through with its traceback.

Subcommands raise `UsageError` / `CommandError` (or the data modules' DataNotFoundError and
DataFormatError) and let `report_errors` around the whole command turn them into that line;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from argparse import ArgumentError
from collections.abc import Iterator, Sequence

DEBUG_OPTION = "--debug"
DEBUG_ENV = "LIGHTNING_HW_DEBUG"
USAGE_STATUS = 2
FAILURE_STATUS = 1


class CommandError(Exception):
    """A command that cannot do what it was asked with what it was given (data, a checkpoint): exit status 1.

    The message is `<what> (<subject>): <todo>`; `subject` names the file or value at fault.
    """

    exit_status = FAILURE_STATUS

    def __init__(self, what: str, subject: object = None, todo: str | None = None) -> None:
        self.what, self.subject, self.todo = what, subject, todo
        message = what if subject is None or subject == "" else f"{what} ({subject})"
        super().__init__(f"{message}: {todo}" if todo else message)


class UsageError(CommandError):
    """A mistake in the command line or a config: exit status 2, as a parser's own errors."""

    exit_status = USAGE_STATUS


def debug_requested(args: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether tracebacks were asked for, `args` without --debug)."""
    remaining = [arg for arg in args if arg != DEBUG_OPTION]
    asked = len(remaining) != len(args) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return asked, remaining


def user_error(error: BaseException) -> CommandError | None:
    """`error` as the user's mistake it reports, or None when it is a bug (or not an error)."""
    # Imported here: the data and callbacks packages import torch and Lightning, this module must not.
    from lightning_hw.callbacks import NonFiniteLossError
    from lightning_hw.data import DataFormatError, DataNotFoundError

    if isinstance(error, CommandError):
        return error
    if isinstance(error, (DataNotFoundError, DataFormatError, NonFiniteLossError)):
        return CommandError(str(error))  # their messages name the file (or step) and what to do
    if isinstance(error, ArgumentError):
        return UsageError(*parse_error_parts(str(error)))
    return None


def one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def report_errors(debug: bool = False) -> Iterator[None]:
    """Turn a user's mistake raised inside into `error: ...` on stderr and its exit status."""
    try:
        yield
    except Exception as error:
        reported = None if debug else user_error(error)
        if reported is None:
            raise
        print(f"error: {one_line(str(reported))}", file=sys.stderr)
        raise SystemExit(reported.exit_status) from None


# jsonargparse's messages: 'Parser key "trainer.max_epochs":' then the reasons, nested per
# subclass and union member; the last line names the given value.
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_PARSER_KEY_PREFIX = re.compile(r'^\s*Parser key "[^"]+":\s*')
_GIVEN_VALUE = re.compile(r"^\s*Given value: (.*)$", re.MULTILINE)
_NESTED_VALUE = re.compile(r"^NestedArg\(key='[^']*', val=(.*)\)$")  # an --a.init_args.b value
_TYPE_NAME = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_NOISE = ("Does not validate against any of", "Subtypes:", "Errors:", "Given value", "Expected a <class 'NoneType'>")


def innermost_reason(message: str) -> str:
    """The innermost reason in a jsonargparse message (the message itself when it is one line), tidied."""
    lines = [_PARSER_KEY_PREFIX.sub("", line).strip(" -") for line in message.splitlines()]
    reasons = [line for line in lines if line and not line.startswith(_NOISE)]
    reason = reasons[-1] if reasons else one_line(message)
    reason = re.sub(r"^Expected an? ", "expected ", _TYPE_NAME.sub(r"\1", reason))
    return re.sub(r"\.? Got value: .*$", "", reason)


def parse_error_parts(message: str) -> tuple[str, str | None, str]:
    """(what, value, what to do) of a jsonargparse parse error's message, for a `UsageError`."""
    if message.startswith("unrecognized arguments:"):
        return "unknown option", message.split(":", 1)[1].strip(), "see --help for the options"
    keys = _PARSER_KEY.findall(message)
    if not keys:
        return one_line(message), None, "see --help for the options"
    option = "--" + ".init_args.".join(dict.fromkeys(keys))  # nested keys of a class's arguments
    given = _GIVEN_VALUE.findall(message)
    value = given[-1] if given else None
    nested = _NESTED_VALUE.match(value or "")
    if nested:
        value = nested.group(1).strip("'\"")
    return f"invalid value for {option}", value, innermost_reason(message)
