"""The one base class of expected failures: bad config, missing or damaged files, unusable data.

Library code raises a subclass where the bad input is first seen, with the key, file or value in the
message; every tool catches :class:`UserError`, prints ``error: <message>`` on one line and exits with its
documented code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure caused by the input; the message names the key/file/value and what was expected."""
