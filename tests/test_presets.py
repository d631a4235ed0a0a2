"""Parameter counts of every preset match spec/k_operators.md to the digit; overrides reach the
model config and its mixer's config."""

import pytest

from linmix.models import PRESETS, build, get_preset, with_overrides

EXPECTED_TOTALS = {
    "kops-ts-v1": 1_137_869,
    "kops-ts-v2": 810_189,
    "kops-ts-v2-nokbase": 744_647,
    "kops-wt2-v2": 4_081_357,
    "nanogpt-ts": 10_745_088,
    "kops-ts-linear": 810_189 - 256 * 256 + 16,  # the dense 256 x 256 Kbase becomes 16 taps
    "kops-ts-linear-long": 810_189 - 256 * 256 + 16,  # no parameter depends on the context length
    # The delta-rule presets: within 5% of kops-ts-v2's 810,189.
    "deltanet-ts": 805_888,
    "pdeltanet-ts": 807_960,  # + 4 layers x (2 x 128 x 2 gate weights + 3 x 2 A_log, dt_bias, centre)
    "gdn-ts": 806_928,
    "pgdn-ts": 809_000,
    "kda-ts": 839_688,
    "pkda-ts": 841_760,
    "gka-ts": 807_968,  # gdn-ts + 4 layers x (2 x 128 alpha gate weights + 4 beta and alpha biases)
    # deltanet-ts without the beta gate (4 layers x 2 x 128) plus the level biases (4 layers x 2 heads x
    # (1 + 8) for 2^j, (1 + 16) for j^2 + 1).
    "structured-ts-pow2": 804_936,
    "structured-ts-sq1": 805_000,
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


@pytest.mark.parametrize("overrides", [{"rank": 8}, {"mixer_kwargs.rank": 8}])
def test_mixer_overrides_merge_into_the_presets_mixer_kwargs(overrides):
    preset = get_preset("kops-ts-v1")
    changed = with_overrides(preset, **overrides)
    assert changed.model["mixer_kwargs"] == {**preset.model["mixer_kwargs"], "rank": 8}
    assert preset.model["mixer_kwargs"]["rank"] == 32  # the preset itself is left as it was
    mixer = build("kops-ts-v1", **overrides).k2_blocks[0].mixer
    assert (mixer.config.rank, mixer.config.gamma_init, mixer.config.alpha_cap) == (8, "v1", 0.8)


def test_overrides_route_model_fields_mixer_fields_and_whole_mixer_kwargs():
    preset = get_preset("nanogpt-ts")
    assert preset.model_config(n_heads=4).mixer_kwargs == {"n_heads": 4, "bias": False, "dropout": 0.2}
    config = preset.model_config(**{"mixer_kwargs.dropout": 0.0, "d_model": 96, "dropout": 0.1})
    assert (config.d_model, config.dropout, config.mixer_kwargs["dropout"]) == (96, 0.1, 0.0)
    assert preset.model_config(mixer_kwargs={"n_heads": 2}).mixer_kwargs == {"n_heads": 2}  # the whole field
    linear = build("kops-ts-linear", decay_backend="chunk", d_model=24, n_k2=1)
    assert linear.k2_blocks[0].mixer.config.decay_backend == "chunk"


@pytest.mark.parametrize("preset, overrides, match", [
    ("kops-ts-v2", {"colour": "red"}, r"no model fields \['colour'\] in a 'kstack' model; its fields: .*'n_k2'.*"
                                      r"fields of mixer 'k2' .*'rank'"),
    ("nanogpt-ts", {"rank": 4}, r"no model fields \['rank'\] in a 'transformer' model; .*'n_heads'"),
    ("kops-ts-v2", {"mixer_kwargs.colour": "red"}, r"mixer 'k2' has no config fields \['colour'\]"),
    ("kops-ts-v2", {"mixer_kwargs.rank": -4}, "rank must be >= 1"),
    ("kops-ts-v2", {"mixer_kwargs.d_model": 8}, r"mixer_kwargs may not set \['d_model'\]"),
    ("nanogpt-ts", {"n_heads": 5}, "multiple of n_heads=5"),
])
def test_bad_overrides_fail_when_applied(preset, overrides, match):
    with pytest.raises(ValueError, match=match):
        with_overrides(get_preset(preset), **overrides)
