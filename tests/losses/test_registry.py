"""The loss registry: names resolve, unknown names fail with the list, params are validated."""

from __future__ import annotations

import inspect

import pytest
import torch
from pydantic import ValidationError

from dpalign.losses import LOSSES, LossSpec, PairLogps, UnknownLossError, dpo, get_loss
from dpalign.losses.config import LossConfig

EXPECTED = {"dpo", "ipo", "hinge", "cdpo", "robust", "mdpo", "mmdpo", "dama", "apo_zero",
            "apo_down", "bco_pair", "nca_pair", "sppo_hard", "exo_pair", "discopop",
            "simpo", "orpo", "bradley_terry"}


def test_every_name_resolves():
    assert set(LOSSES) == EXPECTED
    for name in EXPECTED:
        spec = get_loss(name)
        assert isinstance(spec, LossSpec) and spec is LOSSES[name]


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as err:
        get_loss("dpoo")
    message = str(err.value)
    assert "'dpoo'" in message
    for name in EXPECTED:
        assert name in message
    assert isinstance(err.value, UnknownLossError)
    assert isinstance(err.value, ValueError)  # also usable inside pydantic validators


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_params_defaults_match_function_defaults(name):
    spec = get_loss(name)
    signature = inspect.signature(spec.fn).parameters
    for field, value in spec.params().model_dump().items():
        if field in spec.loop_params:
            assert field not in signature
        else:
            assert signature[field].default == value, field
            assert signature[field].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_params_reject_unknown_keys_and_are_frozen(name):
    spec = get_loss(name)
    with pytest.raises(ValidationError):
        spec.make_params({"not_a_param": 1})
    params = spec.make_params()
    for field in type(params).model_fields:
        with pytest.raises(ValidationError):
            setattr(params, field, getattr(params, field))


@pytest.mark.parametrize(("name", "raw"), [
    ("robust", {"flip_rate": 0.5}),
    ("robust", {"flip_rate": -0.1}),
    ("cdpo", {"label_smoothing": 0.5}),
    ("cdpo", {"label_smoothing": float("nan")}),
    ("mmdpo", {"w": -0.1}),
    ("mmdpo", {"k": 0.0}),
    ("mdpo", {"anchor_delta": float("inf")}),
    ("mdpo", {"image_term": "maybe"}),
    ("dama", {"hardness_mean": 1.5}),
    ("dama", {"data_scale": -1.0}),
    ("dama", {"momentum": 1.0}),
    ("simpo", {"gamma": -0.1}),
    ("simpo", {"gamma": float("inf")}),
    ("simpo", {"label_smoothing": 0.5}),
    ("orpo", {"beta": 0.2}),  # beta is the config's, not a parameter
])
def test_params_reject_out_of_range_values(name, raw):
    with pytest.raises(ValidationError):
        get_loss(name).make_params(raw)


def test_params_accept_valid_values():
    assert get_loss("robust").make_params({"flip_rate": 0.49}).flip_rate == 0.49
    assert get_loss("mdpo").make_params({"image_term": False}).image_term is False
    assert get_loss("dama").make_params({"momentum": 0.0}).momentum == 0.0


def test_needs_flags():
    assert [n for n, s in LOSSES.items() if s.needs_corrupt] == ["mdpo"]
    assert [n for n, s in LOSSES.items() if s.needs_hardness] == ["dama"]
    assert [n for n, s in LOSSES.items() if s.needs_alpha_model] == ["dama"]


def test_reference_free_flags_and_kl_logging():
    """Only SimPO and ORPO ignore the reference (none of TRL's DPOTrainer loss types does);
    they and the reward model's loss log no KL to a reference."""
    assert [n for n, s in LOSSES.items() if s.reference_free] == ["simpo", "orpo"]
    assert [n for n, s in LOSSES.items() if s.averages_tokens] == ["simpo", "orpo"]
    assert sorted(n for n, s in LOSSES.items() if not s.logs_kl) == ["bradley_terry", "orpo",
                                                                    "simpo"]


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_config_rejects_length_normalize_for_losses_that_average_themselves(name):
    assert LossConfig(name=name).name == name
    with pytest.raises(ValidationError, match="twice"):
        LossConfig(name=name, length_normalize=True)
    assert LossConfig(name="ipo", length_normalize=True).length_normalize


def one_pair() -> tuple[PairLogps, PairLogps]:
    one = torch.ones(1)
    return (PairLogps(torch.tensor([-5.0]), torch.tensor([-7.0]), one, one),
            PairLogps(torch.tensor([-5.5]), torch.tensor([-6.5]), one, one))


def test_call_passes_params_and_required_inputs():
    policy, ref = one_pair()
    spec = get_loss("dama")
    with pytest.raises(ValueError, match="hardness"):
        spec.call(policy, ref, beta=0.1, alpha_model=1.0)
    with pytest.raises(ValueError, match="alpha_model"):
        spec.call(policy, ref, beta=0.1, hardness=torch.tensor([0.5]))
    params = spec.make_params({"momentum": 0.5})  # a loop parameter: not passed to the loss
    out = spec.call(policy, ref, beta=0.1, params=params, hardness=torch.tensor([0.5]),
                    alpha_model=1.0)
    torch.testing.assert_close(out.per_example, dpo(policy, ref, beta=0.1).per_example)
    mmdpo_w0 = get_loss("mmdpo").call(policy, ref, beta=0.1, params={"w": 0.0})
    torch.testing.assert_close(mmdpo_w0.per_example, dpo(policy, ref, beta=0.1).per_example)
