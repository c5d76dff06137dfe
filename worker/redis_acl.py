"""The Redis users of a fleet, as ACL rules: a web app may only enqueue tasks and read their results; workers
may do what workers do, nothing that administers the server.

A web app's user pushes onto the session queues (``LPUSH``; senders declare nothing, :mod:`worker.queueing`),
reads a task's result by its id and waits on that result's channel (``GET``/``SUBSCRIBE`` on
``celery-task-meta-*``; no ``PSUBSCRIBE``, so only a task id it knows). It cannot read the queues (other apps'
requests), the worker's keys (``sw:*``: records, leases, limits, secrets, placeholder bindings), the event channel
(every task's arguments) or remote control, nor list keys or administer the server.

Passwords go into the rules only as their SHA-256 (``#<hex>``), so the printed rules hold no secret.
"""

from __future__ import annotations

import hashlib

from pydantic import SecretStr

from worker.celery_app import SESSIONS_QUEUE

RESULT_KEYS = "celery-task-meta-*"  # Celery's Redis result backend: one key and one channel per task id


def _password(password: SecretStr) -> str:
    return "#" + hashlib.sha256(password.get_secret_value().encode()).hexdigest()


def app_rules(password: SecretStr) -> list[str]:
    """ACL SETUSER rules for a web app's user."""
    commands = ["ping", "hello", "client|setname", "lpush", "multi", "exec", "get", "subscribe", "unsubscribe"]
    return [
        "reset",
        "on",
        _password(password),
        "-@all",
        *(f"+{command}" for command in commands),
        f"%W~{SESSIONS_QUEUE}*",
        f"%R~{RESULT_KEYS}",
        f"&{RESULT_KEYS}",
    ]


def worker_rules(password: SecretStr) -> list[str]:
    """ACL SETUSER rules for the workers' user (beat and the operator's commands too): every key and channel,
    every command but the dangerous ones (FLUSHALL, KEYS, CONFIG, DEBUG, ACL, SHUTDOWN...), INFO aside."""
    return ["reset", "on", _password(password), "~*", "&*", "+@all", "-@dangerous", "+info"]


def setuser(user: str, rules: list[str]) -> list[str]:
    """The ACL SETUSER command for ``user``, as arguments."""
    return ["ACL", "SETUSER", user, *rules]
