"""Configuration, read at the process edge only: command-line options over ``PREFIX_SERVE_*`` variables."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_store_url() -> str:
    return (Path.cwd() / "prefix-data").resolve().as_uri()


class ServeSettings(BaseSettings):
    """Options of ``prefix-serve serve``; each also reads ``PREFIX_SERVE_<OPTION>``."""

    model_config = SettingsConfigDict(env_prefix="PREFIX_SERVE_", frozen=True, extra="ignore")

    model: str | None = Field(None, description="local model folder or hub id; none = the offline demo model")
    store: str = Field(
        default_factory=default_store_url, description="file:///abs/path or redis://host:port/db"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: Path | None = Field(None, description="keys file (hashes only); none = auth off, single tenant")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_prompt_tokens: int = Field(2048, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    max_upload_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="a prefix file or PEFT adapter model"
    )
    max_request_bytes: int = Field(1024 * 1024, ge=1024, description="any other request body")
    max_virtual_tokens: int = Field(512, ge=1)
    max_stop_sequences: int = Field(8, ge=0)
    max_stop_sequence_chars: int = Field(64, ge=1)
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
    max_queue: int = Field(256, ge=1, description="waiting requests; more get 429")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still unfinished after this ends")
    shutdown_grace_s: float = Field(10.0, ge=0, description="time running requests get to finish at shutdown")
    replica_name: str = Field(
        default_factory=socket.gethostname,
        description="names this process in the X-Served-By response header",
    )
    log_level: str = "info"
