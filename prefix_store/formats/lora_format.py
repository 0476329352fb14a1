"""LoRA tasks in both accepted forms: the native file's ``kind`` = ``lora`` and a PEFT ``LORA`` adapter folder.

- **Native**: tensors ``<module>.lora_A`` ``[r, in]`` and ``<module>.lora_B`` ``[out, r]`` for each adapted
  projection (its module path in the base model), metadata ``r`` and ``lora_alpha`` (what most modules
  have), ``rank_pattern`` / ``alpha_pattern`` (JSON objects: the modules that differ, by exact path) and
  ``use_rslora``.
- **PEFT**: ``adapter_config.json`` (``peft_type`` ``LORA``) and ``adapter_model.safetensors`` holding
  ``base_model.model.<module>.lora_A.weight`` and ``….lora_B.weight``. A module's rank and alpha come from
  ``rank_pattern`` / ``alpha_pattern`` as PEFT resolves them (the first key ``k`` in order for which the
  module path matches ``(.*\\.)?(k)$``; the patterns are the uploader's regular expressions, matched with a
  time limit), else ``r`` / ``lora_alpha``. Written back with ``target_modules`` as one anchored expression
  of the exact paths, so PEFT adapts exactly the modules the task holds.

Refused (400, naming what is wrong): what changes the model beyond low-rank updates of its projections
(DoRA, ``modules_to_save``, biases, trainable tokens, layer replication, ``target_parameters``, the
other variants' options, initialisations that rewrite the base weights), embedding and ``lm_head``
targets, modules the model does not have or shapes that do not fit them, ranks over
``PrefixLimits.max_lora_rank``; values are held to the same bounds as a prefix's.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any

import regex
import safetensors.torch

from prefix_store.errors import PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.safetensors_check import (
    SafetensorsHeader,
    check_safetensors,
    excerpt,
    format_shape,
    load_checked_tensors,
)
from prefix_store.geometry import ModelGeometry
from prefix_store.lora import LoraAdapter, LoraModule

LORA_KIND = "lora"
PEFT_PREFIX = "base_model.model."
_NATIVE_NAME = re.compile(r"(.+)\.lora_([AB])")
_PEFT_NAME = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
_PATTERN_TIMEOUT_S = 0.05  # per match: an uploader's expression may backtrack without end
_MAX_PATTERN_KEYS = 4096
_MAX_PATTERN_KEY_CHARS = 512
# config options that change the forward pass beyond low-rank updates of projections: falsy or refused
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora) is not served: only plain LoRA updates are",
    "modules_to_save": "modules_to_save is set; an adapter may not change the frozen base model",
    "lora_bias": "LoRA biases (lora_bias) are not served",
    "trainable_token_indices": "trainable tokens change the embeddings; they are not served",
    "layer_replication": "layer_replication changes the base model's layers; it is not served",
    "target_parameters": "target_parameters (LoRA on parameters, not modules) is not served",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not served",
    "use_qalora": "QA-LoRA (use_qalora) is not served",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not served",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) is not served",
    "monteclora_config": "MonteCLoRA is not served",
    "arrow_config": "Arrow routing (arrow_config) is not served",
    "kasa_config": "KaSA (kasa_config) is not served",
    "velora_config": "VeLoRA (velora_config) is not served",
}
# initialisations that rewrite the base weights, which the saved adapter then assumes
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "astra", "lora_ga")
_EMBEDDING_NAMES = re.compile(r"(^|\.)(lm_head|embed_out|wte|wpe|shared|[a-z_]*embed[a-z_]*)$")


# -- native ---------------------------------------------------------------------------------------


def native_lora_names(found: Collection[str]) -> Collection[str]:
    """The tensor names a native LoRA file must hold, given those it holds: ``<module>.lora_A`` and
    ``….lora_B`` pairs (raises on a name of another shape or an unpaired one)."""
    modules = _pairs(found, _NATIVE_NAME, "prefix file", "'<module>.lora_A' and '<module>.lora_B'")
    return {f"{module}.lora_{part}" for module in modules for part in "AB"}


def encode_native_lora(adapter: LoraAdapter) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and the kind-specific metadata of ``adapter``'s native file."""
    r, alpha, rank_pattern, alpha_pattern = _defaults(adapter)
    tensors = {}
    for name, module in adapter.modules.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = module.a, module.b
    metadata = {
        "kind": LORA_KIND,
        "r": str(r),
        "lora_alpha": _number(alpha),
        "use_rslora": "true" if adapter.use_rslora else "false",
        "rank_pattern": json.dumps(rank_pattern, sort_keys=True),
        "alpha_pattern": json.dumps({k: _json_number(v) for k, v in alpha_pattern.items()}, sort_keys=True),
    }
    return tensors, metadata


