"""Objective losses against hand-worked numbers, their limits and gradient signs, and their configs.

Shared pair batch (B = 2) unless a test says otherwise:

    policy     lp(y_w) = [-1.0, -2.0]   lp(y_l) = [-3.0, -1.5]
    reference  lp(y_w) = [-1.5, -2.0]   lp(y_l) = [-2.5, -1.0]
    logratios  r_w = [0.5, 0.0]         r_l = [-0.5, -0.5]        h = r_w - r_l = [1.0, 0.5]
    tokens     |y_w| = [2, 5]           |y_l| = [3, 1]
"""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml

from prefopt.objectives import (
    OBJECTIVES,
    Extras,
    Objective,
    ObjectiveConfig,
    PairLogps,
    dpo,
    expo,
    expo_reg,
    fdpo,
    hpo,
    ipo,
    kto,
    sft,
    simpo,
)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["dpo", "ipo", "fdpo", "sft", "simpo", "kto", "expo", "expo_reg", "hpo"]
STRENGTH_KEYS = {"dpo": "beta", "ipo": "beta", "fdpo": "beta", "kto": "beta", "hpo": "beta"}
STRENGTH_KEYS |= {"expo": "lam", "expo_reg": "lam"}


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x), so -log sigma(z) = softplus(-z)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def pairs(requires_grad: bool = False) -> tuple[PairLogps, PairLogps]:
    chosen = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=requires_grad)
    policy = PairLogps(chosen, f64(-3.0, -1.5))
    reference = PairLogps(f64(-1.5, -2.0), f64(-2.5, -1.0))
    return policy, reference


def extras(**overrides) -> Extras:
    values = dict(
        chosen_tokens=f64(2.0, 5.0),
        rejected_tokens=f64(3.0, 1.0),
        labels=torch.ones(2, dtype=torch.float64),
        step=1000,
        kl=f64(0.5, 0.25),
        mismatched_logratios=f64(0.2, 0.6, -0.2),
        aux_chosen=f64(1.0, 0.2),
        aux_rejected=f64(0.0, 0.4),
        values=f64(0.5, 0.3),
    )
    return Extras(**(values | overrides))


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-12, atol=1e-12)


# --- registry and configs ---------------------------------------------------------------------------------


def test_registry_lists_every_objective_with_a_one_line_description():
    assert list(OBJECTIVES) == NAMES
    for name, spec in OBJECTIVES.items():
        assert isinstance(spec, Objective) and issubclass(spec.config, ObjectiveConfig), name
        assert spec.description and "\n" not in spec.description, name
        module = ROOT / "prefopt" / "objectives" / f"{name}.py"
        assert len(module.read_text().splitlines()) < 150, f"{module} should stay well under 150 lines"


@pytest.mark.parametrize("name", NAMES)
def test_yaml_lists_every_field_with_its_dataclass_default_and_a_comment(name):
    """conf/objective/<name>.yaml: `name` first, then every field; `${strength:D}` with D = the default."""
    path = ROOT / "conf" / "objective" / f"{name}.yaml"
    node = yaml.safe_load(path.read_text())
    node.pop("defaults", None)  # group selections (hpo picks a default aux_reward), not hyperparameters
    assert list(node)[0] == "name" and node["name"] == name
    fields = {f.name: f.default for f in dataclasses.fields(OBJECTIVES[name].config)}
    assert set(node) - {"name"} == set(fields)
    for key, default in fields.items():
        value = node[key]
        if key == STRENGTH_KEYS.get(name):
            assert value == f"${{strength:{default}}}", (name, key)
        else:
            assert value == default, (name, key)
    for line in path.read_text().split("name:", 1)[1].splitlines()[1:]:
        assert line.startswith("#") or "  # " in line, f"{path}: uncommented line {line!r}"


def test_loop_only_fields_are_not_passed_to_the_loss():
    cfg = expo.EXPOConfig()
    assert cfg.loss_kwargs() == {"lam": 0.1}
    assert expo_reg.EXPORegConfig(lam=2.0).loss_kwargs() == {"lam": 2.0}
    value_head = {"value_head_lr", "value_head_width"}  # the loop builds and optimizes the head from these
    fields = {f.name for f in dataclasses.fields(hpo.HPOConfig)}
    assert set(hpo.HPOConfig().loss_kwargs()) == fields - value_head


