"""The sample-based KL of the generation eval, `prefopt.evaluation.sample_kl`: exactly 0 when the policy
is the reference, else the mean of per-sample log-ratios computed independently with a naive per-token
loop; the standard error by hand; and the metric in a real run's generation eval."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import run_training
from test_logps import perturbed

from prefopt.evaluation.sample_kl import kl_from_logps, sample_kl

PAD = 0
PROMPTS = [[5, 9, 3], [7], [2, 11, 4, 8]]  # (P,) different lengths, so rows are padded
SAMPLES = [  # (P, S = 2) responses of different lengths, one ending at the "stop" token 1
    [[4, 4, 12], [6]],
    [[13, 2, 1], [3, 3, 3, 3, 9]],
    [[10], [8, 1]],
]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def naive_logp(model, prompt: list[int], response: list[int]) -> float:
    """sum_t log pi(y_t | x, y_<t), one unpadded sequence, one token at a time from the full logits."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
    return sum(float(logp[len(prompt) + t - 1, y]) for t, y in enumerate(response))


def test_policy_equal_to_reference_gives_exactly_zero_with_zero_se():
    model = tiny_llama()
    for reference in (model, copy.deepcopy(model)):
        kl = sample_kl(model, reference, PROMPTS, SAMPLES, PAD, "cpu", batch_size=2)
        assert kl == {"kl_samples": 0.0, "kl_samples_se": 0.0}


def test_perturbed_policy_gives_the_mean_of_naive_per_sample_log_ratios():
    reference = tiny_llama()
    policy = perturbed(reference, scale=0.2)
    d = [
        naive_logp(policy, p, y) - naive_logp(reference, p, y)
        for p, group in zip(PROMPTS, SAMPLES)
        for y in group
    ]
    assert len(d) == 6 and np.std(d) > 0.01  # the perturbation moved the models apart
    for batch_size in (1, 4, 16):  # batch company (padding) changes nothing
        kl = sample_kl(policy, reference, PROMPTS, SAMPLES, PAD, "cpu", batch_size=batch_size)
        assert kl["kl_samples"] == pytest.approx(np.mean(d), abs=1e-4)
        assert kl["kl_samples_se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(6), abs=1e-4)


def test_standard_error_by_hand():
    """d = [1, -1, 2, 0]: mean 0.5; deviations 0.5, -1.5, 1.5, -0.5, squares sum to 5, so the sample
    variance is 5/3 and se = sqrt(5/3) / sqrt(4) = 0.6455; one sample has no se."""
    mean, se = kl_from_logps(np.array([1.0, -1.0, 2.0, 0.0]), np.zeros(4))
    assert mean == pytest.approx(0.5) and se == pytest.approx(math.sqrt(5 / 3) / 2)
    mean, se = kl_from_logps(np.array([0.3]), np.array([0.1]))
    assert mean == pytest.approx(0.2) and math.isnan(se)


def test_a_runs_generation_eval_logs_the_sample_kl(tmp_path):
    """A trained policy: finite, and its se positive; its samples were drawn from it, so the estimate of a
    KL is not far below 0 (a few se at most)."""
    summary = run_training(
        tmp_path,
        "trainer.max_steps=6",
        "eval.generate=true",
        "eval.generation.num_prompts=4",
        "eval.generation.num_samples=3",
        "eval.generation.max_new_tokens=6",
    )
    final = summary["final_eval"]
    kl, se = final["eval/generate/kl_samples"], final["eval/generate/kl_samples_se"]
    assert math.isfinite(kl) and se > 0 and kl > -4 * se
