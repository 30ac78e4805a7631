"""Secret values out of text that people read (model log lines)."""

from __future__ import annotations

from collections.abc import Iterable

REDACTED = "[redacted]"


def redact(text: str, secrets: Iterable[str]) -> str:
    """Every secret value in ``text`` replaced by ``[redacted]``, the longest first (so a
    secret that contains another goes whole). Any non-empty value counts, however short:
    a secret must never show, even at the cost of a redacted common word."""
    for value in sorted(secrets, key=len, reverse=True):
        if value and value in text:
            text = text.replace(value, REDACTED)
    return text
