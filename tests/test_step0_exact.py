"""At step 0 the policy is the reference: its margins are exactly 0 and every pair is a tie (accuracy 1/2),
on any CPU, whatever layouts the reference pass and the evaluation use.

The reference log-probs are computed once, over the whole table in the reference pass's layout (packed or
prompt-grouped rows); the policy's in each batch's own layout. Equal weights then agree only up to float
rounding (summation order differs), so reading the cached values at step 0 breaks ties at random. While
no optimizer step has been taken, the loop reads the reference side from the policy's own pass instead.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import read_jsonl, run_training

from prefopt.engine.step import LossInputs, reference_side
from prefopt.models import has_dropout


def test_the_reference_row_shows_zero_margins_and_half_accuracy_exactly(tmp_path):
    summary = run_training(tmp_path, "trainer.log_every_steps=1", "trainer.max_steps=4")
    start = summary["reference_eval"]
    assert start["eval/rewards/margins"] == 0.0
    assert start["eval/rewards/accuracies"] == 0.5  # every pair a tie; a tie counts 1/2
    assert start["eval/rewards/chosen"] == 0.0 and start["eval/rewards/rejected"] == 0.0
    assert start["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # -log sigmoid(0), in float32
    assert start["eval/kl_star"] > 0  # the exact metrics still compare with the task's pi*
    train_records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in r]
    first_step = train_records[0]
    assert first_step["step"] == 1
    assert first_step["train/rewards/margins"] == 0.0  # the first step's pairs, before its update
    assert first_step["train/rewards/accuracies"] == 0.5
    # warm-up's first step has lr 0 and changes nothing: the second step's margins are still exactly 0
    assert train_records[0]["train/lr"] == 0.0 and train_records[1]["train/rewards/margins"] == 0.0
    assert train_records[2]["train/rewards/margins"] != 0.0  # after a real update


def test_the_reference_side_is_the_policys_pass_only_while_the_policy_is_the_reference():
    cached = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    inputs = LossInputs(objective=None, hparams=None, reference_logps=cached, aux_rewards=None)
    policy = torch.tensor([-2.5, -0.5], requires_grad=True)
    ids = torch.tensor([3, 1])
    assert torch.equal(reference_side(inputs, policy, ids), torch.tensor([-4.0, -2.0]))
    inputs.policy_is_reference = True
    own = reference_side(inputs, policy, ids)
    assert torch.equal(own, policy.detach()) and not own.requires_grad  # a constant, as the cache is


def test_a_random_training_forward_is_recognised():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1)
    config |= dict(num_attention_heads=2, num_key_value_heads=2)
    assert not has_dropout(LlamaForCausalLM(LlamaConfig(**config)))
    assert has_dropout(LlamaForCausalLM(LlamaConfig(**config, attention_dropout=0.1)))
    assert has_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)))
