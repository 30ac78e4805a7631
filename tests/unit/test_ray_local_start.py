"""The local Ray is started again once when its raylet times out at startup, and only
then (ray.init replaced: no cluster starts here)."""

from __future__ import annotations

from typing import Any

import pytest

from workers.ray_backend import RayBackend

TIMED_OUT = "The current node timed out during startup. This could happen because ..."


def backend() -> RayBackend:
    return RayBackend(address=None, http_host="127.0.0.1", http_port=0, num_cpus=1, num_gpus=0)


def test_a_raylet_that_times_out_at_startup_is_started_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def init(**kwargs: Any) -> None:
        calls.append("init")
        if len(calls) == 1:
            raise Exception(TIMED_OUT)

    monkeypatch.setattr("workers.ray_backend.ray.init", init)
    monkeypatch.setattr("workers.ray_backend.ray.shutdown", lambda: calls.append("shutdown"))
    backend()._start_local()
    assert calls == ["init", "shutdown", "init"]


@pytest.mark.parametrize("message", [TIMED_OUT, "some other failure"])
def test_a_second_failure_or_another_error_stands(
    monkeypatch: pytest.MonkeyPatch, message: str
) -> None:
    calls: list[str] = []

    def init(**kwargs: Any) -> None:
        calls.append("init")
        raise Exception(message)

    monkeypatch.setattr("workers.ray_backend.ray.init", init)
    monkeypatch.setattr("workers.ray_backend.ray.shutdown", lambda: calls.append("shutdown"))
    with pytest.raises(Exception, match=message):
        backend()._start_local()
    tries = 2 if message == TIMED_OUT else 1
    assert calls == ["init", "shutdown"] * tries
