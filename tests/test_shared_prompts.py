"""Shared prompts: one row of prompt groups, each prompt computed once and attended to by all its responses.
The same log-probs, gradients, token KL and value-head inputs as padded rows, on every architecture that
takes it; no attention between sibling responses or between groups; plain sdpa everywhere else
(generation, exported configs); models it would not be exact for keep packed rows or padding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import torch_threads
from test_logps import GRADS_CLOSE, LOGPS_CLOSE, ROWS, naive_logps, perturbed, table_of, tiny_model
from test_packing import (
    ARCHITECTURES,
    HIDDEN_CLOSE,
    KL_CLOSE,
    MORE_ROWS,
    logps_and_grads,
    opt_model,
    packed_table,
    qwen2_model,
)

import prefopt.models.shared_prompt_attention as attention
from prefopt.data.layout import Packing
from prefopt.data.packing import prompt_group_passes, share_prompts
from prefopt.engine.reference import all_sequence_logps as _all_sequence_logps
from prefopt.models.logps import hidden_states, model_logps, token_kl
from prefopt.models.packing_support import supports_packing
from prefopt.models.shared_prompt_attention import IMPLEMENTATION
from prefopt.models.value_head import last_prompt_hidden

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def qwen2_gqa_model(tokenizer):
    """Grouped-query attention on sdpa (2 query heads per key head): the groups' masked calls repeat keys."""
    torch.manual_seed(0)
    return qwen2_model(tokenizer, "sdpa", heads=4, kv_heads=2).float()


def sdpa_model(arch: str):
    model, tokenizer = tiny_model()
    builders = {name: build for name, build in ARCHITECTURES.items() if name != "qwen2_eager"}
    builders |= {"qwen2_gqa": qwen2_gqa_model, "opt": opt_model}
    if builders[arch] is not None:
        torch.manual_seed(0)
        model = builders[arch](tokenizer).float()
    return model, tokenizer


# ---- the layout --------------------------------------------------------------------------------------


def test_each_prompt_appears_once_followed_by_its_responses_with_positions_continuing_the_prompt():
    """ROWS' sequences 1 and 3 share the prompt "tell me" (2 tokens; this tokenizer adds no BOS): their
    group is the prompt once, then "dog EOS" at positions 2-3, then "the cat sat EOS" at positions 2-5."""
    _, tokenizer = tiny_model()
    table, ids = table_of(tokenizer)
    rows = table.pad(ids)
    shared = share_prompts(rows)
    lengths, prompts = rows.attention_mask.sum(-1), rows.prompt_lengths
    assert shared.input_ids.shape == (1, int(lengths.sum() - prompts[3]))  # no padding, prompt 1 once
    assert shared.segments == ((4, (4,)), (2, (2, 4)), (6, (8,)), (4, (2,)))
    assert sum(p + sum(r) for p, r in shared.segments) == shared.input_ids.shape[1]
    assert int(shared.sequence_start[1]) == int(shared.sequence_start[3])
    start, prompt = int(shared.sequence_start[3]), int(prompts[3])
    assert shared.position_ids[0, start : start + prompt + 6].tolist() == [0, 1, 2, 3, 2, 3, 4, 5]
    for i in range(len(ids)):
        row_ids = rows.input_ids[i, : int(lengths[i])].tolist()
        at, response = int(shared.response_starts[i]), int(shared.response_tokens[i])
        own = shared.input_ids[
            0, int(shared.sequence_start[i]) : int(shared.sequence_start[i]) + int(prompts[i])
        ]
        assert own.tolist() + shared.input_ids[0, at : at + response].tolist() == row_ids
        assert shared.response_mask[0, at : at + response].all()
    assert int(shared.response_mask.sum()) == int(rows.response_mask.sum())


def test_prompt_group_passes_keep_a_prompts_responses_together_and_cost_its_prompt_once():
    """Sequences (prompt, length, prompt length): 0 (p1, 6, 4), 1 (p0, 5, 3), 2 (p1, 7, 4), 3 (p0, 4, 3),
    4 (p2, 9, 2); 12 tokens per pass. By prompt: p0 = 1 (5) + 3 (4 - 3 = 1) = 6; p1's 0 (6) makes 12;
    p1's 2 adds 3 > 12: new pass, 2 (7); p2's 4 (9) > 12 - 7: new pass."""
    prompts, lengths, prompt_lengths = (
        torch.tensor(v) for v in ([1, 0, 1, 0, 2], [6, 5, 7, 4, 9], [4, 3, 4, 3, 2])
    )
    passes = prompt_group_passes(prompts, lengths, prompt_lengths, 12)
    assert [p.tolist() for p in passes] == [[1, 3, 0], [2], [4]]


