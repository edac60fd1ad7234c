"""The one exception type that means "the user gave us something wrong".

The CLI turns a :class:`UserError` into one line on stderr and exit code 2, with no traceback.
Library code raises it for bad configuration, bad files and bad data; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """Bad input: a config field, a CLI argument, a file or a data set. Its message is one line."""


def closest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{match[0]}"?)' if match else ""


def one_of(field: str, value: object, choices: Iterable[str]) -> UserError:
    """A UserError for a value outside a closed set, naming the field, the closest and the allowed values."""
    choices = sorted(choices)
    return UserError(
        f"{field}: unknown value {value!r}{closest(str(value), choices)}; allowed: {', '.join(choices)}"
    )
