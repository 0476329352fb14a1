"""The two steps of bringing a task version (a prefix, or a LoRA task's updates) onto the device, kept apart because they fail differently:
``fetch_prefix`` (storage: ``StoreUnavailable``, ``PrefixNotFound``; content: ``PrefixValidationError``)
and ``place_prefix`` (device memory: ``PrefixCacheFull``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from prefix_store.errors import PrefixCacheFull, PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import decode_native
from prefix_store.geometry import ModelGeometry
from prefix_store.lora import LoraAdapter
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import Resident, SoftPrompt, kind_of
from prefix_store.storage.store import PrefixRecord, PrefixStore

DEFAULT_CPU_BUDGET_BYTES = 1 << 30
DEFAULT_DEVICE_BUDGET_FRACTION = 0.1  # of the device memory free when the registry is built


def default_budget_bytes(device: torch.device) -> int:
    """A tenth of the free accelerator memory (the model is loaded by then), or 1 GiB on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(1, int(free * DEFAULT_DEVICE_BUDGET_FRACTION))
    return DEFAULT_CPU_BUDGET_BYTES


SoftPromptEncoder = Callable[[SoftPrompt], Prefix]  # a soft prompt's keys and values, from the model


def fetch_prefix(
    store: PrefixStore,
    record: PrefixRecord,
    geometry: ModelGeometry,
    limits: PrefixLimits,
    dtype: torch.dtype,
    encode_soft_prompt: SoftPromptEncoder | None = None,
) -> Resident:
    """Read a version's blob and validate it fully (a store is trusted with bytes, not with their
    meaning; values are held to the magnitude bound of ``dtype``, ``PrefixLimits.for_dtype``), cast it to
    the model dtype on the CPU; a soft prompt becomes the keys and values its virtual tokens give
    (``encode_soft_prompt``, a CPU prefix in the model dtype); a LoRA task stays itself."""
    blob = store.get_blob(record)
    adapter = decode_native(blob, geometry, limits.for_dtype(dtype)).to("cpu", dtype)
    if isinstance(adapter, SoftPrompt):
        if encode_soft_prompt is None:
            raise PrefixValidationError(
                f"{record.task_id!r} is a soft prompt, and this cache cannot encode one"
            )
        prefix = encode_soft_prompt(adapter)
    else:
        prefix = adapter
    if (record.kind == "lora") != isinstance(adapter, LoraAdapter):
        raise PrefixValidationError(
            f"the stored blob of {record.task_id!r} holds a {kind_of(adapter)} but its record says {record.kind}"
        )
    if prefix.num_virtual_tokens != record.num_virtual_tokens:
        raise PrefixValidationError(
            f"the stored prefix of {record.task_id!r} has {prefix.num_virtual_tokens} virtual tokens "
            f"but its record says {record.num_virtual_tokens}"
        )
    return prefix


def place_prefix(cpu: Resident, device: torch.device) -> Resident:
    """Copy a CPU prefix or LoRA task (already in the model dtype) to the device; on the CPU it is used as
    it is."""
    if device.type == "cpu":
        return cpu
    try:
        if isinstance(cpu, LoraAdapter):
            return cpu.to(device, next(iter(cpu.modules.values())).a.dtype)
        return Prefix(cpu.keys.to(device), cpu.values.to(device))
    except torch.cuda.OutOfMemoryError as exc:
        raise PrefixCacheFull("the device is out of memory for a prefix; try again") from exc
