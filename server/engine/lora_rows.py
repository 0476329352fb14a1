"""LoRA rows in a packed pass: each adapted projection adds ``scaling_a · B_a(A_a x)`` to the tokens of the
rows on adapter ``a``, beside prefix, soft-prompt and base rows in the same pass.

The tokens are grouped by adapter and each projection does **one batched low-rank product per distinct
adapter of the pass** (Punica's and S-LoRA's segmented gather-matmul, in PyTorch):

- **stacked** (decoding, and prompt chunks of similar lengths): the adapters' tokens are gathered into
  ``[G, S, in]`` (``S`` the most any adapter has, the rest padding), multiplied by the adapters' stacked
  ``A`` ``[G, in, r]`` and ``B`` ``[G, r, out]`` (ranks zero-padded to the largest) in two ``bmm``, scaled,
  and added back at the tokens' places: the same handful of operations whatever ``G``;
- **by adapter** when padding would more than double the work (one long prompt chunk beside a few decoding
  tokens): two products per adapter over its own tokens.

Rows on no LoRA add nothing: their tokens are never gathered, and a pass without LoRA rows has no hooks.
A pass holds as many distinct adapters as it has rows: a distinct adapter costs its pair of products and
its stacked weights (at most the resident adapters' own bytes again), so no request waits for a "slot".
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from prefix_store.lora import LoraAdapter

# a stacked product may compute up to this many times the tokens it keeps (padding), else by adapter
MAX_PADDING_FACTOR = 2
_Hook = Callable[[torch.nn.Module, tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LoraRows:
    """Which packed tokens of a pass each distinct adapter owns."""

    adapters: tuple[LoraAdapter, ...]  # G distinct adapters, in the order of their first row
    gather: torch.Tensor  # [G * S] packed token indices: each adapter's S, its tokens then padding (index 0)
    width: int  # S, the most tokens any adapter has
    real: torch.Tensor | None  # [n] positions in ``gather`` that are tokens, not padding; None: no padding
    targets: torch.Tensor  # [n] the packed index of each of those tokens
    segments: tuple[torch.Tensor, ...]  # per adapter, its packed token indices
    stacked: bool  # whether the stacked product is used (else one product pair per adapter)

    @classmethod
    def of(
        cls, adapters: Sequence[LoraAdapter | None], fed: Sequence[int], device: torch.device
    ) -> LoraRows | None:
        """The LoRA work of a pass whose row ``i`` is on ``adapters[i]`` (None: none) and feeds ``fed[i]``
        tokens, packed in row order; None when no row is on a LoRA."""
        distinct: dict[int, int] = {}
        owners: list[LoraAdapter] = []
        tokens: list[list[int]] = []
        start = 0
        for adapter, count in zip(adapters, fed, strict=True):
            if adapter is not None:
                slot = distinct.setdefault(adapter.uid, len(owners))
                if slot == len(owners):
                    owners.append(adapter)
                    tokens.append([])
                tokens[slot].extend(range(start, start + count))
            start += count
        if not owners:
            return None
        width = max(len(t) for t in tokens)
        kept = sum(len(t) for t in tokens)
        gather = torch.tensor([t + [0] * (width - len(t)) for t in tokens])  # [G, S]
        real = torch.tensor([g * width + k for g, t in enumerate(tokens) for k in range(len(t))])  # [n]
        return cls(
            adapters=tuple(owners),
            gather=gather.view(-1).to(device),
            width=width,
            real=real.to(device) if kept < len(owners) * width else None,
            targets=gather.view(-1)[real].to(device),
            segments=tuple(torch.tensor(t, device=device) for t in tokens),
            stacked=len(owners) * width <= MAX_PADDING_FACTOR * kept,
        )

    @property
    def key(self) -> tuple[int, ...]:
        """What names this set of adapters (their ``uid``s, in order)."""
        return tuple(adapter.uid for adapter in self.adapters)


@dataclass(frozen=True)
class _Stack:
    """One projection's weights for the pass's adapters (zeros for an adapter that does not adapt it)."""

    a: torch.Tensor  # [G, in, r_max] (each adapter's A transposed, rank zero-padded)
    b: torch.Tensor  # [G, r_max, out]
    scaling: torch.Tensor  # [G, 1, 1]
    modules: tuple[tuple[torch.Tensor, torch.Tensor, float] | None, ...]  # per adapter: A, B, scaling


class LoraProjections:
    """Applies a pass's LoRA rows to the model's projections (forward hooks, present only while a pass with
    LoRA rows runs), keeping the stacked weights of the last few adapter sets (decoding steps repeat one)."""

    def __init__(self, model: torch.nn.Module, cached_sets: int = 2) -> None:
        self.model = model
        self._stacks: OrderedDict[tuple[int, ...], dict[str, _Stack]] = OrderedDict()
        self._cached_sets = cached_sets

    @contextlib.contextmanager
    def applying(self, rows: LoraRows | None) -> Iterator[None]:
        """Within the block, every projection that an adapter of ``rows`` adapts adds its updates."""
        if rows is None:
            yield
            return
        stacks = self._stacks_of(rows)
        handles = []
        try:
            for name in sorted({name for adapter in rows.adapters for name in adapter.modules}):
                module = self.model.get_submodule(name)
                handles.append(module.register_forward_hook(self._hook(rows, stacks, name)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, rows: LoraRows, stacks: dict[str, _Stack], name: str) -> _Hook:
        def add_updates(
            _module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
        ) -> torch.Tensor:
            stack = stacks.get(name) or stacks.setdefault(name, _stack(rows.adapters, name))
            return _add_updates(rows, stack, args[0], output)

        return add_updates

    def _stacks_of(self, rows: LoraRows) -> dict[str, _Stack]:
        key = rows.key
        stacks = self._stacks.pop(key, None) or {}
        self._stacks[key] = stacks
        while len(self._stacks) > self._cached_sets:
            self._stacks.popitem(last=False)
        return stacks


def _stack(adapters: Sequence[LoraAdapter], name: str) -> _Stack:
    modules = [adapter.modules.get(name) for adapter in adapters]
    present = [m for m in modules if m is not None]
    rank = max(m.rank for m in present)
    in_features, out_features = present[0].a.shape[1], present[0].b.shape[0]
    reference = present[0].a
    a = reference.new_zeros(len(adapters), in_features, rank)  # [G, in, r_max]
    b = reference.new_zeros(len(adapters), rank, out_features)  # [G, r_max, out]
    scaling = reference.new_zeros(len(adapters), 1, 1)
    for g, (adapter, module) in enumerate(zip(adapters, modules, strict=True)):
        if module is not None:
            a[g, :, : module.rank] = module.a.T
            b[g, : module.rank] = module.b.T
            scaling[g] = adapter.scaling(module)
    per_adapter = tuple(
        (module.a, module.b, adapter.scaling(module)) if module is not None else None
        for adapter, module in zip(adapters, modules, strict=True)
    )
    return _Stack(a, b, scaling, per_adapter)


def _add_updates(rows: LoraRows, stack: _Stack, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``output`` (the projection's ``[1, N, out]`` over packed inputs ``x`` ``[1, N, in]``) with each LoRA
    token's update added in place: ``scaling · (x A^T) B^T``, as PEFT's ``lora_B(lora_A(x)) * scaling``."""
    output = output if output.is_contiguous() else output.contiguous()
    flat_x = x.reshape(-1, x.shape[-1])  # [N, in]
    flat_out = output.view(-1, output.shape[-1])  # [N, out]
    if rows.stacked:
        gathered = flat_x.index_select(0, rows.gather).view(len(rows.adapters), rows.width, -1)  # [G, S, in]
        updates = torch.bmm(torch.bmm(gathered, stack.a), stack.b) * stack.scaling  # [G, S, out]
        updates = updates.view(-1, updates.shape[-1])  # [G * S, out]
        flat_out.index_add_(
            0, rows.targets, updates if rows.real is None else updates.index_select(0, rows.real)
        )
        return output
    for segment, module in zip(rows.segments, stack.modules, strict=True):
        if module is not None:
            a, b, scaling = module
            flat_out.index_add_(0, segment, (flat_x.index_select(0, segment) @ a.T) @ b.T * scaling)
    return output
