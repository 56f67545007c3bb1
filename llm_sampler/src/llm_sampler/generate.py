"""`sample` (a stream of each step's tokens) and `generate` (whole sequences) for any forward_func."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from llm_sampler import structured
from llm_sampler.config import SamplingConfig
from llm_sampler.forward import Caller, ForwardFunc, as_batch, last_logits
from llm_sampler.select import TokenSelector

logger = logging.getLogger(__name__)


@dataclass
class Step:
    """One decoding step: `tokens` [B] (pad for rows already finished), `logprobs` [B] when asked for,
    `finished` [B] bool: rows that are done after this step."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None
    finished: torch.Tensor


@dataclass
class Generation:
    """`sequences` [B * num_return_sequences, T + new]: prompts (as given, padding included) and new tokens,
    pad after a row finished. `logprobs` [B * n, new] when asked for (0 after a row finished)."""

    sequences: torch.Tensor
    logprobs: torch.Tensor | None
    prompt_len: int

    @property
    def new_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]


def make_seeds(seed: Any, batch: int, n: int, device: torch.device) -> torch.Tensor | None:
    """One seed per row: prompt b's j-th return sequence uses seed[b] + j (an int seed is shared by prompts)."""
    if seed is None:
        return None
    per_prompt = [seed] * batch if isinstance(seed, int) else list(seed)
    if len(per_prompt) != batch:
        raise ValueError(
            f"seed has {len(per_prompt)} values for {batch} prompts: give one per prompt or one int"
        )
    per_prompt = [s - 2**64 if s >= 2**63 else s for s in per_prompt]  # the same 64 bits, as int64
    seeds = torch.tensor(per_prompt, dtype=torch.long)[:, None] + torch.arange(n)[None, :]
    return seeds.reshape(-1).to(device)


class StopChecker:
    """eos ids, stop token sequences and stop strings -> which rows finish with this step."""

    def __init__(self, config: SamplingConfig, prompt_len: int, device: torch.device) -> None:
        self.eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device)
        self.sequences = [
            torch.tensor(s, dtype=torch.long, device=device) for s in config.stop_sequences or []
        ]
        self.strings = list(config.stop_strings or [])
        self.decode = config.decode
        self.prompt_len = prompt_len

    def __call__(self, ids: torch.Tensor, tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        done = torch.isin(tokens, self.eos) if self.eos.numel() else torch.zeros_like(finished)
        generated = ids.shape[1] - self.prompt_len
        for seq in self.sequences:
            if len(seq) <= generated:
                done |= (ids[:, ids.shape[1] - len(seq) :] == seq).all(-1)
        if self.strings and self.decode is not None:
            for row in (~(finished | done)).nonzero()[:, 0].tolist():
                text = self.decode(ids[row, self.prompt_len :].tolist())
                if any(s in text for s in self.strings):
                    done[row] = True
        return finished | done


def _prepare(
    input_ids: Any, attention_mask: Any, max_new_tokens: int, params: dict[str, Any]
) -> tuple[SamplingConfig, torch.Tensor, torch.Tensor | None, int]:
    """Validate everything; -> (config, ids [B*n, T], left-padding mask or None, pad id)."""
    config = SamplingConfig.from_kwargs(params)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_ids or [0])[0]
    ids, mask = as_batch(input_ids, attention_mask, pad)
    n = config.num_return_sequences
    if n > 1:
        ids = ids.repeat_interleave(n, 0)
        mask = None if mask is None else mask.repeat_interleave(n, 0)
    return config, ids, mask, pad


def sample_steps(
    forward_func: ForwardFunc,
    input_ids: Any,
    max_new_tokens: int,
    *,
    attention_mask: Any = None,
    **params: Any,
) -> Iterator[Step]:
    """Like `sample`, yielding `Step` objects (tokens, log-probabilities, finished rows)."""
    config, ids, mask, pad = _prepare(input_ids, attention_mask, max_new_tokens, params)
    return _decode(forward_func, config, ids, mask, pad, max_new_tokens)


