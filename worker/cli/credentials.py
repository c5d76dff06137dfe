"""``sandbox-worker keygen|secrets|gateway|tenant|vault|egress-proxy``: managing what the credential strategies
use.

Secret values are read from stdin (a hidden prompt on a terminal), never from an argument: arguments end
up in shell history and process lists. Nothing here prints a value.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from cryptography.fernet import Fernet
from pydantic import SecretStr

from worker.cli import output
from worker.config import get_settings
from worker.credentials.broker import gateway_keys
from worker.credentials.gateway import PENDING, GatewayKeys
from worker.credentials.vault import CredentialKind, Vault, VaultCredential, VaultStore
from worker.errors import ConfigurationError, InvalidRequest
from worker.models import CredentialsSpec, GatewayBackend, LLMProvider, Strategy
from worker.secret_store import SecretStore, check_tenant
from worker.store import Rekey, Store

secrets_app = typer.Typer(no_args_is_help=True, help="Per-tenant secrets, encrypted in Redis.")
gateway_app = typer.Typer(no_args_is_help=True, help="Per-tenant gateway keys: rotate, spend, revoke.")
tenant_app = typer.Typer(no_args_is_help=True, help="Per-tenant credential defaults, and removing a tenant.")
vault_app = typer.Typer(no_args_is_help=True, help="Vaults of the vault strategy (egress injection).")

Tenant = Annotated[str, typer.Option("--tenant", help="Tenant id.")]
TenantArg = Annotated[str, typer.Argument(help="Tenant id.")]
Backend = Annotated[
    GatewayBackend | None, typer.Option(help="Gateway backend; every backend holding a key when absent.")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]


def _store() -> Store:
    return Store.from_settings(get_settings())


def _secrets() -> SecretStore:
    return SecretStore.from_store(_store())


def _keys() -> GatewayKeys:
    keys = gateway_keys(get_settings(), _store())
    if keys is None:
        raise ConfigurationError("no gateway backend is configured (credentials.gateway.<backend>.management_key)")
    return keys


def _read_value(what: str) -> SecretStr:
    """A secret from stdin: a hidden prompt on a terminal, the whole input (minus the final newline) otherwise."""
    if sys.stdin.isatty():
        text = typer.prompt(what, hide_input=True)
    else:
        text = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not text.strip():
        raise InvalidRequest(f"no {what} on stdin", field="value")
    return SecretStr(text)


def _backends(keys: GatewayKeys, tenant: str, backend: GatewayBackend | None) -> list[GatewayBackend]:
    return [backend] if backend else keys.backends_of(tenant)


def keygen() -> None:
    """Print a new Fernet key for SANDBOX_WORKER_FERNET_KEY."""
    output.line(Fernet.generate_key().decode())


# -- secrets ------------------------------------------------------------------------------------------------
@secrets_app.command("put")
def secrets_put(name: Annotated[str, typer.Argument(help="Secret name.")], tenant: Tenant) -> None:
    """Store a secret; its value comes from stdin."""
    _secrets().put(tenant, name, _read_value("secret value"))
    output.line(f"stored {name} for tenant {tenant}")


@secrets_app.command("list")
def secrets_list(tenant: Tenant) -> None:
    """The names of the tenant's secrets (never their values)."""
    for name in _secrets().names(tenant):
        output.line(name)


@secrets_app.command("delete")
def secrets_delete(name: Annotated[str, typer.Argument(help="Secret name.")], tenant: Tenant) -> None:
    """Delete a secret."""
    if not _secrets().delete(tenant, name):
        raise InvalidRequest(f"tenant {tenant} has no secret named {name}", field="name")
    output.line(f"deleted {name}")


