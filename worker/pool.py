"""Warm pools: sandboxes already started with a healthy daemon, claimed by a request instead of starting one.

A pool is one :class:`worker.config.PoolTarget` (provider, agent, image) of ``SANDBOX_WORKER_POOL__TARGETS``. Every
worker process keeps the pools filled (:class:`RefillThread`: a short per-pool redis-py ``Lock`` to count what is
missing and mark those fills in progress, then the fills outside the lock), so no single filler can die with the
pool. Any worker claims (:meth:`Pools.claim`) with one Lua script: ``ZPOPMAX`` of the ready set and the claim noted,
so an entry goes to exactly one request, however many claim at once.

**Late binding.** A pooled sandbox holds nothing of any tenant: it is started with the owner and pool labels only,
no sandbox env, and its daemon runs from ``/workspace`` with the pool's environment (:func:`pool_environment`):
empty, or for a ``strategy: vault`` target the agent's switches, the egress proxy's URL for the target's
``llm_base_url`` and a placeholder bound to no tenant (the proxy refuses it). The daemon's token (and placeholder)
are made at fill time, kept Fernet-encrypted in the entry and handed to the one request that claims it. Where the
agent allows it is spawned, ACP-initialized and given a session in ``/workspace`` at fill time too.

A ``binding: llm-relay`` target (Claude Code) pools an agent started with the agent's switches, its LLM base URL at
the daemon front's relay on the sandbox's loopback (:func:`worker.daemon.relay_url`) and a key that is nobody's
(:data:`RELAY_KEY`; the relay drops it), spawned, initialized and given its session at fill time like a vault
pool's: the session is the costly part of Claude Code (its process: ~1.6 s), and Claude Code takes a credential only
when that process starts (ACP ``authenticate`` with the gateway method applies to sessions made after it only).

Everything tenant-specific is bound at the claim (:func:`binds_as_is`). A session whose daemon environment would
be the pool's but for the placeholder's value (same variables, same non-secret values, no files, the pool's cwd)
uses the daemon, agent and session as they are: the mock agent with strategy ``none``, and a vault session whose
LLM vault has the pool's ``llm_base_url``, whose grant then adopts the entry's placeholder (bound in Redis to the
tenant's vault and the sandbox's address: :meth:`worker.credentials.vault.VaultStrategy.adopt`). On an llm-relay
entry, a session whose environment is the pool's (the relay's variables aside) plus a grant of an API key or bearer
token (:func:`worker.agents.relay_binding`) uses daemon, agent and session as they are: the session stage gives the
relay the grant's endpoint and headers (:meth:`worker.daemon.DaemonClient.bind_llm`), which no process of the
sandbox but the front then holds. Any other session restarts the daemon with its own environment
(credentials, user env, agent switches), files and cwd (~35 ms), and its agent is spawned after the claim. Either
way the session stage sets the model, and the mode unless the pooled session already has it (vault and llm-relay
pools set the headless mode at fill time).

Entries are recycled unclaimed after ``max_age_seconds`` and never reused: a claimed sandbox belongs to its request
and goes with it (terminate, compensation, the reaper). Pooled sandboxes hold a slot of their provider's sandbox
quota (holder ``pool:<entry_id>``), taken only when free, and handed to the request at the claim.

Keys, per pool ``<name>`` (hash-tagged, one Redis Cluster slot):

* ``sw:pool:{<name>}:ready`` — zset, entry id → creation time (s)
* ``sw:pool:{<name>}:entries`` — hash, entry id → :class:`PoolEntry` JSON (the token encrypted)
* ``sw:pool:{<name>}:filling`` — zset, entry id → when the fill counts as dead (s)
* ``sw:pool:{<name>}:claimed`` — hash, entry id → ``{"request_id", "sandbox_id", "at"}``: the reaper's way from a claimed
  sandbox (whose labels cannot change on Docker) to its request
* ``sw:pool:{<name>}:refill`` — the refill lock
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
import structlog
from pydantic import BaseModel, ConfigDict, SecretStr

from providers.base import LABEL_CREATED_AT, LABEL_EXPIRES_AT, LABEL_OWNER, Endpoint, Provider, Sandbox, SandboxSpec
from worker import daemon, metrics
from worker.acp import AcpConnection
from worker.agents import AgentSetup, agent_setup, relay_binding
from worker.config import PoolBinding, PoolTarget, Settings
from worker.credentials.agents import BASE_URL_VARIABLES, llm_provider_for, token_grant
from worker.credentials.base import CredentialGrant
from worker.credentials.vault import DEFAULT_LLM_BASE_URLS, Engine, new_placeholder, proxy_url
from worker.environment import SessionEnvironment, daemon_environment
from worker.errors import ConfigurationError
from worker.limits import Limits
from worker.models import LLMProvider, PermissionPolicy, ProviderName, SessionRequest, Strategy
from worker.store import Store

log = structlog.get_logger(__name__)

LABEL_POOL = "sandbox-worker-pool"
LABEL_POOL_ENTRY = "sandbox-worker-pool-entry"
POOL_CWD = "/workspace"  # the pooled daemon's working directory (the request's default cwd)
# An llm-relay pool's variables beside the agent's switches: its LLM is the relay, its key nobody's (the relay drops it).
RELAY_ENV = (BASE_URL_VARIABLES[LLMProvider.anthropic], "ANTHROPIC_API_KEY")
RELAY_KEY = "sandbox-worker-llm-relay"

# KEYS: ready, entries, claimed. ARGV: request id. The newest ready entry (the least likely to be near its max age),
# taken out and noted as claimed in one step: returns [its JSON, or nil when the pool is empty; the entries left].
_CLAIM = """
local popped = redis.call('ZPOPMAX', KEYS[1])
if #popped == 0 then return {false, 0} end
local id = popped[1]
local entry = redis.call('HGET', KEYS[2], id)
redis.call('HDEL', KEYS[2], id)
local note = {request_id = ARGV[1], at = tonumber(redis.call('TIME')[1])}
if entry then note.sandbox_id = cjson.decode(entry).sandbox_id end
redis.call('HSET', KEYS[3], id, cjson.encode(note))
return {entry or false, redis.call('ZCARD', KEYS[1])}
"""


def pool_name(target: PoolTarget) -> str:
    """A label-safe name for the pool of ``target`` ([A-Za-z0-9_-], as E2B metadata requires)."""
    image = hashlib.sha256((target.image or "").encode()).hexdigest()[:10]
    if target.binding is not None:
        return f"{target.provider.value}-{target.agent.value}-{target.binding}-{image}"
    if target.strategy is None:
        return f"{target.provider.value}-{target.agent.value}-{image}"
    binding = hashlib.sha256(f"{target.image or ''} {target.llm_base_url or ''}".encode()).hexdigest()[:10]
    return f"{target.provider.value}-{target.agent.value}-{target.strategy.value}-{binding}"


def slot_holder(entry_id: str) -> str:
    """The holder of a pool entry's quota slot (a colon: never a request id)."""
    return f"pool:{entry_id}"


