"""A preference task with a known ground truth, generated from a seed.

Each prompt x has K candidate responses (multi-word text), an optimal policy pi*(.|x) and a reference
pi_ref(.|x) over them, both given or drawn from a seeded Dirichlet. "Good" prompts have pi_ref = pi*.
Labels follow Bradley-Terry with the oracle reward r*(x, y) = log pi*(y|x):
    p*(y1 > y2 | x) = pi*(y1|x) / (pi*(y1|x) + pi*(y2|x)).
Pairs are drawn as in the EXPO code: (y1, y2) uniform, ties dropped, winner drawn from p*.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from prefopt.data.exact_metrics import exact_metrics
from prefopt.data.ground_truth import CandidateScores
from prefopt.schema import Check, at_least, greater_than

# Candidate words: plain ones and long polysyllabic ones, so readability and length rewards differ.
PLAIN_WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "in",
    "big",
    "red",
    "sun",
    "and",
    "is",
    "it",
    "was",
    "we",
    "go",
    "see",
    "yes",
    "no",
    "so",
    "up",
]
LONG_WORDS = [
    "considerable",
    "extraordinary",
    "responsibility",
    "administration",
    "international",
    "communication",
    "understanding",
    "particularly",
    "organization",
    "environmental",
    "opportunity",
    "approximately",
]
PROMPT_WORDS = ["tell", "me", "about", "."]


@dataclass
class ContextSpec:
    pi_star: list[float]  # optimal policy over this prompt's candidates
    pi_ref: list[float] | None = None  # reference over the same candidates; None: equal to pi_star (good)


@dataclass
class ReferenceFitConfig:
    """dataset.reference_fit: the supervised phase fitting the policy to the task's pi_ref before preference
    training (`prefopt.engine.reference_fit`)."""

    enabled: bool | None = None  # None: only when the policy starts from the embedded model's random init
    max_steps: int = 600  # loss evaluations fitting the policy to the task's reference distribution
    lr: float = 3e-3  # AdamW learning rate of the supervised phase (L-BFGS takes over if Adam stalls)
    target_kl: float = 0.003  # stop early once KL(pi_ref || pi_theta0) over the candidates is below this
    max_kl: float = 0.05  # refuse to start preference training when the fit ends above this
    cache: bool = True  # reuse a fitted reference across runs with the same model, task, fit and seed

    checks: ClassVar[dict[str, Check]] = {"max_steps": at_least(0), "lr": greater_than(0)}


@dataclass
class SyntheticConfig:
    num_prompts: int = 16  # ignored when `contexts` is given
    num_candidates: int = 4  # candidate responses per prompt; ignored when `contexts` is given
    contexts: list[ContextSpec] | None = None  # explicit pi*/pi_ref per prompt
    dirichlet_alpha: float = 1.0  # concentration of the Dirichlet drawing pi* and pi_ref
    good_fraction: float = 0.5  # share of drawn prompts whose reference is already optimal
    train_draws_per_prompt: int = 200  # pair draws per prompt (ties dropped) for the train split
    eval_draws_per_prompt: int = 100  # same for the held-out split
    min_response_words: int = 2
    max_response_words: int = 5
    long_word_rate: float = 0.3  # chance a candidate is written in long words
    marker_word: str = "please"  # a designer-visible marker some candidates start with
    marker_rate: float = 0.5  # chance a candidate carries the marker
    max_prompt_tokens: int = 32
    max_response_tokens: int = 32
    seed: int | None = None  # task seed; None: the run's seed
    reference_fit: ReferenceFitConfig = field(default_factory=ReferenceFitConfig)  # fit pi_theta0 to pi_ref


@dataclass
class SyntheticTask:
    prompts: list[str]  # (P,)
    candidates: list[list[str]]  # (P, K) response texts
    pi_star: np.ndarray  # (P, K)
    pi_ref: np.ndarray  # (P, K)
    good: np.ndarray = field(init=False)  # (P,) pi_ref == pi*

    def __post_init__(self) -> None:
        self.good = np.all(np.isclose(self.pi_star, self.pi_ref), axis=1)
        self._index = {
            (p, y): (i, k) for i, p in enumerate(self.prompts) for k, y in enumerate(self.candidates[i])
        }

    def preference_probability(self, prompt: int, first: int, second: int) -> float:
        """p*(y_first > y_second | x) under Bradley-Terry with r* = log pi*."""
        a, b = self.pi_star[prompt, first], self.pi_star[prompt, second]
        return float(a / (a + b))

    def sample_pairs(self, draws_per_prompt: int, rng: np.random.Generator) -> np.ndarray:
        """(N, 3) rows of (prompt, chosen, rejected) candidate indices; ties dropped."""
        rows = []
        num_candidates = self.pi_star.shape[1]
        for prompt in range(len(self.prompts)):
            first = rng.integers(num_candidates, size=draws_per_prompt)
            second = rng.integers(num_candidates, size=draws_per_prompt)
            keep = first != second
            first, second = first[keep], second[keep]
            p_first = self.pi_star[prompt, first] / (
                self.pi_star[prompt, first] + self.pi_star[prompt, second]
            )
            first_wins = rng.random(len(first)) < p_first
            chosen = np.where(first_wins, first, second)
            rejected = np.where(first_wins, second, first)
            rows.append(np.stack([np.full_like(chosen, prompt), chosen, rejected], axis=1))
        return np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)

    def oracle_reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        """r*(x, y) = log pi*(y|x) for candidate responses; other responses get the worst candidate's."""
        rewards = []
        for prompt, response in zip(prompts, responses):
            if (prompt, response) in self._index:
                i, k = self._index[(prompt, response)]
                rewards.append(float(np.log(self.pi_star[i, k])))
            else:
                i = self.prompts.index(prompt)
                rewards.append(float(np.log(self.pi_star[i].min())))
        return rewards

    def vocabulary(self) -> list[str]:
        words = {w for p in self.prompts for w in p.split()} | {
            w for c in self.candidates for y in c for w in y.split()
        }
        return sorted(words)

    # As a ground truth (`prefopt.data.ground_truth.GroundTruth`):
    enumerates_responses = True

    def candidate_ids(self, table) -> torch.Tensor:
        """(P, K) the candidates as sequences of `table` (added to it)."""
        return torch.tensor([[table.add(p, y) for y in ys] for p, ys in zip(self.prompts, self.candidates)])

    def fit_target(self) -> torch.Tensor:
        return torch.as_tensor(self.pi_ref, dtype=torch.float32)  # (P, K)

    def exact_metrics(self, scores: Callable[[], CandidateScores]) -> dict[str, float]:
        s = scores()
        return exact_metrics(self, s.policy_logps, s.reference_logps, s.aux_rewards, s.aux_components)

    def convergence_target(self, target: Callable[[], Any]) -> Any:
        return target()

    def record(self) -> dict:
        """The truth the run was measured against, so reports need not rebuild a drawn task."""
        return {
            "prompts": self.prompts,
            "candidates": self.candidates,
            "pi_star": self.pi_star.tolist(),
            "pi_ref": self.pi_ref.tolist(),
            "good": self.good.tolist(),
        }


