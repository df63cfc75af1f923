"""The DPO throughput benchmark's inputs (benchmarks/dpo_data.py): lengths in range, token counts equal to
what the tokenizer gives through prefopt's tokenization and through TRL's recipe, and both tools handed the
same rows in the same batches. Needs no trl."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_dpo_data():
    spec = importlib.util.spec_from_file_location("dpo_data", ROOT / "benchmarks" / "dpo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["dpo_data"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


dpo_data = _load_dpo_data()
SHAPE = dpo_data.SHAPES["cpu"]
STEPS = 5


def _trl_tokens(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """TRL 1.x DPOTrainer's recipe for text rows: EOS appended to each completion's text, prompt and prompt +
    completion tokenized, the completion starting where the two diverge."""
    prompt = tokenizer(row["prompt"])["input_ids"]
    sides = []
    for name in ("chosen", "rejected"):
        whole = tokenizer(row["prompt"] + row[name] + tokenizer.eos_token)["input_ids"]
        assert whole[: len(prompt)] == prompt
        sides.append(whole[len(prompt) :])
    return prompt, *sides


@pytest.mark.parametrize("lengths", dpo_data.LENGTHS)
def test_lengths_in_range(lengths):
    pairs = dpo_data.make_pairs(SHAPE, lengths, 200, seed=0)
    low, high = SHAPE.prompt_range(lengths)
    assert all(low <= len(p.prompt) <= high for p in pairs)
    low, high = SHAPE.completion_range(lengths)
    for pair in pairs:
        for completion in (pair.chosen, pair.rejected):
            assert low <= len(completion) <= high
            assert completion[-1] == dpo_data.eos_id(SHAPE)
            assert all(0 <= t < dpo_data.pad_id(SHAPE) for t in completion[:-1])
        assert pair.chosen != pair.rejected
        assert pair.tokens == 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
    if lengths == "variable":  # the ranges are used, not one length
        assert len({len(p.prompt) for p in pairs}) > 50
        assert min(len(p.chosen) for p in pairs) < 20 and max(len(p.chosen) for p in pairs) > 110
    assert dpo_data.make_pairs(SHAPE, lengths, 200, seed=0) == pairs  # seeded
    assert dpo_data.make_pairs(SHAPE, lengths, 200, seed=1) != pairs


@pytest.mark.parametrize("lengths", dpo_data.LENGTHS)
def test_both_tools_tokenize_the_rows_to_the_pairs(tmp_path, lengths):
    """prefopt (its preference loader and token table, as `prefopt train dataset=preference` reads the files)
    and TRL's recipe give every pair's ids, so the real-token counts hold for both."""
    from prefopt.data.batching import SequenceTable
    from prefopt.data.preference import PreferenceFileConfig, load_preference

    tokenizer = dpo_data.word_tokenizer(SHAPE)
    train = dpo_data.make_pairs(SHAPE, lengths, STEPS * SHAPE.pairs_per_step)
    dpo_data.write_dataset(tmp_path, train, dpo_data.make_pairs(SHAPE, lengths, 1, seed=1))
    text = load_preference(PreferenceFileConfig(path=str(tmp_path)), seed=0)
    table = SequenceTable(tokenizer, 2 * SHAPE.prompt_tokens, 2 * SHAPE.completion_tokens)
    kept, _, chosen, rejected = table.add_pairs(text.train.prompts, text.train.chosen, text.train.rejected)
    assert kept == list(range(len(train)))  # every pair, in file order
    for pair, c, r in zip(train, chosen, rejected):
        ids = [
            (table.prompt_ids[table.sequence_prompt[s]], table.response_ids[table.sequence_response[s]])
            for s in (c, r)
        ]
        assert ids == [(pair.prompt, pair.chosen), (pair.prompt, pair.rejected)]
    for pair in train:
        assert _trl_tokens(tokenizer, dpo_data.row(pair)) == (pair.prompt, pair.chosen, pair.rejected)
    assert int(table.lengths()[: 2 * len(train)].sum()) == sum(p.tokens for p in train)


def test_trl_rows_are_prefopts_batches_in_order():
    """TRL reads its rows in order, B per step: they are the pairs prefopt's sampler draws, step by step."""
    from prefopt.data.sampler import PairSampler

    train = dpo_data.make_pairs(SHAPE, "variable", STEPS * SHAPE.pairs_per_step)
    order = dpo_data.batch_order(len(train), SHAPE.pairs_per_step, STEPS, seed=3)
    sampler = PairSampler(len(train), SHAPE.pairs_per_step, 3)  # as the loop builds it: seed = the run's
    assert order == [sampler.next().tolist() for _ in range(STEPS)]
    assert sorted(i for step in order for i in step) == list(range(len(train)))  # one epoch
    rows = dpo_data.trl_rows(train, order)
    batches = [rows[k * SHAPE.pairs_per_step : (k + 1) * SHAPE.pairs_per_step] for k in range(STEPS)]
    assert batches == [[dpo_data.row(train[i]) for i in step] for step in order]
    assert dpo_data.step_tokens(train, order) == [sum(train[i].tokens for i in step) for step in order]