# ---- the same numbers as padding ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "qwen2_gqa", "opt"])
def test_shared_prompt_logps_and_gradients_equal_padded_ones(arch):
    model, tokenizer = sdpa_model(arch)
    _, ids, rows = packed_table(tokenizer)
    assert supports_packing(model, CPU).shares_prompts
    assert model.config._attn_implementation == IMPLEMENTATION
    shared = Packing().arrange(rows, model, CPU)
    assert shared.segments is not None and shared.input_ids.shape[1] < int(rows.attention_mask.sum())
    weights = torch.linspace(-1.0, 2.0, len(ids))
    padded_logps, padded_grads = logps_and_grads(model, rows, weights)
    shared_logps, shared_grads = logps_and_grads(model, shared, weights)
    torch.testing.assert_close(shared_logps, padded_logps, **LOGPS_CLOSE)  # other sdpa calls: rounding
    assert shared_grads.keys() == padded_grads.keys()
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], **GRADS_CLOSE, msg=name)


def test_shared_prompt_logps_equal_a_naive_loop_over_each_sequence():
    model, tokenizer = tiny_model()
    _, _, rows = packed_table(tokenizer)
    expected = torch.stack([naive_logps(model, tokenizer, p, r) for p, r in MORE_ROWS])
    torch.testing.assert_close(Packing().logps(model, rows), expected, **LOGPS_CLOSE)


def test_a_response_sees_neither_its_siblings_nor_other_groups():
    """Changing one response (same length, other words) changes its own log-prob only: not its sibling's
    (same prompt, same group) and not any other group's, bit for bit: the groups are the same, so every
    op on the other responses' tokens is the same computation on the same values."""
    model, tokenizer = tiny_model()
    supports_packing(model, CPU)
    changed = list(ROWS)
    changed[1] = ("tell me", "cat")  # sequence 3 shares its prompt and comes after it in the group
    with torch.no_grad():
        table, ids = table_of(tokenizer)
        rows_before = share_prompts(table.pad(ids))
        table, ids = table_of(tokenizer, changed)
        rows_after = share_prompts(table.pad(ids))
        before, after = model_logps(model, rows_before), model_logps(model, rows_after)
    assert rows_before.segments == rows_after.segments  # the same layout, so exact is guaranteed
    assert torch.equal(rows_before.sequence_start, rows_after.sequence_start)
    assert torch.equal(before[[0, 2, 3, 4]], after[[0, 2, 3, 4]])
    assert (before[1] - after[1]).abs() > 1e-3


def test_token_kl_and_last_prompt_hidden_agree_shared_and_padded():
    reference, tokenizer = tiny_model()
    policy = perturbed(reference)
    _, _, rows = packed_table(tokenizer)
    supports_packing(policy, CPU)
    shared = share_prompts(rows)
    with torch.no_grad():
        hidden = {"padded": hidden_states(policy, rows), "shared": hidden_states(policy, shared)}
        reference_hidden = hidden_states(reference, rows)
    head, reference_head = policy.get_output_embeddings(), reference.get_output_embeddings()
    padded_kl = token_kl(head, hidden["padded"], reference_head, reference_hidden, rows, 3)
    mixed_kl = token_kl(head, hidden["shared"], reference_head, reference_hidden, shared, 3, rows)
    torch.testing.assert_close(mixed_kl, padded_kl, **KL_CLOSE)
    which = torch.arange(len(MORE_ROWS))
    lengths = rows.prompt_lengths
    padded_at = last_prompt_hidden(hidden["padded"], lengths, which)
    shared_at = last_prompt_hidden(hidden["shared"], lengths, shared.sequence_row, shared.sequence_start)
    torch.testing.assert_close(shared_at, padded_at, **HIDDEN_CLOSE)


