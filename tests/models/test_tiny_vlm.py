"""The embedded tiny VLM: tokenizer, processor, save/load through the Auto classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from dpalign.models.encode import IGNORE, PromptEncoder, pad_batch, pixel_values, response_ids
from dpalign.models.load import ModelFolderError, load_model
from dpalign.models.tiny import TinyVLMConfig, build_tiny
from dpalign.models.tokenizer import train_tokenizer
from dpalign.world.load import World

TEXTS = ["Describe the image.", "A red fork, a blue kitten and an orange soccer ball.",
         "Is there a knife in the image?", "No, there is no knife.", "The cup is cyan."]


@pytest.fixture(scope="module")
def built() -> object:
    return build_tiny(TEXTS * 20, TinyVLMConfig(), seed=0)


def test_tokenizer_round_trips_world_and_unseen_text(small_world: Path) -> None:
    world = World.load(small_world)
    texts = [t for r in world.pretrain_rows() for t in (r["prompt"], r["response"])]
    tok = train_tokenizer(texts)
    for text in [*texts[:200], "Ünïcode, emoji 🐱 and tabs\tstay intact."]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # World words are whole tokens: 'fork' is one token after a space.
    assert tok.convert_ids_to_tokens(tok(" fork", add_special_tokens=False)["input_ids"]) == [
        "Ġfork"]


def test_chat_template_takes_list_content(built: object) -> None:
    processor = built.processor  # type: ignore[attr-defined]
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|><image>Describe the image.<|end|><|assistant|>"


def test_processor_expands_image_token_to_patch_count(built: object) -> None:
    processor, model = built.processor, built.model  # type: ignore[attr-defined]
    ids = PromptEncoder(processor, (64, 64))("Describe the image.")
    n_image = sum(i == model.config.image_token_index for i in ids)
    assert n_image == (64 // TinyVLMConfig().patch_size) ** 2 == model.config.image_seq_length


def test_save_load_identity_and_forward_with_pixel_values(tmp_path: Path, built: object) -> None:
    model, processor = built.model, built.processor  # type: ignore[attr-defined]
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LlavaForConditionalGeneration)
    assert type(proc2.image_processor).__name__ == "CLIPImageProcessorPil"
    reference = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    ids = PromptEncoder(proc2, (64, 64))("Describe the image.")
    batch = pad_batch([ids], [response_ids(proc2, "A red fork.")], proc2.tokenizer.pad_token_id)
    pixels = pixel_values(proc2, [image])
    assert pixels.shape == (1, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        a = model(input_ids=batch.input_ids, pixel_values=pixels, labels=batch.labels)
        b = loaded(input_ids=batch.input_ids, pixel_values=pixels, labels=batch.labels)
    assert torch.equal(a.logits, b.logits)
    assert a.logits.shape == (1, batch.input_ids.shape[1], len(proc2.tokenizer))
    # The loss is the mean NLL of the response tokens, computed here by hand.
    logp = torch.log_softmax(a.logits[0, :-1], -1)
    targets = batch.labels[0, 1:]
    keep = targets != IGNORE
    manual = -logp[keep].gather(-1, targets[keep, None]).mean()
    assert torch.allclose(a.loss, manual, atol=1e-6)
    # The image matters: another image changes the logits.
    with torch.no_grad():
        c = model(input_ids=batch.input_ids, pixel_values=pixel_values(
            proc2, [Image.new("RGB", (64, 64), (30, 30, 200))])).logits
    assert not torch.allclose(a.logits, c)


def test_pad_batch_puts_labels_on_response_only() -> None:
    batch = pad_batch([[5, 6, 7], [5]], [[8, 9], [8, 9, 10]], pad_id=0, side="left")
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [0, 5, 8, 9, 10]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[IGNORE] * 3 + [8, 9], [IGNORE, IGNORE, 8, 9, 10]]
    right = pad_batch([[5]], [[8]], pad_id=0, side="right")
    assert right.labels.tolist() == [[IGNORE, 8]]


def test_load_model_names_a_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match=r"no config\.json"):
        load_model(tmp_path)
