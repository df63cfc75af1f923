"""Generation-based evaluation: sample responses for held-out prompts from the policy and the reference,
score them, and judge them against each other and against the dataset's chosen response.

Judges, by `eval.generation.judge`:
  reward   the synthetic oracle r* where the task has one, else the configured auxiliary reward R:
           y beats y' when its reward is higher (a tie counts 1/2)
  llm      a pairwise LLM judge through an OpenAI-compatible endpoint, both orders (`evaluation.judges`)
Reported: win rates with a 95% interval (`judges.win_rate_interval`), mean rewards (R and each unweighted
r_k) of policy and reference samples, the share of samples above the toxicity threshold (HPO's
"violations", with a `toxicity` reward), mean length and readability grade. Samples and judgements go
to `<run dir>/generations.jsonl`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prefopt.evaluation.judges import win_rate_interval
from prefopt.files import atomic_write_text
from prefopt.models.sampling import sample_until_stop

log = logging.getLogger(__name__)
JUDGES = ("reward", "llm")


@dataclass
class Samples:
    """Per held-out prompt: its text, the dataset's chosen response, and S samples of each model."""

    prompts: list[str]  # (P,) rendered prompt texts
    chosen: list[str]  # (P,)
    policy: list[list[str]]  # (P, S)
    reference: list[list[str]]  # (P, S)
    policy_tokens: list[list[int]]  # (P, S) generated token counts
    reference_tokens: list[list[int]]
    policy_finished: list[list[bool]] | None = None  # (P, S) ended at a stop token, not at max_new_tokens
    reference_finished: list[list[bool]] | None = None


def reward_judge(scores_first: np.ndarray, scores_second: np.ndarray) -> list[float]:
    """First beats second when its reward is higher; a tie counts 1/2."""
    return (0.5 * (np.sign(scores_first - scores_second) + 1.0)).tolist()


def readability_grade(text: str) -> float:
    import textstat

    return float(textstat.text_standard(text, float_output=True)) if text.strip() else math.nan


def summarize(
    samples: Samples, scores: dict[str, dict[str, np.ndarray]], wins: dict, threshold: float
) -> dict:
    """The eval/generate/* metrics from scored samples: scores[model][reward] (P*S,), wins[name] (N,)."""
    metrics = {}
    for name, p in wins.items():
        mean, low, high = win_rate_interval(p) if p else (math.nan, math.nan, math.nan)
        metrics |= {f"win_rate_vs_{name}": mean, f"win_rate_vs_{name}_low": low}
        metrics[f"win_rate_vs_{name}_high"] = high
    for model, by_reward in scores.items():
        for reward, values in by_reward.items():
            metrics[f"{model}/{reward}"] = float(np.mean(values))
        if (
            "aux_reward/toxicity" in by_reward
        ):  # reward = 1 - max_k p_k: above threshold <=> reward below 1 - t
            metrics[f"{model}/violations"] = float(np.mean(by_reward["aux_reward/toxicity"] < 1 - threshold))
    for model, texts, tokens, finished in (
        ("policy", samples.policy, samples.policy_tokens, samples.policy_finished),
        ("reference", samples.reference, samples.reference_tokens, samples.reference_finished),
    ):
        flat = [t for row in texts for t in row]
        metrics[f"{model}/length_tokens"] = float(np.mean([n for row in tokens for n in row]))
        if finished is not None:  # the share that ended at a stop token, not cut at max_new_tokens
            metrics[f"{model}/finished"] = float(np.mean([f for row in finished for f in row]))
        grades = [readability_grade(t) for t in flat]
        metrics[f"{model}/readability_grade"] = (
            float(np.nanmean(grades)) if not all(map(math.isnan, grades)) else math.nan
        )
    return {f"eval/generate/{k}": v for k, v in metrics.items()}


def write_samples(path: Path, samples: Samples, scores: dict, judgements: dict) -> list[list]:
    """generations.jsonl: one line per (prompt, sample); returns the rows of a W&B table."""
    rows, table = [], []
    num_samples = len(samples.policy[0]) if samples.policy else 0
    for p, prompt in enumerate(samples.prompts):
        for s in range(num_samples):
            i = p * num_samples + s
            record = {
                "prompt": prompt,
                "chosen": samples.chosen[p],
                "policy": samples.policy[p][s],
                "reference": samples.reference[p][s],
                "scores": {m: {r: float(v[i]) for r, v in by.items()} for m, by in scores.items()},
                "judgements": {name: j[i] for name, j in judgements.items()},
            }
            rows.append(json.dumps(record))
            table.append([prompt, samples.policy[p][s], samples.reference[p][s], samples.chosen[p]])
    atomic_write_text(path, "\n".join(rows) + ("\n" if rows else ""))  # all of it or the old file
    return table


