"""KL(pi_ref || pi_theta) estimators over grouped side sequences, against brute force and hand values."""

import math

import pytest
import torch

from prefopt.engine.kl import KL_ESTIMATORS, exact_kl, sampled_kl


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_registry():
    assert {"exact": exact_kl, "samples": sampled_kl} == KL_ESTIMATORS


def test_exact_kl_hand_value():
    """One group, pi_ref = (0.6, 0.4), pi_theta = (0.5, 0.5):
    KL = 0.6 log(0.6/0.5) + 0.4 log(0.4/0.5) = 0.109393 - 0.089257 = 0.020136."""
    kl = exact_kl(
        f64(math.log(0.5), math.log(0.5)), f64(math.log(0.6), math.log(0.4)), torch.zeros(2).long(), 1
    )
    assert kl.item() == pytest.approx(0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.5), abs=1e-12)


def test_exact_kl_matches_a_per_group_brute_force():
    """Three groups of sizes 3, 2, 4 (rows interleaved), random unnormalized log-probs: for each group,
    q = softmax(lp_ref over the group), KL = sum q (log q - lp_theta)."""
    gen = torch.Generator().manual_seed(0)
    group = torch.tensor([0, 1, 0, 2, 2, 0, 1, 2, 2])
    policy = torch.randn(9, generator=gen, dtype=torch.float64) - 3
    reference = torch.randn(9, generator=gen, dtype=torch.float64) - 3
    expected = []
    for g in range(3):
        rows = (group == g).nonzero().flatten().tolist()
        q = torch.softmax(reference[rows], 0)
        expected.append(
            sum(q[i].item() * (math.log(q[i].item()) - policy[r].item()) for i, r in enumerate(rows))
        )
    torch.testing.assert_close(exact_kl(policy, reference, group, 3), f64(*expected))


def test_exact_kl_is_zero_at_the_reference_and_positive_elsewhere():
    """pi_theta = the renormalized reference over the candidates (no mass outside): KL = 0. A different
    normalized policy: KL > 0. Shifting the reference log-probs by a constant changes nothing."""
    group = torch.tensor([0, 0, 0, 1, 1])
    reference = f64(-1.0, -2.0, -4.0, -0.5, -3.0)
    q_logps = torch.cat([torch.log_softmax(reference[:3], 0), torch.log_softmax(reference[3:], 0)])
    torch.testing.assert_close(exact_kl(q_logps, reference, group, 2), f64(0.0, 0.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        exact_kl(q_logps, reference - 7.0, group, 2), f64(0.0, 0.0), atol=1e-12, rtol=0
    )
    other = torch.cat([torch.log_softmax(f64(0.0, 0.0, 0.0), 0), torch.log_softmax(f64(1.0, 0.0), 0)])
    assert (exact_kl(other, reference, group, 2) > 0.01).all()


def test_exact_kl_counts_policy_mass_outside_the_candidates():
    """lp_theta = log q - 0.5, i.e. only e^-0.5 of the policy's mass on the candidates:
    KL = sum q (log q - log q + 0.5) = 0.5."""
    reference = f64(-1.0, -2.0, -4.0)
    policy = torch.log_softmax(reference, 0) - 0.5
    assert exact_kl(policy, reference, torch.zeros(3).long(), 1).item() == pytest.approx(0.5, abs=1e-12)


def test_exact_kl_gradient_is_minus_q():
    """d KL / d lp_theta(y) = -q(y), q = softmax(log 0.2, log 0.6) = (0.25, 0.75); the reference gets none."""
    policy = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    reference = torch.log(f64(0.2, 0.6)).requires_grad_()
    exact_kl(policy, reference, torch.zeros(2).long(), 1).sum().backward()
    torch.testing.assert_close(policy.grad, f64(-0.25, -0.75))
    assert reference.grad is None


def test_sampled_kl_is_the_group_mean_of_the_log_ratio():
    """group 0 rows: lp_ref - lp_theta = (-1 + 1.5, -2 + 1) = (0.5, -1) -> mean -0.25;
    group 1: (-3 + 3.5) = 0.5; group 2 is empty -> 0. Gradient -1/n_g per row: (-1/2, -1/2, -1)."""
    policy = f64(-1.5, -1.0, -3.5).requires_grad_()
    reference = f64(-1.0, -2.0, -3.0)
    kl = sampled_kl(policy, reference, torch.tensor([0, 0, 1]), 3)
    torch.testing.assert_close(kl, f64(-0.25, 0.5, 0.0))
    kl.sum().backward()
    torch.testing.assert_close(policy.grad, f64(-0.5, -0.5, -1.0))


def test_exact_kl_of_an_empty_group_is_zero():
    kl = exact_kl(f64(-1.0, -2.0), f64(-1.5, -0.5), torch.tensor([1, 1]), 3)
    assert kl[0].item() == 0.0 and kl[2].item() == 0.0 and kl[1].item() > 0


@pytest.mark.parametrize(
    ("overrides", "expected"), [(["objective=expo", "kl=token"], "token"), (["kl=token"], None)]
)
def test_the_kl_group_picks_the_estimator_an_objective_with_a_kl_term_reads(overrides, expected):
    """`kl=token` gives EXPO the token estimator (and keeps the frozen reference it reads); an objective
    without a KL term (dpo) gets none, whatever the group says."""
    from conftest import FAST, FAST_MODEL, compose_config

    from prefopt.config import load_run_config
    from prefopt.engine.kl_estimators import KL_ESTIMATORS, NO_KL, TokenKL
    from prefopt.engine.prepare import prepare

    rc = load_run_config(compose_config(*FAST, *FAST_MODEL, *overrides))
    assert rc.kl_name == "token"
    inputs = prepare(rc, torch.device("cpu")).inputs
    if expected is None:
        assert inputs.kl_estimator is NO_KL and inputs.reference_model is None
    else:
        assert isinstance(inputs.kl_estimator, TokenKL) and inputs.kl_estimator is KL_ESTIMATORS[expected]
        assert inputs.reference_model is not None
