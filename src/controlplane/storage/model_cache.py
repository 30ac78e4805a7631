"""GetModel from memory when this process makes every write: SQLite, one server.

A write that changes anything a client can see of a model commits an event with it;
every such commit clears the whole cache, in the writer's thread, before its RPC
answers, so a client always reads its own writes. A read that raced a write never
stores what it read (the generation moved on). With PostgreSQL other servers write
too and their commits are only heard later, so the cache stays off there and every
read goes to the database.
"""

from __future__ import annotations

import threading

from controlplane.domain.types import Model
from controlplane.storage.db import Database


class ModelCache:
    def __init__(self, db: Database) -> None:
        self.enabled = db.is_sqlite
        self._models: dict[str, Model] = {}
        self._generation = 0
        self._lock = threading.Lock()
        db.on_commit(lambda _revision: self.clear())

    def get(self, name: str) -> Model | None:
        return self._models.get(name)

    @property
    def generation(self) -> int:
        """Read before the database is: ``put`` takes it back."""
        return self._generation

    def put(self, model: Model, generation: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            if generation == self._generation:
                self._models[model.name] = model

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._models.clear()
