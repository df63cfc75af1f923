"""Adding ORPO as an example objective in a test touches only its own files.

Everything ORPO needs lives in this file: the loss (a pure function of log-prob tensors, the math in its
docstring), its config dataclass, its registration through the public `prefopt.objectives.register`, and
its Hydra config node (`objective/orpo.yaml`, written to a temporary config dir added to Hydra's search
path). No file of `prefopt/` or `conf/` names ORPO; `objective.lam` reaches the loss through the node, the
dataclass and `loss_kwargs()` alone.

ORPO: Hong, Lee and Thorne, "ORPO: Monolithic Preference Optimization without Reference Model",
EMNLP 2024, Eq. 6-7, with p(y) the length-normalised sequence probability:

    s(y)       = lp(y) / |y|                                   # (B,) mean token log-prob, log p(y)
    log odds   = log [p / (1 - p)] = s - log(1 - e^s)          # (B,)
    L_SFT      = -s(y_w)                                       # (B,) per-token NLL of the chosen
    L_OR       = -log sigma(log odds(y_w) - log odds(y_l))     # (B,)
    loss       = L_SFT + lam L_OR                              # (B,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config, read_jsonl, run_training
from torch import Tensor

from prefopt.config import load_run_config
from prefopt.objectives import (
    OBJECTIVES,
    Extras,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    PairLogps,
    Requirements,
    positive,
    register,
)

# --- the objective: what a new module prefopt/objectives/orpo.py would hold ------------------------------


@dataclass
class ORPOConfig(ObjectiveConfig):
    """ORPO's weight on the odds-ratio term; reference-free."""

    requires = Requirements(reference=False)

    lam: float = 0.1
    """lambda: weight of the odds-ratio term L_OR next to the per-token NLL of the chosen response."""

    def __post_init__(self) -> None:
        positive("lam", self.lam)


def log_odds(mean_logps: Tensor) -> Tensor:
    """log [p / (1 - p)] with log p = mean_logps (< 0), elementwise; (B,) -> (B,)."""
    return mean_logps - torch.log(-torch.expm1(mean_logps))


def orpo_loss(
    policy: PairLogps, reference: PairLogps | None, extras: Extras, *, lam: float
) -> ObjectiveOutput:
    """ORPO loss per pair (see the module docstring); log-probs and token counts (B,) -> losses (B,).
    `reference` is ignored. Implied rewards: the log odds, which the odds-ratio term compares."""
    s_w = policy.chosen / extras.chosen_tokens  # (B,)
    s_l = policy.rejected / extras.rejected_tokens  # (B,)
    odds_w, odds_l = log_odds(s_w), log_odds(s_l)  # (B,) each
    sft = -s_w  # (B,)
    ratio = -F.logsigmoid(odds_w - odds_l)  # (B,)
    return ObjectiveOutput(
        losses=sft + lam * ratio,
        chosen_rewards=odds_w.detach(),
        rejected_rewards=odds_l.detach(),
        metrics={"sft_loss": sft.detach(), "or_loss": ratio.detach()},
    )


ORPO = Objective(
    loss=orpo_loss,
    config=ORPOConfig,
    description="ORPO: -lp_w/|y_w| - lam log sig(log odds_w - log odds_l), p = exp(lp/|y|), reference-free",
)

ORPO_NODE = """\
name: orpo
lam: 0.5  # weight of the odds-ratio term next to the chosen response's per-token NLL
"""


@pytest.fixture
def orpo(tmp_path):
    """ORPO registered and its config node on Hydra's search path; the registry is restored afterwards."""
    conf = tmp_path / "conf"
    (conf / "objective").mkdir(parents=True)
    (conf / "objective" / "orpo.yaml").write_text(ORPO_NODE)
    register("orpo", ORPO)
    try:
        yield [f"hydra.searchpath=[file://{conf}]", "objective=orpo"]
    finally:
        del OBJECTIVES["orpo"]


