"""Auxiliary rewards: each reward's values, the weighted sum, the scoring cache and the config files."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from prefopt.rewards import AUX_REWARDS, CompositeReward, build_aux_reward, resolve_callable, score_responses
from prefopt.rewards.oracle import NO_ORACLE

CONF = Path(__file__).resolve().parents[1] / "conf"

SIMPLE = "The cat sat on the mat."
MIDDLE = " ".join(
    [
        "Scientists study the weather to predict storms.",
        "They use satellites and computers every day. Forecasts help people stay safe.",
    ]
)
DENSE = " ".join(
    [
        "Notwithstanding considerable epistemological disagreements, contemporary phenomenological",
        "investigations systematically reconceptualize intersubjectivity. Consequently, institutional",
        "administrators increasingly prioritize interdisciplinary collaboration. Organizational",
        "accountability necessitates comprehensive methodological transparency.",
    ]
)


def single(name: str, context=None, **fields):
    """The unweighted reward function of one configured reward."""
    return build_aux_reward({name: fields}, context).components[name]


# --- readability (HPO's R1) -----------------------------------------------------------------------------


def test_readability_prefers_simple_text():
    r = single("readability")([""] * 2, [SIMPLE, DENSE])
    assert r[0] > r[1]
    assert r == [1.0, 0.0]


def test_readability_is_the_clamped_formula_of_the_textstat_grade():
    """R1 = min(max((9 - g) / 5, 0), 1); the texts hit the upper clamp, the middle and the lower clamp."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import textstat
    texts = [SIMPLE, MIDDLE, DENSE]
    grades = [textstat.text_standard(t, float_output=True) for t in texts]
    expected = [min(max((9 - g) / 5, 0), 1) for g in grades]
    assert single("readability")([""] * 3, texts) == pytest.approx(expected)
    assert grades[0] <= 4 < grades[1] < 9 <= grades[2]  # so each branch of the clamp is exercised


def test_readability_of_empty_text_is_zero():
    assert single("readability")(["", ""], ["", "   \n"]) == [0.0, 0.0]


# --- length and keyword ---------------------------------------------------------------------------------


def test_length_is_normalized_and_clipped():
    """max_words = 4: 2 words -> 0.5, 4 -> 1, 8 -> clipped to 1, empty -> 0."""
    r = single("length", max_words=4)
    assert r([""] * 4, ["a b", "a b c d", "a b c d e f g h", ""]) == [0.5, 1.0, 1.0, 0.0]


def test_length_sign_minus_one_favours_short_responses():
    r = single("length", max_words=4, sign=-1)
    short, long = r(["", ""], ["a", "a b c"])
    assert short > long
    assert (short, long) == (-0.25, -0.75)


def test_keyword_any_matches_whole_words_in_any_case():
    r = single("keyword", keywords=["please", "thank you"])
    responses = ["PLEASE help", "pleased to help", "Thank you!", "no marker", "say please.", "displease"]
    assert r([""] * 6, responses) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_keyword_count_and_fraction():
    """'Please, please say thanks' has 2 of 'please', 1 of 'thanks' (3 hits, 4 words), 2 of 2 keywords."""
    y = ["Please, please say thanks", "nothing here"]
    kw = ["please", "thanks"]
    assert single("keyword", keywords=kw, mode="count")(["", ""], y) == [3.0, 0.0]
    assert single("keyword", keywords=kw, mode="count", per_word=True)(["", ""], y) == [0.75, 0.0]
    assert single("keyword", keywords=kw, mode="fraction")(["", ""], ["please do", "x"]) == [0.5, 0.0]


# --- composite and the scoring cache --------------------------------------------------------------------


def test_composite_is_the_weighted_sum():
    """max_words = 4, keyword 'please':
    'please go'          -> length 0.5, keyword 1 -> R = 0.5 * 0.5 + 2 * 1 = 2.25
    'a b c d e'          -> length 1.0, keyword 0 -> R = 0.5 * 1.0 + 2 * 0 = 0.5
    """
    cfg = {"length": {"weight": 0.5, "max_words": 4}, "keyword": {"weight": 2.0}}
    reward = build_aux_reward(cfg, None)
    assert isinstance(reward, CompositeReward)
    prompts, responses = ["", ""], ["please go", "a b c d e"]
    assert reward(prompts, responses) == pytest.approx([2.25, 0.5])
    parts = {k: score_responses(r, prompts, responses, progress=False) for k, r in reward.components.items()}
    assert parts["length"].tolist() == [0.5, 1.0]
    assert reward.combine(parts).tolist() == pytest.approx([2.25, 0.5])


def test_no_reward_selected_builds_nothing():
    assert build_aux_reward({}, None) is None
    assert build_aux_reward(None, None) is None


def test_score_responses_scores_each_distinct_pair_once():
    calls = []

    def spy(prompts, responses):
        calls.append(len(responses))
        return [len(p) + 10.0 * len(y) for p, y in zip(prompts, responses, strict=True)]

    prompts = ["p", "p", "q", "p", "q", "pp"]
    responses = ["a", "a", "a", "bb", "a", "a"]  # distinct pairs: (p,a) (q,a) (p,bb) (pp,a)
    scores = score_responses(spy, prompts, responses, batch_size=3, progress=False)
    assert sum(calls) == 4 and calls == [3, 1]
    assert scores.tolist() == [1 + 10, 1 + 10, 1 + 10, 1 + 20, 1 + 10, 2 + 10]  # len(p) + 10 * len(y)


