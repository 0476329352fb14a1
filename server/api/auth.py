"""API keys: the keys file of docs/API.md (SHA-256 hashes only), key creation, and authentication.

A presented key is hashed and compared with every stored hash in constant time, so neither the
comparison nor the position of a match in the file leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefix_store.errors import InvalidName
from prefix_store.storage.names import validate_tenant
from prefix_store.storage.store import Quota
from server.config import (
    AUTH_ON_MAX_CONCURRENT,
    AUTH_ON_MAX_PREFIX_BYTES,
    AUTH_ON_MAX_PREFIXES,
    AUTH_ON_REQUESTS_PER_MINUTE,
)
from server.engine.config import DEFAULT_TENANT

KEY_PREFIX = "ps-"


class Role(StrEnum):
    USER = "user"  # generate, list models
    ADMIN = "admin"  # user + manage the tenant's prefixes


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant their key belongs to and its role."""

    tenant: str
    role: Role


@dataclass(frozen=True)
class TenantLimits:
    """The limits one tenant's calls are held to. None: no limit."""

    max_prefixes: int | None = AUTH_ON_MAX_PREFIXES  # the tenant's current prefixes
    max_prefix_bytes: int | None = AUTH_ON_MAX_PREFIX_BYTES  # all of the tenant's current prefixes together
    requests_per_minute: int | None = AUTH_ON_REQUESTS_PER_MINUTE
    max_concurrent: int | None = AUTH_ON_MAX_CONCURRENT  # requests of the tenant in the engine at once

    @property
    def quota(self) -> Quota:
        """What the store holds the tenant's uploads to."""
        return Quota(self.max_prefixes, self.max_prefix_bytes)

    def describe(self) -> str:
        """``600 requests/minute, 64 in flight, 1000 prefixes, 1024 MiB of prefixes``."""
        rate = f"{self.requests_per_minute} requests/minute" if self.requests_per_minute else "no rate limit"
        in_flight = f"{self.max_concurrent} in flight" if self.max_concurrent else "no concurrency limit"
        count = f"{self.max_prefixes} prefixes" if self.max_prefixes is not None else "no prefix count limit"
        size = (
            f"{self.max_prefix_bytes / (1 << 20):g} MiB of prefixes"
            if self.max_prefix_bytes is not None
            else "no prefix bytes limit"
        )
        return f"{rate}, {in_flight}, {count}, {size}"


def default_tenant_limits(
    *,
    auth_enabled: bool,
    requests_per_minute: int | None = None,
    max_concurrent: int | None = None,
    max_prefixes: int | None = None,
    max_prefix_bytes: int | None = None,
) -> TenantLimits:
    """The limits of a tenant without an entry in the keys file, from the serve options: None = unset (the
    auth-on default with auth on, no limit with auth off), 0 = no limit."""

    def chosen(option: int | None, auth_on_default: int) -> int | None:
        if option is None:
            return auth_on_default if auth_enabled else None
        return option or None

    return TenantLimits(
        max_prefixes=chosen(max_prefixes, AUTH_ON_MAX_PREFIXES),
        max_prefix_bytes=chosen(max_prefix_bytes, AUTH_ON_MAX_PREFIX_BYTES),
        requests_per_minute=chosen(requests_per_minute, AUTH_ON_REQUESTS_PER_MINUTE),
        max_concurrent=chosen(max_concurrent, AUTH_ON_MAX_CONCURRENT),
    )


class _TenantEntry(BaseModel):
    """A tenant's entry in the keys file; what it leaves out comes from the server's defaults, and 0 is no
    limit (as on the command line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_prefixes: int | None = Field(None, ge=0)
    max_prefix_bytes: int | None = Field(None, ge=0)
    requests_per_minute: int | None = Field(None, ge=0)
    max_concurrent: int | None = Field(None, ge=0)

    def over(self, defaults: TenantLimits) -> TenantLimits:
        given = self.model_dump(exclude_none=True)
        return replace(defaults, **{name: value or None for name, value in given.items()})


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeyEntry] = Field(default_factory=list)
    tenants: dict[str, _TenantEntry] = Field(default_factory=dict)


class KeysFileError(ValueError):
    """The keys file cannot be read or is malformed."""


@dataclass(frozen=True)
class AuthConfig:
    """What the keys file says: keys (as hashes) and per-tenant limits."""

    keys: tuple[tuple[bytes, Caller], ...] = ()  # (sha256 digest, caller)
    tenant_limits: dict[str, TenantLimits] = field(default_factory=dict)
    default_limits: TenantLimits = field(default_factory=TenantLimits)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def limits_for(self, tenant: str) -> TenantLimits:
        return self.tenant_limits.get(tenant, self.default_limits)

    def authenticate(self, api_key: str | None) -> Caller | None:
        """The caller a key belongs to, or None. With auth off everyone is the default tenant's admin."""
        if not self.enabled:
            return Caller(DEFAULT_TENANT, Role.ADMIN)
        if not api_key:
            return None
        digest = hashlib.sha256(api_key.encode("utf-8")).digest()
        found: Caller | None = None
        for stored, caller in self.keys:  # no early exit: every key is compared
            if hmac.compare_digest(stored, digest):
                found = caller
        return found


def load_auth_config(path: Path | None, **options: int | None) -> AuthConfig:
    """Read the keys file; no file means auth off (single tenant). ``options`` (the serve options
    ``requests_per_minute``, ``max_concurrent``, ``max_prefixes``, ``max_prefix_bytes``; None = unset,
    0 = no limit) are the limits of tenants without their own in the file: see ``default_tenant_limits``."""
    parsed = _read_keys_file(path) if path is not None else _KeysFile()
    keys = tuple((bytes.fromhex(entry.sha256), Caller(entry.tenant, entry.role)) for entry in parsed.keys)
    defaults = default_tenant_limits(auth_enabled=bool(keys), **options)
    tenant_limits = {name: entry.over(defaults) for name, entry in parsed.tenants.items()}
    return AuthConfig(keys=keys, tenant_limits=tenant_limits, default_limits=defaults)


def _read_keys_file(path: Path) -> _KeysFile:
    try:
        parsed = _KeysFile.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise KeysFileError(
            f"the keys file {path} does not exist (create keys with `prefix-serve keys create`)"
        ) from None
    except OSError as exc:
        raise KeysFileError(f"cannot read the keys file {path}: {exc.strerror}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise KeysFileError(
            f"the keys file {path} is malformed: {f'{where}: ' if where else ''}{error['msg']}"
        ) from None
    try:
        for name in [entry.tenant for entry in parsed.keys] + list(parsed.tenants):
            validate_tenant(name)
    except InvalidName as exc:
        raise KeysFileError(f"the keys file {path}: {exc}") from None
    return parsed


def create_key(keys_file: Path, tenant: str, role: Role) -> str:
    """Generate a key, append only its SHA-256 to ``keys_file`` (created if missing), return the key."""
    validate_tenant(tenant)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    data = json.loads(keys_file.read_text()) if keys_file.exists() else {"keys": [], "tenants": {}}
    data.setdefault("keys", []).append(
        {"tenant": tenant, "role": role.value, "sha256": hashlib.sha256(key.encode()).hexdigest()}
    )
    _KeysFile.model_validate(data)  # never write a file the server would refuse
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=keys_file.parent, prefix=f".{keys_file.name}.")
    with os.fdopen(fd, "w") as file:
        json.dump(data, file, indent=2)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.chmod(temp, 0o600)
    os.replace(temp, keys_file)
    return key


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
