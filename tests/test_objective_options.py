"""Options that make EXPO and HPO usable on real text: EXPO's `length_normalize` and HPO's `max_weight`.

EXPO batch (B = 2), responses of different lengths, lam = 0.5 unless a test says otherwise:

    lp(y_w) = [-2, -3]   |y_w| = [2, 6]   lp/|y| = [-1, -0.5]
    lp(y_l) = [-6, -3]   |y_l| = [6, 2]   lp/|y| = [-1, -1.5]
    paper's d = [4, 0];  normalized d = [0, 1];  n = (|y_w| + |y_l|) / 2 = [4, 4];  kl = [0.8, 1.2]
"""

import math

import pytest
import torch
from conftest import compose_config

from prefopt.config import ConfigError, ConfigFieldError, load_run_config
from prefopt.objectives import Extras, PairLogps, expo, expo_reg, hpo


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x), so -log sigma(z) = softplus(-z)."""
    return math.log1p(math.exp(x))


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-12, atol=1e-12)


# --- EXPO: length_normalize -------------------------------------------------------------------------------


def expo_batch(requires_grad: bool = False, **overrides) -> tuple[PairLogps, Extras]:
    chosen = torch.tensor([-2.0, -3.0], dtype=torch.float64, requires_grad=requires_grad)
    rejected = torch.tensor([-6.0, -3.0], dtype=torch.float64, requires_grad=requires_grad)
    values = dict(
        chosen_tokens=f64(2.0, 6.0),
        rejected_tokens=f64(6.0, 2.0),
        labels=f64(1.0, 1.0),
        kl=torch.tensor([0.8, 1.2], dtype=torch.float64, requires_grad=requires_grad),
    )
    return PairLogps(chosen, rejected), Extras(**(values | overrides))


def test_expo_length_normalized_hand_values():
    """Normalized: bt = [-log sig(0), -log sig(1)] = [log 2, softplus(-1)] = [0.693147, 0.313262];
    lam KL / n = [0.5 * 0.8 / 4, 0.5 * 1.2 / 4] = [0.1, 0.15]; losses = [0.793147, 0.463262].
    Paper's form on the same batch: [softplus(-4) + 0.4, log 2 + 0.6] = [0.418150, 1.293147].
    Rewards are lp/|y| = [-1, -0.5] and [-1, -1.5]; the kl metric is the raw KL."""
    policy, batch = expo_batch()
    out = expo.loss(policy, None, batch, lam=0.5, length_normalize=True)
    close(out.losses, [math.log(2) + 0.1, softplus(-1) + 0.15])
    close(out.metrics["bt_loss"], [math.log(2), softplus(-1)])
    close(out.metrics["kl"], [0.8, 1.2])
    close(out.chosen_rewards, [-1.0, -0.5])
    close(out.rejected_rewards, [-1.0, -1.5])
    close(expo.loss(policy, None, batch, lam=0.5).losses, [softplus(-4) + 0.4, math.log(2) + 0.6])


def test_expo_reg_length_normalized_hand_values():
    """sq = [(sig(0) - 1)^2, (sig(1) - 1)^2] = [0.25, 0.268941^2] = [0.25, 0.072329]; + [0.1, 0.15]."""
    policy, batch = expo_batch()
    out = expo_reg.loss(policy, None, batch, lam=0.5, length_normalize=True)
    sig1 = 1 / (1 + math.exp(-1))
    close(out.losses, [0.25 + 0.1, (sig1 - 1) ** 2 + 0.15])
    close(out.chosen_rewards, [-1.0, -0.5])


@pytest.mark.parametrize("objective", [expo, expo_reg])
@pytest.mark.parametrize(("n_w", "n_l"), [(2, 20), (20, 2), (7, 7), (1, 40)])
def test_equal_per_token_logps_leave_the_normalized_term_indifferent_to_length(objective, n_w, n_l):
    """lp(y) = -1.3 |y| for both: normalized d = -1.3 - (-1.3) = 0 at every length (bt = log 2, sq = 1/4, tied
    rewards), while the paper's d = -1.3 (n_w - n_l) prefers the shorter response: its term is below its
    value at d = 0 when y_w is shorter and above it when y_w is longer."""
    policy = PairLogps(f64(-1.3 * n_w), f64(-1.3 * n_l))
    batch = Extras(chosen_tokens=f64(n_w), rejected_tokens=f64(n_l), labels=f64(1.0), kl=f64(0.0))
    term = "bt_loss" if objective is expo else "sq_loss"
    indifferent = math.log(2) if objective is expo else 0.25
    normalized = objective.loss(policy, None, batch, lam=0.5, length_normalize=True)
    assert normalized.metrics[term].item() == pytest.approx(indifferent, abs=1e-12)
    assert normalized.chosen_rewards.item() == pytest.approx(normalized.rejected_rewards.item(), abs=1e-12)
    paper = objective.loss(policy, None, batch, lam=0.5).metrics[term].item()
    if n_w == n_l:
        assert paper == pytest.approx(indifferent, abs=1e-12)
    else:
        assert (paper < indifferent) == (n_w < n_l)


def test_expo_length_normalized_gradients():
    """d bt / d lp_w = -sig(-d) / |y_w|, d bt / d lp_l = +sig(-d) / |y_l|, d loss / d kl = lam / n:
    ex. 0 (d = 0): [-0.5 / 2, 0.5 / 6] = [-0.25, 0.083333]; ex. 1 (d = 1): sig(-1) = 0.268941,
    [-0.268941 / 6, 0.268941 / 2] = [-0.044824, 0.134471]; lam / n = 0.5 / 4 = 0.125 for both.
    Signs: raise the chosen, lower the rejected. The paper's form: d loss / d kl = lam = 0.5."""
    policy, batch = expo_batch(requires_grad=True)
    expo.loss(policy, None, batch, lam=0.5, length_normalize=True).losses.sum().backward()
    s = 1 / (1 + math.exp(1))  # sig(-1)
    close(policy.chosen.grad, [-0.25, -s / 6])
    close(policy.rejected.grad, [0.5 / 6, s / 2])
    close(batch.kl.grad, [0.125, 0.125])
    policy, batch = expo_batch(requires_grad=True)
    expo.loss(policy, None, batch, lam=0.5).losses.sum().backward()
    close(batch.kl.grad, [0.5, 0.5])