@secrets_app.command("rekey")
def secrets_rekey(as_json: AsJson = False) -> None:
    """Re-encrypt everything sealed in Redis (tenant secrets, gateway keys, vaults, daemon tokens and headers of
    session records) with the first key of SANDBOX_WORKER_FERNET_KEY. Safe while workers run, and to run again.
    Exits 1 when something could not be decrypted with any configured key."""
    store = _store()
    rekey = Rekey(store.redis, store.cipher)
    SecretStore.from_store(store).rekey(rekey)
    store.rekey(rekey)
    counts = {"rotated": rekey.rotated, "current": rekey.current, "raced": rekey.raced}
    if as_json:
        output.json_doc({**counts, "unreadable": rekey.unreadable})
    else:
        output.line(", ".join(f"{name} {count}" for name, count in counts.items()))
    for where in rekey.unreadable:
        output.error(f"no configured Fernet key decrypts {where}", field="fernet_key")
    if rekey.unreadable:
        raise typer.Exit(1)


# -- gateway ------------------------------------------------------------------------------------------------
@gateway_app.command("rotate")
def gateway_rotate(tenant: TenantArg, backend: Backend = None) -> None:
    """Mint a new key for the tenant and delete the old one at the gateway (kept as pending revocation, and
    retried, when the gateway does not answer)."""
    keys = _keys()
    chosen = _backends(keys, tenant, backend)
    if not chosen:
        raise InvalidRequest(f"tenant {tenant} has no gateway key: name --backend to mint one", field="tenant_id")
    for name in chosen:
        key = keys.rotate(tenant, name)
        output.line(f"rotated {name.value} key of tenant {tenant} ({key.name})")
    for pending in keys.pending(tenant):
        output.line(f"pending revocation (the gateway did not confirm the delete; retried): {pending}")


@gateway_app.command("spend")
def gateway_spend(tenant: TenantArg, backend: Backend = None, as_json: AsJson = False) -> None:
    """What the tenant's gateway key has spent in its budget window."""
    keys = _keys()
    spends = [keys.spend(tenant, name) for name in _backends(keys, tenant, backend)]
    if as_json:
        output.json_doc([s.model_dump(mode="json") for s in spends])
        return
    for spend in spends:
        limit = f" of {spend.limit_usd:.2f}" if spend.limit_usd is not None else ""
        period = f" ({spend.period})" if spend.period else ""
        output.line(f"{spend.backend.value}: {spend.spent_usd:.4f} USD{limit}{period}")


@gateway_app.command("revoke")
def gateway_revoke(tenant: TenantArg, backend: Backend = None) -> None:
    """Delete the tenant's key at the gateway and forget it."""
    keys = _keys()
    for name in _backends(keys, tenant, backend):
        if keys.revoke(tenant, name):
            output.line(f"revoked {name.value} key of tenant {tenant}")


# -- tenant -------------------------------------------------------------------------------------------------
@tenant_app.command("set-default")
def tenant_set_default(
    tenant: TenantArg,
    strategy: Annotated[Strategy, typer.Option(help="Default credentials strategy.")],
    secret_ref: Annotated[str | None, typer.Option(help="Secret name (byok).")] = None,
    gateway: Annotated[GatewayBackend | None, typer.Option(help="Gateway backend (gateway).")] = None,
    llm_provider: Annotated[LLMProvider | None, typer.Option(help="LLM provider (opencode).")] = None,
    vault: Annotated[list[str] | None, typer.Option("--vault", help="Vault to attach (repeatable).")] = None,
) -> None:
    """The credentials a request of this tenant gets when it names no strategy."""
    spec = CredentialsSpec(
        strategy=strategy, secret_ref=secret_ref, gateway=gateway, llm_provider=llm_provider, vaults=vault or []
    )
    _secrets().set_default(tenant, spec)
    output.line(f"default for tenant {tenant}: {spec.model_dump_json(exclude_defaults=True)}")


@tenant_app.command("show")
def tenant_show(tenant: TenantArg) -> None:
    """The tenant's default credentials, secret names, vaults and gateway keys (names only)."""
    secrets = _secrets()
    default = secrets.default(tenant)
    report = {
        "default": default.model_dump(mode="json", exclude_defaults=True) if default else None,
        "secrets": secrets.names(tenant),
        "vaults": [v.name for v in VaultStore(secrets).list(tenant)],
        "gateway_keys": secrets.sealed_names("gateway", tenant),
        "gateway_keys_pending_revocation": secrets.sealed_names(PENDING, tenant),
    }
    output.json_doc(report)


