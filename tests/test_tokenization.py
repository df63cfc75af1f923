"""Tokenization follows TRL's conventions, token by token: BOS once, EOS after plain text unless cut, the chat
template for conversational data, prompts cut from the left, every response token scored, even after an
empty prompt. Real chat templates (SmolLM2, Gemma 3, Llama 3) are in test_chat_templates.py."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_llama

from prefopt.data.batching import SequenceTable
from prefopt.models.logps import model_logps

WORDS = ["tell", "me", "about", "cats", "dogs", "the", "cat", "sat", "hi", "yes", "no", "user", "said"]
ROLES = ["<user>", "</user>", "<assistant>", "</assistant>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}> "
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def bos_tokenizer(chat_template: bool = False):
    """A word-level fast tokenizer that, like Llama's, puts <bos> in front when it adds special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *ROLES, *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        tokenizer.chat_template = TEMPLATE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sequence(table: SequenceTable, prompt, response: str) -> tuple[list[int], list[int]]:
    s = table.add(prompt, response)
    return table.prompt_ids[table.sequence_prompt[s]], table.response_ids[table.sequence_response[s]]


def test_bos_is_added_once_and_eos_ends_the_response():
    tokenizer = bos_tokenizer()
    table = SequenceTable(tokenizer, 32, 32)
    prompt, response = sequence(table, "tell me about cats", "the cat sat")
    assert prompt == [tokenizer.bos_token_id, *ids(tokenizer, "tell me about cats")]
    assert response == [*ids(tokenizer, "the cat sat"), tokenizer.eos_token_id]


def test_a_response_that_already_ends_with_eos_is_not_given_a_second():
    tokenizer = bos_tokenizer()
    _, response = sequence(SequenceTable(tokenizer, 32, 32), "tell me", "yes <eos>")
    assert response == [*ids(tokenizer, "yes"), tokenizer.eos_token_id]


def test_a_prompt_that_starts_with_bos_text_keeps_one_bos():
    tokenizer = bos_tokenizer()
    prompt, _ = sequence(SequenceTable(tokenizer, 32, 32), "<bos> tell me", "yes")
    assert prompt == [tokenizer.bos_token_id, *ids(tokenizer, "tell me")]


def test_cuts_keep_bos_take_the_prompt_from_the_left_and_drop_a_cut_responses_eos():
    tokenizer = bos_tokenizer()
    table = SequenceTable(tokenizer, max_prompt_tokens=3, max_response_tokens=2)
    prompt, response = sequence(table, "tell me about cats", "the cat sat")
    assert prompt == [tokenizer.bos_token_id, *ids(tokenizer, "about cats")]
    assert response == ids(tokenizer, "the cat")  # cut: no EOS, scored as unfinished
    _, fits = sequence(table, "tell me", "yes")
    assert fits == [*ids(tokenizer, "yes"), tokenizer.eos_token_id]
    assert (table.counts.prompts_cut, table.counts.responses_cut) == (1, 1)


def test_max_length_cuts_responses_after_the_prompt_and_drops_pairs_with_no_room():
    tokenizer = bos_tokenizer()
    table = SequenceTable(tokenizer, max_prompt_tokens=8, max_response_tokens=8, max_length=6)
    kept, _, chosen, _ = table.add_pairs(
        ["tell me about cats", "tell me about cats the cat sat"], ["the cat sat", "yes"], ["no", "no"]
    )
    assert kept == [0] and table.counts.pairs_dropped == 1 and table.counts.dropped_examples == [1]
    prompt = table.prompt_ids[table.sequence_prompt[chosen[0]]]
    response = table.response_ids[table.sequence_response[chosen[0]]]
    assert len(prompt) == 5 and response == ids(tokenizer, "the")  # 6 - 5 tokens of room, no EOS


@pytest.mark.parametrize("with_bos", [True, False])
def test_an_empty_prompt_still_leaves_every_response_token_scored(with_bos: bool):
    """The first response token needs a position that predicts it: BOS, or EOS without one."""
    if with_bos:
        tokenizer = bos_tokenizer()
    else:
        from prefopt.models import build_word_tokenizer

        tokenizer = build_word_tokenizer(WORDS)
    table = SequenceTable(tokenizer, 32, 32)
    prompt, response = sequence(table, "", "the cat")
    assert prompt == [tokenizer.bos_token_id if with_bos else tokenizer.eos_token_id]
    rows = table.pad(torch.tensor([0]))
    assert int(rows.response_tokens[0]) == len(response) == 3
    assert rows.response_mask[0, 1:].sum() == 3  # every response token has a predecessor position


def test_conversational_prompts_go_through_the_chat_template_without_a_second_bos():
    """The template writes {{ bos_token }} itself; the response is its assistant turn as the template closes
    it, with no EOS appended (TRL adds EOS to plain-text data only)."""
    tokenizer = bos_tokenizer(chat_template=True)
    table = SequenceTable(tokenizer, 64, 64)
    messages = [{"role": "user", "content": "tell me about cats"}]
    prompt, response = sequence(table, messages, "the cat sat")
    assert prompt == ids(tokenizer, "<bos> <user> tell me about cats </user> <assistant>")
    assert prompt.count(tokenizer.bos_token_id) == 1
    assert response == ids(tokenizer, "the cat sat </assistant>")
    assert table.prompt_texts[0].startswith("<bos><user>")


def test_conversational_prompts_without_a_template_are_joined_as_role_lines():
    tokenizer = bos_tokenizer()
    prompt, _ = sequence(SequenceTable(tokenizer, 64, 64), [{"role": "user", "content": "hi"}], "yes")
    assert prompt == [tokenizer.bos_token_id, *ids(tokenizer, "user: hi\nassistant: ")]


def test_sequence_logps_equal_a_hand_built_bos_prompt_response_eos_sequence(tmp_path):
    """A tiny Llama saved and reloaded with from_pretrained, with a tokenizer that adds BOS: prefopt's
    response log-prob equals the sum over a hand-built [BOS, prompt, response, EOS] sequence's response
    positions, to float32 rounding: prefopt sums T float32 terms of ~3 (its head and log-softmax are not
    the full forward's), ~T * 3 * 2^-24 apart, so 1e-5 relative."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_tiny_llama(tmp_path, bos_tokenizer())
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    table = SequenceTable(tokenizer, 32, 32)
    s = table.add("tell me about dogs", "yes the dog")  # "dog" is unknown: <unk>
    with torch.no_grad():
        got = model_logps(model, table.pad(torch.tensor([s])))[0]
        prompt = [tokenizer.bos_token_id, *ids(tokenizer, "tell me about dogs")]
        response = [*ids(tokenizer, "yes the dog"), tokenizer.eos_token_id]
        logits = model(torch.tensor([prompt + response])).logits[0].double().log_softmax(-1)
        expected = sum(logits[len(prompt) - 1 + t, token] for t, token in enumerate(response))
    assert float(got) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
