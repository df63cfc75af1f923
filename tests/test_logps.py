"""Response log-probs and token-level KL from a tiny Llama, against a naive per-token loop over each
unpadded sequence's full logits; padding, response masks and batch de-duplication."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import torch_threads

from prefopt.data.batching import PairSplit, SequenceTable, make_batch
from prefopt.models import TinyModelConfig, build_tiny
from prefopt.models.logps import hidden_states, model_logps, token_kl

VOCABULARY = [
    "tell",
    "me",
    "about",
    "a",
    "b",
    "c",
    "the",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "big",
    "red",
    "sun",
]
# (prompt, response): prompts of 2-6 words, responses of 1-7 words, so every batch is padded.
ROWS = [
    ("tell me about a", "the cat sat"),
    ("tell me", "dog"),
    ("tell me about a b c", "big red sun on the dog ran"),
    ("tell me", "the cat sat"),
    ("tell me about b", "sun"),
]

# Log-probs computed two ways (layouts, batch company, chunk sizes, kernels) agree to float32 rounding, not
# bit for bit: a sequence's value sums T <= 8 response tokens of |lp| <= 5 (|value| <= 24, where one ulp is
# 2e-6), each from logits of 32-wide dot products, so the sides differ by ~T * M * 2^-24 plus the logits'
# rounding: 1e-5 relative. A wrong mask or position moves a log-prob by >= 3e-3 here.
LOGPS_CLOSE = dict(atol=1e-5, rtol=1e-5)
# A parameter gradient of sum_i w_i lp_i (|w| <= 2, entries <= 12) sums ~100 token terms in an order that
# depends on the layout and the chunking: ~100 * 12 * 2^-24 = 7e-5 at worst.
GRADS_CLOSE = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """A width-32 model gains nothing from threads; on a busy machine they cost 100x (spinning)."""
    with torch_threads(1):
        yield


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2)
    model, tokenizer = build_tiny(cfg, VOCABULARY)
    return model.float(), tokenizer


def word_ids(tokenizer, text: str) -> list[int]:
    """One id per whitespace word, looked up directly in the vocabulary (not through the table)."""
    return tokenizer.convert_tokens_to_ids(text.split())


def naive_logps(model, tokenizer, prompt: str, response: str) -> torch.Tensor:
    """sum_{t = |x|}^{|x|+|y|-1} log_softmax(logits[t - 1])[ids[t]] over the unpadded sequence x + y + EOS."""
    prompt_ids = word_ids(tokenizer, prompt)
    ids = prompt_ids + word_ids(tokenizer, response) + [tokenizer.eos_token_id]
    logits = model(torch.tensor([ids])).logits[0].float()  # (T, V)
    total = torch.zeros(())
    for t in range(len(prompt_ids), len(ids)):
        total = total + torch.log_softmax(logits[t - 1], dim=-1)[ids[t]]
    return total


def naive_token_kl(policy, reference, tokenizer, prompt: str, response: str) -> torch.Tensor:
    """sum_t sum_v p_ref(v) (log p_ref(v) - log p_pol(v)) at the positions predicting response tokens."""
    prompt_ids = word_ids(tokenizer, prompt)
    ids = torch.tensor([prompt_ids + word_ids(tokenizer, response) + [tokenizer.eos_token_id]])
    log_pol = torch.log_softmax(policy(ids).logits[0].float(), -1)  # (T, V)
    with torch.no_grad():
        log_ref = torch.log_softmax(reference(ids).logits[0].float(), -1)
    total = torch.zeros(())
    for t in range(len(prompt_ids), ids.shape[1]):
        for v in range(log_ref.shape[1]):
            total = total + log_ref[t - 1, v].exp() * (log_ref[t - 1, v] - log_pol[t - 1, v])
    return total


def table_of(tokenizer, rows=ROWS) -> tuple[SequenceTable, torch.Tensor]:
    table = SequenceTable(tokenizer, max_prompt_tokens=16, max_response_tokens=16)
    ids = torch.tensor([table.add(p, r) for p, r in rows])
    return table, ids


def perturbed(model, scale: float = 0.05, seed: int = 1):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


# ---- sequence log-probs ------------------------------------------------------------------------------


def test_model_logps_equals_a_naive_loop_over_each_unpadded_sequence():
    model, tokenizer = tiny_model()
    table, ids = table_of(tokenizer)
    rows = table.pad(ids)
    assert (rows.attention_mask == 0).any()  # padding is present
    got = model_logps(model, rows)
    expected = torch.stack([naive_logps(model, tokenizer, p, r) for p, r in ROWS])
    torch.testing.assert_close(got, expected, **LOGPS_CLOSE)


def test_row_order_and_batch_company_do_not_change_a_rows_logps():
    """The same sequence alone, or in a reversed batch with longer neighbours, gets the same value."""
    model, tokenizer = tiny_model()
    table, ids = table_of(tokenizer)
    together = model_logps(model, table.pad(ids))
    reversed_ = model_logps(model, table.pad(ids.flip(0))).flip(0)
    alone = torch.cat([model_logps(model, table.pad(ids[i : i + 1])) for i in range(len(ids))])
    # other widths and batch sizes: other GEMM shapes and blocking, so rounding, not bits
    torch.testing.assert_close(reversed_, together, **LOGPS_CLOSE)
    torch.testing.assert_close(alone, together, **LOGPS_CLOSE)


def logps_and_grads(model, rows, chunk_tokens: int, weights: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logps = model_logps(model, rows, chunk_tokens)
    (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def test_chunk_size_changes_neither_values_nor_gradients():
    """chunk_tokens = 1 (one position per chunk), 3 (chunks straddle rows) and 1000 (one chunk) give the
    same log-probs and the same parameter gradients of a weighted sum of them."""
    model, tokenizer = tiny_model()
    table, ids = table_of(tokenizer)
    rows = table.pad(ids)
    weights = torch.linspace(-1.0, 2.0, len(ids))
    base_logps, base_grads = logps_and_grads(model, rows, 1000, weights)
    assert len(base_grads) == len(list(model.parameters()))  # every parameter gets a gradient
    for chunk in (1, 3):
        logps, grads = logps_and_grads(model, rows, chunk, weights)
        torch.testing.assert_close(logps, base_logps, **LOGPS_CLOSE)
        assert grads.keys() == base_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], base_grads[name], **GRADS_CLOSE, msg=name)


def test_no_grad_path_matches_the_checkpointed_path():
    model, tokenizer = tiny_model()
    table, ids = table_of(tokenizer)
    rows = table.pad(ids)
    with torch.no_grad():
        plain = model_logps(model, rows, 3)
    # the grad path runs the head through _LinearLogps (custom autograd), the no-grad path plain modules
    torch.testing.assert_close(model_logps(model, rows, 3).detach(), plain, **LOGPS_CLOSE)


# ---- token-level KL ----------------------------------------------------------------------------------


def kl_of(policy, reference, rows, chunk_tokens: int = 4) -> torch.Tensor:
    with torch.no_grad():
        reference_hidden = hidden_states(reference, rows)
    return token_kl(
        policy.get_output_embeddings(),
        hidden_states(policy, rows),
        reference.get_output_embeddings(),
        reference_hidden,
        rows,
        chunk_tokens,
    )


def test_token_kl_equals_the_naive_full_vocabulary_sum():
    reference, tokenizer = tiny_model()
    policy = perturbed(reference)
    table, ids = table_of(tokenizer)
    got = kl_of(policy, reference, table.pad(ids))
    expected = torch.stack([naive_token_kl(policy, reference, tokenizer, p, r) for p, r in ROWS])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
def test_token_kl_is_zero_against_a_copy_and_positive_after_a_perturbation(chunk_tokens: int):
    policy, tokenizer = tiny_model()
    table, ids = table_of(tokenizer)
    rows = table.pad(ids)
    same = kl_of(policy, copy.deepcopy(policy), rows, chunk_tokens)
    # 0 up to rounding: the copy's hidden states come from a no-grad pass, and an ulp (~3e-7) in the
    # log-softmax of each of T <= 8 positions moves the sum by ~T * 3e-7
    torch.testing.assert_close(same, torch.zeros(len(ids)), atol=1e-5, rtol=0)
    moved = kl_of(perturbed(policy), policy, rows, chunk_tokens)
    assert (moved > 1e-4).all()


def test_token_kl_gradient_reaches_the_policy_only():
    """The reference is a constant of the KL: an unfrozen copy (as a caller might pass) gets no gradient,
    neither through its hidden states nor through its lm_head; every policy parameter gets one."""
    reference, tokenizer = tiny_model()
    policy = perturbed(reference)
    table, ids = table_of(tokenizer)
    rows = table.pad(ids)
    kl = token_kl(
        policy.get_output_embeddings(),
        hidden_states(policy, rows),
        reference.get_output_embeddings(),
        hidden_states(reference, rows),  # built with gradients on
        rows,
        3,
    )
    kl.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    leaked = [n for n, p in reference.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert leaked == []


# ---- padding, masks and batches ----------------------------------------------------------------------


def test_response_mask_marks_exactly_the_response_tokens_and_eos():
    _, tokenizer = tiny_model()
    table, ids = table_of(tokenizer)
    rows = table.pad(ids)
    width = max(len(p.split()) + len(r.split()) + 1 for p, r in ROWS)
    assert rows.input_ids.shape == (len(ROWS), width)
    for i, (prompt, response) in enumerate(ROWS):
        prompt_ids, response_ids = word_ids(tokenizer, prompt), word_ids(tokenizer, response)
        response_ids = response_ids + [tokenizer.eos_token_id]
        n = len(prompt_ids) + len(response_ids)
        assert rows.input_ids[i, :n].tolist() == prompt_ids + response_ids
        assert (rows.input_ids[i, n:] == tokenizer.pad_token_id).all()
        assert rows.attention_mask[i].tolist() == [1] * n + [0] * (width - n)
        expected_mask = [False] * len(prompt_ids) + [True] * len(response_ids) + [False] * (width - n)
        assert rows.response_mask[i].tolist() == expected_mask
        assert rows.prompt_lengths[i] == len(prompt_ids)
        assert rows.response_tokens[i] == len(response.split()) + 1


def test_long_prompts_are_cut_from_the_left_and_cut_responses_keep_no_eos():
    """max_prompt_tokens=2 keeps the prompt's last 2 words; max_response_tokens=3 keeps the response's
    first 3 words and no EOS: a cut response is scored as unfinished, as TRL does."""
    _, tokenizer = tiny_model()
    table = SequenceTable(tokenizer, max_prompt_tokens=2, max_response_tokens=3)
    rows = table.pad(torch.tensor([table.add("tell me about a", "the cat sat on")]))
    expected = word_ids(tokenizer, "about a") + word_ids(tokenizer, "the cat sat")
    assert rows.input_ids[0].tolist() == expected
    assert rows.response_mask[0].tolist() == [False, False, True, True, True]
    assert table.counts.prompts_cut == 1 and table.counts.responses_cut == 1


def pair_split(tokenizer):
    """Sequences s0..s4 (ROWS); pairs repeat them: (0,1), (0,4), (1,4), (2,0), (3,2), (0,1)."""
    table, ids = table_of(tokenizer)
    pairs = [(0, 1), (0, 4), (1, 4), (2, 0), (3, 2), (0, 1)]
    chosen = torch.tensor([ids[c] for c, _ in pairs])
    rejected = torch.tensor([ids[r] for _, r in pairs])
    prompts = torch.tensor([table.sequence_prompt[int(s)] for s in chosen])
    mismatched = torch.tensor([ids[(c + 2) % len(ids)] for c, _ in pairs])
    split = PairSplit(chosen, rejected, torch.linspace(0.5, 1.0, len(pairs)), prompts, mismatched)
    return table, split


def test_make_batch_forwards_each_distinct_sequence_once_and_points_at_the_right_rows():
    """Examples (1, 2, 5, 0): sequences {0,4}, {1,4}, {0,1}, {0,1} -> 3 distinct rows instead of 2 x 4 = 8."""
    _, tokenizer = tiny_model()
    table, split = pair_split(tokenizer)
    examples = torch.tensor([1, 2, 5, 0])
    batch = make_batch(table, split, examples, kl_side=None, with_mismatched=False)
    distinct = {int(s) for s in torch.cat([split.chosen[examples], split.rejected[examples]])}
    assert len(batch.sequence_ids) == len(distinct) == 3 < 2 * len(examples)
    assert batch.num_pairs == len(examples)
    assert batch.sequence_ids[batch.chosen_rows].tolist() == split.chosen[examples].tolist()
    assert batch.sequence_ids[batch.rejected_rows].tolist() == split.rejected[examples].tolist()
    assert batch.labels.tolist() == split.labels[examples].tolist()
    assert batch.rows.input_ids.tolist() == table.pad(batch.sequence_ids).input_ids.tolist()
    assert batch.kl_rows is None and batch.mismatched_rows is None


def test_make_batch_side_rows_and_groups_point_at_the_right_sequences():
    """kl_side maps a prompt id to its side sequences; each pair's group is its prompt's group."""
    _, tokenizer = tiny_model()
    table, split = pair_split(tokenizer)
    kl_side = {
        p: [s for s in range(len(table)) if table.sequence_prompt[s] == p] for p in set(table.sequence_prompt)
    }
    examples = torch.tensor([3, 4, 0])
    batch = make_batch(table, split, examples, kl_side=kl_side, with_mismatched=True)
    batch_prompts = sorted({int(p) for p in split.prompts[examples]})
    side = [s for p in batch_prompts for s in kl_side[p]]
    assert batch.sequence_ids[batch.kl_rows].tolist() == side
    assert batch.kl_groups.tolist() == [g for g, p in enumerate(batch_prompts) for _ in kl_side[p]]
    assert [batch_prompts[g] for g in batch.example_groups.tolist()] == split.prompts[examples].tolist()
    assert batch.sequence_ids[batch.mismatched_rows].tolist() == split.mismatched[examples].tolist()
    assert len(set(batch.sequence_ids.tolist())) == len(batch.sequence_ids)


@pytest.mark.parametrize("bias", [False, True])
def test_the_linear_head_function_gives_autograds_logps_and_gradients(bias):
    """token_logps on a plain nn.Linear (chunks of 7; backward recomputes each chunk's logits) against
    plain autograd through log_softmax over the whole vocabulary: the same values and gradients."""
    from prefopt.models.logps import token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias).double()
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    upstream = torch.randn(23, dtype=torch.float64)

    def gradients(logps):
        (logps * upstream).sum().backward()
        grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
        hidden.grad = None
        head.zero_grad()
        return grads

    ours = token_logps(head, hidden, targets, chunk_tokens=7)
    our_grads = gradients(ours)
    plain = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(ours.double(), plain, rtol=0, atol=1e-6)  # fp32 out, like every lm_head
    for mine, theirs in zip(our_grads, gradients(plain.float())):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


def test_the_linear_head_function_computes_logsumexp_as_torch_does_bit_for_bit():
    """Its in-place log-sum-exp (max, subtract, exp, sum, log, add) is torch.logsumexp's own sequence of
    steps, so with or without gradients the values equal the plain head's on the same chunks exactly."""
    from prefopt.models.logps import _chunk_logps, token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=False)
    hidden, targets = torch.randn(37, 24) * 4, torch.randint(0, 300, (37,))
    for chunk in (5, 37, 64):
        pieces = zip(hidden.split(chunk), targets.split(chunk))
        plain = torch.cat([_chunk_logps(head, h, t) for h, t in pieces]).detach()
        with torch.no_grad():
            assert torch.equal(token_logps(head, hidden, targets, chunk), plain)
        assert torch.equal(token_logps(head, hidden.requires_grad_(), targets, chunk).detach(), plain)


def test_under_bf16_autocast_the_linear_head_runs_in_bf16_with_fp32_gradients():
    from prefopt.models.logps import _chunk_logps, token_logps

    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300)
    hidden = torch.randn(37, 24, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = token_logps(head, hidden, targets, 8)
        plain = _chunk_logps(head, hidden, targets)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)  # both from bf16 logits
    grads = torch.autograd.grad(ours.sum(), [hidden, head.weight, head.bias])
    plain_grads = torch.autograd.grad(plain.sum(), [hidden, head.weight, head.bias])
    for mine, theirs in zip(grads, plain_grads):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)  # bf16 matmuls, rounded apart
