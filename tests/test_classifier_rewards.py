"""Classifier rewards on tiny random classifiers saved locally: each score against a direct forward."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config, run_training, save_tiny_llama

from prefopt.config import load_run_config
from prefopt.models import build_word_tokenizer
from prefopt.rewards import AUX_REWARDS, build_aux_reward, score_responses
from prefopt.rewards.base import validate_config

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "you",
    "are",
    "awful",
    "and",
    "kind",
    "good",
    "bad",
    "dog",
    "ran",
]
LABELS = ["toxic", "insult", "threat"]
TEXTS = ["the cat sat", "you are awful and bad", "good dog", "a", "the dog ran on the mat and sat"]
PROMPTS = ["the cat", "a dog", "you are", "on a mat", "kind"]
CHAT = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}<eos>"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A 1-layer width-16 BERT with three labels over a word tokenizer: toxicity and sentiment."""
    from transformers import BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_word_tokenizer(WORDS)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_rm_dir(tmp_path_factory):
    """A 2-layer width-32 Llama with one logit and a chat template: a reward model."""
    from transformers import LlamaForSequenceClassification

    tokenizer = build_word_tokenizer(WORDS + ["<user>", "<assistant>"])
    tokenizer.chat_template = CHAT
    directory = tmp_path_factory.mktemp("tiny-rm")
    return save_tiny_llama(
        directory,
        tokenizer,
        seed=1,
        head=LlamaForSequenceClassification,
        num_labels=1,
        max_position_embeddings=64,
    )


def build(name: str, **fields):
    entry = AUX_REWARDS[name]
    return entry.build(validate_config(name, entry.config, fields), None)


