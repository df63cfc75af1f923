"""Padding-free packing: several sequences per row, positions restarting, no attention across them; the
same log-probs, gradients, token KL, value-head inputs and training losses as padded rows; padding where
a model cannot keep packed sequences apart."""

from __future__ import annotations

import logging
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config, read_jsonl, run_training, torch_threads
from test_logps import (
    GRADS_CLOSE,
    LOGPS_CLOSE,
    ROWS,
    naive_logps,
    pair_split,
    perturbed,
    table_of,
    tiny_model,
)
from torch import nn

from prefopt.config import ConfigError, load_run_config
from prefopt.data.batching import make_batch
from prefopt.data.layout import Packing
from prefopt.data.packing import PackedSequences, best_fit_decreasing, pack, whole_table_passes
from prefopt.engine.reference import all_sequence_logps as _all_sequence_logps
from prefopt.models.logps import (
    _liger,
    fused_kernel_applies,
    fused_token_logps,
    hidden_states,
    model_logps,
    token_kl,
    token_logps,
)
from prefopt.models.packing_support import supports_packing
from prefopt.models.value_head import last_prompt_hidden

CPU = torch.device("cpu")
# More rows than ROWS, of more lengths, so packing puts 2-3 sequences in a row.
MORE_ROWS = ROWS + [("a", "b"), ("tell me about the red sun", "c"), ("me", "the big dog sat on a cat")]
# Per-token KL of a 0.05-perturbed copy (0.07-0.5 a sequence): T <= 8 positions x V = 18 terms; an ulp of
# each log-softmax (~3e-7) moves it by ~T * 3e-7 at worst, the summation by less. A leak moves it by >> 1e-4.
KL_CLOSE = dict(atol=1e-5, rtol=1e-4)
# Final hidden states (|h| <= 4) through two 32/64-wide layers: ~64 * 4 * 2^-24 = 1.5e-5 at worst.
HIDDEN_CLOSE = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def packed_table(tokenizer):
    table, ids = table_of(tokenizer, MORE_ROWS)
    return table, ids, table.pad(ids)


# ---- the layout --------------------------------------------------------------------------------------


def test_best_fit_decreasing_puts_each_length_in_the_fullest_bin_it_fits():
    """lengths 5 3 4 2 6 1 (ids 0-5), budget 7, longest first: 6 opens bin A (room 1), 5 opens B (room 2),
    4 opens C (room 3); 3 fits only C (room 0); 2 fits only B (0); 1 fits only A (0). A 9 gets a bin of
    its own."""
    assert best_fit_decreasing([5, 3, 4, 2, 6, 1], 7) == [[4, 5], [0, 3], [2, 1]]
    assert best_fit_decreasing([9, 3, 3], 7) == [[0], [1, 2]]


def test_packed_rows_hold_each_sequence_with_positions_restarting_and_the_tail_apart():
    _, tokenizer = tiny_model()
    _, ids, rows = packed_table(tokenizer)
    packed = pack(rows)  # budget: the longest sequence
    lengths = rows.attention_mask.sum(-1)
    assert packed.input_ids.shape[1] == int(lengths.max())
    assert len(packed.input_ids) < len(ids)  # some rows hold several sequences
    assert int(packed.attention_mask.sum()) == int(lengths.sum())
    for i, length in enumerate(lengths.tolist()):
        row, start = int(packed.sequence_row[i]), int(packed.sequence_start[i])
        span = slice(start, start + length)
        assert packed.input_ids[row, span].tolist() == rows.input_ids[i, :length].tolist()
        assert packed.position_ids[row, span].tolist() == list(range(length))
        assert packed.response_mask[row, span].tolist() == rows.response_mask[i, :length].tolist()
    used = packed.attention_mask.sum(-1)
    for row, count in enumerate(used.tolist()):  # a tail starts its own sequence at position 0
        tail = packed.position_ids[row, count:].tolist()
        assert tail == list(range(len(tail)))
        assert not packed.response_mask[row, count:].any()
    assert packed.response_tokens.tolist() == rows.response_tokens.tolist()


def test_a_budget_caps_the_row_width_except_for_a_longer_sequence():
    _, tokenizer = tiny_model()
    _, _, rows = packed_table(tokenizer)
    longest = int(rows.attention_mask.sum(-1).max())
    packed = pack(rows, 6)
    assert packed.input_ids.shape[1] == longest
    assert (packed.attention_mask.sum(-1)[packed.attention_mask.sum(-1) <= 6] <= 6).all()
    assert len(pack(rows, 1000).input_ids) == 1


