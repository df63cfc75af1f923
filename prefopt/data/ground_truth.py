"""A dataset's ground truth, as a part: what a dataset that knows pi*, pi_ref and the oracle declares, so
the run asks it instead of testing which dataset it has.

A ground truth enumerates every prompt's candidate responses and supplies
- `candidate_ids(table)`: the candidates as sequences of the run's token table (P, K);
- `fit_target()`: pi_ref over the candidates (P, K), the supervised reference fit's target (None: the
  starting policy is the reference as it is; else the dataset's config has the fit's options,
  `reference_fit`: `prefopt.data.synthetic.ReferenceFitConfig`);
- `exact_metrics(scores)`: metrics computed exactly over the candidates from the models' log-probs of
  them (`scores()` is called only by a ground truth that has candidates);
- `convergence_target(target)`: (the minimizer the run is compared with, the policy over the
  candidates), from `target()`, called likewise;
- `oracle_reward(prompts, responses)`, `record()` (for eval.json), `vocabulary()`.
`NO_GROUND_TRUTH` answers for data without one: nothing to enumerate, fit, measure exactly or record.
The synthetic task (`prefopt.data.synthetic.SyntheticTask`) is one; any dataset with an oracle can be.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor


@dataclass(frozen=True)
class CandidateScores:
    """The models' view of every prompt's candidates, each (P, K)."""

    policy_logps: Tensor
    reference_logps: Tensor
    aux_rewards: Tensor | None = None
    aux_components: dict[str, Tensor] | None = None


class GroundTruth(Protocol):
    enumerates_responses: bool  # every prompt's responses are known (the exact KL estimator needs it)
    prompts: list[str]  # (P,) prompt texts, candidates[i] being prompt i's

    def candidate_ids(self, table) -> Tensor | None: ...

    def fit_target(self) -> Tensor | None: ...

    def exact_metrics(self, scores: Callable[[], CandidateScores]) -> dict[str, float]: ...

    def convergence_target(self, target: Callable[[], Any]) -> Any: ...

    def oracle_reward(self, prompts: list[str], responses: list[str]) -> list[float] | None: ...

    def record(self) -> dict | None: ...

    def vocabulary(self) -> list[str] | None: ...


class NoGroundTruth:
    """The ground truth of data without one: every question gets an empty answer."""

    enumerates_responses = False
    prompts: list[str] = []

    def candidate_ids(self, table) -> None:
        return None

    def fit_target(self) -> None:
        return None

    def exact_metrics(self, scores: Callable[[], CandidateScores]) -> dict[str, float]:
        return {}

    def convergence_target(self, target: Callable[[], Any]) -> tuple[None, None]:
        return None, None  # no minimizer, no policy over candidates

    def oracle_reward(self, prompts: list[str], responses: list[str]) -> None:
        return None

    def record(self) -> None:
        return None

    def vocabulary(self) -> None:
        return None


NO_GROUND_TRUTH = NoGroundTruth()