def decode_native_lora(
    data: bytes, header: SafetensorsHeader, geometry: ModelGeometry, limits: PrefixLimits
) -> LoraAdapter:
    """A checked native LoRA file's adapter (``header``: its checked header)."""
    source = "prefix file"
    _require_decoder_only(geometry, source)
    metadata = header.metadata
    shapes = _module_shapes(header, _NATIVE_NAME)
    config = {
        "r": _parse_json(metadata, "r", source),
        "lora_alpha": _parse_json(metadata, "lora_alpha", source),
        "use_rslora": {"true": True, "false": False}.get(
            metadata.get("use_rslora", ""), metadata.get("use_rslora")
        ),
        "rank_pattern": _parse_json(metadata, "rank_pattern", source),
        "alpha_pattern": _parse_json(metadata, "alpha_pattern", source),
    }
    r, alpha, use_rslora, rank_pattern, alpha_pattern = _settings(config, source, limits)
    for key in (*rank_pattern, *alpha_pattern):
        if key not in shapes:
            raise PrefixValidationError(
                f"{source}: a pattern names {excerpt(key)}, which the file does not adapt"
            )
    ranks = {name: rank_pattern.get(name, r) for name in shapes}
    alphas = {name: alpha_pattern.get(name, alpha) for name in shapes}
    _check_modules(shapes, ranks, geometry, limits, source)
    tensors = load_checked_tensors(data, source, limits)
    modules = {
        name: LoraModule(tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"], alphas[name])
        for name in shapes
    }
    return LoraAdapter(modules, use_rslora)


# -- PEFT -----------------------------------------------------------------------------------------


def decode_peft_lora(
    config: Mapping[str, Any], adapter_model: bytes, geometry: ModelGeometry, limits: PrefixLimits
) -> LoraAdapter:
    """Validate a parsed PEFT ``LORA`` ``adapter_config.json`` and its ``adapter_model.safetensors`` fully,
    then convert them. Raises ``PrefixValidationError``."""
    config_source, model_source = "adapter_config.json", "adapter_model.safetensors"
    _require_decoder_only(geometry, config_source)
    _check_peft_options(config, config_source)
    r, alpha, use_rslora, rank_pattern, alpha_pattern = _settings(config, config_source, limits)
    header = check_safetensors(
        adapter_model,
        expected_names=lambda _metadata, found: _peft_names(found, model_source),
        limits=limits,
        source=model_source,
    )
    shapes = _module_shapes(header, _PEFT_NAME)
    ranks = {name: rank_pattern[key] if (key := _pattern_key(rank_pattern, name)) else r for name in shapes}
    alphas = {
        name: alpha_pattern[key] if (key := _pattern_key(alpha_pattern, name)) else alpha for name in shapes
    }
    _check_modules(shapes, ranks, geometry, limits, model_source)
    tensors = load_checked_tensors(adapter_model, model_source, limits)
    modules = {
        name: LoraModule(
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"],
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"],
            alphas[name],
        )
        for name in shapes
    }
    return LoraAdapter(modules, use_rslora)


def encode_peft_lora(
    adapter: LoraAdapter, geometry: ModelGeometry, base_model_name_or_path: str
) -> dict[str, bytes]:
    """The files of an inference-mode PEFT ``LORA`` adapter holding ``adapter``, by file name."""
    r, alpha, rank_pattern, alpha_pattern = _defaults(adapter)
    names = sorted(adapter.modules)
    config = {
        "alpha_pattern": {re.escape(k): _json_number(v) for k, v in alpha_pattern.items()},
        "base_model_name_or_path": base_model_name_or_path or None,
        "bias": "none",
        "fan_in_fan_out": any(geometry.projection_by_name[name].transposed for name in names),
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {re.escape(k): v for k, v in rank_pattern.items()},
        "target_modules": "(?:" + "|".join(re.escape(name) for name in names) + ")",
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": adapter.use_rslora,
    }
    tensors = {}
    for name in names:
        module = adapter.modules[name]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.a.detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.b.detach().cpu().contiguous()
    return {
        "adapter_config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        "adapter_model.safetensors": safetensors.torch.save(tensors, metadata={"format": "pt"}),
    }


# -- shared checks ----------------------------------------------------------------------------------


def _check_peft_options(config: Mapping[str, Any], source: str) -> None:
    for option, refusal in _UNSUPPORTED.items():
        if config.get(option):
            raise PrefixValidationError(f"{source}: {refusal}")
    if config.get("bias", "none") != "none":
        raise PrefixValidationError(
            f"{source}: bias is {_shown(config['bias'])}; biases are not served (only bias 'none')"
        )
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise PrefixValidationError(
            f"{source}: init_lora_weights {_shown(config['init_lora_weights'])} rewrites the base model's "
            "weights, which the frozen base model never is; convert the adapter to plain LoRA first (PEFT's "
            "path_initial_model_for_weight_conversion)"
        )
    targets = config.get("target_modules")
    named = [targets] if isinstance(targets, str) else targets if isinstance(targets, list) else []
    for target in named:
        if isinstance(target, str) and _EMBEDDING_NAMES.search(target):
            raise PrefixValidationError(f"{source}: target module {excerpt(target)}: {_EMBEDDING_REFUSAL}")


_EMBEDDING_REFUSAL = (
    "embedding and lm_head targets are refused; a LoRA task adapts the projections in the layers"
)


def _settings(
    config: Mapping[str, Any], source: str, limits: PrefixLimits
) -> tuple[int, float, bool, dict[str, int], dict[str, float]]:
    """``r``, ``lora_alpha``, ``use_rslora`` and the two patterns, each checked."""
    r = config.get("r")
    if not _is_int(r) or not 1 <= r <= limits.max_lora_rank:
        raise PrefixValidationError(_rank_refusal(source, "r", r, limits))
    alpha = _alpha(config.get("lora_alpha"), "lora_alpha", source, limits)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise PrefixValidationError(f"{source}: use_rslora must be true or false, got {_shown(use_rslora)}")
    patterns = []
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict) or len(pattern) > _MAX_PATTERN_KEYS:
            raise PrefixValidationError(
                f"{source}: {field} must be a JSON object of at most {_MAX_PATTERN_KEYS} entries"
            )
        for key in pattern:
            if not 1 <= len(key) <= _MAX_PATTERN_KEY_CHARS:
                raise PrefixValidationError(
                    f"{source}: a {field} key has {len(key)} characters (1-512 allowed)"
                )
        patterns.append(pattern)
    rank_pattern, alpha_pattern = patterns
    for key, rank in rank_pattern.items():
        if not _is_int(rank) or not 1 <= rank <= limits.max_lora_rank:
            raise PrefixValidationError(_rank_refusal(source, f"rank_pattern[{excerpt(key)}]", rank, limits))
    alpha_pattern = {
        key: _alpha(value, f"alpha_pattern[{excerpt(key)}]", source, limits)
        for key, value in alpha_pattern.items()
    }
    return r, alpha, use_rslora, rank_pattern, alpha_pattern