class PoolEntry(BaseModel):
    """A ready sandbox as the pool keeps it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    entry_id: str
    pool: str
    provider: ProviderName
    sandbox_id: str
    labels: dict[str, str]
    token: str  # Fernet ciphertext of the daemon's token
    private_address: str | None = None  # the sandbox's (Docker): a vault placeholder is bound to it at the claim
    strategy: Strategy | None = None  # the strategy whose grant may adopt the placeholder (the target's)
    binding: PoolBinding | None = None  # the target's: "llm-relay", its agent's LLM credential is the relay's
    env: dict[str, str] = {}  # the pooled daemon's non-secret variables
    secret_env: list[str] = []  # the names of its secret variables, each holding the placeholder
    placeholder: str | None = None  # Fernet ciphertext of the placeholder, bound to nothing until the claim
    server_id: str | None = None  # an ACP server whose agent is spawned and initialized
    acp_requests: int = 1  # the requests the filler sent on that server (before sessions were pooled: 1)
    session_id: str | None = None  # an ACP session it created there, in POOL_CWD
    mode: str | None = None  # the mode set on that session
    created_at: float
    expires_at: float  # the sandbox's hard lifetime

    def sandbox(self) -> Sandbox:
        return Sandbox(self.provider.value, self.sandbox_id, self.labels, private_address=self.private_address)

    def __repr__(self) -> str:
        return f"PoolEntry({self.pool!r}, {self.entry_id!r}, sandbox_id={self.sandbox_id!r})"


@dataclass(frozen=True, slots=True)
class Claimed:
    """A warm sandbox now belonging to one request, with its running daemon's token."""

    entry: PoolEntry
    sandbox: Sandbox
    endpoint: Endpoint
    token: SecretStr
    placeholder: SecretStr | None
    seconds: float


