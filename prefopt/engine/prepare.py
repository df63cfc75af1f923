"""Everything built once per run, in order: text data, auxiliary rewards, model and tokenizer, token
tables, the supervised reference fit, the frozen reference, and the per-sequence caches the loop reads
(reference log-probs, auxiliary rewards, side sequences for KL estimators)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prefopt.config import RunConfig
from prefopt.data import DATASETS, TextData
from prefopt.data.batching import PairSplit, SequenceTable
from prefopt.data.ground_truth import GroundTruth
from prefopt.data.layout import Packing
from prefopt.data.preference import TextPairs
from prefopt.engine.kl_estimators import KL_ESTIMATORS, NO_KL, KLSetup
from prefopt.engine.reference import fit_to_task, frozen_reference, reference_logps, wants_reference_fit
from prefopt.engine.reference_cache import free_memory
from prefopt.engine.sampled_data import data_after_model, data_vocabulary
from prefopt.engine.step import LossInputs
from prefopt.models import MODELS, count_parameters
from prefopt.models.value_head import ValueHead
from prefopt.objectives import OBJECTIVES
from prefopt.progress import progress_enabled
from prefopt.rewards import build_aux_reward, score_responses

log = logging.getLogger(__name__)
COMPILED_WIDTH_MULTIPLE = 64  # packed row widths under trainer.layout.compile: few shapes, few recompilations


@dataclass(frozen=True)
class TrainablePart:
    """A module the optimizer updates, with the options of its parameter group (lr, weight decay)."""

    module: torch.nn.Module
    optimizer_options: dict


@dataclass
class PreparedRun:
    policy: torch.nn.Module
    tokenizer: object
    table: SequenceTable
    train: PairSplit
    eval: PairSplit
    truth: GroundTruth  # what the dataset knows (`NO_GROUND_TRUTH`: nothing)
    candidates: Tensor | None  # (P, K) sequence ids of each prompt's candidates, where the truth has them
    kl_side: dict[int, list[int]] | None  # prompt id -> side sequence ids for the KL estimator
    inputs: LossInputs
    reference_fit: dict | None
    aux_components: dict[str, Tensor] = field(default_factory=dict)  # name -> (S,) unweighted r_k
    data_report: dict = field(default_factory=dict)  # loading and tokenization counts, for summary.json
    reference: object = None  # the frozen pi_ref (a model, or the policy with its adapters disabled)
    aux_reward: object = None  # the CompositeReward R, for scoring generated text
    trainable: dict[str, TrainablePart] = field(default_factory=dict)  # what the optimizer updates


def prepare(rc: RunConfig, device) -> PreparedRun:
    """Data, aux reward, model, tokens, reference (fitted where the task has one), the caches the loop
    reads, and the trainable parts; each part is asked for what it declares."""
    text, aux_reward = _load_data(rc.dataset_name, rc.dataset, rc.aux_reward_configs, rc.seed)
    truth, needs = text.ground_truth, rc.objective.requirements()
    estimator = KL_ESTIMATORS[rc.kl_name] if needs.kl else NO_KL
    estimator.check(enumerates_responses=truth.enumerates_responses)
    torch.manual_seed(rc.seed)
    policy, tokenizer = MODELS[rc.model_name].build(rc.model, data_vocabulary(text))
    policy.to(device)
    text = data_after_model(text, policy, tokenizer, aux_reward, device)  # the dataset's hook
    log.info("model: %s, %.2f M parameters, on %s", rc.model_name, count_parameters(policy) / 1e6, device)
    table, train, held_out = _tokenize(tokenizer, text)
    candidates = truth.candidate_ids(table)
    if needs.mismatched:
        for split in (train, held_out):
            split.mismatched = _mismatched(table, split, rc.seed)
    fit_report = None
    if wants_reference_fit(truth, rc.dataset, MODELS[rc.model_name].random_init):
        fit_report = fit_to_task(rc, policy, table, candidates, truth, device)
    separate = rc.model.separate_reference()  # None: pi_ref is the starting policy
    reference = frozen_reference(separate, policy, device)
    setup = KLSetup(table, truth.prompts, candidates, reference, rc.kl, rc.seed, device)
    kl_side = estimator.side_sequences(setup)
    layout = rc.trainer.layout
    packing = _packing(layout)
    cached_logps, reference_cache = reference_logps(
        reference, table, packing, layout, rc.trainer.precision, device
    )
    keeps_reference = estimator.reads_reference_model
    if not keeps_reference and not rc.eval.generate:  # nothing reads the model after this pass
        reference = None
        free_memory(device)
    aux_rewards, aux_components = _aux_scores(aux_reward, table, device)
    trainable = _trainable_parts(policy, rc.trainer.optimizer, rc.objective, needs, device)
    inputs = LossInputs(
        objective=OBJECTIVES[rc.objective_name],
        hparams=rc.objective,
        reference_logps=cached_logps,
        aux_rewards=aux_rewards,
        reference_model=reference if keeps_reference else None,
        value_head=trainable["value_head"].module if "value_head" in trainable else None,
        kl_estimator=estimator,
        chunk_tokens=layout.logps_chunk_tokens,
        aux_components=aux_components,
        packing=packing,
        policy_is_reference=separate is None,  # pi_ref = pi_theta0 until the first optimizer step
    )
    report = {**text.report, "train_pairs": len(train), "eval_pairs": len(held_out)}
    report |= {"tokenization": table.counts.as_dict(), "reference_logps_cache": reference_cache}
    return PreparedRun(
        policy, tokenizer, table, train, held_out, truth, candidates, kl_side, inputs, fit_report,
        aux_components, report, reference, aux_reward, trainable,
    )  # fmt: skip


def _load_data(name: str, dataset, aux_reward_configs: dict, seed: int) -> tuple[TextData, object]:
    """The dataset's text pairs and the aux reward R (a bad reward fails here, before the model loads)."""
    text = DATASETS[name].load(dataset, seed)
    log.info("data: %s, %d train and %d held-out pairs", name, len(text.train), len(text.eval))
    aux_reward = build_aux_reward(aux_reward_configs, text.task)
    for request in text.requests_after_model():
        request.check_scorer(aux_reward.components if aux_reward is not None else {})
    return text, aux_reward


