"""EXPO's preservation property on an exact tabular problem (Hu et al., ICML 2025; see the EXPO notes).

One context, three responses, a free softmax policy pi_theta = softmax(theta). Pairs (y1, y2), y1 != y2,
are drawn uniformly from the 6 orderings and y1 wins with p*(y1 > y2) = pi*(y1) / (pi*(y1) + pi*(y2)) =: p_12.
The row (chosen i, rejected j) arises from the draw (i, j) with i winning, prob. p_ij / 6, and from the draw
(j, i) with i winning, prob. (1 - p_ji) / 6 = p_ij / 6; so its weight is w_ij = p_ij / 3 (the 6 weights sum
to 1, since p_ij + p_ji = 1), and the population loss is exact:

    L(theta) = sum_{i != j} w_ij loss(chosen=i, rejected=j)

with Extras.kl = KL(pi_ref || pi_theta) from `prefopt.engine.kl.exact_kl` (the same for every row, so the
objective is E[BT] + lam KL). L-BFGS from the uniform policy finds the minimizer.
"""

import pytest
import torch

from prefopt.evaluation.population import population_minimizer

GOOD = ([0.6, 0.3, 0.1], [0.6, 0.3, 0.1])  # (pi*, pi_ref): the reference is already right
BAD = ([0.6, 0.2, 0.2], [0.4, 0.2, 0.4])


def f64(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def kl_to(pi_star: list[float], pi: torch.Tensor) -> float:
    """KL(pi* || pi_theta) = sum pi* log(pi* / pi_theta)."""
    p = f64(pi_star)
    return float((p * (p / pi).log()).sum())


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("name", ["expo", "expo_reg"])
def test_expo_keeps_pi_star_where_the_reference_is_right(name, lam):
    """Both EXPO terms are minimized by pi* = pi_ref = [.6, .3, .1], so the minimizer is pi* for every lam."""
    pi = population_minimizer(name, *GOOD, lam=lam)
    assert kl_to(GOOD[0], pi) < 1e-4, pi


def test_dpo_sharpens_pi_star_where_the_reference_is_right():
    """DPO's minimizer is pi_ref (pi*)^(1/beta), normalized; beta = 1: [.36, .09, .01] / .46
    = [.7826, .1957, .0217], KL(pi* || .) = 0.121 (the notes' table) > 0.01."""
    pi = population_minimizer("dpo", *GOOD, beta=1.0, label_smoothing=0.0)
    torch.testing.assert_close(pi, f64([0.36, 0.09, 0.01]) / 0.46, atol=1e-5, rtol=0)
    assert kl_to(GOOD[0], pi) > 0.01
    assert kl_to(GOOD[0], pi) == pytest.approx(0.121, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "expected"), [("expo", [0.471, 0.212, 0.317]), ("expo_reg", [0.442, 0.209, 0.349])]
)
def test_bad_context_matches_the_notes_table(name, expected):
    """pi* = [.6, .2, .2], pi_ref = [.4, .2, .4], lam = 1: the notes' log lam = 0 cells."""
    pi = population_minimizer(name, *BAD, lam=1.0)
    torch.testing.assert_close(pi, f64(expected), atol=1e-3, rtol=0)