def binds_as_is(
    request: SessionRequest, agent: AgentSetup, grant: CredentialGrant, env: SessionEnvironment, entry: PoolEntry
) -> bool:
    """Whether a warm daemon already runs as this session needs: the same variables with the same non-secret values
    (the secret ones are the grant's, which adopts the entry's placeholder: same strategy; on an llm-relay entry,
    the grant's variables and the relay's aside: the grant goes to the relay), no file, the pool's cwd. Otherwise
    the daemon is restarted with the session's."""
    daemon_env, pool_env = env.daemon_env, entry.env
    if entry.binding is not None:
        if relay_binding(grant) is None:
            return False
        daemon_env = {k: v for k, v in daemon_env.items() if k not in grant.env and k not in grant.plain_env}
        pool_env = {k: v for k, v in pool_env.items() if k not in RELAY_ENV}
    plain = {name: value for name, value in daemon_env.items() if isinstance(value, str)}
    secret = sorted(name for name, value in daemon_env.items() if not isinstance(value, str))
    if secret and (entry.placeholder is None or grant.strategy != entry.strategy):
        return False
    return (
        plain == pool_env
        and secret == entry.secret_env
        and not agent.files
        and not grant.files
        and request.session.cwd == POOL_CWD
    )


@dataclass(frozen=True, slots=True)
class PoolSetup:
    """What a pooled daemon and its agent start with: no tenant's anything."""

    env: dict[str, SecretStr | str]
    placeholder: SecretStr | None = None  # the value of the secret variables, bound to nothing
    mode: str | None = None  # the ACP session mode set on the pooled session (a headless session's)


def pool_environment(target: PoolTarget, settings: Settings) -> PoolSetup:
    """Nothing for a target without a strategy; for an llm-relay target the agent's switches and headless mode, the
    relay as its LLM and :data:`RELAY_KEY`; for a vault target what a vault session's grant and agent setup give
    it (the egress proxy's URL for the target's LLM, the agent's switches and headless mode), with a fresh placeholder
    bound to nothing as its key."""
    provider = llm_provider_for(target.agent, None)
    if target.binding is not None and provider is not None:
        setup = agent_setup(
            target.agent, provider, {}, permissions=PermissionPolicy.approve, llm_retries=settings.llm_retries
        )
        relay = dict(zip(RELAY_ENV, (daemon.relay_url(settings.daemon_port), RELAY_KEY), strict=True))
        return PoolSetup({**setup.env, **relay}, mode=setup.mode)
    if target.strategy is None:
        return PoolSetup({})
    public_url = settings.credentials.egress.public_url
    if provider is None or not public_url:
        raise ConfigurationError(
            f"pool target {target.agent.value}/{target.strategy.value} needs an agent with an LLM and "
            "credentials.egress.public_url"
        )
    engine = Engine.claude if provider is LLMProvider.anthropic else Engine.codex
    base_url = proxy_url(public_url, target.llm_base_url or DEFAULT_LLM_BASE_URLS[engine])
    placeholder = new_placeholder()
    grant = token_grant(target.strategy, provider, placeholder, base_url=base_url)
    setup = agent_setup(
        target.agent,
        provider,
        dict(grant.plain_env),
        permissions=PermissionPolicy.approve,
        llm_retries=settings.llm_retries,
    )
    if setup.files or setup.auth_method:  # a session would rewrite them: it could never use the daemon as is
        raise ConfigurationError(
            f"agent {target.agent.value} takes config files or an ACP authenticate: pool it without a strategy"
        )
    return PoolSetup(daemon_environment(grant, setup), placeholder, setup.mode)


