"""HPO's value head: it can fit a reward, stays fp32 and never sends gradients into the policy."""

from __future__ import annotations

import torch

from prefopt.models.value_head import ValueHead, last_prompt_hidden


def test_value_head_fits_a_known_reward():
    """Target V*(h) = tanh(h @ w) + 0.5 * h_0 * h_1 on N=256 random features (D=16); R^2 on the set > 0.9."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only contend with other jobs on a small CI box
    try:
        assert fitted_r2() > 0.9
    finally:
        torch.set_num_threads(threads)


def fitted_r2() -> float:
    torch.manual_seed(0)
    h = torch.randn(256, 16)  # (N, D)
    w = torch.randn(16) / 4
    target = torch.tanh(h @ w) + 0.5 * h[:, 0] * h[:, 1]  # (N,)
    head = ValueHead(16, width=64)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(200):
        loss = (head(h) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        residual = (head(h) - target).pow(2).sum()
    return float(1 - residual / (target - target.mean()).pow(2).sum())


def test_output_is_fp32_for_bf16_input_and_under_autocast():
    head = ValueHead(8)
    h = torch.randn(4, 8, dtype=torch.bfloat16)
    v = head(h)
    assert v.shape == (4,) and v.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(h).dtype == torch.float32


def test_parameters_are_fp32_under_a_bf16_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        head = ValueHead(8)
    finally:
        torch.set_default_dtype(previous)
    assert all(p.dtype == torch.float32 for p in head.parameters())


def test_no_gradient_flows_into_the_hidden_states():
    head = ValueHead(8)
    h = torch.randn(4, 8, requires_grad=True)
    head(h).sum().backward()
    assert h.grad is None
    assert all(p.grad is not None for p in head.parameters())


def test_last_prompt_hidden_picks_the_last_prompt_token_of_each_row():
    """Rows 0..2 of T=5; example 0: row 2, prompt of 3 -> position 2; example 1: row 0, 1 -> 0;
    example 2: row 1 packed, prompt starting at 1 with 2 tokens -> position 2."""
    hidden = torch.arange(3 * 5 * 2, dtype=torch.float32).reshape(3, 5, 2).requires_grad_()  # (R, T, D)
    lengths, rows = torch.tensor([3, 1]), torch.tensor([2, 0])
    picked = last_prompt_hidden(hidden, lengths, rows)
    assert torch.equal(picked, torch.stack([hidden[2, 2], hidden[0, 0]]))
    assert not picked.requires_grad
    packed = last_prompt_hidden(hidden, torch.tensor([2]), torch.tensor([1]), prompt_starts=torch.tensor([1]))
    assert torch.equal(packed, hidden[1, 2:3])