def test_whole_table_passes_sort_padded_ones_and_pack_the_whole_table_for_packed_ones():
    """lengths 3 9 4 8 5 (ids 0-4), 2 rows per pass. Padded: longest first, 2 per pass: 9 8 | 5 4 | 3.
    Packed into rows of 9 tokens: 9 fills a row; 8 opens one (room 1); 5 does not fit there and opens
    one (room 4); 4 fills it; 3 opens a fourth: rows [9] [8] | [5 4] [3], two rows per pass."""
    lengths = torch.tensor([3, 9, 4, 8, 5])
    assert [p.tolist() for p in whole_table_passes(lengths, 2, None)] == [[1, 3], [4, 2], [0]]
    assert [p.tolist() for p in whole_table_passes(lengths, 2, 9)] == [[1, 3], [4, 2, 0]]


# ---- the same numbers packed and padded --------------------------------------------------------------


def gpt2_model(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def neox_model(tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    return GPTNeoXForCausalLM(config)


def qwen2_model(tokenizer, attention: str = "eager", heads: int = 2, kv_heads: int = 1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation=attention,
    )
    return Qwen2ForCausalLM(config)


qwen2_eager_model = qwen2_model


ARCHITECTURES = {"llama": None, "gpt2": gpt2_model, "gpt_neox": neox_model, "qwen2_eager": qwen2_eager_model}


def model_of(arch: str):
    model, tokenizer = tiny_model()
    if ARCHITECTURES[arch] is not None:
        torch.manual_seed(0)
        model = ARCHITECTURES[arch](tokenizer)
    return model.float(), tokenizer


def logps_and_grads(model, rows, weights):
    model.zero_grad(set_to_none=True)
    logps = model_logps(model, rows, chunk_tokens=4)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_logps_and_gradients_equal_padded_ones(arch):
    model, tokenizer = model_of(arch)
    _, ids, rows = packed_table(tokenizer)
    assert supports_packing(model, CPU).layout == "rows"
    packed = Packing().arrange(rows, model, CPU)
    assert isinstance(packed, PackedSequences) and len(packed.input_ids) < len(ids)
    assert isinstance(Packing(True).arrange(rows, model, CPU), PackedSequences)
    weights = torch.linspace(-1.0, 2.0, len(ids))
    padded_logps, padded_grads = logps_and_grads(model, rows, weights)
    packed_logps, packed_grads = logps_and_grads(model, packed, weights)
    torch.testing.assert_close(packed_logps, padded_logps, **LOGPS_CLOSE)  # other shapes: rounding
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) == len(list(model.parameters()))
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], **GRADS_CLOSE, msg=name)


def test_packed_logps_equal_a_naive_loop_over_each_sequence():
    model, tokenizer = tiny_model()
    _, _, rows = packed_table(tokenizer)
    expected = torch.stack([naive_logps(model, tokenizer, p, r) for p, r in MORE_ROWS])
    torch.testing.assert_close(model_logps(model, pack(rows, 9)), expected, **LOGPS_CLOSE)


def test_no_attention_crosses_a_packed_sequence_boundary():
    """Changing the prompt of a sequence that has row-mates after it changes its own log-prob only."""
    model, tokenizer = tiny_model()
    before = pack(table_of(tokenizer, MORE_ROWS)[0].pad(torch.arange(len(MORE_ROWS))))
    row, start = before.sequence_row, before.sequence_start
    first = next(i for i in range(len(MORE_ROWS)) if ((row == row[i]) & (start > start[i])).any())
    changed = list(MORE_ROWS)
    prompt, response = changed[first]
    changed[first] = (" ".join(["sun"] * len(prompt.split())), response)  # same length, other tokens
    after = pack(table_of(tokenizer, changed)[0].pad(torch.arange(len(changed))))
    assert row.tolist() == after.sequence_row.tolist() and start.tolist() == after.sequence_start.tolist()
    with torch.no_grad():
        old, new = model_logps(model, before), model_logps(model, after)
    others = [i for i in range(len(MORE_ROWS)) if i != first]
    # exact: the same layout (asserted above), so every op on the others' tokens is the same computation on
    # the same values; the changed tokens reach them only through masked attention weights, exactly 0
    assert torch.equal(old[others], new[others])
    assert (old[first] - new[first]).abs() > 1e-3


