"""KL(pi_theta || pi_ref) estimated from the policy's own samples, as the DPO paper's reward-KL frontier
reads it (Rafailov et al. 2023, Fig. 2):

    KL(pi || pi_ref) = E_x E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)]
                     ~ mean_i d_i,  d_i = lp(y_i | x_i) - lp_ref(y_i | x_i),  se = std(d) / sqrt(N)

over the N = P x S samples of the generation eval (S per prompt, each drawn independently given its prompt;
the prompts are a fixed set, so se is the sampling error of the samples alone). lp is the summed log-prob
of the sampled tokens, the stop token included when the sample ended at one: the same
`prefopt.models.logps` code the training loop uses, over right-padded prompt + response rows. Each d_i
can be negative; the mean is an unbiased estimate of a KL, which is >= 0. Identical models give exactly 0
with se 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from prefopt.data.batching import PaddedSequences
from prefopt.models.logps import CHUNK_TOKENS, model_logps


def padded_rows(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> PaddedSequences:
    """Right-padded prompt + response rows, the response tokens marked (as `SequenceTable.pad`)."""
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    response_mask = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[row, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[row, : len(p) + len(r)] = 1
        response_mask[row, len(p) : len(p) + len(r)] = True
    return PaddedSequences(
        input_ids, attention_mask, response_mask, torch.tensor([len(p) for p in prompt_ids])
    )


@torch.no_grad()
def response_logps(
    model,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    pad_id: int,
    device,
    batch_size: int = 16,
    chunk_tokens: int = CHUNK_TOKENS,
) -> np.ndarray:
    """(N,) summed log-probs lp(y_i | x_i) of each response's tokens after its prompt, in eval mode (no
    dropout), `batch_size` rows per pass; the module's train/eval mode is restored after."""
    module = model if isinstance(model, torch.nn.Module) else None  # a LoRA reference sets its own mode
    training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        out = []
        for start in range(0, len(prompt_ids), batch_size):
            end = start + batch_size
            rows = padded_rows(prompt_ids[start:end], response_ids[start:end], pad_id).to(device)
            out.append(model_logps(model, rows, chunk_tokens).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)
    finally:
        if module is not None:
            module.train(training)


def kl_from_logps(logps: np.ndarray, reference_logps: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of d = logps - reference_logps; se = std(d, ddof=1) / sqrt(N), NaN for N < 2."""
    d = np.asarray(logps, dtype=np.float64) - np.asarray(reference_logps, dtype=np.float64)
    if not len(d):
        return math.nan, math.nan
    se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return float(np.mean(d)), se


def sample_kl(
    policy,
    reference,
    prompt_ids: list[list[int]],
    sampled_ids: list[list[list[int]]],
    pad_id: int,
    device,
    batch_size: int = 16,
) -> dict[str, float]:
    """{"kl_samples": mean, "kl_samples_se": se} of lp - lp_ref over the policy's samples: `sampled_ids`
    (P, S) token ids per prompt of `prompt_ids` (P,), as `prefopt.models.sampling.sample_until_stop`
    returns them."""
    prompts = [p for p, group in zip(prompt_ids, sampled_ids) for _ in group]
    responses = [y for group in sampled_ids for y in group]
    logps = response_logps(policy, prompts, responses, pad_id, device, batch_size)
    reference_logps = response_logps(reference, prompts, responses, pad_id, device, batch_size)
    mean, se = kl_from_logps(logps, reference_logps)
    return {"kl_samples": mean, "kl_samples_se": se}