def test_config_validation_names_the_field():
    from conftest import compose_config

    from prefopt.config import ConfigError, load_run_config

    for objective, estimator in (("expo", "bogus"), ("expo_reg", "tokens")):  # the estimator: the kl group's
        with pytest.raises(ConfigError, match=r"kl\.name"):
            load_run_config(compose_config(f"objective={objective}", f"kl.name={estimator}"))
    with pytest.raises(ValueError, match="base"):
        hpo.HPOConfig(base="ipo")
    with pytest.raises(ValueError, match="margin_alpha"):
        hpo.HPOConfig(base="kto", margin_alpha=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo.DPOConfig(label_smoothing=0.7)


def test_requirements():
    assert dpo.DPOConfig().requirements().reference
    assert not sft.SFTConfig().requirements().reference
    assert not simpo.SimPOConfig().requirements().reference
    assert kto.KTOConfig().requirements().mismatched
    need = expo.EXPOConfig().requirements()
    assert need.kl and not need.reference
    assert expo_reg.EXPORegConfig().requirements() == need
    need = hpo.HPOConfig().requirements()
    assert need.reference and need.aux_reward and need.value_head and not need.mismatched
    assert hpo.HPOConfig(base="kto").requirements().mismatched


# --- hand-worked values -----------------------------------------------------------------------------------


def test_dpo_hand_values():
    """beta = 0.1, h = [1, 0.5]: loss = -log sig(beta h) = [log(1 + e^-0.1), log(1 + e^-0.05)]
    = [0.644397, 0.669384]; rewards beta r_w = [0.05, 0], beta r_l = [-0.05, -0.05]."""
    policy, reference = pairs()
    out = dpo.loss(policy, reference, extras(), beta=0.1, label_smoothing=0.0)
    close(out.losses, [math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(-0.05))])
    close(out.chosen_rewards, [0.05, 0.0])
    close(out.rejected_rewards, [-0.05, -0.05])


def test_cdpo_hand_values_and_zero_smoothing_is_dpo():
    """eps = 0.25: loss = 0.75 log(1 + e^-(beta h)) + 0.25 log(1 + e^(beta h)); with beta h = [0.1, 0.05]
    that is [0.75 * 0.644397 + 0.25 * 0.744397, ...]. eps = 0 gives exactly -log sig(beta h)."""
    policy, reference = pairs()
    out = dpo.loss(policy, reference, extras(), beta=0.1, label_smoothing=0.25)
    close(out.losses, [0.75 * softplus(-z) + 0.25 * softplus(z) for z in (0.1, 0.05)])
    plain = dpo.loss(policy, reference, extras(), beta=0.1, label_smoothing=0.0).losses
    h = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    assert torch.equal(plain, -torch.nn.functional.logsigmoid(0.1 * h))


def test_ipo_hand_values():
    """beta = 0.1, target 1/(2 beta) = 5: loss = (h - 5)^2 = [(1 - 5)^2, (0.5 - 5)^2] = [16, 20.25]."""
    policy, reference = pairs()
    close(ipo.loss(policy, reference, extras(), beta=0.1).losses, [16.0, 20.25])


def test_ipo_gradient_vanishes_at_the_target_margin():
    """lp(y_w) = -1, lp_ref(y_w) = -6, and y_l equal under both models: h = 5 = 1/(2 * 0.1), so
    d loss / d lp = 2 (h - 5) (+1 or -1) = 0 for both responses."""
    chosen = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    reference = PairLogps(f64(-6.0), f64(-2.0))
    ipo.loss(PairLogps(chosen, rejected), reference, extras(), beta=0.1).losses.sum().backward()
    assert chosen.grad.item() == 0.0 and rejected.grad.item() == 0.0


def test_fdpo_hand_values():
    """pi(y_w) = 0.3, pi_ref(y_w) = 0.1: t_w = log(2 * 0.3 / 0.4) = log 1.5; pi(y_l) = 0.1, pi_ref(y_l) = 0.3:
    t_l = log(0.2 / 0.4) = log 0.5. t_w - t_l = log 3, so loss = log(1 + 3^-beta): log(4/3) at beta = 1,
    log(1 + 3^-0.1) at beta = 0.1; rewards beta t."""
    policy = PairLogps(f64(math.log(0.3)), f64(math.log(0.1)))
    reference = PairLogps(f64(math.log(0.1)), f64(math.log(0.3)))
    close(fdpo.loss(policy, reference, extras(), beta=1.0).losses, [math.log(4 / 3)])
    out = fdpo.loss(policy, reference, extras(), beta=0.1)
    close(out.losses, [math.log(1 + 3**-0.1)])
    close(out.chosen_rewards, [0.1 * math.log(1.5)])
    close(out.rejected_rewards, [0.1 * math.log(0.5)])