def test_token_kl_and_last_prompt_hidden_agree_packed_and_padded():
    """The policy packed and the reference padded (layouts may differ per model), against both padded."""
    reference, tokenizer = tiny_model()
    policy = perturbed(reference)
    _, _, rows = packed_table(tokenizer)
    packed = pack(rows)
    with torch.no_grad():
        hidden = {"padded": hidden_states(policy, rows), "packed": hidden_states(policy, packed)}
        reference_hidden = hidden_states(reference, rows)
    head, reference_head = policy.get_output_embeddings(), reference.get_output_embeddings()
    padded_kl = token_kl(head, hidden["padded"], reference_head, reference_hidden, rows, 3)
    mixed_kl = token_kl(head, hidden["packed"], reference_head, reference_hidden, packed, 3, rows)
    torch.testing.assert_close(mixed_kl, padded_kl, **KL_CLOSE)
    assert (padded_kl > 1e-4).all()
    which = torch.tensor([4, 0, 2])
    lengths = rows.prompt_lengths[which]
    padded_at = last_prompt_hidden(hidden["padded"], lengths, which)
    packed_at = last_prompt_hidden(
        hidden["packed"], lengths, packed.sequence_row[which], packed.sequence_start[which]
    )
    torch.testing.assert_close(packed_at, padded_at, **HIDDEN_CLOSE)


def sequence_tokens(rows, i: int) -> list[int]:
    """Sequence i read back from any layout: its prompt at its start, its response at its response start."""
    row, start, prompt = int(rows.sequence_row[i]), int(rows.sequence_start[i]), int(rows.prompt_lengths[i])
    response_start, response = int(rows.response_starts[i]), int(rows.response_tokens[i])
    ids = rows.input_ids[row]
    return ids[start : start + prompt].tolist() + ids[response_start : response_start + response].tolist()


@pytest.mark.parametrize("share_prompts", [True, False], ids=["shared_prompts", "packed_rows"])
def test_a_micro_batch_packs_its_pairs_chosen_and_rejected_together(share_prompts):
    model, tokenizer = tiny_model()
    table, split = pair_split(tokenizer)
    for micro in torch.arange(len(split)).split(4):
        batch = make_batch(table, split, micro, kl_side=None, with_mismatched=False)
        rows = Packing(share_prompts=share_prompts).arrange(batch.rows, model, CPU)
        assert isinstance(rows, PackedSequences) and (rows.segments is not None) == share_prompts
        for kind, positions in (("chosen", batch.chosen_rows), ("rejected", batch.rejected_rows)):
            for example, i in zip(micro.tolist(), positions.tolist()):
                expected = table.pad(getattr(split, kind)[example : example + 1])
                assert sequence_tokens(rows, i) == expected.input_ids[0].tolist()


def test_the_reference_pass_packs_the_whole_table_and_matches_padding():
    model, tokenizer = tiny_model()
    table, ids, rows = packed_table(tokenizer)
    with torch.no_grad():
        expected = model_logps(model, rows)
    packed = _all_sequence_logps(model, table, 2048, CPU, Packing(), rows_per_pass=2)
    padded = _all_sequence_logps(model, table, 2048, CPU, Packing(False), rows_per_pass=2)
    torch.testing.assert_close(packed, expected, **LOGPS_CLOSE)  # 2 rows a pass: other shapes
    torch.testing.assert_close(padded, expected, **LOGPS_CLOSE)


# ---- models that cannot pack -------------------------------------------------------------------------


def opt_model(tokenizer):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        dropout=0.0,
    )
    return OPTForCausalLM(config)


def test_a_model_whose_masks_ignore_position_ids_is_padded():
    """OPT builds its causal mask without the position ids: packed rows would let sequences attend to
    each other, so without shared prompts auto pads (the same rows back) and packing=true refuses, naming
    the key. Its attention layers do take shared-prompt groups (they need no mask), so by default it packs
    that way, with the padded log-probs."""
    _, tokenizer = tiny_model()
    model = opt_model(tokenizer)
    _, _, rows = packed_table(tokenizer)
    support = supports_packing(model, CPU)
    assert support.layout is None and "attends to the sequence before it" in support.reason
    rows_only = Packing(share_prompts=False)
    assert rows_only.arrange(rows, model, CPU) is rows
    assert Packing(False).arrange(rows, model, CPU) is rows
    with pytest.raises(ValueError, match="trainer.layout.packing=true"):
        Packing(True, share_prompts=False).arrange(rows, model, CPU)
    assert support.shares_prompts and Packing(True).arrange(rows, model, CPU).segments is not None
    with torch.no_grad():
        padded = model_logps(model, rows)
        assert torch.equal(rows_only.logps(model, rows), padded)  # the same rows: exact
        torch.testing.assert_close(Packing().logps(model, rows), padded, **LOGPS_CLOSE)


