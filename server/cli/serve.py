"""``prefix-serve serve``: the HTTP server.

The options, their help and the list of environment-only settings come from ``ServeSettings``. What can
be checked before the model loads is (settings, keys file, model path, store folder, port, device); a
start-up error is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import shutil
import signal
import socket
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError

from server.cli.remote import fail
from server.config import (
    AUTH_ON_MAX_CONCURRENT,
    AUTH_ON_MAX_PREFIX_BYTES,
    AUTH_ON_MAX_PREFIXES,
    AUTH_ON_REQUESTS_PER_MINUTE,
    ENV_PREFIX,
    ServeSettings,
    StartupError,
)
from server.model_source import BUILTIN_MODELS

EXIT_STARTUP = 2
_UVICORN_STARTUP_FAILURE = 3  # uvicorn's exit status when the app's start-up fails
_NO_DEFAULT = "; none = "  # in a setting's description: what leaving it unset means
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")

# the settings that are also command-line options, in the order of the help
CLI_OPTIONS = ("model", "store", "host", "port", "api_keys", "device", "dtype", "prompt_cache")
LIMIT_OPTIONS = (
    "tenant_requests_per_minute",
    "tenant_max_concurrent",
    "tenant_max_prefixes",
    "tenant_max_prefix_bytes",
)

_LIMITS_HELP = (
    "With --api-keys, a tenant without its own limits in the keys file gets these "
    f"({AUTH_ON_REQUESTS_PER_MINUTE} requests per minute, {AUTH_ON_MAX_CONCURRENT} in flight, "
    f"{AUTH_ON_MAX_PREFIXES} prefixes and {AUTH_ON_MAX_PREFIX_BYTES >> 20} MiB of prefixes unless set here; "
    "0 = no limit). Without --api-keys (auth off, the one local tenant "
    "'default') there are no per-tenant limits unless set here; the server-wide "
    f"queue ({ENV_PREFIX}MAX_QUEUE) still answers 429 when it is full. The start-up log says which "
    "limits are in force."
)


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the HTTP server.",
        epilog=_settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--model", metavar="PATH_OR_ID", help=describe_setting("model"))
    serve.add_argument("--store", metavar="FOLDER_OR_URL", help=describe_setting("store"))
    serve.add_argument("--host", help=describe_setting("host"))
    serve.add_argument("--port", type=int, help=describe_setting("port"))
    serve.add_argument("--api-keys", type=Path, metavar="FILE", help=describe_setting("api_keys"))
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help=describe_setting("device"))
    serve.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], help=describe_setting("dtype")
    )
    serve.add_argument(
        "--prompt-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=describe_setting("prompt_cache"),
    )
    limits = serve.add_argument_group("per-tenant limits", _wrap(_LIMITS_HELP))
    limits.add_argument(
        "--tenant-requests-per-minute",
        type=int,
        metavar="N",
        help=describe_setting("tenant_requests_per_minute"),
    )
    limits.add_argument(
        "--tenant-max-concurrent", type=int, metavar="N", help=describe_setting("tenant_max_concurrent")
    )
    limits.add_argument(
        "--tenant-max-prefixes", type=int, metavar="N", help=describe_setting("tenant_max_prefixes")
    )
    limits.add_argument(
        "--tenant-max-prefix-bytes", type=int, metavar="N", help=describe_setting("tenant_max_prefix_bytes")
    )
    serve.set_defaults(handler=_serve)


def describe_setting(name: str) -> str:
    """A setting's description with its default: ``waiting requests; more get 429 (default: 256)``."""
    field = ServeSettings.model_fields[name]
    description = field.description or ""
    if _NO_DEFAULT in description:  # "…; none = the offline demo model": the default says what unset means
        head, _, meaning = description.partition(_NO_DEFAULT)
        return f"{head} (default: {meaning})"
    return f"{description} (default: {_shown_default(field)})"


def _shown_default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True, validated_data={})
    if value is None or value == []:
        return "none"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value} = {value >> 20} MiB"
    return str(value)


def _settings_epilog() -> str:
    env_only = [
        f"  {ENV_PREFIX}{name.upper()}\n{_wrap(describe_setting(name), indent='      ')}"
        for name in ServeSettings.model_fields
        if name not in CLI_OPTIONS + LIMIT_OPTIONS
    ]
    every_option = (
        f"Every option also reads {ENV_PREFIX}<OPTION> (--api-keys: {ENV_PREFIX}API_KEYS, "
        f"--tenant-max-concurrent: {ENV_PREFIX}TENANT_MAX_CONCURRENT, ...); an option given on the "
        "command line wins over the environment."
    )
    return "\n\n".join(
        [_wrap(every_option), "Settings read only from the environment:\n" + "\n".join(env_only)]
    )


def _wrap(text: str, indent: str = "") -> str:
    width = min(88, shutil.get_terminal_size().columns - 2)  # as argparse wraps the options' help
    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent)


