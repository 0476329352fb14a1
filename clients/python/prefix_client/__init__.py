"""PrefixServe's Python SDK: generate with prefix-tuned tasks, stream tokens, manage prefixes.

    from prefix_client import Client

    with Client("http://127.0.0.1:8000", api_key="ps-…") as client:
        client.upload_prefix("summarize", "adapter/")  # a PEFT prompt-learning folder or a .safetensors
        print(client.generate("The weather today is", task_id="summarize").text)
        with client.stream("Once upon a time", task_id="summarize", max_new_tokens=32) as tokens:
            for token in tokens:
                print(token.text, end="", flush=True)

``AsyncClient`` has the same methods, awaited. Errors are ``PrefixServeError`` subclasses.
"""

from ._async_client import AsyncClient
from ._base import DEFAULT_BASE_URL, GenerateParams, validate_task_id
from ._client import Client
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PrefixServeError,
    RateLimitError,
    ServerError,
    ServiceUnavailableError,
    ValidationError,
)
from ._retry import RetryPolicy
from ._streaming import AsyncStream, Stream
from ._version import __version__
from .types import (
    Generation,
    Health,
    PrefixInfo,
    PrefixPage,
    StreamEnd,
    TenantUsage,
    TokenEvent,
    UploadResult,
    Usage,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncStream",
    "AuthenticationError",
    "Client",
    "ConflictError",
    "GenerateParams",
    "Generation",
    "Health",
    "InvalidInputError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PrefixInfo",
    "PrefixPage",
    "PrefixServeError",
    "RateLimitError",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailableError",
    "Stream",
    "StreamEnd",
    "TenantUsage",
    "TokenEvent",
    "UploadResult",
    "Usage",
    "ValidationError",
    "__version__",
    "validate_task_id",
]
