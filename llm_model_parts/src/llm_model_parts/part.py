"""`Part`: begin (embeddings), a range of decoder layers, end (final norm + head), as one nn.Module.

Built on `meta` and loaded with `assign=True`, so a part allocates only its own tensors. Input: token ids
when it holds begin, hidden states otherwise; output: logits when it holds end, hidden states otherwise.
A part holds no sequence state: the `KVCache` comes in with each call (see cache.py for who owns it).
"""

from __future__ import annotations

import functools
import itertools
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from llm_model_parts.cache import KVCache, Slots
from llm_model_parts.config import ModelConfig
from llm_model_parts.families import get_family
from llm_model_parts.inputs import InputsEmbeds, check_hidden, embed_inputs
from llm_model_parts.layers.ends import Begin, End
from llm_model_parts.layers.rope import RotaryEmbedding
from llm_model_parts.loading import assign, check_complete, init_random, load_weights, own_memory
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

    begin_section: Begin | None  # wires begin's children (`embed_tokens`, GPT-2's `wte` + `wpe` ...)
    end_section: End | None  # ... and end's (`norm`, `lm_head`, Falcon's `ln_f` ...)

    def __init__(self, config: ModelConfig, spec: PartSpec, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.spec = spec.resolve(config.num_hidden_layers)
        self.layer_indices: tuple[int, ...] = self.spec.layers
        family = get_family(config.model_type)
        self.embed_scale = family.embed_scale(config)
        with torch.device("meta"):
            begin = family.build_begin(config) if self.spec.begin else None
            self.layers = nn.ModuleList(family.build_layer(config, i) for i in self.layer_indices)
            end = family.build_end(config) if self.spec.end else None
        # The sections' children are registered on the part under HF's names (`embed_tokens.weight`,
        # `norm.weight`, `lm_head.weight`, `wte.weight` ...); the section objects only wire them.
        for section in (begin, end):
            for name, child in section.named_children() if section is not None else ():
                self.add_module(name, child)
        object.__setattr__(self, "begin_section", begin)
        object.__setattr__(self, "end_section", end)
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
        self.cache_shapes = {i: a.cache_shape() for i, a in zip(self.layer_indices, attentions, strict=True)}
        self.cache: KVCache | None = None  # only for the deprecated `setup_cache`

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
        `decode_layout` is accepted for compatibility and ignored (deprecated).
        """
        cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_hf(config)
        part = cls(cfg, PartSpec.coerce(spec), device=device)
        if state_dict is None:
            init_random(part, device, dtype or torch.float32)
        else:
            load_weights(part, to_part_names(state_dict, part.spec, cfg), device, dtype)
        return part.eval()

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
        """Tokens in the cache set up by `setup_cache` (per row, padding included); 0 without one."""
        return self.cache.seq_len if self.cache is not None else 0

    def extra_repr(self) -> str:
        return f"model_type={self.config.model_type!r}, spec={str(self.spec)!r}"

    # ---- caches ---------------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_seq_len: int, *, rows: int | None = None) -> KVCache:
        """A KV cache for this part's layers (see `KVCache`); pass it to each forward call."""
        return KVCache(
            self.cache_shapes, batch_size, max_seq_len, device=self.device, dtype=self.dtype, rows=rows
        )

    def as_forward_func(self, max_seq_len: int | None = None) -> IncrementalForward:
        """The incremental forward_func of docs/forward_func.md (needs a part holding begin and end)."""
        from llm_model_parts.forward_func import IncrementalForward

        return IncrementalForward([self], max_seq_len=max_seq_len)

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """Deprecated: keep a cache on the part, used by calls that pass none. Use `new_cache`."""
        warnings.warn(
            "Part.setup_cache is deprecated; use cache = part.new_cache(...) and part(x, cache)",
            DeprecationWarning,
            stacklevel=2,
        )
        self.cache = self.new_cache(batch_size, max_seq_len)

    def reset_cache(self) -> None:
        """Deprecated (with `setup_cache`): forget the cached tokens."""
        if self.cache is not None:
            self.cache.reset()

    def drop_cache(self) -> None:
        """Deprecated (with `setup_cache`): free the cache."""
        self.cache = None

    def rewind(self, n: int) -> None:
        """Deprecated (with `setup_cache`): drop the last `n` tokens of every row."""
        if self.cache is None:
            raise RuntimeError("rewind: this part has no cache; pass a KVCache to each call instead")
        self.cache.rewind(n)

    def decode_layout(self, batch_size: int = 1) -> Part:
        """Deprecated no-op: projections are fused at load and the matmul is chosen per call."""
        return self

    # ---- forward --------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor | None,
        cache: KVCache | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: InputsEmbeds | None = None,
        slots: Slots | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """x: token ids (B, T) with begin, hidden states (B, T, hidden) otherwise.

        `cache`: the KV cache to read and append to (None: a stateless call over x alone). `attention_mask`
        (B, seq_len + T), 1 = token, 0 = left padding, covers the cached tokens and the new ones.
        `slots`: given by a cache's owner that runs several parts for one call (`cache.begin(...)`); the
        owner then commits. Without it the part places the tokens and commits itself.

        `inputs_embeds` (parts holding begin; a vision tower's output entering the chain, as VLMs do): a
        (B, T, width) tensor used instead of the token embeddings (x may then be None); or an
        `(embeds, mask)` pair, embeds (N, width) or (B, n, width) written in order at the N positions where
        mask (B, T) is true; or embeds (N, width) alone, written where x is the config's image token id.

        `logits_to_keep` (HF's name; parts holding end): n > 0 returns the logits of the last n positions
        only, (B, n, vocab), and skips the head's work on the others; 0 keeps every position.
        """
        h = embed_inputs(self, x, inputs_embeds) if self.spec.begin else check_hidden(self, x)
        b, t = h.shape[:2]
        cache = cache if cache is not None else self.cache
        own = cache is not None and slots is None
        if cache is not None:
            slots = slots if slots is not None else cache.begin(t, attention_mask)
            rows = slots.rows.stop - (slots.rows.start or 0)
            if b != rows:
                raise ValueError(f"input batch size {b} does not match the {rows} cache rows of this call")
            step, positions = self._cached_step(slots, h.device)
        else:
            step, positions = self._stateless_step(attention_mask, b, t, h.device)
        if self.begin_section is not None:
            h = self.begin_section.finish(h, positions)
        step.rope = self._rope(positions, h.dtype)
        h = self._layers(h, step, cache)
        if logits_to_keep > 0 and self.end_section is not None:
            h = h[:, -logits_to_keep:]
        out = self._output(h)
        if own:
            assert cache is not None and slots is not None
            cache.commit(slots)
        return out

    def _cached_step(self, slots: Slots, device: torch.device) -> tuple[Step, torch.Tensor]:
        valid = slots.valid.to(device) if slots.padded else None
        starts = None if slots.start is not None else slots.starts_t.to(device)
        views = causal_views(self._windows, slots.start, slots.end, valid, device, starts)
        step = Step(slots.start, slots.end, slots.rows, views=views, valid=valid, starts=starts)
        return step, slots.positions.to(device)

    def _stateless_step(
        self, attention_mask: torch.Tensor | None, b: int, t: int, device: torch.device
    ) -> tuple[Step, torch.Tensor]:
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != (b, t):
                raise ValueError(
                    f"attention_mask must cover the whole sequence so far, shape (B, seq_len + T) = ({b}, {t}); "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(device=device, dtype=torch.bool)
            valid = None if bool(mask.all()) else mask
        if valid is None:
            positions = torch.arange(t, device=device)[None]
        else:
            positions = (valid.long().cumsum(-1) - 1).masked_fill(~valid, 1)
        views = causal_views(self._windows, 0, t, valid, device)
        return Step(0, t, None, views=views, valid=valid), positions

    def forward_packed(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        tree_mask: torch.Tensor,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Several continuations of the cached prefix (batch row 0) packed in one row: x (1, N) ids or
        (1, N, hidden), position_ids (1, N), tree_mask (1, N, N) bool. The cache is left as it was."""
        h = embed_inputs(self, x) if self.spec.begin else check_hidden(self, x)
        b, n = h.shape[:2]
        if b != 1 or position_ids.shape != (1, n) or tree_mask.shape != (1, n, n):
            raise ValueError(
                f"forward_packed: expected input (1, N), position_ids (1, N), tree_mask (1, N, N); got "
                f"{tuple(x.shape)}, {tuple(position_ids.shape)}, {tuple(tree_mask.shape)}"
            )
        cache = cache if cache is not None else self.cache
        start = cache.lengths[0] if cache is not None else 0
        if cache is not None and start + n > cache.max_seq_len:
            cache.begin(n, rows=slice(0, 1))  # raises the overflow error
        cache_valid = cache.valid[0, :start].to(h.device) if cache is not None else None
        first = cache_valid.sum() if cache_valid is not None else 0
        position_ids = position_ids.to(h.device)
        if self.begin_section is not None:
            h = self.begin_section.finish(h, position_ids)
        views = packed_views(
            self._windows, start, position_ids[0] - first, cache_valid, tree_mask.to(h.device)
        )
        valid = None
        if cache_valid is not None and not bool(cache_valid.all()):
            valid = torch.cat((cache_valid, torch.ones(n, dtype=torch.bool, device=h.device)))[None]
        rows = slice(0, 1) if cache is not None else None
        step = Step(
            start, start + n, rows, self._rope(position_ids, h.dtype), views, valid=valid, packed=True
        )
        return self._output(self._layers(h, step, cache))

    def _layers(self, h: torch.Tensor, step: Step, cache: KVCache | None) -> torch.Tensor:
        for i, layer in zip(self.layer_indices, self.layers, strict=True):
            h = layer(h, step, cache.layer(i) if cache is not None else None)
        return h

    def _rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: rotary(positions, dtype) for name, rotary in self.rotary.items()}

    def _output(self, h: torch.Tensor) -> torch.Tensor:
        if self.end_section is None:
            return h
        logits = self.end_section(h)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def load_part(
    path: str | Path,
    spec: str | PartSpec = "f",
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    decode_layout: bool | None = None,
) -> Part:
    """Load part `spec` ("b 0-12", "12-24", "24-32 e", "f" ...) of a sepweight or HF checkpoint directory.

    Only the tensors of that part are read and allocated, a section at a time. `dtype=None` keeps the
    stored dtype. `decode_layout` is accepted for compatibility and ignored (deprecated: the projections
    are always fused at load, and the matmul is chosen per call).
    """
    from llm_sepweight import Checkpoint

    checkpoint = Checkpoint(path)
    config = ModelConfig.from_hf(checkpoint.config)
    resolved = PartSpec.coerce(spec).resolve(config.num_hidden_layers)
    part = Part(config, resolved, device=device)
    sections: list[tuple[str, Callable[[], Any]]] = []
    if resolved.begin:
        sections.append(("", lambda: checkpoint.load("b", device=device).begin))
    for j, i in enumerate(resolved.layers):
        sections.append((f"layers.{j}.", functools.partial(checkpoint.layer_state_dict, i, device)))
    if resolved.end:
        sections.append(("", lambda: checkpoint.load("e", device=device).end))
    provided: set[str] = set()
    for prefix, read in sections:
        loaded = {prefix + name: t for name, t in section_tensors(read()).items()}
        assign(part, loaded, device, dtype)
        own_memory(part, loaded.values())
        checkpoint.close()
        provided.update(loaded)
    check_complete(part, provided)
    logger.info("loaded part %r of %s", str(resolved), config.model_type)
    return part.eval()
