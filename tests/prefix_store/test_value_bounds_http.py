"""The magnitude bound over real HTTP, on a float32 and a float16 server (the demo model on the CPU): in
every format an upload with one element over the bound of the server's dtype is refused with 400
``invalid_prefix`` stating the bound, the store's files stay byte for byte the same and the task keeps
serving its previous version; the same upload with that element at the bound is accepted and serves.

(It tests the upload route, ``server/api/routes/admin.py``; it sits beside the format tests until it
moves to ``tests/server/api``.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from prefix_store.formats.limits import MAX_ABS_VALUE
from prefix_store.formats.native import encode_native
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt
from testing.peft_reference import make_peft_adapter, make_peft_soft_prompt
from tests.prefix_store.test_peft_format import read_adapter
from tests.server.api.live_server import live_server

pytestmark = [
    pytest.mark.e2e,  # starts servers
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

PROMPT = "Once upon a time there was a little model"
NUM_VIRTUAL_TOKENS = 3
Files = dict[str, tuple[str, bytes]]  # the multipart files of an upload


@dataclass(frozen=True)
class Server:
    client: httpx.Client
    store: Path
    dtype: str


@dataclass(frozen=True)
class Upload:
    tensor: str  # the tensor that holds the value, as messages name it
    files: Callable[[float | None], Files]  # the upload, one element set to the value (None: unchanged)


@pytest.fixture(scope="module", params=["float32", "float16"])
def server(
    request: pytest.FixtureRequest, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("store")
    with (
        live_server(demo_model_dir, store, env={"PREFIX_SERVE_DTYPE": request.param}) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield Server(client, store, request.param)


def _native(adapter_of: Callable[[float | None], Prefix | SoftPrompt], geometry: ModelGeometry) -> Upload:
    def files(value: float | None) -> Files:
        return {"file": ("p.safetensors", encode_native(adapter_of(value), geometry))}

    tensor = "embeddings" if isinstance(adapter_of(None), SoftPrompt) else "values"
    return Upload(tensor, files)


def _peft(folder: Path) -> Upload:
    config, model = read_adapter(folder)

    def files(value: float | None) -> Files:
        embeddings = safetensors.torch.load(model)["prompt_embeddings"].clone()  # [P, width]
        if value is not None:
            embeddings[-1, -1] = value
        changed = safetensors.torch.save({"prompt_embeddings": embeddings}, metadata={"format": "pt"})
        return {
            "adapter_config": ("adapter_config.json", config),
            "adapter_model": ("adapter_model.safetensors", changed),
        }

    return Upload("prompt_embeddings", files)


@pytest.fixture(scope="module")
def uploads(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Upload]:
    """Every format an upload may take, for the demo model, by name."""
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype="float32")
    geometry = ModelGeometry.from_config(model.config)
    folder = tmp_path_factory.mktemp("adapters")
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(geometry.prefix_shape(NUM_VIRTUAL_TOKENS), generator=generator)
    values = torch.randn(geometry.prefix_shape(NUM_VIRTUAL_TOKENS), generator=generator)
    embeddings = torch.randn(NUM_VIRTUAL_TOKENS, geometry.embedding_dim or 0, generator=generator)

    def prefix(value: float | None) -> Prefix:
        changed = values.clone()  # [layers, kv_heads, P, head_dim]
        if value is not None:
            changed[0, 1, 2, 3] = value
        return Prefix(keys, changed)

    def soft_prompt(value: float | None) -> SoftPrompt:
        changed = embeddings.clone()  # [P, embedding_dim]
        if value is not None:
            changed[2, 5] = value
        return SoftPrompt(changed)

    return {
        "native prefix": _native(prefix, geometry),
        "native soft prompt": _native(soft_prompt, geometry),
        "PEFT PREFIX_TUNING": _peft(
            make_peft_adapter(model, folder / "prefix", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
        ),
        "PEFT PREFIX_TUNING with projection": _peft(
            make_peft_adapter(
                model, folder / "projection", num_virtual_tokens=NUM_VIRTUAL_TOKENS, prefix_projection=True
            )
        ),
        "PEFT PROMPT_TUNING": _peft(
            make_peft_soft_prompt(model, folder / "prompt", num_virtual_tokens=NUM_VIRTUAL_TOKENS)
        ),
        "PEFT P_TUNING": _peft(
            make_peft_soft_prompt(
                model, folder / "p-tuning", num_virtual_tokens=NUM_VIRTUAL_TOKENS, method="P_TUNING"
            )
        ),
    }


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def _generate(client: httpx.Client, task_id: str) -> dict:
    answer = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 6, "task_id": task_id})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["finish_reason"] in ("length", "eos", "stop") and body["token_ids"]
    return body


@pytest.mark.parametrize(
    "name",
    [
        "native prefix",
        "native soft prompt",
        "PEFT PREFIX_TUNING",
        "PEFT PREFIX_TUNING with projection",
        "PEFT PROMPT_TUNING",
        "PEFT P_TUNING",
    ],
)
def test_over_the_bound_is_refused_and_stores_nothing_at_the_bound_serves(
    server: Server, uploads: dict[str, Upload], name: str
) -> None:
    client, upload, bound = server.client, uploads[name], MAX_ABS_VALUE[server.dtype]
    task = "bounded-" + name.lower().replace(" ", "-").replace("_", "-")
    first = client.put(f"/v1/admin/prefixes/{task}", files=upload.files(None))
    assert first.status_code == 201, first.text
    version = first.json()["version"]
    serving = _generate(client, task)
    assert serving["prefix_version"] == version

    before = _tree(server.store)
    for over in (-2 * bound, 1e30):
        refused = client.put(f"/v1/admin/prefixes/{task}", files=upload.files(over))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["type"] == "invalid_prefix"
        assert f"tensor '{upload.tensor}' holds a value of magnitude" in error["message"]
        assert f"over the bound of {bound:g} for a {server.dtype} server" in error["message"]
        assert _tree(server.store) == before  # nothing stored
        assert client.get(f"/v1/admin/prefixes/{task}").json()["version"] == version
        assert _generate(client, task)["token_ids"] == serving["token_ids"]  # the old version serves

    at_bound = client.put(f"/v1/admin/prefixes/{task}", files=upload.files(-bound))
    assert at_bound.status_code == 200, at_bound.text
    assert _generate(client, task)["prefix_version"] == at_bound.json()["version"]
