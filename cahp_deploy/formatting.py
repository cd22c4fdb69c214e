"""Numbers as the reports and summaries print them (one place, so every page rounds alike)."""

from __future__ import annotations


def percent(x: float | None, unit: str = "%", missing: str = "—", signed: bool = False) -> str:
    """A fraction as percent with one decimal: ``percent(0.8123) == "81.2%"``; ``signed`` prints the sign
    (``percent(-0.004, " pp", signed=True) == "-0.4 pp"``); None prints ``missing``."""
    if x is None:
        return missing
    return f"{100 * x:{'+' if signed else ''}.1f}{unit}"


__all__ = ["percent"]
