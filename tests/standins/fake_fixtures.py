"""Fixtures of the fast pipeline tests, a pytest plugin (``pytest_plugins = ["tests.standins.fake_fixtures"]``):
the fake provider's stand-in daemons and a store on an in-memory Redis."""

from __future__ import annotations

from collections.abc import Iterator

import fakeredis
import pytest

from providers.fake import StandInDaemons
from worker.config import get_settings
from worker.store import Cipher, Store


@pytest.fixture(scope="session")
def daemons() -> Iterator[StandInDaemons]:
    server = StandInDaemons()
    yield server
    server.close()


@pytest.fixture
def store() -> Store:
    settings = get_settings()
    return Store(fakeredis.FakeRedis(decode_responses=True), Cipher(settings.fernet_key))