def test_the_reference_pass_groups_prompts_and_matches_padding():
    model, tokenizer = tiny_model()
    table, _, rows = packed_table(tokenizer)
    with torch.no_grad():
        expected = model_logps(model, rows)
    shared = _all_sequence_logps(model, table, 2048, CPU, Packing(), rows_per_pass=2)
    torch.testing.assert_close(shared, expected, **LOGPS_CLOSE)


# ---- sdpa everywhere else; where it does not apply ---------------------------------------------------


def test_generation_and_exported_configs_are_plain_sdpa(tmp_path):
    model, tokenizer = tiny_model()
    prompt = torch.tensor([tokenizer.convert_tokens_to_ids(["tell", "me", "about", "a"])])
    with torch.no_grad():
        before = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert supports_packing(model, CPU).shares_prompts
        after = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)  # exact: without segments the switched attention is the same sdpa call
    model.save_pretrained(tmp_path)
    assert IMPLEMENTATION not in (tmp_path / "config.json").read_text()
    assert "prefopt" not in json.dumps(json.loads((tmp_path / "config.json").read_text()))


def test_a_compiled_decoder_gets_packed_rows_not_groups():
    model, tokenizer = tiny_model()
    _, _, rows = packed_table(tokenizer)
    assert Packing().arrange(rows, model, CPU).segments is not None
    compiled = Packing(width_multiple=64).arrange(rows, model, CPU)
    assert compiled.segments is None and compiled.input_ids.shape[1] == 64
    assert Packing(share_prompts=False).arrange(rows, model, CPU).segments is None


def test_eager_attention_and_sliding_windows_are_not_switched():
    from test_packing import qwen2_eager_model
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer = tiny_model()
    eager = qwen2_eager_model(tokenizer)
    support = supports_packing(eager, CPU)
    assert support.layout == "rows" and not support.shares_prompts
    assert eager.config._attn_implementation == "eager"
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        sliding_window=4,
        attn_implementation="sdpa",
    )
    windowed = MistralForCausalLM(config)
    assert not supports_packing(windowed, CPU).shares_prompts
    assert windowed.config._attn_implementation == "sdpa"


def _causal_over_the_row(module, query, key, value, attention_mask, shared_prompt_segments=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def _segments_never_arrive(module, query, key, value, attention_mask, shared_prompt_segments=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # the placeholder


@pytest.mark.parametrize("broken", [_causal_over_the_row, _segments_never_arrive])
def test_a_model_that_fails_the_group_probe_goes_back_to_sdpa(monkeypatch, broken):
    """If the attention layers let groups see each other (the segments ignored and plain causal sdpa over
    the whole row; or a decoder that never passes them down, so sdpa reads the (1, 1, 1, 1) placeholder
    mask and attends everywhere), the probe catches it: the model goes back to sdpa and packs rows."""
    monkeypatch.setattr(attention, "shared_prompt_attention", broken)
    model, _ = tiny_model()
    try:
        support = supports_packing(model, CPU)
    finally:
        monkeypatch.undo()
        attention._register()  # the real one again, for every model switched after this test
    assert not support.shares_prompts and support.layout == "rows"
    assert model.config._attn_implementation == "sdpa"


def test_a_one_token_sibling_response_under_grouped_query_attention():
    """A later response of one token is a one-query attention call, which sdpa handles apart for grouped
    keys: prompt [1 5 6] with responses [7 8] and [9], and prompt [2 3] with [4], as padded rows."""
    from prefopt.data.batching import PaddedSequences

    _, tokenizer = tiny_model()
    model = qwen2_gqa_model(tokenizer)
    sequences, prompts = [[1, 5, 6, 7, 8], [1, 5, 6, 9], [2, 3, 4]], [3, 3, 2]
    ids = torch.zeros(3, 5, dtype=torch.long)
    mask, response_mask = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, sequence in enumerate(sequences):
        ids[i, : len(sequence)], mask[i, : len(sequence)] = torch.tensor(sequence), 1
        response_mask[i, prompts[i] : len(sequence)] = True
    rows = PaddedSequences(ids, mask, response_mask, torch.tensor(prompts))
    shared = Packing().arrange(rows, model, CPU)
    assert shared.segments == ((3, (2, 1)), (2, (1,)))
    with torch.no_grad():
        torch.testing.assert_close(model_logps(model, shared), model_logps(model, rows), **LOGPS_CLOSE)
