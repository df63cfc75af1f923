"""Exact ground-truth metrics of a policy on a task that knows pi*, pi_ref and the oracle reward, by
enumerating every prompt's candidates."""

from __future__ import annotations


def exact_metrics(
    task, policy_logps, reference_logps, aux_rewards=None, aux_components=None
) -> dict[str, float]:
    """Ground-truth metrics by enumerating each prompt's candidates (torch tensors, all (P, K)).

    pi_theta and pi_ref below are the models' sequence probabilities renormalised over the candidates;
    `outside_mass` is what the policy puts on other sequences.
      kl_star          KL(pi* || pi_theta), mean over all / good / bad prompts
      kl_policy_reference  KL(pi_theta || pi_ref)
      oracle_reward    E_{y ~ pi_theta} r*(x, y), r* = log pi*
      win_rate         sum_{y, y'} pi_theta(y) pi_ref(y') p*(y > y'), a tie counting 1/2
      aux_reward       E_{y ~ pi_theta} R(x, y); aux_reward/<name> the same for each unweighted r_k
    and per prompt p: outside_mass/p<p>, pi_theta/p<p>/y<k>.
    """
    import torch

    pi_star = torch.as_tensor(task.pi_star, dtype=torch.float64)
    log_policy = torch.log_softmax(policy_logps.double().cpu(), dim=-1)
    log_reference = torch.log_softmax(reference_logps.double().cpu(), dim=-1)
    policy, reference = log_policy.exp(), log_reference.exp()
    kl_star = (pi_star * (pi_star.log() - log_policy)).sum(-1)
    preference = pi_star[:, :, None] / (pi_star[:, :, None] + pi_star[:, None, :])  # (P, K, K) p*(y_i > y_j)
    per_prompt = {
        "kl_star": kl_star,
        "kl_policy_reference": (policy * (log_policy - log_reference)).sum(-1),
        "oracle_reward": (policy * pi_star.log()).sum(-1),
        "win_rate": torch.einsum("pi,pj,pij->p", policy, reference, preference),
        "outside_mass": 1.0 - policy_logps.double().cpu().exp().sum(-1),
    }
    if aux_rewards is not None:
        per_prompt["aux_reward"] = (policy * aux_rewards.double().cpu()).sum(-1)
    for name, scores in (aux_components or {}).items():
        per_prompt[f"aux_reward/{name}"] = (policy * scores.double().cpu()).sum(-1)
    metrics = {name: float(values.mean()) for name, values in per_prompt.items()}
    good = torch.as_tensor(task.good)
    for subset, mask in (("good", good), ("bad", ~good)):
        if mask.any():
            metrics[f"kl_star_{subset}"] = float(kl_star[mask].mean())
    for p in range(policy.shape[0]):
        metrics[f"outside_mass/p{p}"] = float(per_prompt["outside_mass"][p])
        for k in range(policy.shape[1]):
            metrics[f"pi_theta/p{p}/y{k}"] = float(policy[p, k])
    return metrics
