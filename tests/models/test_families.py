"""Every supported VLM family, at toy size, through dpalign's real paths.

Each family's model is built with its own transformers classes, a locally trained tokenizer
and the family's processor, saved and loaded back through ``load_model`` (Auto classes,
safetensors). Against per-example references computed with the family's own processor:
token ids, sequence log-probs (left and right padding, batched vs alone), per-pair DP
gradients (hooks engine vs the one-pair-at-a-time loop), and two steps of DPO and of DP-DPO.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from PIL import Image

from dpalign.data.records import read_preference_jsonl
from dpalign.losses.base import PairLogps
from dpalign.losses.config import LossConfig
from dpalign.losses.objective import Objective, pair_logps
from dpalign.models.encode import chat_prompt, pad_batch
from dpalign.models.families import ImageInputs, family_of, process_images
from dpalign.models.load import load_model, resolve_device, resolve_dtype
from dpalign.models.logprobs import ImageTokenMismatchError, sequence_logps
from dpalign.models.lora import LoraConfig, prepare_trainable
from dpalign.models.pairs import collate, encode_pairs
from dpalign.models.tiny_families import TINY_FAMILIES
from dpalign.privacy.per_pair import per_pair_grads
from dpalign.train.config import TrainConfig
from dpalign.train.loop import train
from dpalign.world.load import World

FAMILY_NAMES = list(TINY_FAMILIES)
MODEL_CLASS = {"llava": "LlavaForConditionalGeneration",
               "llava_next": "LlavaNextForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration",
               "idefics3": "Idefics3ForConditionalGeneration"}


@pytest.fixture(scope="module")
def pool(small_world: Path) -> list:
    return read_preference_jsonl(World.load(small_world).pool_file)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_saved_folder_loads_as_its_family(family_dirs: dict[str, Path], name: str) -> None:
    """Auto classes give the family's model class and an image-text processor; safetensors
    only (no pickle files written or read)."""
    vlm = load_model(family_dirs[name])
    assert type(vlm.model).__name__ == MODEL_CLASS[name]
    assert family_of(vlm.model).name == ("llava" if name == "llava_next" else name)
    assert hasattr(vlm.processor, "image_processor") and hasattr(vlm.processor, "tokenizer")
    assert (family_dirs[name] / "model.safetensors").is_file()
    assert not list(family_dirs[name].glob("*.bin"))
    assert not vlm.model.training


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_token_ids_equal_the_processors_own(family_dirs: dict[str, Path], pool: list,
                                            name: str) -> None:
    """dpalign's prompt + response ids equal the family processor run on the whole text
    (template, image-token expansion and all), and image tensors equal its batch output."""
    vlm = load_model(family_dirs[name])
    tok = vlm.processor.tokenizer
    pairs = encode_pairs(pool[:3], vlm.processor)
    for record, pair in zip(pool[:3], pairs, strict=True):
        image = Image.open(record.images[0]).convert("RGB")
        text = chat_prompt(vlm.processor, record.prompt) + record.chosen + tok.eos_token
        ref = vlm.processor(images=[[image]], text=[text], return_tensors="pt")
        assert ref["input_ids"][0].tolist() == pair.prompt + pair.chosen
        for key, value in pair.images.tensors.items():
            assert torch.equal(value, ref[key].reshape(value.shape)), key


def _manual_logps(model: torch.nn.Module, processor: object, record: object,
                  response: str) -> float:
    """Sum of log p(response token) from one processor call and one plain forward."""
    tok = processor.tokenizer  # type: ignore[attr-defined]
    image = Image.open(record.images[0]).convert("RGB")  # type: ignore[attr-defined]
    prompt = chat_prompt(processor, record.prompt)  # type: ignore[attr-defined]
    full = processor(images=[[image]], text=[prompt + response + tok.eos_token],  # type: ignore[operator]
                     return_tensors="pt")
    n_prompt = len(processor(images=[[image]], text=[prompt])["input_ids"][0])  # type: ignore[operator]
    logits = model(**full).logits[0].double()
    ids = full["input_ids"][0]
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:, None])[:, 0]
    return float(logp[n_prompt - 1:].sum())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_batched_logps_equal_per_example_forward(family_dirs: dict[str, Path], pool: list,
                                                 name: str, side: str) -> None:
    """A padded batch of 2B rows gives each row's log-prob as computed alone by the family's
    processor and a plain forward (padding side, image layout and positions all handled)."""
    vlm = load_model(family_dirs[name])
    pairs = encode_pairs(pool[:3], vlm.processor)
    pad = vlm.processor.tokenizer.pad_token_id
    batch = collate(pairs, pad, side=side)
    with torch.no_grad():
        got = sequence_logps(vlm.model, batch.tokens, batch.images, batch.images_per_row)
        want = [_manual_logps(vlm.model, vlm.processor, r, getattr(r, which))
                for which in ("chosen", "rejected") for r in pool[:3]]
    assert got.total.tolist() == pytest.approx(want, rel=1e-5, abs=1e-4)
    assert all(math.isfinite(v) for v in want)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_image_token_mismatch_names_the_row(family_dirs: dict[str, Path], pool: list,
                                            name: str) -> None:
    """A prompt that lost one image placeholder fails before the forward, naming the row."""
    vlm = load_model(family_dirs[name])
    pairs = encode_pairs(pool[:2], vlm.processor)
    image_id = int(vlm.model.config.image_token_id)
    broken = list(pairs[1].prompt)
    broken.remove(image_id)
    rows = pad_batch([pairs[0].prompt, broken], [pairs[0].chosen, pairs[1].chosen],
                     vlm.processor.tokenizer.pad_token_id)
    images = ImageInputs.cat([pairs[0].images, pairs[1].images])
    with pytest.raises(ImageTokenMismatchError, match="row 1"):
        sequence_logps(vlm.model, rows, images)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_dp_per_pair_grads_equal_the_loop(family_dirs: dict[str, Path], pool: list,
                                          name: str) -> None:
    """LoRA on the family's language model: the one-backward hooks engine gives each pair's
    gradient as the one-pair-at-a-time loop does, and the pairs sum to the batch gradient."""
    vlm = load_model(family_dirs[name])
    torch.manual_seed(0)
    model = prepare_trainable(vlm.model, LoraConfig(r=2, alpha=4))
    for pname, p in model.named_parameters():  # B = 0 at start: move off the zero point
        if "lora_B" in pname:
            p.data.normal_(0, 0.05)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    scope = family_of(vlm.model).lm_scope
    assert params and all(scope in k for k in params)
    pairs = encode_pairs(pool[:3], vlm.processor)
    batch = collate(pairs, vlm.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        ref = pair_logps(model, batch)
    ref = PairLogps(ref.chosen - 0.3, ref.rejected + 0.2, ref.chosen_tokens, ref.rejected_tokens)
    objective = Objective.from_config(LossConfig(name="dpo", beta=0.1))
    hooks, out = per_pair_grads(model, batch, ref, objective, params=params, engine="hooks")
    loop, _ = per_pair_grads(model, batch, ref, objective, params=params, engine="loop")
    scale = max(float(g.abs().max()) for g in loop.values())
    assert scale > 0
    for key in params:
        torch.testing.assert_close(hooks[key], loop[key], rtol=1e-4, atol=1e-6 * scale)
    assert torch.isfinite(out.per_example).all()


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("private", [False, True], ids=["dpo", "dp-dpo"])
def test_two_training_steps(family_dirs: dict[str, Path], small_world: Path, tmp_path: Path,
                            name: str, private: bool) -> None:
    """``dpalign train`` on the world's pairs: 2 steps of DPO or DP-DPO (LoRA, sigma 1),
    finite losses, and the step-1 loss equals the DPO loss of the untrained policy, log 2."""
    world = World.load(small_world)
    privacy = ({"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 1.0}
               if private else {})
    cfg = TrainConfig.model_validate({
        "model": str(family_dirs[name]), "data": {"train": str(world.pool_file), "k": 8},
        "lora": {"r": 2, "alpha": 4}, "train": {"steps": 2, "batch_size": 4},
        "eval": {"world": False}, "privacy": privacy})
    result = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2]
    first = next(r for r in rows if r["loss"] is not None)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA B = 0 at step 1
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in rows)
    if private:  # the diagnostics agree with the norms; epsilon is dp_accounting's
        for r in rows:
            assert r["dp_units"] == r["pairs"]
            assert (r["dp_clip_fraction"] == 0) == (r["dp_norm_max"] <= 1.0)
            assert 0 <= r["dp_clip_fraction"] <= 1
        acc = PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                            value_discretization_interval=1e-4)  # as dpalign's PLD
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            0.5, dp_accounting.GaussianDpEvent(1.0)), 2))  # q = 4 / 8, sigma 1, 2 steps
        assert rows[-1]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)
    reloaded = load_model(result.out / "final")
    assert type(reloaded.model).__name__ == MODEL_CLASS[name]


def test_auto_device_and_dtype_on_this_machine() -> None:
    """auto picks CUDA + bfloat16 only when a GPU is visible; explicit names pass through."""
    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("float32", device) is torch.float32
    if device.type == "cpu":
        assert resolve_dtype("auto", device) is torch.float32
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


def test_bfloat16_logps_match_float32(family_dirs: dict[str, Path], pool: list) -> None:
    """The same model in bfloat16 gives the float32 log-probs up to bf16 precision."""
    pairs = encode_pairs(pool[:4], load_model(family_dirs["llava"]).processor)
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        vlm = load_model(family_dirs["llava"], dtype=dtype)
        batch = collate(pairs, vlm.processor.tokenizer.pad_token_id)
        with torch.no_grad():
            got[dtype] = sequence_logps(vlm.model, batch.tokens, batch.images,
                                        batch.images_per_row).total
    assert got[torch.float32].dtype == got[torch.bfloat16].dtype == torch.float32
    n_tokens = batch.tokens.labels.ne(-100).sum(dim=1)
    per_token = (got[torch.bfloat16] - got[torch.float32]).abs() / n_tokens
    assert float(per_token.max()) < 0.05


def test_process_images_units_split_back(family_dirs: dict[str, Path], pool: list) -> None:
    """Qwen2-VL's flat patch rows: selecting images returns exactly their own rows."""
    vlm = load_model(family_dirs["qwen2_vl"])
    images = [Image.open(r.images[0]).convert("RGB") for r in pool[:3]]
    images[1] = images[1].resize((48, 32))
    joined = process_images(vlm.processor, images)
    for i, image in enumerate(images):
        alone = process_images(vlm.processor, [image])
        picked = joined.select([i])
        for key in alone.tensors:
            assert torch.equal(picked.tensors[key], alone.tensors[key])
    assert joined.units["image_grid_thw"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_batched_generation_equals_one_at_a_time(family_dirs: dict[str, Path], pool: list,
                                                 name: str) -> None:
    """``generate`` (left-padded batches, dpalign's inputs) gives each image's greedy answer
    as ``model.generate`` on the family processor's output for that example alone."""
    from dpalign.eval.generate import generate

    vlm = load_model(family_dirs[name])
    tok = vlm.processor.tokenizer
    records = pool[:3]
    prompts = [r.prompt if i != 1 else r.prompt + " Answer briefly." for i, r in
               enumerate(records)]
    paths = [Path(r.images[0]) for r in records]
    got = generate(vlm.model, vlm.processor, paths, prompts, batch_size=3, max_new_tokens=5)
    for path, prompt, answer in zip(paths, prompts, got, strict=True):
        image = Image.open(path).convert("RGB")
        inputs = vlm.processor(images=[[image]], text=[chat_prompt(vlm.processor, prompt)],
                               return_tensors="pt")
        with torch.no_grad():
            out = vlm.model.generate(**inputs, max_new_tokens=5, do_sample=False,
                                     pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
        new = out[0, inputs["input_ids"].shape[1]:]
        assert answer == tok.decode(new, skip_special_tokens=True).strip()


def test_remote_code_never_runs_without_the_flag(family_dirs: dict[str, Path],
                                                 tmp_path: Path) -> None:
    """A folder whose config points the Auto classes at shipped Python code: without
    trust_remote_code that code is never imported (the built-in class loads instead)."""
    import shutil

    folder = tmp_path / "shipped"
    shutil.copytree(family_dirs["llava"], folder)
    marker = tmp_path / "ran"
    (folder / "modeling_shipped.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlavaForConditionalGeneration as ShippedModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageTextToText": "modeling_shipped.ShippedModel"}
    (folder / "config.json").write_text(json.dumps(config))
    try:
        vlm = load_model(folder)
        assert type(vlm.model).__name__ == "LlavaForConditionalGeneration"
    except ValueError as exc:  # transformers may refuse outright instead
        assert "trust_remote_code" in str(exc)
    assert not marker.exists()


def test_pickle_weights_are_refused(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Weights only as a pickle (pytorch_model.bin): loading fails instead of unpickling."""
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(family_dirs["llava"], folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_model(folder)