@pytest.mark.parametrize("objective", [expo, expo_reg])
def test_one_token_responses_make_the_normalized_loss_the_papers(objective):
    """|y| = 1 everywhere: lp/1 = lp and n = 1, so both forms agree bit for bit."""
    policy, batch = expo_batch(chosen_tokens=f64(1.0, 1.0), rejected_tokens=f64(1.0, 1.0))
    paper = objective.loss(policy, None, batch, lam=0.5)
    normalized = objective.loss(policy, None, batch, lam=0.5, length_normalize=True)
    assert torch.equal(paper.losses, normalized.losses)


def test_expo_default_is_the_papers_form_and_the_option_is_validated():
    """Off by default, and then the loss is called with lam alone (as before the option existed)."""
    assert expo.EXPOConfig().loss_kwargs() == {"lam": 0.1}
    assert expo_reg.EXPORegConfig().loss_kwargs() == {"lam": 0.1}
    on = expo.EXPOConfig(length_normalize=True).loss_kwargs()
    assert on == {"lam": 0.1, "length_normalize": True}
    policy, batch = expo_batch()
    assert torch.equal(
        expo.loss(policy, None, batch, lam=0.5).losses,
        expo.loss(policy, None, batch, lam=0.5, length_normalize=False).losses,
    )
    with pytest.raises(ConfigFieldError, match="true or false") as info:
        expo_reg.EXPORegConfig(length_normalize="yes")
    assert info.value.field == "length_normalize"


@pytest.mark.parametrize("name", ["expo", "expo_reg"])
def test_length_normalize_reaches_the_config(name):
    rc = load_run_config(compose_config(f"objective={name}"))
    assert rc.objective.length_normalize is False
    rc = load_run_config(compose_config(f"objective={name}", "objective.length_normalize=true"))
    assert rc.objective.loss_kwargs()["length_normalize"] is True