@dataclass(frozen=True, slots=True)
class _Keys:
    ready: str
    entries: str
    filling: str
    claimed: str
    refill: str

    @classmethod
    def of(cls, name: str) -> _Keys:
        base = f"sw:pool:{{{name}}}:"
        return cls(f"{base}ready", f"{base}entries", f"{base}filling", f"{base}claimed", f"{base}refill")


class Pools:
    """The warm pools of the settings: claiming (the pipeline), filling and recycling (:class:`RefillThread`), and
    what the reaper needs to know about a pooled sandbox."""

    def __init__(
        self, settings: Settings, store: Store, providers: Callable[[ProviderName], Provider], limits: Limits
    ) -> None:
        self.settings = settings
        self.config = settings.pool
        self.store = store
        self.redis = store.redis
        self.providers = providers
        self.limits = limits
        self._claim = self.redis.register_script(_CLAIM)

    # -- claiming ------------------------------------------------------------------------------------------
    def target_for(self, request: SessionRequest, strategy: Strategy | None = None) -> PoolTarget | None:
        """The pool that may serve ``request`` (whose grant is of ``strategy``): same provider, agent and image, and
        nothing a started sandbox can no longer take (its own labels, cpu or memory, egress beyond what every sandbox
        may reach: a Docker sandbox's forward-proxy pass is sealed when it starts; a ttl longer than the pool's
        sandboxes live); of those, the one serving ``strategy`` first, then one binding a key at the LLM relay."""
        box = request.sandbox
        if (
            box.labels
            or box.egress
            or box.cpu is not None
            or box.memory_mb is not None
            or box.ttl_seconds > self.config.session_ttl_seconds
        ):
            return None
        fits = [
            target
            for target in self.config.targets
            if (target.provider, target.agent, target.image) == (request.provider, request.agent, box.image)
            and target.size > 0
        ]
        return min(fits, key=lambda target: (target.strategy != strategy, target.binding is None), default=None)

    def claim(self, request: SessionRequest, target: PoolTarget, provider: Provider) -> Claimed | None:
        """Take a ready sandbox of ``target``'s pool for ``request``; None (start cold) when the pool is empty or
        the entry it got is past its max age or no longer answers (that entry is removed)."""
        name = pool_name(target)
        keys = _Keys.of(name)
        started = time.perf_counter()
        try:
            raw, left = self._claim(keys=[keys.ready, keys.entries, keys.claimed], args=[request.request_id])
            metrics.POOL_SIZE.labels(name).set(left)
            miss = "empty"
            if raw:
                entry = PoolEntry.model_validate_json(raw)
                claimed, miss = self._check(entry, provider)
                if claimed is not None:
                    self.limits.hand_over_sandbox(
                        entry.provider, slot_holder(entry.entry_id), request, entry.expires_at
                    )
                    seconds = time.perf_counter() - started
                    metrics.POOL_HITS.labels(name).inc()
                    log.info(
                        "warm sandbox claimed", pool=name, sandbox_id=entry.sandbox_id, ms=round(seconds * 1000, 1)
                    )
                    return Claimed(entry, *claimed, seconds)
                self.discard(entry, provider)
            metrics.POOL_MISSES.labels(name, miss).inc()
            log.info("warm pool miss: starting cold", pool=name, reason=miss)
            return None
        finally:
            metrics.POOL_CLAIM_SECONDS.labels(name).observe(time.perf_counter() - started)

    def _check(
        self, entry: PoolEntry, provider: Provider
    ) -> tuple[tuple[Sandbox, Endpoint, SecretStr, SecretStr | None] | None, str]:
        """The entry's sandbox, token and placeholder when it may be handed out, else why not."""
        if time.time() - entry.created_at > self.config.max_age_seconds:
            return None, "expired"
        sandbox, token = entry.sandbox(), self.store.cipher.decrypt(entry.token)
        placeholder = self.store.cipher.decrypt(entry.placeholder) if entry.placeholder else None
        try:
            endpoint = provider.endpoint(sandbox, self.settings.daemon_port)
        except Exception:  # gone, or the provider cannot say: either way not worth a session
            return None, "dead"
        client = daemon.DaemonClient(endpoint, token, timeout=5)
        try:
            return ((sandbox, endpoint, token, placeholder), "") if client.health() else (None, "dead")
        finally:
            client.close()

    def discard(self, entry: PoolEntry, provider: Provider | None = None) -> None:
        """Remove an entry's sandbox and free its quota slot. Best effort: the reaper removes what this misses."""
        try:
            (provider or self.providers(entry.provider)).stop(entry.sandbox_id)
        except Exception as exc:
            log.warning("could not remove a pooled sandbox", sandbox_id=entry.sandbox_id, error=type(exc).__name__)
        self.limits.release_sandbox(entry.provider, slot_holder(entry.entry_id))
        self.redis.hdel(_Keys.of(entry.pool).claimed, entry.entry_id)

    # -- filling and recycling -----------------------------------------------------------------------------
    def refill(self) -> int:
        """One pass over every pool: remove what is past its max age, then start what is missing. Returns the
        sandboxes made ready."""
        made = 0
        for target in self.config.targets:
            self.recycle(target)
            for entry_id in self._reserve_fills(target):
                made += self._fill(target, entry_id)
            metrics.POOL_SIZE.labels(pool_name(target)).set(self.redis.zcard(_Keys.of(pool_name(target)).ready))
        return made

    def recycle(self, target: PoolTarget) -> int:
        """Remove the ready entries of ``target``'s pool past their max age (each by whoever takes it out first)."""
        name = pool_name(target)
        keys = _Keys.of(name)
        removed = 0
        cutoff = time.time() - self.config.max_age_seconds
        for entry_id in [str(member) for member in self.redis.zrangebyscore(keys.ready, "-inf", cutoff)]:
            pipe = self.redis.pipeline()  # MULTI: taken out and read in one step, or not ours
            pipe.zrem(keys.ready, entry_id)
            pipe.hget(keys.entries, entry_id)
            pipe.hdel(keys.entries, entry_id)
            taken, raw, _ = pipe.execute()
            if taken and raw:
                self.discard(PoolEntry.model_validate_json(raw))
                metrics.POOL_RECYCLED.labels(name).inc()
                removed += 1
        return removed

    def drain(self) -> int:
        """Remove every ready entry of every pool (a benchmark's or a shutdown's clean-up); fills in progress finish."""
        removed = 0
        for target in self.config.targets:
            keys = _Keys.of(pool_name(target))
            while (raw := self._claim(keys=[keys.ready, keys.entries, keys.claimed], args=["drain"])[0]) is not None:
                self.discard(PoolEntry.model_validate_json(raw))
                removed += 1
        return removed

    def _reserve_fills(self, target: PoolTarget) -> list[str]:
        """Under the pool's refill lock (short: no sandbox is started under it), count ready sandboxes and fills in
        progress, and mark the missing ones as this process's fills. Another worker holding the lock skips this pool
        for one pass."""
        keys = _Keys.of(pool_name(target))
        lock = self.redis.lock(keys.refill, timeout=10, blocking=False)
        if not lock.acquire():
            return []
        try:
            now = time.time()
            self.redis.zremrangebyscore(keys.filling, "-inf", now)  # fills whose worker died count no more
            missing = target.size - self.redis.zcard(keys.ready) - self.redis.zcard(keys.filling)
            ids = [uuid.uuid4().hex[:16] for _ in range(max(missing, 0))]
            if ids:
                self.redis.zadd(keys.filling, dict.fromkeys(ids, now + self.config.fill_timeout_seconds))
            return ids
        finally:
            with contextlib.suppress(redis.exceptions.LockError):
                lock.release()

    def _fill(self, target: PoolTarget, entry_id: str) -> int:
        """Start one pooled sandbox with its daemon and agent, and make it ready. 1 when it is, 0 otherwise."""
        name, settings = pool_name(target), self.settings
        keys = _Keys.of(name)
        now = time.time()
        expires = now + self.config.max_age_seconds + self.config.session_ttl_seconds
        provider = self.providers(target.provider)
        sandbox: Sandbox | None = None
        if not self.limits.reserve_pool_sandbox(target.provider, slot_holder(entry_id), expires):
            self.redis.zrem(keys.filling, entry_id)
            log.info("no quota slot free for a pooled sandbox", pool=name)
            return 0
        try:
            labels = {
                LABEL_OWNER: settings.owner,
                LABEL_POOL: name,
                LABEL_POOL_ENTRY: entry_id,
                LABEL_CREATED_AT: str(int(now)),
                LABEL_EXPIRES_AT: str(int(expires)),
            }
            spec = SandboxSpec(
                image=target.image,
                labels=labels,
                ttl_seconds=int(expires - now),
                ports=(settings.daemon_port,),
                idempotency_key=f"pool-{entry_id}",
            )
            sandbox = provider.start(spec)
            setup = pool_environment(target, settings)
            token, agent = self._start_daemon(target, provider, sandbox, entry_id, setup)
            entry = PoolEntry(
                entry_id=entry_id,
                pool=name,
                provider=target.provider,
                sandbox_id=sandbox.sandbox_id,
                labels=dict(sandbox.labels),
                token=self.store.cipher.encrypt(token),
                private_address=sandbox.private_address,
                strategy=target.strategy,
                binding=target.binding,
                env={k: v for k, v in setup.env.items() if isinstance(v, str)},
                secret_env=sorted(k for k, v in setup.env.items() if not isinstance(v, str)),
                placeholder=self.store.cipher.encrypt(setup.placeholder) if setup.placeholder else None,
                **agent,
                created_at=now,
                expires_at=expires,
            )
            pipe = self.redis.pipeline()  # MULTI: ready and no longer filling in one step (the reaper looks at both)
            pipe.hset(keys.entries, entry_id, entry.model_dump_json())
            pipe.zadd(keys.ready, {entry_id: now})
            pipe.zrem(keys.filling, entry_id)
            pipe.execute()
        except Exception as exc:
            log.warning("filling a pooled sandbox failed", pool=name, error=type(exc).__name__, detail=str(exc)[:200])
            metrics.POOL_FILLS.labels(name, "failed").inc()
            if sandbox is not None:
                with contextlib.suppress(Exception):
                    provider.stop(sandbox.sandbox_id)
            self.limits.release_sandbox(target.provider, slot_holder(entry_id))
            self.redis.zrem(keys.filling, entry_id)
            return 0
        metrics.POOL_FILLS.labels(name, "ready").inc()
        log.info("pooled sandbox ready", pool=name, sandbox_id=sandbox.sandbox_id)
        return 1

    def _start_daemon(
        self, target: PoolTarget, provider: Provider, sandbox: Sandbox, entry_id: str, setup: PoolSetup
    ) -> tuple[SecretStr, dict[str, Any]]:
        """The daemon of a pooled sandbox: checked, its agent installed, started with the pool's environment (no
        tenant's anything), healthy. Its agent is spawned, ACP-initialized and given a session in POOL_CWD when the
        session can use it as is: an agent that takes no LLM credential (mock), or one whose credential is the
        pool's placeholder or relay; any other needs its session's environment, so it is spawned after the claim.
        Returns the token and the entry's agent fields."""
        settings, agent = self.settings, target.agent.value
        daemon.install_daemon(provider, sandbox, settings.daemon_install, settings.daemon_binary, image=target.image)
        daemon.install_agent(provider, sandbox, agent, settings.daemon_install)
        token = daemon.new_token()
        daemon.start_daemon(provider, sandbox, token=token, port=settings.daemon_port, cwd=POOL_CWD, env=setup.env)
        client = daemon.DaemonClient(provider.endpoint(sandbox, settings.daemon_port), token)
        fields: dict[str, Any] = {}
        try:
            client.wait_healthy(settings.health_timeout)
            daemon.check_agent(client, agent)
            if llm_provider_for(target.agent, None) is None or target.strategy is not None or target.binding:
                server_id = f"sw-pool-{entry_id}"
                with AcpConnection(client, server_id, agent) as acp:
                    acp.initialize(timeout=settings.session_timeout)
                    session_id = acp.new_session(POOL_CWD, timeout=settings.session_timeout)
                    if setup.mode:
                        acp.set_mode(session_id, setup.mode, timeout=settings.session_timeout)
                fields = {
                    "server_id": server_id,
                    "acp_requests": 2 + bool(setup.mode),
                    "session_id": session_id,
                    "mode": setup.mode,
                }
        finally:
            client.close()
        return token, fields

    # -- what the reaper asks ------------------------------------------------------------------------------
    def claimed_by(self, sandbox: Sandbox) -> str | None:
        """The request a pooled sandbox was claimed by, or None (not pooled, or not claimed)."""
        name, entry_id = sandbox.labels.get(LABEL_POOL), sandbox.labels.get(LABEL_POOL_ENTRY)
        if not name or not entry_id:
            return None
        raw = self.redis.hget(_Keys.of(name).claimed, entry_id)
        return str(json.loads(raw)["request_id"]) if raw else None

    def in_use(self, sandbox: Sandbox) -> bool:
        """Whether a pooled, unclaimed sandbox is still the pool's: ready, or its fill still in progress."""
        keys = _Keys.of(sandbox.labels[LABEL_POOL])
        entry_id = sandbox.labels[LABEL_POOL_ENTRY]
        if self.redis.zscore(keys.ready, entry_id) is not None:
            return True
        deadline = self.redis.zscore(keys.filling, entry_id)
        return deadline is not None and deadline > time.time()

    def recycle_all(self) -> int:
        return sum(self.recycle(target) for target in self.config.targets)

    def forget_claims(self, listed: set[str], before: float) -> None:
        """Drop the claim notes of sandboxes that no longer exist (not in ``listed``, the sandbox ids a listing
        taken at ``before`` returned); a note newer than the listing is kept: its sandbox may not have been listed."""
        for target in self.config.targets:
            key = _Keys.of(pool_name(target)).claimed
            for entry_id, raw in self.redis.hgetall(key).items():
                note = json.loads(raw)
                if note.get("at", 0) < before and note.get("sandbox_id") not in listed:
                    self.redis.hdel(key, entry_id)


class RefillThread(threading.Thread):
    """A worker process's background refill: :meth:`Pools.refill` every ``refill_interval_seconds``."""

    def __init__(self, pools: Pools) -> None:
        super().__init__(name="pool-refill", daemon=True)
        self.pools = pools
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.pools.refill()
            except Exception as exc:  # Redis or a provider down: try again next pass
                log.warning("pool refill pass failed", error=type(exc).__name__)
            self.stopped.wait(self.pools.config.refill_interval_seconds)

    def stop(self) -> None:
        self.stopped.set()
