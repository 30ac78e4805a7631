"""Cross-process wake-ups on PostgreSQL: every write NOTIFYs, every server LISTENs.

Two control planes on one database must wake each other's dispatcher and
watchers at once, not at their next poll. ``Database.write()`` sends
``NOTIFY cp_changes, '<revision>'`` inside its transaction (PostgreSQL delivers
it at commit, never for a rollback), and one ``Listener`` thread per server
passes each notification to the same callbacks a local commit calls. Polling
stays as the fallback: a lost connection only delays a wake-up; it is retried.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

log = logging.getLogger(__name__)

CHANNEL = "cp_changes"


def libpq_url(sqlalchemy_url: str) -> str:
    """``postgresql+psycopg://...`` -> ``postgresql://...`` for psycopg itself."""
    scheme, sep, rest = sqlalchemy_url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


class Listener:
    def __init__(self, url: str, on_change: Callable[[int], None], retry_s: float = 1.0) -> None:
        self.url = libpq_url(url)
        self.on_change = on_change
        self.retry_s = retry_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listen", daemon=True)

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        self._ready.wait(timeout_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except Exception as e:  # a lost connection: retry; polling covers the gap
                log.warning("LISTEN %s failed (%s); retrying in %ss", CHANNEL, e, self.retry_s)
                self._stop.wait(self.retry_s)

    def _listen(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self._ready.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.5):
                    self.on_change(int(note.payload) if note.payload.isdigit() else 0)
