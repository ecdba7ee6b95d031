"""The one base class of expected failures: bad config, missing or damaged files, unusable data.

Library code raises a subclass where the bad input is first seen, with the key, file or value in the
message; every tool catches :class:`UserError`, prints ``error: <message>`` on one line and exits with
:data:`EXIT_USER_ERROR`. Anything else is a bug and keeps its traceback. The exit codes below are the same in
every tool (the README's table).
"""

from __future__ import annotations

EXIT_OK = 0
# The work ran and did not succeed: a NaN loss, some inputs of many failed, an export that differs from eager,
# a run of a study failed, or a bug (with its traceback).
EXIT_FAILED = 1
# Nothing (or nothing more) could run because of the input: arguments, config or --opts key, a missing or
# unreadable file (config, checkpoint, dataset, image), an unavailable device. One `error: ...` line.
EXIT_USER_ERROR = 2
# Stopped by a signal (SIGINT, SIGTERM) after saving: 128 + the signal number, as a shell reports it.
EXIT_SIGNAL_BASE = 128


class UserError(Exception):
    """An expected failure caused by the input; the message names the key/file/value and what was expected."""


def error_message(exc: BaseException) -> str:
    """The message a tool prints for ``exc``.

    An exception raised in a DataLoader worker reaches the main process re-created from a text that holds
    the worker's whole traceback; only the original message (after the last ``<ExcName>: ``) is kept.
    """
    text = str(exc)
    marker = "\nOriginal Traceback (most recent call last):"
    if marker in text:
        tail = text.split(marker, 1)[1]
        name = type(exc).__name__ + ": "
        if name in tail:
            text = tail.rsplit(name, 1)[1]
    return text.strip()