class SegmentMeanModel(nn.Module):
    """A stand-in decoder: h_t = mean of (token + position embeddings) over the tokens its mask lets t see.
    Like flash attention, it reads sequence boundaries from the position ids only in a one-row batch;
    `restart=False` also takes positions 0..T-1 whatever the position ids say."""

    def __init__(self, vocab: int, restart: bool = True):
        super().__init__()
        self.embed, self.position, self.restart = nn.Embedding(vocab, 8), nn.Embedding(64, 8), restart
        self.head = nn.Linear(8, vocab)

    def get_decoder(self):
        return self

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        batch, width = input_ids.shape
        columns = torch.arange(width).expand(batch, -1)
        positions = position_ids if position_ids is not None and self.restart else columns
        segments = torch.zeros_like(input_ids)
        if position_ids is not None and batch == 1:
            segments = (position_ids.diff(prepend=position_ids[:, :1] - 1) != 1).cumsum(-1)
        sees = (segments[:, :, None] == segments[:, None, :]) & (columns[:, None, :] <= columns[:, :, None])
        if attention_mask is not None:
            sees = sees & attention_mask.bool()[:, None, :]
        x = self.embed(input_ids) + self.position(positions)
        h = sees.float() @ x / sees.sum(-1, keepdim=True).clamp(min=1)
        return SimpleNamespace(last_hidden_state=h)


def test_a_decoder_that_keeps_boundaries_in_one_row_only_gets_one_row():
    _, tokenizer = tiny_model()
    torch.manual_seed(0)
    model = SegmentMeanModel(len(tokenizer))
    _, _, rows = packed_table(tokenizer)
    assert supports_packing(model, CPU).layout == "one_row"
    packed = Packing(pack_tokens=4).arrange(rows, model, CPU)
    assert len(packed.input_ids) == 1
    with torch.no_grad():
        torch.testing.assert_close(model_logps(model, packed), model_logps(model, rows), **LOGPS_CLOSE)


def test_a_decoder_whose_positions_do_not_restart_is_padded():
    _, tokenizer = tiny_model()
    torch.manual_seed(0)
    support = supports_packing(SegmentMeanModel(len(tokenizer), restart=False), CPU)
    assert support.layout is None and "positions do not restart" in support.reason


# ---- the fused kernel --------------------------------------------------------------------------------


@pytest.fixture
def fresh_liger():
    """`_liger` caches what it found: forget it before and after a test that fakes Liger."""
    _liger.cache_clear()
    yield
    _liger.cache_clear()


def fake_liger(monkeypatch, exact_backward: bool):
    """Liger's two modules as this code reads them: the functional (a plain torch stand-in here) and the
    ops module whose forward signature tells whether the per-token backward is exact."""

    def fused(hidden, weight, target, bias=None, reduction="mean"):
        logits = hidden @ weight.T + (bias if bias is not None else 0)
        return nn.functional.cross_entropy(logits.float(), target, reduction=reduction)

    def forward(_input, weight, target, token_grad_output=None):
        pass

    def old_forward(_input, weight, target):
        pass

    ops = types.ModuleType("liger_kernel.ops.fused_linear_cross_entropy")
    ops.fused_linear_cross_entropy_forward = forward if exact_backward else old_forward
    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = fused
    modules = {
        "liger_kernel": types.ModuleType("liger_kernel"),
        "liger_kernel.ops": types.ModuleType("liger_kernel.ops"),
        "liger_kernel.ops.fused_linear_cross_entropy": ops,
        "liger_kernel.transformers": types.ModuleType("liger_kernel.transformers"),
        "liger_kernel.transformers.functional": functional,
    }
    modules["liger_kernel.ops"].fused_linear_cross_entropy = ops
    modules["liger_kernel.transformers"].functional = functional
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("exact_backward", [True, False])
def test_the_fused_kernel_gives_the_chunked_logps_and_stays_off_the_cpu(
    monkeypatch, fresh_liger, exact_backward
):
    fake_liger(monkeypatch, exact_backward)
    assert _liger()[1] is exact_backward
    torch.manual_seed(0)
    head, hidden, targets = nn.Linear(8, 11), torch.randn(5, 8), torch.randint(0, 11, (5,))
    fused = fused_token_logps(head, hidden, targets)
    assert fused.dtype == torch.float32
    # two kernels (matmul + bias and cross_entropy; addmm and logsumexp): lp ~ -3 from 8-term logits and an
    # 11-way logsumexp, ~20 * 2^-24 relative apart; a wrong target or sign is O(1)
    chunked = token_logps(head, hidden, targets, chunk_tokens=2)
    torch.testing.assert_close(fused, chunked, atol=1e-6, rtol=1e-5)
    assert not fused_kernel_applies(head, hidden)  # CPU hidden states: the chunked path


