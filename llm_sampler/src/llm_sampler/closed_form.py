"""`score`, `score_texts`, `score_many`: closed-form questions, with lm-evaluation-harness's conventions.

Text requests are tokenized exactly as lm-evaluation-harness's `loglikelihood` does (lm_eval 0.4.x,
`TemplateLM._encode_pair` and `HFLM.tok_encode`):
- trailing whitespace of the context moves to the front of the option;
- context + option are encoded together, and split at the length of the encoded context;
- an empty context becomes the prefix token (BOS, else EOS), unless the option already starts with it;
- strings are encoded with the tokenizer's default special tokens (`add_special_tokens=None`), except that a
  string already starting with the prefix token's text is encoded without them.
The tokenizer is duck-typed: a Hugging Face tokenizer (`encode` -> list of ids) or a `tokenizers.Tokenizer`
(`encode` -> `Encoding` with `.ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm_sampler.forward import ForwardFunc
from llm_sampler.scores import OptionScore, Scores, check_normalize
from llm_sampler.scoring import Ids, _check_ids, score_requests


class TextEncoder:
    """lm-evaluation-harness's tokenization rules over a duck-typed tokenizer."""

    def __init__(
        self, tokenizer: Any, prefix_token_id: int | None = None, add_special_tokens: bool | None = None
    ) -> None:
        if not hasattr(tokenizer, "encode"):
            raise TypeError(
                f"tokenizer must have encode() (HF tokenizer or tokenizers.Tokenizer), got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        if prefix_token_id is None:
            prefix_token_id = getattr(tokenizer, "bos_token_id", None)
            if prefix_token_id is None:
                prefix_token_id = getattr(tokenizer, "eos_token_id", None)
        self.prefix_token_id = prefix_token_id
        self._prefix_text: str | None = None

    def _raw(self, text: str, add_special_tokens: bool | None) -> list[int]:
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        enc = self.tokenizer.encode(text, **kwargs)
        return list(enc.ids) if hasattr(enc, "ids") else list(enc)

    def encode(self, text: str) -> list[int]:
        special = self.add_special_tokens
        if special is None and self.prefix_token_id is not None:
            if self._prefix_text is None:
                self._prefix_text = self.tokenizer.decode([self.prefix_token_id])
            if self._prefix_text and text.startswith(self._prefix_text):
                special = False
        return self._raw(text, special)

    def pair(self, context: str, option: str) -> tuple[Ids, Ids]:
        if not isinstance(context, str) or not isinstance(option, str):
            raise TypeError(
                f"context and options must be strings, got {type(context).__name__}, {type(option).__name__}"
            )
        if context == "":
            cont = self._raw(option, False)
            if self.prefix_token_id is None:
                raise ValueError(
                    "the context is empty and the tokenizer has no BOS/EOS token: pass prefix_token_id="
                )
            if cont and cont[0] == self.prefix_token_id:
                return tuple(cont[:1]), tuple(cont[1:])
            return (self.prefix_token_id,), tuple(cont)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, option = context[:-n_spaces], context[-n_spaces:] + option
        whole = self.encode(context + option)
        ctx = self.encode(context)
        return tuple(ctx), tuple(whole[len(ctx) :])


def score(
    forward_func: ForwardFunc,
    context_ids: Any,
    continuation_ids_list: Sequence[Any],
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    use_cache: bool | None = None,
) -> Scores:
    """Log-likelihood of each continuation (token ids) after `context_ids` (at least one token).

    `max_length`: the model's context window; longer rows are cut from the left as lm-evaluation-harness does
    (an option longer than the window raises). `use_cache`: None = use the incremental engine when the
    forward_func is incremental.
    """
    ctx = _check_ids(context_ids, "context_ids")
    if not continuation_ids_list:
        raise ValueError("continuation_ids_list is empty: give at least one option")
    conts = [_check_ids(c, f"continuation_ids_list[{i}]") for i, c in enumerate(continuation_ids_list)]
    res = score_requests(
        forward_func,
        [(ctx, c) for c in conts],
        batch_size=batch_size,
        max_length=max_length,
        use_cache=use_cache,
    )
    return Scores([OptionScore(r.logprobs, r.is_greedy, list(c)) for r, c in zip(res, conts, strict=True)])


def score_many(
    forward_func: ForwardFunc,
    tokenizer: Any,
    requests: Sequence[tuple[str, Sequence[str]]],
    *,
    batch_size: int | None = None,
    normalize: str = "none",
    max_length: int | None = None,
    use_cache: bool | None = None,
    prefix_token_id: int | None = None,
    add_special_tokens: bool | None = None,
    pack_tokens: int | None = None,
    progress: bool = False,
) -> list[Scores]:
    """One `Scores` per `(context, options)`; all requests are sorted and batched together across questions.

    `normalize` is the default of each `Scores.best()`; "unconditional" also scores every option after an
    empty context (lm-evaluation-harness's acc_mutual_info). With a forward_func that has `forward_packed`
    (llm_model_parts), questions go `pack_tokens` tokens per call (default 512), a prefix they share
    computed once: with layers streamed from disk, each call reads the weights once for all of them.
    `progress=True` shows a bar (tqdm, when installed) with questions/s and an ETA.
    """
    check_normalize(normalize)
    encoder = TextEncoder(tokenizer, prefix_token_id, add_special_tokens)
    flat: list[tuple[Ids, Ids]] = []
    for q, request in enumerate(requests):
        if not isinstance(request, (tuple, list)) or len(request) != 2 or isinstance(request[1], str):
            raise ValueError(f"requests[{q}] must be (context, [option, ...]), got {request!r}")
        context, options = request
        if not options:
            raise ValueError(f"requests[{q}] has no options")
        flat += [encoder.pair(context, o) for o in options]
    n_cond = len(flat)
    if normalize == "unconditional":
        flat += [encoder.pair("", o) for _, options in requests for o in options]
    res = score_requests(
        forward_func,
        flat,
        batch_size=batch_size,
        max_length=max_length,
        use_cache=use_cache,
        pack_tokens=pack_tokens,
        progress=progress,
    )
    out: list[Scores] = []
    k = 0
    for _, options in requests:
        scores = []
        for o in options:
            uncond = res[n_cond + k].logprobs if normalize == "unconditional" else None
            scores.append(
                OptionScore(
                    res[k].logprobs,
                    res[k].is_greedy,
                    list(flat[k][1]),
                    o,
                    None if uncond is None else sum(uncond),
                )
            )
            k += 1
        out.append(Scores(scores, normalize))
    return out


def score_texts(
    forward_func: ForwardFunc,
    tokenizer: Any,
    context: str,
    options: Sequence[str],
    normalize: str = "none",
    **kwargs: Any,
) -> Scores:
    """`score_many` for one question."""
    return score_many(forward_func, tokenizer, [(context, options)], normalize=normalize, **kwargs)[0]
