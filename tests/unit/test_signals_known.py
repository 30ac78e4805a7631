"""The signals loop reads the database's models again only when something was written
since (the revision counter moved), a model it does not know reports, or 30 s passed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import pytest

from controlplane import signals as signals_module
from controlplane.config import Settings
from controlplane.signals import KNOWN_MODELS_MAX_S, Signals
from controlplane.storage.db import Database
from workers.backend import Backend


def test_the_models_are_read_again_only_after_a_write_or_their_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(Database.sqlite_url(tmp_path))
    db.migrate()
    reads: list[int] = []
    real = signals_module._known

    def counted(d: Database) -> signals_module._Known:
        reads.append(d.head_revision())
        return real(d)

    clock = [1000.0]
    monkeypatch.setattr(signals_module, "_known", counted)
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    s = Signals(db, cast(Backend, None), Settings(data_dir=tmp_path))

    s._know(False)
    assert len(reads) == 1, "read the first time"
    clock[0] += 2
    s._know(False)
    assert len(reads) == 1, "nothing written since"
    with db.write() as tx:
        tx.next_revision()
    clock[0] += 2
    s._know(False)
    assert len(reads) == 2, "a write moved the revision"
    s._know(True)
    assert len(reads) == 3, "a model it does not know reported: read whatever the revision"
    clock[0] += KNOWN_MODELS_MAX_S
    s._know(False)
    assert len(reads) == 4, "kept no longer than KNOWN_MODELS_MAX_S"
    db.close()
