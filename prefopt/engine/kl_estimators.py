"""KL estimators as parts: each owns what it needs prepared once per run and its per-pair estimate.

The `kl` config group (conf/kl/<name>.yaml, `kl=token`) names one of `KL_ESTIMATORS` and holds its options
(its `config` schema, from `prefopt.config.kl`); only an objective whose requirements say `kl` reads it.
`prepare` asks the estimator for its side sequences and whether it reads the frozen reference at every
step, and `pair_loss` asks it for the estimate. Neither tests which one it is.

- exact:   the side rows of a prompt are every response the reference can produce (a dataset's ground
           truth enumerates them), so KL(pi_ref || pi_theta) is computed exactly (`kl.exact_kl`).
- samples: the side rows are responses sampled from pi_ref once per run; the Monte Carlo mean of
           lp_ref - lp_theta (`kl.sampled_kl`).
- token:   no side rows: the full-vocabulary KL at every response position of the pair's own responses,
           from the live frozen reference's logits (`models.logps.token_kl`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prefopt.config.kl import ExactKLConfig, SampledKLConfig, TokenKLConfig
from prefopt.engine.kl import exact_kl, sampled_kl
from prefopt.models.logps import hidden_states, token_kl
from prefopt.models.packing_support import supports_packing


@dataclass(frozen=True)
class KLSetup:
    """What a run has built when an estimator prepares: the token table, the dataset's enumerated
    responses (a ground truth's candidates, where it has one), the frozen reference, the settings."""

    table: object  # SequenceTable: sequences added here join the table
    prompts: list  # the ground truth's prompts, candidates[i] being prompt i's
    candidates: Tensor | None  # (P, K) table sequence ids; None: the dataset enumerates no responses
    reference: object  # the frozen pi_ref
    kl: object  # the estimator's own config (conf/kl/<name>.yaml, e.g. samples_per_prompt)
    seed: int
    device: object


@dataclass(frozen=True)
class StepView:
    """What one forward pass computed, for an estimate: the policy, its hidden states and log-probs of
    the batch's rows, the reference's log-probs of the same rows, and the batch."""

    policy: object
    hidden: Tensor  # (G, T, D)
    logps: Tensor  # (R,)
    reference_logps: Tensor  # (R,)
    rows: object  # the layout the policy read
    batch: object  # Batch
    inputs: object  # LossInputs (reference model, packing, chunk size)
    device: object


class ExactKL:
    """Exact KL over each prompt's enumerated responses (a dataset with a ground truth)."""

    config = ExactKLConfig
    reads_reference_model = False

    def check(self, enumerates_responses: bool) -> None:
        """Before the model loads: the dataset must enumerate every prompt's responses."""
        if not enumerates_responses:
            raise ValueError("kl=exact needs an enumerable response set (dataset=synthetic)")

    def side_sequences(self, setup: KLSetup) -> dict[int, list[int]]:
        return {int(setup.table.prompt(p)): row.tolist() for p, row in zip(setup.prompts, setup.candidates)}

    def estimate(self, view: StepView) -> Tensor:
        return _side_estimate(exact_kl, view)


class SampledKL:
    """Monte Carlo KL from `kl.samples_per_prompt` reference samples per prompt, drawn once."""

    config = SampledKLConfig
    reads_reference_model = False

    def check(self, enumerates_responses: bool) -> None:
        """Any dataset: the samples come from the reference."""

    def side_sequences(self, setup: KLSetup) -> dict[int, list[int]]:
        return reference_samples(
            setup.reference, setup.table, setup.kl.samples_per_prompt, setup.seed, setup.device
        )

    def estimate(self, view: StepView) -> Tensor:
        return _side_estimate(sampled_kl, view)


class TokenKL:
    """Full-vocabulary KL at every position of the pair's own responses, averaged over its two rows."""

    config = TokenKLConfig
    reads_reference_model = True

    def check(self, enumerates_responses: bool) -> None:
        """Any dataset: the pair's own responses are scored."""

    def side_sequences(self, setup: KLSetup) -> None:
        return None

    def estimate(self, view: StepView) -> Tensor:
        inputs, batch, device = view.inputs, view.batch, view.device
        reference = inputs.reference_model
        same_layout = supports_packing(reference, device) == supports_packing(view.policy, device)
        reference_rows = (
            view.rows if same_layout else inputs.packing.arrange(batch.rows, reference, device).to(device)
        )
        with torch.no_grad():
            reference_hidden = hidden_states(reference, reference_rows)
        per_row = token_kl(
            view.policy.get_output_embeddings(),
            view.hidden,
            reference.get_output_embeddings(),
            reference_hidden,
            view.rows,
            inputs.chunk_tokens,
            reference_rows,
        )
        return 0.5 * (per_row[batch.chosen_rows.to(device)] + per_row[batch.rejected_rows.to(device)])


class NoKL:
    """An objective without a KL term: nothing to prepare, never asked for an estimate."""

    reads_reference_model = False

    def check(self, enumerates_responses: bool) -> None:
        """Nothing to check."""

    def side_sequences(self, setup: KLSetup) -> None:
        return None


KL_ESTIMATORS = {"exact": ExactKL(), "samples": SampledKL(), "token": TokenKL()}
NO_KL = NoKL()


def _side_estimate(per_group_kl, view: StepView) -> Tensor:
    """(B,) a per-prompt estimate from the batch's side rows, grouped by prompt, read per pair."""
    batch, device = view.batch, view.device
    side, groups = batch.kl_rows.to(device), batch.kl_groups.to(device)
    per_group = per_group_kl(view.logps[side], view.reference_logps[side], groups, int(groups.max()) + 1)
    return per_group[batch.example_groups.to(device)]


@torch.no_grad()
def reference_samples(reference, table, per_prompt: int, seed: int, device) -> dict[int, list[int]]:
    """Sample `per_prompt` responses per prompt from the frozen reference, once; they join the table."""
    torch.manual_seed(seed)
    eos, side = table.tokenizer.eos_token_id, {}
    for prompt_id, prompt_ids in enumerate(list(table.prompt_ids)):
        prompt = torch.tensor([prompt_ids], device=device)
        generated = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=table.max_response_tokens,
            num_return_sequences=per_prompt,
            pad_token_id=table.tokenizer.pad_token_id,
            eos_token_id=eos,
        )[:, prompt.shape[1] :]
        side[prompt_id] = []
        for row in generated.tolist():
            ids = row[: row.index(eos) + 1] if eos in row else row
            text = table.tokenizer.decode(ids, skip_special_tokens=True)
            side[prompt_id].append(table.sequence(prompt_id, table.response(text, ids=ids)))
    return side