def evaluate_generations(run, cfg, seed: int, device, judge=None) -> tuple[dict, Samples, dict, dict]:
    """Sample, score and judge on the first `cfg.num_prompts` distinct held-out prompts.
    `judge`: an object with `compare(prompts, first, second) -> [{"p_first": ...}]` (None: the reward
    judge). Returns (metrics, samples, scores, judgements)."""
    table = run.table
    prompt_ids, chosen = _first_prompts(table, run.eval, cfg.num_prompts)
    samples, kl = _sample(run, cfg, seed, device, prompt_ids, chosen)
    repeat = lambda values: [v for v in values for _ in range(cfg.num_samples)]  # noqa: E731
    flat = {
        "policy": [t for row in samples.policy for t in row],
        "reference": [t for row in samples.reference for t in row],
        "chosen": repeat(chosen),
    }
    prompts = repeat(samples.prompts)
    scores = _score(run, prompts, flat)
    judgements = _judge(run, judge, prompts, flat, scores)
    scored = {m: by for m, by in scores.items() if m != "chosen"}
    metrics = summarize(samples, scored, judgements, cfg.toxicity_threshold)
    metrics |= {f"eval/generate/{k}": v for k, v in kl.items()}  # KL(pi || pi_ref) on the policy's samples
    log.info(
        "generation eval on %d prompts x %d samples: %s",
        len(prompt_ids),
        cfg.num_samples,
        ", ".join(
            f"{k.removeprefix('eval/generate/')}={v:.4g}" for k, v in metrics.items() if "win_rate" in k
        ),
    )
    return metrics, samples, scores, judgements


def _first_prompts(table, split, num_prompts: int) -> tuple[list[int], list[str]]:
    """The first `num_prompts` distinct prompts of the held-out split, and the chosen response of each
    one's first pair."""
    first_pair: dict[int, int] = {}
    for i, prompt in enumerate(split.prompts.tolist()):
        first_pair.setdefault(prompt, i)
    prompt_ids = list(first_pair)[:num_prompts]
    chosen = [
        table.response_texts[table.sequence_response[int(split.chosen[first_pair[p]])]] for p in prompt_ids
    ]
    return prompt_ids, chosen


def _sample(run, cfg, seed: int, device, prompt_ids: list[int], chosen: list[str]) -> tuple[Samples, dict]:
    """Samples of the policy and the reference (each in eval mode meanwhile, then back in its own mode),
    and the sampled KL(pi || pi_ref) on the policy's samples."""
    from prefopt.evaluation.sample_kl import sample_kl

    table = run.table
    modes = [m for m in (run.policy, run.reference) if isinstance(m, torch.nn.Module)]
    training = [m.training for m in modes]
    for module in modes:
        module.eval()
    ids, policy_ids = [table.prompt_ids[p] for p in prompt_ids], []
    policy, policy_tokens, policy_finished = sample_until_stop(
        run.policy, table.tokenizer, ids, cfg, device, seed, policy_ids
    )
    kl = sample_kl(run.policy, run.reference, ids, policy_ids, table.tokenizer.pad_token_id, device)
    reference, reference_tokens, reference_finished = sample_until_stop(
        run.reference, table.tokenizer, ids, cfg, device, seed
    )
    for module, mode in zip(modes, training):
        module.train(mode)
    texts = [table.prompt_texts[p] for p in prompt_ids]
    samples = Samples(
        texts, chosen, policy, reference, policy_tokens, reference_tokens, policy_finished, reference_finished
    )
    return samples, kl


def _score(run, prompts: list[str], flat: dict[str, list[str]]) -> dict[str, dict[str, np.ndarray]]:
    """scores[model][reward] (P*S,): the auxiliary reward and each of its parts, and the oracle reward
    where the task has one."""
    from prefopt.rewards import score_responses

    scores: dict[str, dict[str, np.ndarray]] = {model: {} for model in flat}
    for model, responses in flat.items():
        if run.aux_reward is not None:
            parts = {
                f"aux_reward/{name}": score_responses(fn, prompts, responses, progress=False)
                for name, fn in run.aux_reward.components.items()
            }
            combined = run.aux_reward.combine({k.split("/", 1)[1]: v for k, v in parts.items()})
            scores[model] |= {"aux_reward": np.asarray(combined), **parts}
        oracle = run.truth.oracle_reward(prompts, responses)  # None without a ground truth
        if oracle is not None:
            scores[model]["oracle_reward"] = np.asarray(oracle)
    return scores


def _judge(run, judge, prompts: list[str], flat: dict[str, list[str]], scores: dict) -> dict[str, list]:
    """judgements[other] (P*S,): the probability that the policy's sample beats the reference's (or the
    chosen response), by `judge`, else by the oracle reward where the task has one, else the aux reward."""
    judgements = {}
    key = "oracle_reward" if "oracle_reward" in scores["policy"] else "aux_reward"
    for other in ("reference", "chosen"):
        if judge is not None:
            verdicts = judge.compare(prompts, flat["policy"], flat[other])
            judgements[other] = [v["p_first"] for v in verdicts]
        elif key in scores["policy"]:
            judgements[other] = reward_judge(scores["policy"][key], scores[other][key])
    return judgements


def markdown_table(metrics: dict, num_comparisons: int) -> str:
    """The win-rate table and the sample means of a generation eval, as Markdown."""
    get = lambda key: metrics.get(f"eval/generate/{key}", math.nan)  # noqa: E731
    lines = ["| policy against | win rate | 95% interval | comparisons |", "|---|---|---|---|"]
    for other in ("reference", "chosen"):
        if f"eval/generate/win_rate_vs_{other}" in metrics:
            mean, low, high = (get(f"win_rate_vs_{other}{end}") for end in ("", "_low", "_high"))
            lines.append(f"| {other} | {mean:.3f} | [{low:.3f}, {high:.3f}] | {num_comparisons} |")
    names = sorted({k.split("/", 3)[3] for k in metrics if k.startswith("eval/generate/policy/")})
    lines += ["", "| samples | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model in ("policy", "reference"):
        lines.append(f"| {model} | " + " | ".join(f"{get(f'{model}/{n}'):.4g}" for n in names) + " |")
    return "\n".join(lines) + "\n"
