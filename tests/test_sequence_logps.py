"""Response log-probs: chunked, padded, deduplicated batches equal a naive per-token loop."""

from __future__ import annotations

import copy

import pytest
import torch

from prefopt.data.batching import PairSplit, SequenceTable, make_batch
from prefopt.logps import hidden_states, model_logps, token_kl
from prefopt.modeling import TinyModelConfig, build_tiny

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


@pytest.fixture
def model_and_rows():
    torch.manual_seed(0)
    model, tokenizer = build_tiny(
        TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), WORDS
    )
    table = SequenceTable(tokenizer, max_prompt_tokens=16, max_response_tokens=16)
    texts = [
        ("a b", "c"),
        ("a b c d", "e f g h"),
        ("h", "a b c"),
        ("b c d", "d"),
    ]  # different lengths: padding
    ids = torch.tensor([table.add(p, r) for p, r in texts])
    return model, table, table.pad(ids), texts


def naive_logps(model, table: SequenceTable, prompt: str, response: str) -> torch.Tensor:
    """sum over response tokens (EOS included) of log softmax(logits at t-1)[token t], one unpadded row."""
    prompt_ids = table.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = table.tokenizer(response, add_special_tokens=False)["input_ids"] + [
        table.tokenizer.eos_token_id
    ]
    ids = torch.tensor([prompt_ids + response_ids])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(logp[len(prompt_ids) + i - 1, token] for i, token in enumerate(response_ids))


def test_padded_batch_logps_equal_the_naive_loop(model_and_rows):
    model, table, rows, texts = model_and_rows
    assert rows.attention_mask.sum(-1).tolist() != [rows.input_ids.shape[1]] * len(texts)  # padding present
    batched = model_logps(model, rows)
    for i, (prompt, response) in enumerate(texts):
        torch.testing.assert_close(
            batched[i], naive_logps(model, table, prompt, response), atol=1e-5, rtol=1e-5
        )


def test_response_mask_marks_exactly_the_response_tokens(model_and_rows):
    _, _, rows, texts = model_and_rows
    assert rows.response_tokens.tolist() == [len(r.split()) + 1 for _, r in texts]  # + EOS
    assert rows.prompt_lengths.tolist() == [len(p.split()) for p, _ in texts]


@pytest.mark.parametrize("chunk_tokens", [1, 3])
def test_chunking_changes_neither_values_nor_gradients(model_and_rows, chunk_tokens):
    model, _, rows, _ = model_and_rows
    whole = model_logps(model, rows, chunk_tokens=10_000)
    (whole * torch.arange(1.0, 5.0)).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked = model_logps(model, rows, chunk_tokens=chunk_tokens)
    (chunked * torch.arange(1.0, 5.0)).sum().backward()
    torch.testing.assert_close(chunked, whole)
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_token_kl_equals_the_full_vocabulary_sum_and_vanishes_at_the_reference(model_and_rows):
    model, _, rows, _ = model_and_rows
    reference = copy.deepcopy(model).requires_grad_(False)
    head, ref_head = model.get_output_embeddings(), reference.get_output_embeddings()
    at_start = token_kl(head, hidden_states(model, rows), ref_head, hidden_states(reference, rows), rows, 2)
    torch.testing.assert_close(at_start, torch.zeros(4), atol=1e-6, rtol=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = token_kl(head, hidden_states(model, rows), ref_head, hidden_states(reference, rows), rows, 2)
    # naive: sum over response-predicting positions t of sum_v p_ref(v) (log p_ref(v) - log p_theta(v))
    log_p = torch.log_softmax(model(rows.input_ids, attention_mask=rows.attention_mask).logits, -1)
    log_q = torch.log_softmax(reference(rows.input_ids, attention_mask=rows.attention_mask).logits, -1)
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)[:, :-1]  # position t predicts token t+1
    naive = (per_position * rows.response_mask[:, 1:]).sum(-1)
    torch.testing.assert_close(kl, naive, atol=1e-5, rtol=1e-4)
    assert (kl > 0).all()
    kl.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in reference.parameters())


def test_a_batch_forwards_each_distinct_sequence_once(model_and_rows):
    _, table, _, _ = model_and_rows
    a, b, c = table.add("a", "b"), table.add("a", "c"), table.add("b", "c")
    split = PairSplit(
        torch.tensor([a, a, c]), torch.tensor([b, b, a]), torch.ones(3), torch.tensor([0, 0, 1])
    )
    batch = make_batch(table, split, torch.arange(3), None, with_mismatched=False)
    assert len(batch.sequence_ids) == 3 < 2 * 3
    assert batch.sequence_ids[batch.chosen_rows].tolist() == [a, a, c]
    assert batch.sequence_ids[batch.rejected_rows].tolist() == [b, b, a]
