"""The convergence report: hand-computed loss changes, which criteria judge a run, and the minimizer of a
run's own pairs."""

from __future__ import annotations

import pytest
import torch

from prefopt.config import ConvergenceConfig
from prefopt.evaluation.convergence import convergence_report, loss_change, own_pairs_minimizer
from prefopt.objectives import OBJECTIVES


def test_loss_change_is_the_share_of_the_runs_change_made_in_its_last_tenth():
    """20 steps, tenths of 2: first tenth mean (10 + 8) / 2 = 9, second-to-last (3 + 3) / 2 = 3, last
    (2 + 2) / 2 = 2: (2 - 3) / (9 - 2) = -1/7."""
    losses = [10.0, 8.0] + [5.0] * 14 + [3.0, 3.0, 2.0, 2.0]
    assert loss_change(losses) == pytest.approx(-1 / 7)


def test_a_loss_that_never_moved_has_changed_by_nothing_and_too_few_steps_cannot_be_judged():
    assert loss_change([0.5] * 30) == 0.0
    assert loss_change([1.0, 0.5]) is None


def test_a_settled_full_batch_run_is_converged_and_a_falling_one_is_not():
    cfg = ConvergenceConfig()
    settled = [1.0 / (1 + t) ** 2 for t in range(200)] + [0.0] * 100  # losses and norms both settle
    report = convergence_report(settled, [1.0] + [1e-4] * 299, cfg)
    assert report["converged"] is True and report["reasons"] == []
    falling = [1.0 - t / 300 for t in range(300)]  # linear: the last tenth makes 10% of the change
    report = convergence_report(falling, [1.0] * 300, cfg)
    assert report["converged"] is False
    assert report["loss_change_last_10pct"] == pytest.approx(-0.1 / 0.9, rel=1e-6)
    assert len(report["reasons"]) == 2  # the loss moves and the gradient did not shrink


def test_mini_batch_gradient_noise_does_not_count_against_convergence():
    cfg = ConvergenceConfig()
    losses = [1.0] * 10 + [0.5] * 290
    assert convergence_report(losses, [1.0] * 300, cfg, full_batch=True)["converged"] is False
    report = convergence_report(losses, [1.0] * 300, cfg, full_batch=False)
    assert report["converged"] is True and report["grad_norm_ratio"] == 1.0


def test_distance_to_the_minimizer_is_the_mean_total_variation_over_prompts():
    report = convergence_report(
        [1.0] * 30, [1.0] * 30, ConvergenceConfig(), 0.2, [[0.5, 0.5], [1.0, 0.0]], [[0.6, 0.4], [1.0, 0.0]]
    )
    assert report["tv_per_prompt"] == pytest.approx([0.1, 0.0])
    assert report["tv_to_minimizer"] == pytest.approx(0.05)
    assert report["outside_mass"] == 0.2


def test_own_pairs_minimizer_of_expo_at_tiny_lam_is_the_pairs_bradley_terry_fit():
    """Two candidates, chosen 0 over 1 in 3 of 4 pairs: EXPO's preference term alone is minimised at
    sigma(lp_0 - lp_1) = 3/4, i.e. pi = [3/4, 1/4], whatever the reference."""
    chosen = torch.tensor([[0, 0], [0, 0], [0, 0], [0, 1]])
    rejected = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 0]])
    hparams = OBJECTIVES["expo"].config(lam=1e-8)
    reference = torch.log(torch.tensor([[0.2, 0.8]]))
    pi = own_pairs_minimizer("expo", hparams, chosen, rejected, reference, torch.ones(1, 2))
    assert pi[0] == pytest.approx([0.75, 0.25], abs=1e-4)


def test_objectives_without_a_tabular_form_have_no_own_pairs_minimizer():
    pairs = torch.tensor([[0, 0]]), torch.tensor([[0, 1]])
    hparams = OBJECTIVES["hpo"].config()
    assert own_pairs_minimizer("hpo", hparams, *pairs, torch.zeros(1, 2), torch.ones(1, 2)) is None