# --- running ------------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        check_before_loading(settings, args)
    except StartupError as exc:
        fail(str(exc))
        return EXIT_STARTUP
    import uvicorn

    from server.api.app import begin_stopping, create_app

    class _Server(uvicorn.Server):
        """uvicorn's server, telling the app as soon as a stop signal comes (``begin_stopping``)."""

        def __init__(self, config: uvicorn.Config, on_stop: Callable[[], None]) -> None:
            super().__init__(config)
            self._on_stop = on_stop

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if not self.should_exit:
                self._on_stop()
            super().handle_exit(sig, frame)

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler that was
    # in place before it started: ours, so a graceful stop exits 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _exit_cleanly)
    app = create_app(settings)
    config = uvicorn.Config(
        StartupFailureInOneLine(app),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # longer than the engine's grace, so that requests it aborts can still answer (503)
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + 2,
    )
    try:
        _Server(config, on_stop=lambda: begin_stopping(app)).run()
    except SystemExit as exc:
        if exc.code == _UVICORN_STARTUP_FAILURE:  # already said, in one line
            return EXIT_STARTUP
        raise
    return 0


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _settings(args: argparse.Namespace) -> ServeSettings:
    """The settings: the options given, over the environment, over the defaults."""
    options = {
        name: getattr(args, name) for name in CLI_OPTIONS + LIMIT_OPTIONS if getattr(args, name) is not None
    }
    try:
        return ServeSettings(**options)
    except ValidationError as exc:
        raise StartupError("; ".join(_setting_error(args, error) for error in exc.errors())) from None
    except SettingsError as exc:  # an environment value that is not JSON where JSON is needed
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"{ENV_PREFIX}{field.group(1).upper()}" if field else "a PREFIX_SERVE_ variable"
        raise StartupError(f"{name}: not valid JSON ({exc.__cause__ or exc})") from None


def _setting_error(args: argparse.Namespace, error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if getattr(args, name, None) is not None:
        return f"--{name.replace('_', '-')} {error['input']}: {message}"
    return f"{ENV_PREFIX}{name.upper()}={error['input']}: {message}"


def _label(args: argparse.Namespace, name: str) -> str:
    """How the user gave a setting: ``--api-keys``, or ``PREFIX_SERVE_API_KEYS`` when it came from there."""
    env = f"{ENV_PREFIX}{name.upper()}"
    if getattr(args, name, None) is None and env in os.environ:
        return env
    return f"--{name.replace('_', '-')}"


def check_before_loading(settings: ServeSettings, args: argparse.Namespace) -> None:
    """What can be found wrong in milliseconds, before seconds (or minutes) of model loading; raises
    ``StartupError``."""
    from server.api.auth import KeysFileError, load_auth_config

    try:
        load_auth_config(settings.api_keys)
    except KeysFileError as exc:
        raise StartupError(f"{_label(args, 'api_keys')}: {exc}") from None
    _check_model(settings.model, _label(args, "model"))
    _check_store(settings.store, _label(args, "store"))
    _check_port(settings.host, settings.port, _label(args, "host"), _label(args, "port"))
    _check_device(settings)


def _check_model(model: str, label: str) -> None:
    """A built-in name, or a local path that exists, or at least a possible hub id. (Whether the model
    can be served is for the loader to say.)"""
    if model in BUILTIN_MODELS:
        return
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_file():
        raise StartupError(f"{label} {model}: no such GGUF file")
    if path.is_dir() and not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
        raise StartupError(f"{label} {model}: not a model folder (it has no config.json)")
    if path.exists():
        return
    if path.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1:
        raise StartupError(f"{label} {model}: no such file or folder")
    if not _HUB_ID.fullmatch(model):
        raise StartupError(
            f"{label} {model}: neither a built-in model ({', '.join(BUILTIN_MODELS)}), a local model folder "
            "or .gguf file, nor a hub id (owner/name)"
        )


def _check_store(url: str, label: str) -> None:
    """A file store's folder must exist or be creatable, and be writable."""
    parsed = urlparse(url)
    if parsed.scheme != "file":
        return  # a Redis store may come up after the server: readiness says when it answers
    folder = Path(url2pathname(parsed.path))
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise StartupError(f"{label} {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StartupError(f"{label} {folder}: {existing} is not writable")


def _check_port(host: str, port: int, host_label: str, port_label: str) -> None:
    """Bind and release the address as uvicorn will (SO_REUSEADDR), so a port in use is said now."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"{host_label} {host}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"{port_label} {port}: already in use on {host} (is another server running there?)"
                ) from None
            raise StartupError(f"{host_label} {host} {port_label} {port}: {exc.strerror}") from None


def _check_device(settings: ServeSettings) -> None:
    from server.engine.base_model import resolve_device  # torch: imported last, it takes seconds

    try:
        resolve_device(settings.device)
    except ValueError as exc:  # --device cuda without CUDA
        raise StartupError(str(exc)) from None


class StartupFailureInOneLine:
    """The app, with a failed start-up reported to uvicorn as one line instead of the traceback that
    Starlette sends it (uvicorn then logs that line and exits)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        failed = False

        async def send_short(message: Any) -> None:
            nonlocal failed
            if message["type"] == "lifespan.startup.failed":
                failed = True  # sent below, once the exception is known
                return
            await send(message)

        try:
            await self.app(scope, receive, send_short)
        except Exception as exc:
            if not failed:
                raise
            reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
            await send(
                {"type": "lifespan.startup.failed", "message": f"cannot start: {' '.join(reason.split())}"}
            )