def f64(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- the loss on numbers worked by hand -------------------------------------------------------------------


def test_orpo_hand_value_and_gradient_signs():
    """One pair: lp(y_w) = 2 log 0.5, |y_w| = 2 -> p_w = 0.5, odds 1, log odds 0;
    lp(y_l) = log 0.2, |y_l| = 1 -> p_l = 0.2, odds 0.25, log odds -log 4.
    L_SFT = -log 0.5 = log 2 = 0.693147; L_OR = -log sigma(log 4) = -log(4/5) = log 1.25 = 0.223144;
    lam = 0.5: loss = 0.693147 + 0.111572 = 0.804719.
    Gradients: d log odds / d s = 1 / (1 - p), d s / d lp = 1 / |y|, d L_OR / d log odds_w = -sigma(-log 4)
    = -0.2. d loss / d lp_w = -1/2 + 0.5 (-0.2) (1 / 0.5) (1/2) = -0.5 - 0.1 = -0.6 (raise the chosen);
    d loss / d lp_l = 0.5 (0.2) (1 / 0.8) (1/1) = +0.125 (lower the rejected)."""
    chosen = torch.tensor([2 * math.log(0.5)], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([math.log(0.2)], dtype=torch.float64, requires_grad=True)
    batch = Extras(chosen_tokens=f64(2.0), rejected_tokens=f64(1.0), labels=f64(1.0))
    out = orpo_loss(PairLogps(chosen, rejected), None, batch, lam=0.5)
    assert out.losses.item() == pytest.approx(math.log(2) + 0.5 * math.log(1.25), abs=1e-12)
    assert out.losses.item() == pytest.approx(0.804719, abs=1e-6)
    assert out.metrics["or_loss"].item() == pytest.approx(math.log(1.25), abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.0, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-math.log(4), abs=1e-12)
    out.losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.6, abs=1e-12)
    assert rejected.grad.item() == pytest.approx(0.125, abs=1e-12)


def test_orpo_config_refuses_a_non_positive_lam():
    with pytest.raises(ValueError, match="must be > 0"):
        ORPOConfig(lam=0.0)


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register("dpo", ORPO)


# --- the real entry point ---------------------------------------------------------------------------------


def test_orpo_config_reaches_the_loss_through_its_node(orpo):
    """`objective=orpo` selects the test's node; `objective.lam` overrides it like any built-in key."""
    rc = load_run_config(compose_config(*orpo))
    assert rc.objective_name == "orpo" and isinstance(rc.objective, ORPOConfig)
    assert rc.objective.loss_kwargs() == {"lam": 0.5}
    rc = load_run_config(compose_config(*orpo, "objective.lam=0.25"))
    assert rc.objective.loss_kwargs() == {"lam": 0.25}
    assert rc.objective.requirements() == Requirements(reference=False)


def test_orpo_trains_through_the_real_loop(orpo, tmp_path):
    """A short run on the embedded default task: finite metrics; the held-out loss falls (0.70 -> 0.50 on
    this seed) and the held-out accuracy (log odds of y_w above those of y_l) rises above the reference
    policy's (0.65 -> 0.78). Per-step training losses are single noisy batches, so they are not compared."""
    run_dir = tmp_path / "run"
    summary = run_training(
        run_dir,
        *orpo,
        "trainer.max_steps=30",
        "trainer.optimizer.lr=3e-3",
        "eval.eval_every_steps=30",
        "trainer.log_every_steps=5",
    )
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert len(records) == 6  # steps 5, 10, ..., 30
    assert all(math.isfinite(value) for r in records for value in r.values() if isinstance(value, float))
    assert "train/or_loss" in records[-1] and "train/sft_loss" in records[-1]
    start, final = summary["reference_eval"], summary["final_eval"]
    assert all(math.isfinite(v) for v in final.values() if isinstance(v, float))
    assert final["eval/loss"] < start["eval/loss"]
    assert final["eval/rewards/accuracies"] > start["eval/rewards/accuracies"] + 0.05