def _rank_refusal(source: str, field: str, value: Any, limits: PrefixLimits) -> str:
    return f"{source}: {field} is {_shown(value)}; a rank is an integer from 1 to {limits.max_lora_rank} (the server's limit)"


def _alpha(value: Any, field: str, source: str, limits: PrefixLimits) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise PrefixValidationError(f"{source}: {field} must be a finite number, got {_shown(value)}")
    if abs(value) > limits.max_abs_value:
        raise PrefixValidationError(
            f"{source}: {field} is {value:g}, over the bound of {limits.max_abs_value:g}"
        )
    return float(value)


def _pairs(found: Collection[str], pattern: re.Pattern[str], source: str, expected: str) -> set[str]:
    """The modules of tensor names ``found`` (each ``pattern``: module, A or B), every one with both parts."""
    parts: dict[str, set[str]] = {}
    for name in found:
        match = pattern.fullmatch(name)
        if match is None:
            raise PrefixValidationError(
                f"{source}: tensor {excerpt(name)} {_misnamed(name)}; expected {expected}"
            )
        parts.setdefault(match.group(1), set()).add(match.group(2))
    if not parts:
        raise PrefixValidationError(f"{source} holds no tensors; expected {expected} for each adapted module")
    for module, held in sorted(parts.items()):
        if held != {"A", "B"}:
            missing = ({"A", "B"} - held).pop()
            raise PrefixValidationError(f"{source}: module {excerpt(module)} has no lora_{missing} tensor")
    return set(parts)


def _misnamed(name: str) -> str:
    """Why a tensor name is not a LoRA update's."""
    if "lora_magnitude_vector" in name:
        return "is a DoRA magnitude; DoRA is not served"
    if "lora_embedding" in name or _EMBEDDING_NAMES.search(name.removesuffix(".weight")):
        return f"adapts an embedding or lm_head: {_EMBEDDING_REFUSAL}"
    if name.endswith(".bias"):
        return "is a bias; biases are not served"
    return "is not a LoRA update"