# --- HPO: max_weight --------------------------------------------------------------------------------------

HPO = dict(
    base="dpo",
    beta=0.1,
    label_smoothing=0.0,
    margin_alpha=0.0,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    gamma=0.5,
    adv_temperature=4.0,
    value_coef=0.1,
    expectile=0.7,
    actor_warmup_steps=0,
)


def hpo_pair(aux_chosen: float = 1.0, requires_grad: bool = False, **hparams):
    """One pair: lp = (-3, -3), |y| = (2, 3) -> lp/|y| = (-1.5, -1); lp_ref = (-2.5, -2.5) -> h = 0;
    R = (aux_chosen, 0), V = 0.5. Returns (output, policy, values)."""
    policy = PairLogps(
        torch.tensor([-3.0], dtype=torch.float64, requires_grad=requires_grad),
        torch.tensor([-3.0], dtype=torch.float64, requires_grad=requires_grad),
    )
    values = torch.tensor([0.5], dtype=torch.float64, requires_grad=requires_grad)
    batch = Extras(
        chosen_tokens=f64(2.0),
        rejected_tokens=f64(3.0),
        labels=f64(1.0),
        step=10,
        aux_chosen=f64(aux_chosen),
        aux_rejected=f64(0.0),
        values=values,
    )
    reference = PairLogps(f64(-2.5), f64(-2.5))
    return hpo.loss(policy, reference, batch, **(HPO | hparams)), policy, values


def test_hpo_clipped_hand_values():
    """A = (0.5, -0.5), lambda = 4: exp(lambda A) = (e^2, e^-2) = (7.389056, 0.135335); max_weight = 5 clips
    the first: w = (5, 0.135335). actor = -(5 * -1.5 + 0.135335 * -1) / 2 = (7.5 + 0.135335) / 2 = 3.817668;
    mean weight (5 + 0.135335) / 2 = 2.567668; clipped share 1/2. base = -log sig(0.1 * 0) = log 2;
    value = (0.7 * 0.25 + 0.3 * 0.25) / 2 = 0.125. L = log 2 + 0.5 * 3.817668 + 0.1 * 0.125 = 2.614481."""
    out, _, _ = hpo_pair(max_weight=5.0)
    e = math.exp(-2)
    close(out.metrics["actor_loss"], [(7.5 + e) / 2])
    close(out.metrics["actor_weight"], [(5 + e) / 2])
    close(out.metrics["actor_weight_clipped"], [0.5])
    close(out.losses, [math.log(2) + 0.5 * (7.5 + e) / 2 + 0.1 * 0.125])
    unclipped, _, _ = hpo_pair(max_weight=None)
    close(unclipped.metrics["actor_loss"], [(1.5 * math.exp(2) + e) / 2])
    close(unclipped.metrics["actor_weight_clipped"], [0.0])


@pytest.mark.parametrize("max_weight", [5.0, None])
def test_hpo_clipped_weights_are_constants(max_weight):
    """w is detached, clipped or not: the actor adds -gamma w / (2 |y|) to d L / d lp(y) and nothing to V.
    Clipped (5): chosen -0.5 * 5 / 4 = -0.625; unclipped: -0.5 e^2 / 4 = -0.923632; rejected
    -0.5 e^-2 / 6 = -0.011278 either way. gamma = 0 gives the rest of the gradient, which is subtracted."""
    grads = {}
    for gamma in (0.5, 0.0):
        out, policy, values = hpo_pair(requires_grad=True, gamma=gamma, value_coef=0.0, max_weight=max_weight)
        out.losses.sum().backward()
        grads[gamma] = (policy.chosen.grad, policy.rejected.grad)
        assert values.grad is None or torch.all(values.grad == 0)
        assert not out.metrics["actor_weight"].requires_grad
    w_w = 5.0 if max_weight else math.exp(2)
    close(grads[0.5][0] - grads[0.0][0], [-0.5 * w_w / 4])
    close(grads[0.5][1] - grads[0.0][1], [-0.5 * math.exp(-2) / 6])


