"""GGUF conversion against transformers' own GGUF loading.

The references are transformers' own GGUF loaders. `fixtures.real_checkpoint(name)` is exactly what
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` and `AutoTokenizer.from_pretrained(dir,
gguf_file=...)` load from the same GGUF file (dequantized, un-permuted), saved with `save_pretrained`.
SmolLM2's tokenizer is also compared with transformers' GGUF tokenizer loader called directly; for Gemma-3
(a 262k vocabulary transformers takes minutes to parse on two busy cores) the saved fixture stands in.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import fixtures
import pytest
import torch

from llm_sepweight import Checkpoint, convert, verify
from llm_sepweight.gguf import GGUFError, unpermute

SAMPLES = [
    "Hello world",
    "  two  spaces\n\n\tand tabs   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nÜber naïve café 🙂 日本語のテキスト<end_of_turn>",
    "def f(x):\n    return x ** 2  # 12345678",
    "",
]
_NAME_KEYS = {"_name_or_path", "_model_name_or_path", "architectures", "dtype", "transformers_version"}


def _gguf(name: str) -> Path:
    return {"smollm2": fixtures.smollm2_gguf, "gemma3": fixtures.gemma3_gguf}[name]()


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def converted(request: pytest.FixtureRequest) -> tuple[str, Path]:
    name = request.param
    return name, request.getfixturevalue(f"{name}_gguf_sepweight")


def test_tensors_equal_transformers_gguf_loading(converted: tuple[str, Path]) -> None:
    name, out = converted
    verify(out)
    ours = Checkpoint(out)
    ref = Checkpoint(fixtures.real_checkpoint(name))
    assert ours.manifest is not None and ours.manifest["source"]["kind"] == "gguf"
    assert ours.num_layers == ref.num_layers and ours.tied_embeddings == ref.tied_embeddings
    a, b = ours.load("f").to_dict(), ref.load("f").to_dict()
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype == torch.float32, k
        assert torch.equal(a[k], b[k]), f"{name}: {k} differs, max {float((a[k] - b[k]).abs().max())}"


def _reference_kwargs(name: str) -> tuple[Path, dict[str, str]]:
    if name == "smollm2":
        gguf = _gguf(name)
        return gguf.parent, {"gguf_file": gguf.name}
    return fixtures.real_checkpoint(name), {}


def test_config_matches_transformers(converted: tuple[str, Path]) -> None:
    from transformers import AutoConfig

    name, out = converted
    ours = AutoConfig.from_pretrained(out).to_dict()
    # the config transformers built from this GGUF (AutoModelForCausalLM.from_pretrained(..., gguf_file=...))
    ref = AutoConfig.from_pretrained(fixtures.real_checkpoint(name)).to_dict()
    diff = {
        k: (ours.get(k), ref.get(k))
        for k in set(ours) | set(ref)
        if k not in _NAME_KEYS and ours.get(k) != ref.get(k)
    }
    assert not diff
    assert json.loads((out / "config.json").read_text()) == Checkpoint(out).config


def test_tokenizer_encodes_like_transformers(converted: tuple[str, Path]) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    name, out = converted
    ref_dir, kwargs = _reference_kwargs(name)
    ours = AutoTokenizer.from_pretrained(out)
    ref = AutoTokenizer.from_pretrained(ref_dir, **kwargs)
    for text in SAMPLES:
        assert ours(text)["input_ids"] == ref(text)["input_ids"], repr(text)
        assert ours.decode(ours(text)["input_ids"]) == ref.decode(ref(text)["input_ids"])
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == len(ref)
    saved = json.loads((fixtures.real_checkpoint(name) / "tokenizer.json").read_text())
    assert json.loads((out / "tokenizer.json").read_text()) == saved


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py, LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("heads, head_dim, cols", [(9, 64, 576), (3, 64, 576), (1, 8, 1), (4, 2, 3)])
def test_unpermute_inverts_llama_cpp(heads: int, head_dim: int, cols: int) -> None:
    w = torch.randn(heads * head_dim, cols).squeeze(-1) if cols == 1 else torch.randn(heads * head_dim, cols)
    assert torch.equal(unpermute(_llama_cpp_permute(w, heads), heads), w)


def _write_gguf(path: Path, type_id: int | None = None) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_context_length(32)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if type_id is not None:
        data = bytearray(path.read_bytes())
        name = b"token_embd.weight"
        pos = data.index(name) + len(name) + 4 + 2 * 8  # n_dims, two dims
        data[pos : pos + 4] = struct.pack("<I", type_id)
        path.write_bytes(bytes(data))
    return path


def test_unknown_quantization_type_is_a_clear_error(tmp_path: Path) -> None:
    bad = _write_gguf(tmp_path / "bad.gguf", type_id=250)
    with pytest.raises(GGUFError, match=r"token_embd\.weight.*quantization type 250"):
        convert(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_and_unsupported_architecture(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        convert(fake, tmp_path / "out", progress=False)
    truncated = tmp_path / "trunc.gguf"
    truncated.write_bytes(_write_gguf(tmp_path / "ok.gguf").read_bytes()[:60])
    with pytest.raises(ValueError, match="truncated"):
        convert(truncated, tmp_path / "out", progress=False)
