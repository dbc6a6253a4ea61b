"""Module hooks scoped to the thread that registers them.

A hook on a shared model sees every forward pass, and the demo serves concurrent requests from one
model in several threads: without this, one request's Grad-CAM or feature summaries would pick up
another's activations.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def this_thread_only(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook``, called only for forward passes run by the calling thread (others pass untouched)."""
    owner = threading.get_ident()

    def scoped(*args: Any) -> Any:
        if threading.get_ident() == owner:
            return hook(*args)
        return None

    return scoped