def test_sft_hand_values():
    """loss = -lp(y_w) / |y_w| = [1 / 2, 2 / 5] = [0.5, 0.4]; rewards lp / |y|: [-0.5, -0.4], [-1, -1.5]."""
    policy, _ = pairs()
    out = sft.loss(policy, None, extras())
    close(out.losses, [0.5, 0.4])
    close(out.rejected_rewards, [-1.0, -1.5])


def test_simpo_hand_values():
    """lp/|y|: chosen [-0.5, -0.4], rejected [-1, -1.5]; beta = 2, gamma = 0.5:
    z = 2 [0.5, 1.1] - 0.5 = [0.5, 1.7]; loss = log(1 + e^-z) = [0.474077, 0.168483]."""
    policy, _ = pairs()
    out = simpo.loss(policy, None, extras(), beta=2.0, gamma=0.5)
    close(out.losses, [softplus(-0.5), softplus(-1.7)])
    close(out.chosen_rewards, [-1.0, -0.8])
    close(out.rejected_rewards, [-2.0, -3.0])


def test_kto_hand_values():
    """z = max(0, mean[0.2, 0.6, -0.2]) = 0.2; beta = 1, r_w = [0.5, 0], r_l = [-0.5, -0.5]:
    l_w = 1 - sig(r_w - z) = [1 - sig(0.3), 1 - sig(-0.2)], l_l = 1 - sig(z - r_l) = 1 - sig(0.7) (both);
    weights 2 and 0.5: loss = (2 l_w + 0.5 l_l) / 2; metric kl = z."""
    policy, reference = pairs()
    out = kto.loss(policy, reference, extras(), beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    l_l = 1 - sigmoid(0.7)
    close(out.losses, [(2 * (1 - sigmoid(0.3)) + 0.5 * l_l) / 2, (2 * (1 - sigmoid(-0.2)) + 0.5 * l_l) / 2])
    assert out.metrics["kl"].item() == pytest.approx(0.2)


def test_kto_reference_point_is_clamped_and_detached():
    """mean of mismatched [-0.3, -0.1] = -0.2 -> z = 0; loss ex. 0 = ((1 - sig(0.5)) + (1 - sig(0.5))) / 2
    with beta = 1. z carries no gradient back to the mismatched log-ratios."""
    mismatched = torch.tensor([-0.3, -0.1], dtype=torch.float64, requires_grad=True)
    policy, reference = pairs(requires_grad=True)
    batch = extras(mismatched_logratios=mismatched)
    out = kto.loss(policy, reference, batch, beta=1.0, desirable_weight=1.0, undesirable_weight=1.0)
    assert out.metrics["kl"].item() == 0.0
    assert out.losses[0].item() == pytest.approx(1 - sigmoid(0.5), abs=1e-12)
    assert torch.autograd.grad(out.losses.sum(), mismatched, allow_unused=True) == (None,)


def test_kto_unpaired_helper_takes_a_desirable_mask():
    """Three unpaired responses, r = [0.5, 0.5, -1], desirable = [T, F, T], z = 0.1, beta = 1:
    [1 - sig(0.4), 1 - sig(-0.4), 1 - sig(-1.1)], the undesirable one weighted by 3."""
    r = f64(0.5, 0.5, -1.0)
    mask = torch.tensor([True, False, True])
    z = torch.tensor(0.1, dtype=torch.float64)
    losses = kto.response_losses(r, mask, z, beta=1.0, desirable_weight=1.0, undesirable_weight=3.0)
    close(losses, [1 - sigmoid(0.4), 3 * (1 - sigmoid(-0.4)), 1 - sigmoid(-1.1)])


def test_expo_hand_values():
    """d = lp_w - lp_l = [2, -0.5], kl = [0.5, 0.25], lam = 0.1:
    hard labels: [log(1 + e^-2) + 0.05, log(1 + e^0.5) + 0.025] = [0.176928, 0.999077];
    soft label 0.75 on ex. 0: 0.75 log(1 + e^-2) + 0.25 log(1 + e^2) + 0.05. Rewards are lp itself."""
    policy, _ = pairs()
    out = expo.loss(policy, None, extras(), lam=0.1)
    close(out.losses, [softplus(-2) + 0.05, softplus(0.5) + 0.025])
    close(out.metrics["bt_loss"], [softplus(-2), softplus(0.5)])
    close(out.metrics["kl"], [0.5, 0.25])
    close(out.chosen_rewards, [-1.0, -2.0])
    soft = expo.loss(policy, None, extras(labels=f64(0.75, 1.0)), lam=0.1)
    close(soft.losses, [0.75 * softplus(-2) + 0.25 * softplus(2) + 0.05, softplus(0.5) + 0.025])


def test_expo_without_kl_is_the_reference_free_bradley_terry_loss():
    """lam = 0: loss = -log sig(lp_w - lp_l) exactly."""
    policy, _ = pairs()
    out = expo.loss(policy, None, extras(), lam=0.0)
    assert torch.equal(out.losses, -torch.nn.functional.logsigmoid(policy.chosen - policy.rejected))
    with pytest.raises(ValueError, match="kl"):
        expo.loss(policy, None, extras(kl=None), lam=0.1)


def test_expo_reg_hand_values():
    """(sig(d) - p)^2 + lam kl with d = [2, -0.5], lam = 0.1:
    [(sig(2) - 1)^2 + 0.05, (sig(-0.5) - 1)^2 + 0.025] = [0.014341 + 0.05, 0.388354 + 0.025];
    soft label 0.75 on ex. 0: (sig(2) - 0.75)^2 + 0.05."""
    policy, _ = pairs()
    close(
        expo_reg.loss(policy, None, extras(), lam=0.1).losses,
        [(sigmoid(2) - 1) ** 2 + 0.05, (sigmoid(-0.5) - 1) ** 2 + 0.025],
    )
    soft = expo_reg.loss(policy, None, extras(labels=f64(0.75, 1.0)), lam=0.1)
    assert soft.losses[0].item() == pytest.approx((sigmoid(2) - 0.75) ** 2 + 0.05, abs=1e-12)


# --- HPO --------------------------------------------------------------------------------------------------

HPO_DEFAULTS = hpo.HPOConfig().loss_kwargs()  # the loss's own: not the loop's value head options


def hpo_case(step: int = 200, **hparams):
    """One pair: lp = (-2, -3), |y| = (2, 3), lp_ref = (-2.5, -2.5) -> h = 0.5 - (-0.5) = 1;
    R = (1, 0), V = 0.5, so A = (0.5, -0.5). Other hyperparameters at their defaults."""
    policy = PairLogps(f64(-2.0), f64(-3.0))
    reference = PairLogps(f64(-2.5), f64(-2.5))
    batch = Extras(
        chosen_tokens=f64(2.0),
        rejected_tokens=f64(3.0),
        labels=f64(1.0),
        step=step,
        aux_chosen=f64(1.0),
        aux_rejected=f64(0.0),
        values=f64(0.5),
    )
    return hpo.loss(policy, reference, batch, **(HPO_DEFAULTS | hparams))


def test_hpo_hand_values():
    """beta = 0.1, alpha = 0.5: base = -log sig(0.1 * 1 - 0.5 (1 - 0)) = log(1 + e^0.4) = 0.913015.
    adv_temperature = 1: w = (e^0.5, e^-0.5), lp/|y| = (-1, -1): actor = (e^0.5 + e^-0.5) / 2 = cosh 0.5.
    tau = 0.7: value = (0.7 * 0.5^2 + 0.3 * 0.5^2) / 2 = (0.175 + 0.075) / 2 = 0.125.
    L = 0.913015 + 0.5 cosh(0.5) + 0.1 * 0.125."""
    out = hpo_case(margin_alpha=0.5, adv_temperature=1.0)
    expected = softplus(0.4) + 0.5 * math.cosh(0.5) + 0.1 * 0.125
    close(out.losses, [expected])
    close(out.metrics["base_loss"], [softplus(0.4)])
    close(out.metrics["actor_loss"], [math.cosh(0.5)])
    close(out.metrics["value_loss"], [0.125])
    close(out.metrics["advantage"], [0.0])
    close(out.metrics["actor_weight"], [math.cosh(0.5)])


def test_hpo_max_weight_clamps_the_actor_weight():
    """max_weight = 1.2 < e^0.5 = 1.6487: actor = (1.2 + e^-0.5) / 2."""
    close(hpo_case(adv_temperature=1.0, max_weight=1.2).metrics["actor_loss"], [(1.2 + math.exp(-0.5)) / 2])


def test_hpo_actor_is_off_before_warmup():
    """actor_warmup_steps = 100: at step 99 the actor term is 0, at step 100 it is cosh(0.5) (above)."""
    before = hpo_case(adv_temperature=1.0, step=99)
    after = hpo_case(adv_temperature=1.0, step=100)
    assert before.metrics["actor_loss"].item() == 0.0
    assert after.metrics["actor_loss"].item() == pytest.approx(math.cosh(0.5))
    assert after.losses.item() - before.losses.item() == pytest.approx(0.5 * math.cosh(0.5))


@pytest.mark.parametrize("base", ["dpo", "kto"])
def test_hpo_with_extra_weights_at_zero_is_its_base_loss(base):
    """gamma = value_coef = margin_alpha = 0 reproduces the base loss bit for bit (dpo: smoothing 0.1)."""
    policy, reference = pairs()
    batch = extras()
    if base == "dpo":
        expected = dpo.loss(policy, reference, batch, beta=0.2, label_smoothing=0.1)
    else:
        expected = kto.loss(policy, reference, batch, beta=0.2, desirable_weight=1.5, undesirable_weight=0.5)
    hparams = HPO_DEFAULTS | dict(
        base=base,
        beta=0.2,
        label_smoothing=0.1 if base == "dpo" else 0.0,
        desirable_weight=1.5,
        undesirable_weight=0.5,
        gamma=0.0,
        value_coef=0.0,
    )
    out = hpo.loss(policy, reference, batch, **hparams)
    assert torch.equal(out.losses, expected.losses)
    assert torch.equal(out.chosen_rewards, expected.chosen_rewards)


def test_hpo_value_gradient_moves_v_towards_the_expectile():
    """R = (1, 0), tau = 0.7, value_coef = 1: L_value(V) = [0.7 (1 - V)^2 + 0.3 V^2] / 2, so
    dL/dV = V - 0.7: -0.2 at V = 0.5, +0.2 at V = 0.9, 0 at the 0.7-expectile of {0, 1} (0.7)."""
    for v, grad in [(0.5, -0.2), (0.9, 0.2), (0.7, 0.0)]:
        values = torch.tensor([v], dtype=torch.float64, requires_grad=True)
        policy = PairLogps(f64(-2.0), f64(-3.0))
        batch = Extras(
            chosen_tokens=torch.ones(1),
            rejected_tokens=torch.ones(1),
            labels=torch.ones(1),
            aux_chosen=f64(1.0),
            aux_rejected=f64(0.0),
            values=values,
            step=200,
        )
        hparams = HPO_DEFAULTS | dict(gamma=1.0, value_coef=1.0)
        hpo.loss(policy, policy, batch, **hparams).losses.sum().backward()
        assert values.grad.item() == pytest.approx(grad, abs=1e-12)  # the actor term adds no V gradient


def test_expectile_loss_weights_residual_signs():
    """tau = 0.8: u = 2 -> 0.8 * 4 = 3.2; u = -1 -> 0.2 * 1 = 0.2; tau = 0.5 is half the squared error."""
    close(hpo.expectile_loss(f64(2.0, -1.0), 0.8), [3.2, 0.2])
    close(hpo.expectile_loss(f64(2.0, -1.0), 0.5), [2.0, 0.5])


# --- gradient signs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_raising_the_chosen_logp_lowers_the_loss(name):
    """d loss / d lp(y_w) < 0 for every example, default hyperparameters (IPO: h = [1, 0.5] < 5)."""
    spec = OBJECTIVES[name]
    cfg = spec.config()
    policy, reference = pairs(requires_grad=True)
    reference = reference if cfg.requirements().reference else None
    out = spec.loss(policy, reference, extras(), **cfg.loss_kwargs())
    assert out.losses.shape == (2,)
    out.losses.sum().backward()
    assert (policy.chosen.grad < 0).all(), policy.chosen.grad
    for value in [out.chosen_rewards, out.rejected_rewards, *out.metrics.values()]:
        assert not value.requires_grad
