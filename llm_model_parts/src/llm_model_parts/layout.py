"""Weight layouts that make decoding fast: projections that read the same input share one buffer (one
matmul instead of three), and on the CPU wide projections are stored column-major.

Decoding one token is a matrix-vector product per projection, bound by how fast the weights stream from
memory. On the CPU (MKL), `x @ Wt` with `Wt` (in, out) contiguous streams up to 1.8x faster than
`x @ W.t()` with HF's row-major `W` (out, in), for projections at least as wide as their input (q/k/v,
gate/up, the LM head); narrow ones (`down_proj`) are fastest row-major and stay so. For a few rows at a
time (decoding a batch) row-major wins instead, through `layers.linear` (`W @ x.T`): `Part.setup_cache`
lays a part out column-major for batch size 1 and row-major for larger batches. Both measured in fp32 only:
with bf16 weights MKL is 10x slower column-major, so other dtypes stay row-major.

Packing changes only strides and storage: every parameter keeps its HF name, shape and values (a view into
the shared buffer), so state dicts, hooks and llm_offload's weight swapping work unchanged. `linear_group`
takes the single matmul only while the group's modules hold the laid-out tensors; a group whose
weights were replaced (offloaded, `.to(...)`, `load_state_dict(assign=True)`) falls back to one matmul each.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

from llm_model_parts.layers.linear import linear

logger = logging.getLogger(__name__)

# Sibling projections that read the same input, by HF's names, in the order their outputs are used.
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedGroup:
    """Where a laid-out group's weights (and biases) lie in their shared buffer, valid while its modules
    hold the very same tensors. They are held weakly: offloading a layer must be able to free them."""

    def __init__(self, linears: tuple[nn.Linear, ...], names: tuple[str, ...] = ()) -> None:
        self.names = names  # the modules' names in their owner
        fused = _fused(linears)
        if fused is None:
            raise ValueError("FusedGroup: the weights are not laid out side by side in one buffer")
        weight, bias = fused
        tensors = _tensors(linears)
        self._refs = tuple(weakref.ref(t) for t in tensors)
        self._ptrs = tuple(t.data_ptr() for t in tensors)
        self._weight = (weight.shape, weight.stride(), weight.storage_offset())
        self._bias = (bias.shape, bias.stride(), bias.storage_offset()) if bias is not None else None
        self.sizes = [m.out_features for m in linears]

    def views(self, linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The (sum of out, in) weight and its bias, or None once any tensor was replaced."""
        tensors = _tensors(linears)
        if len(tensors) != len(self._refs):
            return None
        for ref, ptr, t in zip(self._refs, self._ptrs, tensors, strict=True):
            if ref() is not t or t.data_ptr() != ptr:
                return None
        weight = linears[0].weight.as_strided(*self._weight)
        bias = linears[0].bias.as_strided(*self._bias) if self._bias is not None else None
        return weight, bias

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_refs": (), "_ptrs": ()}  # weak references do not pickle; invalid after