def _decode(
    forward_func: ForwardFunc,
    config: SamplingConfig,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    pad: int,
    max_new_tokens: int,
) -> Iterator[Step]:
    n = config.num_return_sequences
    batch, prompt_len = ids.shape
    caller = Caller(forward_func)
    if mask is not None and not caller.takes_mask:
        logger.warning(
            "prompts are left-padded but forward_func takes no attention_mask: padding is attended to"
        )
    constraint = None
    text = structured.grammar_text(config.json_schema, config.regex, config.choices, config.grammar)
    if text is not None:
        constraint = structured.Constraint(text[0], text[1], config.tokenizer, batch)
    selector = TokenSelector(config, prompt_len, make_seeds(config.seed, batch // n, n, ids.device))
    stop = StopChecker(config, prompt_len, ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    deadline = None if config.max_time is None else time.monotonic() + config.max_time
    caller.reset()
    for step in range(max_new_tokens):
        if deadline is not None and time.monotonic() > deadline:
            logger.info("max_time of %.3fs reached after %d new tokens", config.max_time, step)
            break
        if constraint is not None:
            constraint.start()  # the mask is computed while forward_func runs
        logits = last_logits(caller(ids, mask), batch)
        if constraint is not None:
            logits = constraint.apply(logits)
        if step == 0:
            config.check_vocab(logits.shape[-1])
            if int(ids.max()) >= logits.shape[-1]:
                raise ValueError(
                    f"input_ids holds token id {int(ids.max())}, outside the vocabulary of "
                    f"{logits.shape[-1]} tokens the forward_func returned"
                )
        sel = selector(ids, logits, step)
        bad, empty = torch.stack(
            [(sel.bad_logits & ~finished).any(), (sel.nothing_left & ~finished).any()]
        ).tolist()
        if bad:
            rows = (sel.bad_logits & ~finished).nonzero()[:, 0].tolist()
            raise ValueError(f"forward_func returned NaN or +inf logits for rows {rows} at step {step}")
        if empty:
            rows = (sel.nothing_left & ~finished).nonzero()[:, 0].tolist()
            raise ValueError(
                f"every token was filtered out for rows {rows} at step {step} "
                "(check bad_words_ids, logit_bias and the logits)"
            )
        tokens = sel.tokens.masked_fill(finished, pad)
        logprobs = None if sel.logprobs is None else sel.logprobs.masked_fill(finished, 0.0)
        ids = torch.cat([ids, tokens[:, None]], 1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        finished_now = stop(ids, tokens, finished)
        if constraint is not None:
            finished_now |= constraint.advance(tokens, finished)
        finished = finished_now
        yield Step(tokens, logprobs, finished)
        if bool(finished.all()):
            break
    if constraint is not None:
        constraint.close()


def sample(
    forward_func: ForwardFunc,
    input_ids: Any,
    max_new_tokens: int,
    *,
    attention_mask: Any = None,
    **params: Any,
) -> Iterator[torch.Tensor]:
    """Yield each step's new tokens, LongTensor[B * num_return_sequences], as soon as they are chosen.

    `forward_func` is stateless (`ids -> logits`, the whole sequence is sent every step) or incremental
    (keeps a cache; only new tokens are sent). `input_ids`: LongTensor[B, T] (left-padded with
    `attention_mask`), a list of ints, or a list of lists of ints (left-padded for you). `params`: see
    `SamplingConfig`. Rows that finished get `pad_token_id` (default: the first eos id) until all finish.
    """
    for step in sample_steps(
        forward_func, input_ids, max_new_tokens, attention_mask=attention_mask, **params
    ):
        yield step.tokens


def generate(
    forward_func: ForwardFunc,
    input_ids: Any,
    max_new_tokens: int,
    *,
    attention_mask: Any = None,
    **params: Any,
) -> Generation:
    """Run `sample` to the end and return the prompts with their continuations (see `Generation`)."""
    config, prompts, mask, pad = _prepare(input_ids, attention_mask, max_new_tokens, params)
    tokens, logprobs = [], []
    for step in _decode(forward_func, config, prompts, mask, pad, max_new_tokens):
        tokens.append(step.tokens)
        if step.logprobs is not None:
            logprobs.append(step.logprobs)
    sequences = torch.cat([prompts, torch.stack(tokens, 1)], 1) if tokens else prompts
    lp = None
    if config.return_logprobs:
        lp = torch.stack(logprobs, 1) if logprobs else torch.zeros(prompts.shape[0], 0)
    return Generation(sequences, lp, prompts.shape[1])