def test_step_flops_count_matmuls_and_attention():
    train = dpo_data.make_pairs(SHAPE, "fixed", 2 * SHAPE.pairs_per_step)
    order = [list(range(8)), list(range(8, 16))]
    flops = dpo_data.step_flops(SHAPE, train, order)
    assert flops[0] == flops[1]  # fixed lengths: equal steps
    d, n = SHAPE.hidden_size, SHAPE.prompt_tokens + SHAPE.completion_tokens
    matmul = SHAPE.num_layers * (4 * d * d + 3 * d * SHAPE.intermediate_size) + SHAPE.vocab_size * d
    assert flops[0] == 16 * (6 * matmul * n + 6 * SHAPE.num_layers * d * n * n)


def test_saved_model_is_the_cpu_shape(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = dpo_data.save_random_llama(SHAPE, tmp_path, seed=0)
    assert 5.4e6 < params < 5.6e6
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == params
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer("t5 t7")["input_ids"] == [5, 7]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (8190, 8191, None)


def test_chat_pairs_are_the_ids_prefopt_and_trl_give_the_real_smollm2_conversations(tmp_path):
    """`--model smollm2`'s chat pairs: messages rows that prefopt's preference loader and token table turn
    into exactly the ids TRL's recipe gives (the generation prompt; the completion through the template's
    end of turn, no EOS after it), so both tools train on the same tokens."""
    from test_chat_templates import smollm2

    from prefopt.data.batching import SequenceTable
    from prefopt.data.preference import PreferenceFileConfig, load_preference

    tokenizer = smollm2()
    train = dpo_data.make_chat_pairs(SHAPE, "variable", 12, tokenizer, seed=0)
    assert train == dpo_data.make_chat_pairs(SHAPE, "variable", 12, tokenizer, seed=0)  # seeded
    dpo_data.write_dataset(tmp_path, train, dpo_data.make_chat_pairs(SHAPE, "variable", 1, tokenizer, seed=1))
    text = load_preference(PreferenceFileConfig(path=str(tmp_path)), seed=0)
    table = SequenceTable(tokenizer, 4 * SHAPE.prompt_tokens, 4 * SHAPE.completion_tokens)
    kept, _, chosen, rejected = table.add_pairs(text.train.prompts, text.train.chosen, text.train.rejected)
    assert kept == list(range(len(train)))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for pair, c, r in zip(train, chosen, rejected):
        got = [
            (table.prompt_ids[table.sequence_prompt[s]], table.response_ids[table.sequence_response[s]])
            for s in (c, r)
        ]
        assert got == [(pair.prompt, pair.chosen), (pair.prompt, pair.rejected)]
        for completion in (pair.chosen, pair.rejected):
            assert completion.count(end_of_turn) == 1 and completion[-2] == end_of_turn  # then "\n"


def test_sampled_pairs_with_turns_are_conversations_answered_by_the_model(tmp_path):
    """`sample_chat_pairs.py --turns 3`: each prompt is 1-3 user turns, user and assistant alternating and
    ending with the user, every earlier answer the model's; the pair is two different answers to the last
    turn. Seeded: the same arguments write the same file. `--turns 1` keeps one user message per prompt."""
    from conftest import save_tiny_llama
    from test_tokenization import bos_tokenizer

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sample_chat_pairs

    model = save_tiny_llama(tmp_path / "model", bos_tokenizer(chat_template=True))
    common = ["--model", str(model), "--pairs", "12", "--max-new-tokens", "5", "--threads", "1"]

    def written(name: str, *extra: str) -> list[dict]:
        sample_chat_pairs.main([*common, *extra, "--out", str(tmp_path / name)])
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    deep = written("deep.jsonl", "--turns", "3")
    assert written("again.jsonl", "--turns", "3") == deep
    user_turns = []
    for row in deep:
        roles = [message["role"] for message in row["prompt"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert all(message["content"].strip() for message in row["prompt"])
        user_turns.append(roles.count("user"))
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert set(user_turns) <= {1, 2, 3} and len(set(user_turns)) > 1
    assert {len(row["prompt"]) for row in written("flat.jsonl")} == {1}
