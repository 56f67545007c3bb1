"""`Part`: begin (embeddings), a range of decoder layers, end (final norm + head), as one nn.Module.

Built on `meta` and loaded with `assign=True`, so a part allocates only its own tensors. Input: token ids
when it holds begin, hidden states otherwise; output: logits when it holds end, hidden states otherwise.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llm_model_parts.cache import KVCache
from llm_model_parts.config import ModelConfig
from llm_model_parts.families import get_family
from llm_model_parts.layers.ends import merge_positions
from llm_model_parts.layers.linear import Linear
from llm_model_parts.layers.norm import GemmaRMSNorm, RMSNorm
from llm_model_parts.layers.rope import RotaryEmbedding
from llm_model_parts.layout import decode_layout as layout
from llm_model_parts.layout import intact as layout_intact
from llm_model_parts.step import Step, causal_views, packed_views
from llm_model_parts.weights import section_tensors, to_part_names
from llm_sepweight import PartSpec

if TYPE_CHECKING:
    from llm_model_parts.forward_func import IncrementalForward

logger = logging.getLogger(__name__)


def _attention_of(layer: nn.Module) -> Any:
    for module in layer.modules():
        if hasattr(module, "cache_shape"):
            return module
    raise TypeError(f"decoder layer {type(layer).__name__} has no attention module with cache_shape()")


class Part(nn.Module):
    """A part of a model. Build one with `load_part(path, spec)` or `Part.from_config(config, spec, weights)`."""

    _begin: Any  # a family's own `layers.ends.Begin` (GPT-2, Falcon, OPT ...), else None
    _end: Any  # ... and `layers.ends.End`

    def __init__(self, config: ModelConfig, spec: PartSpec, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.spec = spec.resolve(config.num_hidden_layers)
        self.layer_indices: tuple[int, ...] = self.spec.layers
        family = get_family(config.model_type)
        self.embed_scale = family.embed_scale(config)
        with torch.device("meta"):
            # Families with their own begin / end (GPT-2's wte + wpe, Falcon's ln_f ...): the children are
            # registered on the part under HF's names; the Begin / End objects only wire them.
            begin = family.build_begin(config) if family.build_begin and self.spec.begin else None
            end = family.build_end(config) if family.build_end and self.spec.end else None
            for section in (begin, end):
                for name, child in section.named_children() if section is not None else ():
                    self.add_module(name, child)
            if begin is None:
                self.embed_tokens = (
                    nn.Embedding(config.vocab_size, config.hidden_size) if self.spec.begin else None
                )
            self.layers = nn.ModuleList(family.build_layer(config, i) for i in self.layer_indices)
            if end is None:
                self.norm = family.build_norm(config) if self.spec.end else None
                self.lm_head = (
                    Linear(config.hidden_size, config.vocab_size, bias=False) if self.spec.end else None
                )
        if begin is not None and "embed_tokens" not in self._modules:
            self.embed_tokens = None
        if end is not None and "norm" not in self._modules:
            self.norm = None
        object.__setattr__(self, "_begin", begin)  # not a submodule: its children already are
        object.__setattr__(self, "_end", end)
        attentions = [_attention_of(layer) for layer in self.layers]
        self._windows = {a.sliding_window for a in attentions}
        self.rotary = nn.ModuleDict(
            {
                t: RotaryEmbedding(
                    config.rope_parameters[t], config.head_dim, config.max_position_embeddings, device=device
                )
                for t in sorted({a.layer_type for a in attentions if getattr(a, "rope", "half") is not None})
                if t in config.rope_parameters
            }
        )
        self._cache_shapes = [a.cache_shape() for a in attentions]
        self.cache: KVCache | None = None
        self._laid_out = False  # set by decode_layout
        self._column_major = False
        self._scale_by_dtype: dict[torch.dtype, float] = {}

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: ModelConfig | Mapping[str, Any],
        spec: str | PartSpec = "f",
        state_dict: Any = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = torch.float32,
        decode_layout: bool | None = None,
    ) -> Part:
        """A part from an HF `config.json` dict (or a `ModelConfig`) and its weights.

        `state_dict`: an `llm_sepweight.PartStateDict` (begin / mid / end), or a flat state dict with HF's
        names (`model.layers.12.self_attn.q_proj.weight` ..., the `model.` prefix optional; tensors of
        other layers are ignored), or None for random weights. `dtype=None` keeps the tensors' dtype.
        `decode_layout`: lay the weights out for fast decoding (`Part.decode_layout`); None: on the CPU only.
        """
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
        part = cls(cfg, PartSpec.coerce(spec), device=device)
        if state_dict is None:
            part._init_random(device, dtype or torch.float32)
        else:
            part._load(to_part_names(state_dict, part.spec, cfg), device, dtype)
        if decode_layout or (decode_layout is None and part.device.type == "cpu"):
            part.decode_layout()
        return part.eval()

    def decode_layout(self, batch_size: int = 1) -> Part:
        """Lay the weights out for decoding `batch_size` sequences, in place (see `llm_model_parts.layout`):
        q/k/v and gate/up each in one buffer, run as one matmul; on the CPU for one sequence, projections
        at least as wide as their input column-major. Names, shapes and values do not change. From now on
        `setup_cache` re-lays the part out when its batch size calls for the other layout. Returns self."""
        self._column_major = self._wants_column_major(batch_size)
        layout(self, column_major=self._column_major)
        self._laid_out = True
        return self

    def _wants_column_major(self, batch_size: int) -> bool:
        # Measured for fp32 with MKL only: bf16 matmuls on column-major weights run 10x slower there.
        return self.device.type == "cpu" and self.dtype == torch.float32 and batch_size == 1

    def _expected(self) -> dict[str, torch.Size]:
        return {name: p.shape for name, p in self.named_parameters(remove_duplicate=False)}

    def _load(
        self, weights: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype | None
    ) -> None:
        for name, shape in self._expected().items():
            if name not in weights:
                raise self._missing(name, shape)
        self._assign(weights, device, dtype)
        self._tie()
        logger.info("loaded part %r of %s (%d tensors)", str(self.spec), self.config.model_type, len(weights))

    def _missing(self, name: str, shape: torch.Size) -> KeyError:
        return KeyError(
            f"{self._describe(name)} is missing from the weights for part {str(self.spec)!r} "
            f"({self.config.model_type}); expected shape {tuple(shape)}"
        )

    def _assign(
        self, weights: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype | None
    ) -> None:
        """Check `weights` (some or all of the part's tensors) against the config and assign them."""
        expected = self._expected()
        unexpected = sorted(set(weights) - set(expected))
        for name, t in weights.items():
            if name in expected and t.shape != expected[name]:
                raise ValueError(
                    f"{self._describe(name)} has shape {tuple(t.shape)}, expected {tuple(expected[name])} from config.json"
                )
        if unexpected:
            raise KeyError(
                f"{self._describe(unexpected[0])} is not a tensor of a {self.config.model_type} part built from "
                f"this config.json ({len(unexpected)} unexpected in all); the config may not match the weights"
            )
        converted = {
            name: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
            for name, t in weights.items()
        }
        self.load_state_dict(converted, strict=False, assign=True)

    def _init_random(self, device: torch.device | str, dtype: torch.dtype) -> None:
        weights: dict[str, torch.Tensor] = {}
        for module_name, module in self.named_modules():
            for name, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if isinstance(module, GemmaRMSNorm):
                    t = torch.zeros(p.shape, device=device, dtype=dtype)
                elif isinstance(module, (RMSNorm, nn.LayerNorm)) and name == "weight":
                    t = torch.ones(p.shape, device=device, dtype=dtype)
                elif name == "bias":
                    t = torch.zeros(p.shape, device=device, dtype=dtype)
                else:
                    t = torch.randn(p.shape, device=device, dtype=dtype) * 0.02
                weights[full] = t
        self.load_state_dict(weights, strict=True, assign=True)
        self._tie()

    def _tie(self) -> None:
        embeddings: nn.Embedding | None = (
            self._begin.input_embeddings if self._begin is not None else self.embed_tokens
        )
        if self.config.tie_word_embeddings and embeddings is not None and self.lm_head is not None:
            self.lm_head.weight = embeddings.weight

    def _describe(self, name: str) -> str:
        parts = name.split(".")
        if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
            return f"tensor {'.'.join(parts[2:])!r} of layer {self.layer_indices[int(parts[1])]}"
        begin_names = (
            dict(self._begin.named_children()) if self._begin is not None else {"embed_tokens": None}
        )
        section = "begin" if parts[0] in begin_names else "end"
        return f"{section} tensor {name!r}"

    # ---- properties ----------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        # Skip `meta` tensors: llm_offload releases streamed layers' weights to meta between uses.
        for t in itertools.chain(self.parameters(), self.buffers()):
            if t.device.type != "meta":
                return t.device
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def seq_len(self) -> int:
        """Tokens in the cache (per row, padding included); 0 without a cache."""
        return self.cache.seq_len if self.cache is not None else 0

    def extra_repr(self) -> str:
        return f"model_type={self.config.model_type!r}, spec={str(self.spec)!r}"

    # ---- cache ----------------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Preallocate the KV cache; from now on each forward call appends to it."""
        # Across batch size 1 the other layout is faster (layers.linear); only while the layout is still
        # ours: weights someone swapped in (llm_offload) are left alone.
        relayout = self._laid_out and self._column_major != self._wants_column_major(batch_size)
        if relayout and layout_intact(self):
            logger.info("laying part %r out again for batch size %d", str(self.spec), batch_size)
            self.decode_layout(batch_size)
        self.cache = KVCache(
            self._cache_shapes, batch_size, max_seq_len, device=self.device, dtype=self.dtype
        )

    def reset_cache(self) -> None:
        """Forget the cached tokens (the buffers stay allocated)."""
        if self.cache is not None:
            self.cache.reset()

    def drop_cache(self) -> None:
        """Free the cache; forward calls are stateless again."""
        self.cache = None

    def rewind(self, n: int) -> None:
        """Drop the last `n` tokens of every row from the cache."""
        if self.cache is None:
            raise RuntimeError(
                "rewind: this part has no cache; call setup_cache(batch_size, max_seq_len) first"
            )
        self.cache.rewind(n)

    def as_forward_func(self, max_seq_len: int | None = None) -> IncrementalForward:
        """The incremental forward_func of docs/forward_func.md (needs a part holding begin and end)."""
        from llm_model_parts.forward_func import IncrementalForward

        return IncrementalForward([self], max_seq_len=max_seq_len)

    # ---- forward --------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor | None,
        *,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: token ids (B, T) with begin, hidden states (B, T, hidden) otherwise. `attention_mask`
        (B, seq_len + T), 1 = token, 0 = left padding, covers the cached tokens and the new ones.

        `inputs_embeds` (parts holding begin; a vision tower's output entering the chain, as VLMs do): a
        (B, T, width) tensor used instead of the token embeddings (x may then be None); or an
        `(embeds, mask)` pair, embeds (N, width) or (B, n, width) written in order at the N positions where
        mask (B, T) is true; or embeds (N, width) alone, written where x is the config's image token id.
        """
        h = self._input(x, inputs_embeds)
        b, t = h.shape[:2]
        cache = self.cache
        start = 0
        if cache is not None:
            if b != cache.batch_size:
                raise ValueError(
                    f"input batch size {b} does not match the cache's batch size {cache.batch_size}"
                )
            cache.check_room(t)
            start = cache.seq_len
        end = start + t
        mask = self._check_mask(attention_mask, b, end)
        if cache is not None:
            cache.record_mask(mask, t)
            valid = cache.valid[:, :end] if cache.has_padding else None
        else:
            valid = mask.bool() if mask is not None and not bool(mask.all()) else None
        if valid is None:
            positions = torch.arange(start, end, device=h.device)[None]
        else:
            positions = (valid.long().cumsum(-1)[:, start:] - 1).masked_fill(~valid[:, start:end], 1)
        if self._begin is not None:
            h = self._begin.finish(h, positions)
        step = Step(
            start,
            end,
            None,
            self._rope(positions, h.dtype),
            causal_views(self._windows, start, end, valid, h.device),
            valid=valid,
        )
        h = self._layers(h, step)
        if cache is not None:
            cache.advance(t)
        return self._output(h)

    def forward_packed(
        self, x: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor
    ) -> torch.Tensor:
        """Several continuations of the cached prefix (batch row 0) packed in one row: x (1, N) ids or
        (1, N, hidden), position_ids (1, N), tree_mask (1, N, N) bool. The cache is left as it was."""
        h = self._input(x)
        b, n = h.shape[:2]
        if b != 1 or position_ids.shape != (1, n) or tree_mask.shape != (1, n, n):
            raise ValueError(
                f"forward_packed: expected input (1, N), position_ids (1, N), tree_mask (1, N, N); got "
                f"{tuple(x.shape)}, {tuple(position_ids.shape)}, {tuple(tree_mask.shape)}"
            )
        cache = self.cache
        start = cache.seq_len if cache is not None else 0
        if cache is not None:
            cache.check_room(n)
        cache_valid = cache.valid[0, :start] if cache is not None else None
        first = cache_valid.sum() if cache_valid is not None else 0
        position_ids = position_ids.to(h.device)
        if self._begin is not None:
            h = self._begin.finish(h, position_ids)
        views = packed_views(
            self._windows, start, position_ids[0] - first, cache_valid, tree_mask.to(h.device)
        )
        valid = None
        if cache_valid is not None and not bool(cache_valid.all()):
            valid = torch.cat((cache_valid, torch.ones(n, dtype=torch.bool, device=h.device)))[None]
        step = Step(start, start + n, 1, self._rope(position_ids, h.dtype), views, valid=valid)
        return self._output(self._layers(h, step))

    def _layers(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        cache = self.cache
        for i, layer in enumerate(self.layers):
            h = layer(h, step, cache.layer(i) if cache is not None else None)
        return h

    def _rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: rotary(positions, dtype) for name, rotary in self.rotary.items()}

    def _input(
        self,
        x: torch.Tensor | None,
        inputs_embeds: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.spec.begin:
            full = isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.dim() == 3
            if full:
                assert isinstance(inputs_embeds, torch.Tensor)
                return inputs_embeds.to(device=self.device, dtype=self.dtype)
            if x is None or x.dim() != 2 or x.is_floating_point() or x.is_complex():
                got = "None" if x is None else f"{x.dtype} of shape {tuple(x.shape)}"
                raise ValueError(
                    f"part {str(self.spec)!r} holds the embeddings: expected token ids LongTensor (B, T), got {got}"
                )
            x = x.to(self.device)
            merge = None
            if inputs_embeds is not None:
                merge = merge_positions(x, inputs_embeds, self.config)
                x = x.masked_fill(merge[1], 0)  # image tokens may lie outside the text vocabulary
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size):
                bad = x[(x < 0) | (x >= self.config.vocab_size)][0]
                raise ValueError(
                    f"token id {int(bad)} is out of the vocabulary (vocab_size={self.config.vocab_size})"
                )
            if self._begin is not None:
                h = self._begin.embed(x)
            else:
                assert self.embed_tokens is not None
                h = self.embed_tokens(x)
            if self.embed_scale != 1.0:
                h = h * self._embed_scale(h.dtype)
            if merge is not None:
                embeds, where = merge
                h = h.masked_scatter(where[..., None], embeds.to(device=h.device, dtype=h.dtype))
            return h
        width = self.config.hidden_size
        if x is None:
            raise ValueError(f"part {str(self.spec)!r} needs hidden states (B, T, {width}), got None")
        if x.dim() != 3 or x.shape[-1] != width or not x.is_floating_point():
            raise ValueError(
                f"part {str(self.spec)!r} starts at layer {self.layer_indices[0] if self.layer_indices else 'end'}: "
                f"expected hidden states (B, T, {width}), got {x.dtype} of shape {tuple(x.shape)}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def _embed_scale(self, dtype: torch.dtype) -> float:
        # HF multiplies by the scale rounded to the weights' dtype (sqrt(640) in bf16 is not sqrt(640)).
        if dtype not in self._scale_by_dtype:
            self._scale_by_dtype[dtype] = float(torch.tensor(self.embed_scale, dtype=torch.float32).to(dtype))
        return self._scale_by_dtype[dtype]

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        if self._end is not None:
            logits = self._end(h)
        elif self.norm is None or self.lm_head is None:
            return h
        else:
            logits = self.lm_head(self.norm(h))
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _check_mask(self, mask: torch.Tensor | None, batch: int, end: int) -> torch.Tensor | None:
        if mask is None:
            return None
        if mask.shape != (batch, end):
            raise ValueError(
                f"attention_mask must cover the whole sequence so far, shape (B, seq_len + T) = ({batch}, {end}); "
                f"got {tuple(mask.shape)}"
            )
        return mask.to(self.device)


def load_part(
    path: str | Path,
    spec: str | PartSpec = "f",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    decode_layout: bool | None = None,
) -> Part:
    """Load part `spec` ("b 0-12", "12-24", "24-32 e", "f" ...) of a sepweight or HF checkpoint directory.

    Only the tensors of that part are read and allocated. `dtype=None` keeps the stored dtype.
    `decode_layout` (default: on the CPU): see `Part.decode_layout`; False keeps the weights as loaded
    (on the CPU, zero-copy memory maps: a model larger than RAM still loads).
    """
    from llm_sepweight import Checkpoint

    checkpoint = Checkpoint(path)
    config = ModelConfig.from_hf(checkpoint.config)
    resolved = PartSpec.coerce(spec).resolve(config.num_hidden_layers)
    if not (decode_layout or (decode_layout is None and torch.device(device).type == "cpu")):
        weights = checkpoint.load(resolved, device=device, dtype=dtype)
        return Part.from_config(config, resolved, weights, device=device, dtype=dtype, decode_layout=False)
    # The layout copies the weights; a section at a time, each file's memory map dropped before the next
    # is read, keeps the peak at the part's size plus one section rather than twice the part.
    part = Part(config, resolved, device=device)
    sections: list[tuple[nn.Module, str, Any]] = []
    if resolved.begin:
        sections.append((part, "", lambda: checkpoint.load("b", device=device).begin))
    for j, i in enumerate(resolved.layers):
        sections.append((part.layers[j], f"layers.{j}.", lambda i=i: checkpoint.layer_state_dict(i, device)))
    if resolved.end:
        sections.append((part, "", lambda: checkpoint.load("e", device=device).end))
    for module, prefix, read in sections:
        loaded = {prefix + name: t for name, t in section_tensors(read()).items()}
        part._assign(loaded, device, dtype)
        part._tie()
        part._column_major = part._wants_column_major(1)
        layout(module, column_major=part._column_major)
        _own_memory(part, loaded)
        part._laid_out = True
        checkpoint.close()
    for name, p in part.named_parameters():
        if p.device.type == "meta":
            raise part._missing(name, p.shape)
    logger.info("loaded part %r of %s (decode layout)", str(resolved), config.model_type)
    return part.eval()


def _own_memory(part: Part, loaded: dict[str, torch.Tensor]) -> None:
    """Copy the parameters that still share memory with the checkpoint's memory maps (the layout left
    them as they were), so that the maps can go."""
    for name, t in loaded.items():
        if t.device.type != "cpu":
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = part.get_submodule(owner_name)
        p = owner._parameters.get(leaf)
        if p is not None and p.data_ptr() == t.data_ptr():
            setattr(owner, leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
