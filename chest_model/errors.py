"""The one base class of the errors this package raises on purpose.

Each module keeps its own error type (``ConfigError``, ``ImageLoadError``, ...), and each also stays
the ``ValueError`` or ``RuntimeError`` it always was, so existing ``except`` clauses keep working.
The base lets a caller, such as the command line, handle all of them in one place.
"""
from __future__ import annotations


class ChestModelError(Exception):
    """Every error this package raises on purpose; the message says what is wrong and with which file."""
