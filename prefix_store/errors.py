"""Every exception ``prefix_store`` raises, under one root; foreign exceptions (OS, Redis, safetensors) are
translated into these at its edge."""


class PrefixStoreError(Exception):
    """Root of every error raised by ``prefix_store``."""


class PrefixValidationError(PrefixStoreError):
    """An uploaded or loaded prefix is malformed or does not fit the base model.

    ``status`` is the HTTP status the API layer answers with (400 bad content, 413 too large).
    The message names what is wrong precisely and never contains paths or stack traces.
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class PrefixCacheFull(PrefixStoreError):
    """A prefix cannot be placed on the device: every resident prefix is pinned by a running request and
    the new one does not fit in the byte budget (or the prefix is larger than the whole budget, or the
    device is out of memory). Transient unless the prefix is larger than the budget: the API answers 503."""


class InvalidName(PrefixStoreError):
    """A task id or tenant name outside ``[A-Za-z0-9._-]{1,128}`` or starting with ``.`` (``name``)."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class PrefixNotFound(PrefixStoreError):
    """No prefix of that task id (``name``, where known) in that tenant (or no such version)."""

    def __init__(self, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


class QuotaExceeded(PrefixStoreError):
    """A write would take a tenant past its quota (``what``: "prefixes" or "bytes"; ``limit``; ``usage``,
    the tenant's figure before the write). Nothing was stored."""

    def __init__(self, what: str, limit: int, usage: int) -> None:
        noun = "prefixes" if what == "prefixes" else "bytes of prefixes"
        super().__init__(
            f"the tenant has {usage} {noun}; this upload would take it past its limit of {limit}"
        )
        self.what, self.limit, self.usage = what, limit, usage


class VersionMismatch(PrefixStoreError):
    """An ``If-Match`` precondition named a version that is not the current one."""


class StoreUnavailable(PrefixStoreError):
    """The storage backend cannot be reached (or refuses to work); retrying later may succeed."""