def test_score_responses_rejects_a_reward_of_the_wrong_length():
    with pytest.raises(ValueError, match="2 scores for a batch of 1"):
        score_responses(lambda p, y: [0.0, 0.0], ["p"], ["y"], progress=False)


# --- custom and oracle ----------------------------------------------------------------------------------


def test_custom_reward_from_an_allowed_path_with_kwargs():
    cfg = {"function": "prefopt.rewards.custom:example_word_count", "kwargs": {"scale": 0.5}}
    assert single("custom", **cfg)(["", ""], ["one two three four", ""]) == [2.0, 0.0]
    dotted = single("custom", function="prefopt.rewards.custom.example_word_count")
    assert dotted([""], ["one two"]) == [2.0]


def test_custom_reward_outside_the_allowlist_is_refused_before_import():
    with pytest.raises(ValueError, match=r"'os:system'.*\['prefopt\.rewards\.', 'user_rewards\.'\]"):
        single("custom", function="os:system")
    with pytest.raises(
        ValueError, match="outside the allowlist"
    ):  # a prefix is a package, not a string prefix
        resolve_callable("prefopt_evil.module:f", ["prefopt."])


def test_custom_reward_errors_name_what_is_missing():
    allowed = ["prefopt."]
    with pytest.raises(AttributeError, match="no attribute 'not_there'"):
        resolve_callable("prefopt.rewards.custom:not_there", allowed)
    with pytest.raises(ImportError, match="no module named 'prefopt.no_such_module'"):
        resolve_callable("prefopt.no_such_module:f", allowed)
    with pytest.raises(TypeError, match="not a callable"):
        resolve_callable("prefopt.rewards.oracle:NO_ORACLE", allowed)
    with pytest.raises(ValueError, match="not an import path"):
        resolve_callable("prefopt.rewards.custom:os.system()", allowed)


def test_oracle_without_a_ground_truth_raises_the_clear_error():
    with pytest.raises(ValueError, match=r"needs a dataset with a known ground truth \(dataset=synthetic\)"):
        build_aux_reward({"oracle": {}}, object())
    with pytest.raises(ValueError, match="dataset=synthetic"):
        build_aux_reward({"oracle": {}}, None)
    assert "dataset=synthetic" in NO_ORACLE


def test_oracle_asks_the_context():
    class Task:
        def oracle_reward(self, prompts, responses):
            return [float(y.count("+")) for y in responses]

    assert single("oracle", Task())(["", ""], ["++", "+"]) == [2.0, 1.0]


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"length": {"max_word": 3}}, "aux_reward.length.max_word"),
        ({"length": {"max_words": "many"}}, "aux_reward.length.max_words"),
        ({"length": {"sign": 2}}, "aux_reward.length.sign"),
        ({"keyword": {"mode": "all"}}, "aux_reward.keyword.mode"),
        ({"custom": {}}, "aux_reward.custom.function"),
        ({"toxicity": {}}, "aux_reward.toxicity"),
    ],
)
def test_invalid_config_names_the_key(cfg, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_aux_reward(cfg, None)


# --- the config files -----------------------------------------------------------------------------------


@pytest.fixture
def conf_dir(tmp_path):
    """A minimal primary config next to a copy of conf/aux_reward (conf/train.yaml is written elsewhere)."""
    shutil.copytree(CONF / "aux_reward", tmp_path / "aux_reward")
    (tmp_path / "config.yaml").write_text("defaults:\n  - aux_reward: none\n  - _self_\n")
    return str(tmp_path)


def compose_aux(conf_dir: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.to_container(cfg)["aux_reward"]


def test_every_registered_reward_has_a_config_file_and_back():
    assert {p.stem for p in (CONF / "aux_reward").glob("*.yaml")} == set(AUX_REWARDS) | {"none"}


def test_default_selects_no_reward(conf_dir):
    assert compose_aux(conf_dir, []) == {}


@pytest.mark.parametrize("name", sorted(AUX_REWARDS))
def test_each_config_file_lists_exactly_its_schema(conf_dir, name):
    composed = compose_aux(conf_dir, [f"aux_reward=[{name}]"])
    schema = OmegaConf.to_container(OmegaConf.structured(AUX_REWARDS[name].config))
    assert composed == {name: schema}
    assert composed[name]["weight"] == 1.0


def test_selected_rewards_compose_and_build_the_weighted_sum(conf_dir):
    """length weight 0.5 (max_words 64) + readability weight 1:
    SIMPLE has 6 words -> 0.5 * 6/64 + 1 * 1 = 1.046875; DENSE is a grade >= 9 text -> 0.5 * 23/64 + 0.
    """
    aux = compose_aux(conf_dir, ["aux_reward=[readability,length]", "aux_reward.length.weight=0.5"])
    assert set(aux) == {"readability", "length"}
    assert (aux["readability"]["weight"], aux["length"]["weight"]) == (1.0, 0.5)
    reward = build_aux_reward(aux, None)
    assert reward(["", ""], [SIMPLE, DENSE]) == pytest.approx([0.5 * 6 / 64 + 1.0, 0.5 * 23 / 64])


def test_custom_config_composes_with_a_function(conf_dir):
    aux = compose_aux(
        conf_dir,
        ["aux_reward=[custom]", "aux_reward.custom.function=prefopt.rewards.custom:example_word_count"],
    )
    assert build_aux_reward(aux, None)(["", ""], ["a b", "c"]) == [2.0, 1.0]