def test_without_liger_the_fused_kernel_never_applies(fresh_liger):
    assert _liger() is None  # not installed in the test environment
    assert not fused_kernel_applies(nn.Linear(4, 4), torch.zeros(2, 4))


# ---- config and the real loop ------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["trainer.layout.packing=maybe", "trainer.layout.pack_tokens=0"])
def test_a_bad_packing_value_fails_naming_its_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_run_config(compose_config(override))


@pytest.mark.parametrize(
    "objective",
    [
        ["objective=dpo"],
        ["objective=expo", "kl=token"],
        ["objective=hpo", "aux_reward=keyword"],
    ],
    ids=["dpo", "expo_token_kl", "hpo_value_head"],
)
def test_training_takes_the_same_steps_packed_and_padded(tmp_path, caplog, monkeypatch, objective):
    """The real loop, 6 steps in micro-batches of 16 pairs: per-step losses and gradient norms and the
    final evaluation agree to 1e-5 whether the tiny Llama reads one row of prompt groups (the default),
    packed rows (several sequences each: the task's sequences are alike in length, so rows of 48 tokens)
    or padded ones.

    Tolerance: the layouts round differently (log-probs ~1e-6 apart), and each step's weights carry the
    last step's rounding: measured, losses within 1e-7 and final log-probs within 1e-6 over these 6
    warm-up steps (lr <= 6e-4). Asserted: 1e-5 (+1e-5 relative) per step, 1e-4 relative at the end; a
    layout that leaks attention moves log-probs by >= 3e-3 and the loss visibly."""
    import prefopt.data.layout

    layouts = []

    def counting(arrange):
        def counted(rows, *args):
            arranged = arrange(rows, *args)
            layouts.append((len(arranged.input_ids) / arranged.num_sequences, arranged.segments is not None))
            return arranged

        return counted

    monkeypatch.setattr(prefopt.data.layout, "pack", counting(prefopt.data.layout.pack))
    monkeypatch.setattr(prefopt.data.layout, "share_prompts", counting(prefopt.data.layout.share_prompts))
    steps = [*objective, "trainer.max_steps=6", "trainer.log_every_steps=1", "trainer.micro_batch_size=16"]
    caplog.set_level(logging.INFO, logger="prefopt.models.packing_support")
    shared = run_training(tmp_path / "shared", *steps)  # packing: auto
    assert "a prompt computed once for all its responses" in caplog.text
    assert layouts and all(shares for _, shares in layouts)  # training, evaluation, reference pass
    layouts.clear()
    packed = run_training(
        tmp_path / "packed", *steps, "trainer.layout.pack_tokens=48", "trainer.layout.share_prompts=false"
    )
    assert layouts and max(per_sequence for per_sequence, _ in layouts) < 0.5
    assert not any(shares for _, shares in layouts)
    padded = run_training(tmp_path / "padded", *steps, "trainer.layout.packing=false")
    for run, result in (("shared", shared), ("packed", packed)):
        for key in ["train/loss", "train/grad_norm"]:
            got, expected = (
                [r[key] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if key in r]
                for name in (run, "padded")
            )
            assert len(got) == 6
            assert got == pytest.approx(expected, abs=1e-5, rel=1e-5), (run, key)
        for key, value in padded["final_eval"].items():
            assert result["final_eval"][key] == pytest.approx(value, abs=1e-5, rel=1e-4), (run, key)
