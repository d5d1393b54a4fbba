"""The one base class of every error meant for the user.

A `HQClipError` says what is wrong in one line (naming the key, file or id); the CLI catches it once
(`cycle.cli.main`) and prints that line in red with exit code 2, no traceback. Anything else that escapes
is a bug and keeps its traceback.
"""

from __future__ import annotations


class HQClipError(Exception):
    """A problem the user can fix: bad config or input, a refused resume, a missing file."""