@tenant_app.command("remove")
def tenant_remove(tenant: TenantArg) -> None:
    """Remove a tenant: revoke its gateway keys at the gateways, then forget its secrets, vaults and default."""
    check_tenant(tenant)
    settings = get_settings()
    keys = gateway_keys(settings, _store())
    secrets = _secrets()
    if keys is not None:
        for backend in keys.backends_of(tenant):
            keys.revoke(tenant, backend)
            output.line(f"revoked {backend.value} key")
    elif secrets.sealed_names("gateway", tenant):
        raise ConfigurationError("the tenant has gateway keys but no gateway is configured here to revoke them")
    secrets.purge(tenant)
    output.line(f"removed tenant {tenant}")


# -- vault --------------------------------------------------------------------------------------------------
@vault_app.command("create")
def vault_create(
    name: Annotated[str, typer.Argument(help="Vault name.")],
    tenant: Tenant,
    credential: Annotated[str, typer.Option(help="Name of the credential whose token comes from stdin.")] = "default",
    engine: Annotated[str | None, typer.Option(help="claude or codex: makes an LLM vault (role=llm).")] = None,
    llm_base_url: Annotated[str | None, typer.Option(help="LLM endpoint (default: the engine's public API).")] = None,
    kind: Annotated[CredentialKind, typer.Option(help="Kind of the credential.")] = CredentialKind.static_bearer,
    mcp_server_url: Annotated[str | None, typer.Option(help="MCP server the credential belongs to.")] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="KEY=VALUE metadata (repeatable).")] = None,
    replace: Annotated[bool, typer.Option(help="Replace an existing vault of that name.")] = False,
) -> None:
    """Create a vault with one credential; its token comes from stdin."""
    pairs = [item.partition("=") for item in meta or []]
    if any(not sep or not key for key, sep, _ in pairs):
        raise InvalidRequest("--meta takes KEY=VALUE", field="meta")
    metadata = {key: value for key, _, value in pairs}
    if engine:
        metadata.update(role="llm", engine=engine)
    if llm_base_url:
        metadata["llm_base_url"] = llm_base_url
    vault = Vault(
        name=name,
        metadata=metadata,
        credentials=[
            VaultCredential(name=credential, kind=kind, token=_read_value("token"), mcp_server_url=mcp_server_url)
        ],
    )
    VaultStore(_secrets()).create(tenant, vault, replace=replace)
    output.line(f"created vault {name} for tenant {tenant}")


@vault_app.command("list")
def vault_list(tenant: Tenant) -> None:
    """The tenant's vaults with their metadata and credential names (tokens masked)."""
    vaults = VaultStore(_secrets()).list(tenant)
    output.json_doc([v.model_dump(mode="json") for v in vaults])


@vault_app.command("delete")
def vault_delete(name: Annotated[str, typer.Argument(help="Vault name.")], tenant: Tenant) -> None:
    """Delete a vault."""
    if not VaultStore(_secrets()).delete(tenant, name):
        raise InvalidRequest(f"tenant {tenant} has no vault named {name}", field="name")
    output.line(f"deleted vault {name}")


def egress_proxy(
    host: Annotated[str | None, typer.Option(help="Listen address (credentials.egress.listen_host).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (credentials.egress.listen_port).")] = None,
) -> None:
    """Run the egress proxy of the vault strategy."""
    from worker.egress_proxy import serve

    serve(get_settings(), host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command()(keygen)
    app.add_typer(secrets_app, name="secrets")
    app.add_typer(gateway_app, name="gateway")
    app.add_typer(tenant_app, name="tenant")
    app.add_typer(vault_app, name="vault")
    app.command("egress-proxy")(egress_proxy)