def build_task(cfg: SyntheticConfig, seed: int) -> SyntheticTask:
    rng = np.random.default_rng(seed)
    if cfg.contexts:
        for i, context in enumerate(cfg.contexts):
            sizes = {
                len(context.pi_star),
                len(context.pi_ref or context.pi_star),
                len(cfg.contexts[0].pi_star),
            }
            if len(sizes) != 1:
                raise ValueError(
                    f"dataset.contexts[{i}]: pi_star and pi_ref need {len(cfg.contexts[0].pi_star)} entries "
                    "(as contexts[0].pi_star): every context ranks the same number of candidates"
                )
        pi_star = np.array([c.pi_star for c in cfg.contexts], dtype=np.float64)
        pi_ref = np.array(
            [c.pi_ref if c.pi_ref is not None else c.pi_star for c in cfg.contexts], dtype=np.float64
        )
    else:
        shape = (cfg.num_prompts, cfg.num_candidates)
        pi_star = rng.dirichlet([cfg.dirichlet_alpha] * cfg.num_candidates, size=shape[0])
        pi_ref = rng.dirichlet([cfg.dirichlet_alpha] * cfg.num_candidates, size=shape[0])
        good = rng.random(shape[0]) < cfg.good_fraction
        pi_ref[good] = pi_star[good]
    _check_distributions(pi_star, "pi_star")
    _check_distributions(pi_ref, "pi_ref")
    prompts = [f"tell me about topic{i} ." for i in range(len(pi_star))]
    candidates = [_distinct_responses(cfg, pi_star.shape[1], rng) for _ in prompts]
    return SyntheticTask(prompts=prompts, candidates=candidates, pi_star=pi_star, pi_ref=pi_ref)


def _check_distributions(table: np.ndarray, name: str) -> None:
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"dataset.contexts: every {name} needs the same number (>= 2) of candidates")
    for i, row in enumerate(table):
        if np.any(row <= 0) or not np.isclose(row.sum(), 1.0, atol=1e-6):
            raise ValueError(
                f"dataset.contexts[{i}].{name}: must be positive and sum to 1, got {row.tolist()}"
            )


def _distinct_responses(cfg: SyntheticConfig, count: int, rng: np.random.Generator) -> list[str]:
    responses: list[str] = []
    while len(responses) < count:
        words = LONG_WORDS if rng.random() < cfg.long_word_rate else PLAIN_WORDS
        length = int(rng.integers(cfg.min_response_words, cfg.max_response_words + 1))
        text = " ".join(rng.choice(words, size=length))
        if cfg.marker_word and rng.random() < cfg.marker_rate:
            text = f"{cfg.marker_word} {text}"
        if text not in responses:
            responses.append(text)
    return responses
