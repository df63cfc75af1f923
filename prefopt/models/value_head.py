"""The value head V(x) of HPO (Badrinath et al. 2024, "Hybrid Preference Optimization", arXiv 2405.17956).

HPO weights the log-likelihood of dataset responses by exp(lambda * (R(x, y) - V(x))) and fits V by expectile
regression on the auxiliary reward R. V is a small MLP on the policy's final hidden state at the last prompt
token, detached, so fitting V never moves the policy and costs no extra forward pass. The loop owns the head
and its optimizer; the objective only sees its output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ValueHead(nn.Module):
    """V(x) = MLP(sg(h_x)), Linear-ReLU-Dropout-Linear-ReLU-Dropout-Linear, fp32 whatever the policy's dtype.

    hidden_size: the policy's hidden size D; width: the MLP's hidden width; dropout: as in HALOs' head (0.1).
    """

    def __init__(self, hidden_size: int, width: int = 128, dropout: float = 0.1):
        super().__init__()
        fp32 = {"dtype": torch.float32}  # explicit, so a bf16 default dtype does not reach the head
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, width, **fp32),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, width, **fp32),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, 1, **fp32),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (B, D), any dtype -> V (B,) fp32; no gradient reaches `hidden`."""
        # Reward scale and exp(lambda * A) are sensitive to rounding: keep V out of any bf16 autocast region.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.mlp(hidden.detach().float()).squeeze(-1)  # (B,)


def last_prompt_hidden(
    hidden_states: Tensor,
    prompt_lengths: Tensor,
    row_index: Tensor,
    prompt_starts: Tensor | None = None,
) -> Tensor:
    """The detached hidden state at each example's last prompt token.

    hidden_states (R, T, D): the policy's final hidden states for R rows of T tokens.
    prompt_lengths (B,): prompt tokens per example; row_index (B,): the row holding each example.
    prompt_starts (B,): where each prompt begins in its row (packed rows); 0 for right-padded rows.
    Returns (B, D): hidden_states[row_index, prompt_starts + prompt_lengths - 1], detached.
    """
    position = prompt_lengths - 1 if prompt_starts is None else prompt_starts + prompt_lengths - 1  # (B,)
    return hidden_states.detach()[row_index, position]  # (B, D)
