"""API keys: the keys file of API.md (SHA-256 hashes only), key creation, and authentication.

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
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefix_store.names import InvalidName, validate_tenant

DEFAULT_TENANT = "default"
KEY_PREFIX = "ps-"


class Role(StrEnum):
    USER = "user"  # generate, list models
    ADMIN = "admin"  # user + manage the tenant's prefixes


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant their key belongs to and its role."""

    tenant: str
    role: Role


class TenantLimits(BaseModel):
    """Per-tenant limits of the keys file; a tenant without an entry gets the server defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_prefixes: int = Field(1000, ge=0)
    max_prefix_bytes: int = Field(1 << 30, ge=0)  # all of the tenant's current prefixes together
    requests_per_minute: int = Field(600, ge=1)
    max_concurrent: int = Field(64, ge=1)  # requests of the tenant in the engine at once


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    role: Role
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[_KeyEntry] = Field(default_factory=list)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)


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


def load_auth_config(path: Path | None, default_limits: TenantLimits | None = None) -> AuthConfig:
    """Read the keys file; no file means auth off (single tenant)."""
    defaults = default_limits or TenantLimits()
    if path is None:
        return AuthConfig(default_limits=defaults)
    try:
        parsed = _KeysFile.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise KeysFileError(
            f"the keys file {path} does not exist (create keys with `prefix-serve keys create`)"
        ) from None
    except ValidationError as exc:
        raise KeysFileError(f"the keys file {path} is malformed: {exc.errors()[0]['msg']}") from None
    try:
        for name in [entry.tenant for entry in parsed.keys] + list(parsed.tenants):
            validate_tenant(name)
    except InvalidName as exc:
        raise KeysFileError(f"the keys file {path}: {exc}") from None
    keys = tuple((bytes.fromhex(entry.sha256), Caller(entry.tenant, entry.role)) for entry in parsed.keys)
    return AuthConfig(keys=keys, tenant_limits=dict(parsed.tenants), default_limits=defaults)


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