def _peft_names(found: Collection[str], source: str) -> Collection[str]:
    modules = _pairs(
        found, _PEFT_NAME, source, "'base_model.model.<module>.lora_A.weight' and '….lora_B.weight'"
    )
    return {f"{PEFT_PREFIX}{module}.lora_{part}.weight" for module in modules for part in "AB"}


def _module_shapes(
    header: SafetensorsHeader, pattern: re.Pattern[str]
) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{module: {"A": shape, "B": shape}}`` from a checked header's tensor names."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, entry in header.tensors.items():
        match = pattern.fullmatch(name)
        assert match is not None  # the names were checked
        shapes.setdefault(match.group(1), {})[match.group(2)] = entry.shape
    return dict(sorted(shapes.items()))


def _check_modules(
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    ranks: Mapping[str, int],
    geometry: ModelGeometry,
    limits: PrefixLimits,
    source: str,
) -> None:
    """Every module a projection of the model, its A ``[r, in]`` and B ``[out, r]`` at its configured rank."""
    for name, shape in shapes.items():
        projection = geometry.projection_by_name.get(name)
        if projection is None:
            why = (
                _EMBEDDING_REFUSAL
                if _EMBEDDING_NAMES.search(name)
                else "the base model has no such projection"
            )
            raise PrefixValidationError(f"{source}: module {excerpt(name)}: {why}")
        rank = ranks[name]
        expected = {"A": (rank, projection.in_features), "B": (projection.out_features, rank)}
        for part in "AB":
            if shape[part] != expected[part]:
                raise PrefixValidationError(
                    f"{source}: module {excerpt(name)}: lora_{part} has shape {format_shape(shape[part])}; "
                    f"expected {format_shape(expected[part])} (rank {rank}, the projection's "
                    f"{projection.in_features} -> {projection.out_features})"
                )
        if rank > limits.max_lora_rank:  # a pattern's rank was checked already; kept for native files
            raise PrefixValidationError(_rank_refusal(source, f"{excerpt(name)}'s rank", rank, limits))


def _require_decoder_only(geometry: ModelGeometry, source: str) -> None:
    if geometry.encoder_decoder:
        raise PrefixValidationError(
            f"{source}: LoRA tasks are served on decoder-only models; this base model is an encoder-decoder "
            f"({geometry.model_type}), which takes prefixes and soft prompts"
        )
    if not geometry.projections:
        raise PrefixValidationError(
            f"{source}: a LoRA task is checked against the base model's projections, which this geometry "
            "does not list (build it from the loaded model: server.engine.base_model)"
        )


def _pattern_key(pattern: Mapping[str, Any], name: str) -> str | None:
    """The first key of ``pattern`` that PEFT's ``get_pattern_key`` would match ``name`` with, if any."""
    for key in pattern:
        try:
            if regex.match(rf"(.*\.)?({key})$", name, timeout=_PATTERN_TIMEOUT_S):
                return key
        except TimeoutError:
            raise PrefixValidationError(
                f"adapter_config.json: pattern {excerpt(key)} took too long to match a module name"
            ) from None
        except regex.error as exc:
            raise PrefixValidationError(
                f"adapter_config.json: pattern {excerpt(key)} is not a regular expression ({exc})"
            ) from None
    return None


def _defaults(adapter: LoraAdapter) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """The most common rank and alpha, and the modules that differ from them."""
    r = Counter(m.rank for m in adapter.modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in adapter.modules.values()).most_common(1)[0][0]
    rank_pattern = {name: m.rank for name, m in sorted(adapter.modules.items()) if m.rank != r}
    alpha_pattern = {name: m.alpha for name, m in sorted(adapter.modules.items()) if m.alpha != alpha}
    return r, alpha, rank_pattern, alpha_pattern


def _parse_json(metadata: Mapping[str, str], field: str, source: str) -> Any:
    if field not in metadata:
        raise PrefixValidationError(f"{source} has no '{field}' metadata (a LoRA file needs it)")
    try:
        return json.loads(metadata[field])
    except (ValueError, RecursionError):
        raise PrefixValidationError(
            f"{source}: metadata {field} {excerpt(metadata[field])} is not JSON"
        ) from None


def _json_number(value: float) -> int | float:
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _number(value: float) -> str:
    return json.dumps(_json_number(value))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return excerpt(value)
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:80] + "…"


__all__ = [
    "LORA_KIND",
    "decode_native_lora",
    "decode_peft_lora",
    "encode_native_lora",
    "encode_peft_lora",
    "native_lora_names",
]