def _tensors(linears: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
    return [m.weight for m in linears] + [m.bias for m in linears if m.bias is not None]


def linear_group(
    x: torch.Tensor, linears: tuple[nn.Linear, ...], fused: FusedGroup | None
) -> tuple[torch.Tensor, ...]:
    """`tuple(m(x) for m in linears)`, as one matmul while `fused` (set by `decode_layout`) holds."""
    # One view over several parameters would route gradients wrongly: training runs them one by one.
    training = torch.is_grad_enabled() and linears[0].weight.requires_grad
    views = fused.views(linears) if fused is not None and not training else None
    if views is None:
        return tuple(m(x) for m in linears)
    weight, bias = views
    return linear(x, weight, bias).split(fused.sizes, dim=-1)  # type: ignore[union-attr]


def _fused(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One (sum of out, in) view over the group's weights (and biases), or None unless they are laid out
    back to back, with the same strides, in one storage."""
    weights: list[torch.Tensor] = [m.weight for m in linears]
    first = weights[0]
    rows, cols = sum(w.shape[0] for w in weights), first.shape[1]
    if first.stride() == (1, rows):
        row_step = 1  # column-major: row r + 1 of the group starts one element after row r
    elif first.stride() == (cols, 1):
        row_step = cols
    else:
        return None
    weight = _adjacent(weights, row_step, (rows, cols))
    if weight is None:
        return None
    biases: list[torch.Tensor | None] = [m.bias for m in linears]
    if all(b is None for b in biases):
        return weight, None
    if any(b is None or b.stride() != (1,) for b in biases):
        return None
    bias = _adjacent([b for b in biases if b is not None], 1, (rows,))
    return (weight, bias) if bias is not None else None


def _adjacent(tensors: list[torch.Tensor], row_step: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    ptr, itemsize = first.data_ptr(), first.element_size()
    for t in tensors:
        same_place = t.data_ptr() == ptr and t.untyped_storage().data_ptr() == storage
        if not same_place or t.stride() != first.stride() or t.dtype != first.dtype:
            return None
        ptr += t.shape[0] * row_step * itemsize
    return first.as_strided(shape, first.stride(), first.storage_offset())


@torch.no_grad()
def decode_layout(module: nn.Module, *, column_major: bool) -> nn.Module:
    """Lay out `module`'s projections for decoding, in place: each group of `GROUPS` in one buffer (and
    the owner's `fused` set); every other `nn.Linear` weight at least as wide as its input column-major
    when `column_major`, row-major otherwise. Converts from either layout; tied weights stay tied."""
    grouped: set[int] = set()  # ids of the weights packed in groups
    for owner in module.modules():
        for names in GROUPS:
            linears = tuple(m for m in (getattr(owner, n, None) for n in names) if isinstance(m, nn.Linear))
            if len(linears) < len(names) or not _packable([m.weight for m in linears]):
                continue
            if _fused(linears) is None or _is_column_major(linears[0].weight) != column_major:
                _pack_group(linears, column_major)
            grouped.update(id(m.weight) for m in linears)
            owner.fused = FusedGroup(linears, names)  # type: ignore[assignment]  # read by linear_group
    wide = {
        id(m.weight): m.weight
        for m in module.modules()
        if isinstance(m, nn.Linear) and m.out_features >= m.in_features and id(m.weight) not in grouped
    }
    new = {
        i: _parameter(p.t().contiguous().t() if column_major else p.contiguous(), p)
        for i, p in wide.items()
        if _packable([p]) and _is_column_major(p) != column_major
    }
    for owner in module.modules():  # every owner of a replaced weight (an LM head tied to the embeddings)
        for name, p in list(owner.named_parameters(recurse=False)):
            if id(p) in new:
                setattr(owner, name, new[id(p)])
    logger.debug("laid out %d projections in groups (column-major: %s)", len(grouped), column_major)
    return module


def intact(module: nn.Module) -> bool:
    """Whether every group `decode_layout` fused still holds its laid-out tensors (nobody swapped them:
    llm_offload streaming a layer's weights, for one)."""
    for owner in module.modules():
        fused = getattr(owner, "fused", None)
        if (
            isinstance(fused, FusedGroup)
            and fused.views(tuple(getattr(owner, n) for n in fused.names)) is None
        ):
            return False
    return True


def _is_column_major(weight: torch.Tensor) -> bool:
    return weight.stride(-1) != 1


def _packable(tensors: list[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(
        t.is_floating_point()
        and t.device == first.device
        and t.dtype == first.dtype
        and t.device.type != "meta"
        for t in tensors
    )


def _pack_group(linears: tuple[nn.Linear, ...], column_major: bool) -> None:
    weights = [m.weight for m in linears]
    sizes = [w.shape[0] for w in weights]
    # column-major: (in, sum of out) contiguous, seen transposed; each weight is a block of its rows
    rows = torch.cat([w.t() for w in weights], dim=1).t() if column_major else torch.cat(weights)
    for m, view in zip(linears, rows.split(sizes), strict=True):
        m.weight = _parameter(view, m.weight)
    biases = [m.bias for m in linears]
    if all(b is not None for b in biases):
        for m, view in zip(linears, torch.cat(biases).split(sizes), strict=True):  # type: ignore[arg-type]
            m.bias = _parameter(view, m.bias)


def _parameter(data: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data, requires_grad=like.requires_grad)


def is_fused(linears: tuple[nn.Linear, ...]) -> bool:
    """Whether these projections' weights lie side by side in one buffer."""
    return _fused(linears) is not None