def _tokenize(tokenizer, text: TextData) -> tuple[SequenceTable, PairSplit, PairSplit]:
    table = SequenceTable(tokenizer, text.max_prompt_tokens, text.max_response_tokens, text.max_length)
    train, held_out = _split(table, text.train, "train"), _split(table, text.eval, "eval")
    log.info(
        "tokenized: %d train and %d held-out pairs, %d sequences; %d prompts and %d responses cut to the "
        "length budget",
        len(train),
        len(held_out),
        len(table),
        table.counts.prompts_cut,
        table.counts.responses_cut,
    )
    return table, train, held_out


def _packing(layout) -> Packing:
    width = COMPILED_WIDTH_MULTIPLE if layout.compile else 1
    return Packing(layout.packing, layout.pack_tokens, width, layout.share_prompts)


def _aux_scores(aux_reward, table: SequenceTable, device) -> tuple[Tensor | None, dict[str, Tensor]]:
    """R (S,) and each unweighted r_k (S,) of every table sequence; (None, {}) without an aux reward."""
    if aux_reward is None:
        return None, {}
    prompts, responses = table.texts(list(range(len(table))))
    scores = {
        name: score_responses(reward, prompts, responses, progress=progress_enabled())
        for name, reward in aux_reward.components.items()
    }
    as_tensor = lambda values: torch.as_tensor(values, dtype=torch.float32, device=device)  # noqa: E731
    return as_tensor(aux_reward.combine(scores)), {name: as_tensor(v) for name, v in scores.items()}


def _trainable_parts(policy, optimizer, objective, needs, device) -> dict[str, TrainablePart]:
    """The policy (the `trainer.optimizer` options), and a value head where the objective declares one
    (the objective's own learning rate; the optimizer's default weight decay)."""
    parts = {"policy": TrainablePart(policy, {"lr": optimizer.lr, "weight_decay": optimizer.weight_decay})}
    if needs.value_head:
        head = ValueHead(policy.config.hidden_size, objective.value_head_width).to(device)
        parts["value_head"] = TrainablePart(head, {"lr": objective.value_head_lr})
    return parts


def _split(table: SequenceTable, pairs: TextPairs, name: str) -> PairSplit:
    """Tokenize a split's pairs in batched calls; pairs the length budget leaves no room for are dropped."""
    dropped_before = table.counts.pairs_dropped
    kept, prompts, chosen, rejected = table.add_pairs(pairs.prompts, pairs.chosen, pairs.rejected)
    if not kept:
        raise ValueError(
            f"dataset: every {name} pair was dropped: its prompt leaves no room for a response under "
            f"dataset.max_length = {table.limits.max_length}"
        )
    if table.counts.pairs_dropped > dropped_before:
        log.warning(
            "%s: %d pairs dropped (no room for a response under dataset.max_length), e.g. pairs %s",
            name,
            table.counts.pairs_dropped - dropped_before,
            table.counts.dropped_examples[dropped_before : dropped_before + 5],
        )
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    labels = torch.tensor([pairs.labels[i] for i in kept])
    return PairSplit(as_long(chosen), as_long(rejected), labels, as_long(prompts))


def _mismatched(table: SequenceTable, split: PairSplit, seed: int) -> Tensor:
    """Pair each example's prompt with the chosen response of a random example of another prompt (KTO's z)."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    sequences = []
    for i in range(len(split)):
        j = next((int(k) for k in order.roll(-i) if split.prompts[k] != split.prompts[i]), int(order[i]))
        response = table.sequence_response[int(split.chosen[j])]
        sequences.append(table.sequence(int(split.prompts[i]), response))
    return torch.tensor(sequences, dtype=torch.long)
