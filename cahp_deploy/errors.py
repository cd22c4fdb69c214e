"""One user-error type for the whole tool.

Anything the user can fix (a path, a column, a flag, a selection made for another model) raises
:class:`CahpError`. The CLI prints its message as one line on stderr and exits with code 2. Any
other exception is a bug and may show a traceback.
"""

from __future__ import annotations


class CahpError(ValueError):
    """A problem with the user's input, with a message that says what to do about it."""


class Int8GateError(CahpError):
    """An INT8 graph failed its accuracy gate against its own fp32 graph. Alone, export stops (loosen the
    gate knowingly, or ship fp32); under ``run``'s accuracy budget the artifact is written without its INT8
    variant and the shipping sequence chooses among the variants that exist."""