def direct_logits(directory, *texts) -> torch.Tensor:
    """One text (or text pair) at a time, no padding: (K,) logits."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(**tokenizer(*texts, return_tensors="pt")).logits[0]


def count_forwards(reward) -> list[int]:
    calls = [0]
    reward.classifier.model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_toxicity_is_one_minus_the_max_sigmoid_over_labels(bert_dir):
    """r = 1 - max_k sigmoid(z_k), z from a direct forward of each text alone."""
    reward = build("toxicity", model=str(bert_dir))
    expected = [1 - torch.sigmoid(direct_logits(bert_dir, t)).max().item() for t in TEXTS]
    assert reward(PROMPTS, TEXTS) == pytest.approx(expected, abs=1e-5)


def test_toxicity_labels_select_the_max_over_a_subset(bert_dir):
    reward = build("toxicity", model=str(bert_dir), labels=["Insult", "threat"])
    expected = [1 - torch.sigmoid(direct_logits(bert_dir, t)[1:]).max().item() for t in TEXTS]
    assert reward(PROMPTS, TEXTS) == pytest.approx(expected, abs=1e-5)


def test_prompt_plus_response_scores_the_joined_text(bert_dir):
    reward = build("toxicity", model=str(bert_dir), text="prompt+response")
    joined = [f"{p}\n{y}" for p, y in zip(PROMPTS, TEXTS)]
    expected = [1 - torch.sigmoid(direct_logits(bert_dir, t)).max().item() for t in joined]
    assert reward(PROMPTS, TEXTS) == pytest.approx(expected, abs=1e-5)


def test_sentiment_is_the_softmax_of_the_positive_label_or_its_log_odds(bert_dir):
    """p = exp(z_k) / sum_j exp(z_j); log-odds = z_k - log sum_{j != k} exp(z_j)."""
    logits = torch.stack([direct_logits(bert_dir, t) for t in TEXTS])  # (N, 3)
    probability = build("sentiment", model=str(bert_dir), positive="insult")
    assert probability(PROMPTS, TEXTS) == pytest.approx(logits.softmax(-1)[:, 1].tolist(), abs=1e-5)
    by_index = build("sentiment", model=str(bert_dir), positive="2")
    assert by_index(PROMPTS, TEXTS) == pytest.approx(logits.softmax(-1)[:, 2].tolist(), abs=1e-5)
    log_odds = build("sentiment", model=str(bert_dir), positive="toxic", score="logit_diff")
    expected = logits[:, 0] - logits[:, 1:].logsumexp(-1)
    assert log_odds(PROMPTS, TEXTS) == pytest.approx(expected.tolist(), abs=1e-5)


def test_reward_model_reads_the_chat_template_by_default(llama_rm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_rm_dir)
    reward = build("reward_model", model=str(llama_rm_dir))
    expected = []
    for p, y in zip(PROMPTS, TEXTS):
        text = f"<user> {p} <assistant> {y} <eos>"
        chat = [{"role": "user", "content": p}, {"role": "assistant", "content": y}]
        assert tokenizer.apply_chat_template(chat, tokenize=False) == text
        expected.append(direct_logits(llama_rm_dir, text)[0].item())
    assert reward(PROMPTS, TEXTS) == pytest.approx(expected, abs=1e-5)


def test_reward_model_pair_and_concat_formats(bert_dir):
    pair = build("reward_model", model=str(bert_dir), format="pair", index=2)
    expected = [direct_logits(bert_dir, p, y)[2].item() for p, y in zip(PROMPTS, TEXTS)]
    assert pair(PROMPTS, TEXTS) == pytest.approx(expected, abs=1e-5)
    concat = build("reward_model", model=str(bert_dir), format="concat", separator=" and ")
    expected = [direct_logits(bert_dir, f"{p} and {y}")[0].item() for p, y in zip(PROMPTS, TEXTS)]
    assert concat(PROMPTS, TEXTS) == pytest.approx(expected, abs=1e-5)
    assert build("reward_model", model=str(bert_dir), format="auto").classifier.add_special_tokens  # pair


@pytest.mark.parametrize("directory", ["bert_dir", "llama_rm_dir"])
def test_batched_length_sorted_scores_equal_one_by_one(directory, request):
    path = str(request.getfixturevalue(directory))
    batched = build("reward_model", model=path, batch_size=2)
    one_by_one = build("reward_model", model=path, batch_size=1)
    single = [one_by_one([p], [y])[0] for p, y in zip(PROMPTS, TEXTS)]
    assert batched(PROMPTS, TEXTS) == pytest.approx(single, abs=1e-5)


def test_the_cache_forwards_each_text_once_across_calls(bert_dir):
    reward = build("toxicity", model=str(bert_dir), batch_size=2)
    calls = count_forwards(reward)
    first = reward(PROMPTS, TEXTS)
    assert calls[0] == 3  # 5 distinct texts in batches of 2
    assert reward(PROMPTS[::-1], TEXTS[::-1]) == first[::-1]
    assert reward(["x"] * 2, [TEXTS[0]] * 2) == [first[0]] * 2  # text=response: the prompt is not read
    assert calls[0] == 3
    reward(["x"], ["the mat"])
    assert calls[0] == 4


def test_score_responses_through_the_composite(bert_dir):
    composite = build_aux_reward({"toxicity": {"model": str(bert_dir), "weight": 0.5}})
    scores = score_responses(composite.components["toxicity"], PROMPTS * 2, TEXTS * 2, progress=False)
    assert scores.tolist() == pytest.approx(composite.components["toxicity"](PROMPTS, TEXTS) * 2)
    assert composite.combine({"toxicity": scores}).tolist() == pytest.approx((0.5 * scores).tolist())


@pytest.mark.parametrize(
    ("name", "fields", "key"),
    [
        ("toxicity", {"batch_size": 0}, "aux_reward.toxicity.batch_size"),
        ("toxicity", {"text": "prompt"}, "aux_reward.toxicity.text"),
        ("toxicity", {"labels": []}, "aux_reward.toxicity.labels"),
        ("toxicity", {"max_length": 0}, "aux_reward.toxicity.max_length"),
        ("sentiment", {"dtype": "int8"}, "aux_reward.sentiment.dtype"),
        ("sentiment", {"score": "odds"}, "aux_reward.sentiment.score"),
        ("reward_model", {"format": "xml"}, "aux_reward.reward_model.format"),
        ("reward_model", {"device": "tpu"}, "aux_reward.reward_model.device"),
        ("reward_model", {"batch_size": "many"}, "aux_reward.reward_model.batch_size"),
    ],
)
def test_config_errors_name_the_field(name, fields, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate_config(name, AUX_REWARDS[name].config, fields)


def test_build_errors_name_the_field(bert_dir, tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match=r"aux_reward\.toxicity\.model=.*does not exist") as error:
        build("toxicity", model=str(missing))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"aux_reward\.sentiment\.model"):
        build("sentiment", model=str(tmp_path))  # a directory, but no checkpoint in it
    with pytest.raises(ValueError, match=r"aux_reward\.toxicity\.labels.*'obscene'"):
        build("toxicity", model=str(bert_dir), labels=["obscene"])
    with pytest.raises(ValueError, match=r"aux_reward\.sentiment\.positive"):
        build("sentiment", model=str(bert_dir))  # POSITIVE is not one of the tiny model's labels
    with pytest.raises(ValueError, match=r"aux_reward\.reward_model\.index"):
        build("reward_model", model=str(bert_dir), index=3)
    with pytest.raises(ValueError, match=r"aux_reward\.reward_model\.format=chat"):
        build("reward_model", model=str(bert_dir), format="chat")


@pytest.mark.parametrize("name", ["toxicity", "sentiment", "reward_model"])
def test_each_yaml_composes_next_to_readability(name, bert_dir):
    rc = load_run_config(
        compose_config(f"aux_reward=[readability,{name}]", f"aux_reward.{name}.model={bert_dir}")
    )
    assert set(rc.aux_reward) == {"readability", name}
    assert rc.aux_reward[name]["model"] == str(bert_dir)
    defaults = load_run_config(compose_config(f"aux_reward={name}")).aux_reward[name]
    assert defaults["model"] == AUX_REWARDS[name].config().model  # the yaml and the schema agree


def test_hpo_trains_two_steps_with_the_toxicity_classifier(bert_dir, tmp_path):
    summary = run_training(
        tmp_path / "run",
        "objective=hpo",
        "aux_reward=toxicity",
        f"aux_reward.toxicity.model={bert_dir}",
        "aux_reward.toxicity.device=cpu",
        "trainer.max_steps=2",
        "eval.eval_every_steps=2",
    )
    assert summary["status"] == "completed"
    assert 0 < summary["final_eval"]["eval/aux_reward/toxicity"] < 1  # R2 in (0, 1), logged on its own