def test_hpo_without_a_cap_reproduces_the_unclipped_numbers_exactly():
    """max_weight = None and inf give today's (the paper's) w = exp(lambda A), bit for bit, on weights up to
    e^(5 * 3) = 3.3e6; the default cap 20 changes them."""
    g = torch.Generator().manual_seed(0)
    B = 16
    lp = -20 * torch.rand(B, 2, generator=g, dtype=torch.float64)  # (B, 2) chosen, rejected
    lp_ref = -20 * torch.rand(B, 2, generator=g, dtype=torch.float64)
    n = torch.randint(1, 30, (B, 2), generator=g).double()
    R = 3 * torch.rand(B, 2, generator=g, dtype=torch.float64)
    policy, reference = PairLogps(lp[:, 0], lp[:, 1]), PairLogps(lp_ref[:, 0], lp_ref[:, 1])
    batch = Extras(
        chosen_tokens=n[:, 0],
        rejected_tokens=n[:, 1],
        labels=torch.ones(B, dtype=torch.float64),
        step=10,
        aux_chosen=R[:, 0],
        aux_rejected=R[:, 1],
        values=torch.zeros(B, dtype=torch.float64),
    )
    kw = HPO | dict(adv_temperature=5.0)
    w = torch.exp(5.0 * R)  # (B, 2) today's weight, V = 0
    unclipped = hpo.loss(policy, reference, batch, **kw, max_weight=None)
    assert torch.equal(unclipped.metrics["actor_loss"], -(w * lp / n).mean(-1))
    assert torch.equal(unclipped.metrics["actor_weight"], w.mean(-1))
    infinite = hpo.loss(policy, reference, batch, **kw, max_weight=math.inf)
    assert torch.equal(infinite.losses, unclipped.losses)
    capped = hpo.loss(policy, reference, batch, **kw, max_weight=20.0)
    assert capped.metrics["actor_weight"].max() <= 20 < unclipped.metrics["actor_weight"].max()


def test_a_huge_advantage_gives_a_bounded_loss():
    """R_w = 1e4, V = 0.5: exp(4 * 9999.5) overflows to inf, and so does the unclipped actor loss. At the
    default cap 20 it is (20 * 1.5 + e^-2 * 1) / 2 = 15.067668 and the actor's share of d L / d lp_w is
    -0.5 * 20 / 4 = -2.5 (value_coef = 0 here: the value loss is quadratic in A by design)."""
    cap = hpo.HPOConfig().max_weight
    assert cap == 20.0
    unclipped, _, _ = hpo_pair(aux_chosen=1e4, value_coef=0.0, max_weight=None)
    assert math.isinf(unclipped.metrics["actor_loss"].item())
    grads = {}
    for gamma in (0.5, 0.0):
        out, policy, _ = hpo_pair(
            aux_chosen=1e4, requires_grad=True, value_coef=0.0, gamma=gamma, max_weight=cap
        )
        out.losses.sum().backward()
        grads[gamma] = policy.chosen.grad
    close(out.metrics["actor_loss"], [(30 + math.exp(-2)) / 2])
    close(out.metrics["actor_weight_clipped"], [0.5])
    assert torch.isfinite(out.losses).all()
    close(grads[0.5] - grads[0.0], [-2.5])


def test_max_weight_is_validated_and_reaches_the_config():
    with pytest.raises(ConfigFieldError, match="must be > 0") as info:
        hpo.HPOConfig(max_weight=0.0)
    assert info.value.field == "max_weight"
    assert load_run_config(compose_config("objective=hpo")).objective.max_weight == 20.0
    assert (
        load_run_config(compose_config("objective=hpo", "objective.max_weight=null")).objective.max_weight
        is None
    )
    with pytest.raises(ConfigError, match="max_weight"):
        load_run_config(compose_config("objective=hpo", "objective.max_weight=-1"))
