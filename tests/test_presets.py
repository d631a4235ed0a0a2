"""Parameter counts of every preset match spec/k_operators.md to the digit."""

import pytest

from linmix.models import PRESETS, build, get_preset

EXPECTED_TOTALS = {
    "kops-ts-v1": 1_137_869,
    "kops-ts-v2": 810_189,
    "kops-ts-v2-nokbase": 744_647,
    "kops-wt2-v2": 4_081_357,
    "nanogpt-ts": 10_745_088,
    "kops-ts-linear": 810_189 - 256 * 256 + 16,  # the dense 256 x 256 Kbase becomes 16 taps
    "kops-ts-linear-long": 810_189 - 256 * 256 + 16,  # no parameter depends on the context length
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TOTALS))
def test_preset_parameter_count(name):
    assert build(name).num_parameters() == EXPECTED_TOTALS[name]


def test_every_preset_has_an_expected_count():
    assert set(PRESETS) == set(EXPECTED_TOTALS)


def test_nanogpt_count_without_position_embeddings():
    assert build("nanogpt-ts").num_parameters(exclude_positions=True) == 10_646_784


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"kbase": "per_layer"}, 5_392_077),  # WT2 per-layer Kbase, logged by the author's repo
        ({"kbase": "none"}, 3_819_207),
        ({"kbase": "none", "d_model": 304}, 5_025_207),
    ],
)
def test_wt2_ablation_counts(overrides, expected):
    assert build("kops-wt2-v2", **overrides).num_parameters() == expected


def test_wt2_original_count():
    model = build(
        "kops-wt2-v2", d_model=128, n_k2=8, kbase="per_layer", gamma_min=0.85, gamma_max=1.0,
        gamma_init="v1", alpha_cap=0.8, refine_steps_train=1, refine_steps_eval=1,
    )
    assert model.num_parameters() == 3_790_353


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="kops-ts-v2"):
        get_preset("kops-ts-v9")


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="no model fields"):
        build("kops-ts-v2", widht=3)
