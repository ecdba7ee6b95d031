"""The one base class of expected failures: bad config, missing or damaged files, unusable data.

Library code raises a subclass where the bad input is first seen, with the key, file or value in the
message; every tool catches :class:`UserError`, prints ``error: <message>`` on one line and exits with its
documented code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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
