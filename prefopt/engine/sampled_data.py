"""Data that needs the model: pairs built from the starting model's own samples (a dataset's request),
and the vocabulary the embedded word tokenizer is built from."""

from __future__ import annotations

import logging

from prefopt.data import TextData
from prefopt.data.batching import SequenceTable
from prefopt.data.tokenization import render_prompt
from prefopt.progress import progress_enabled
from prefopt.rewards import score_responses

log = logging.getLogger(__name__)


def data_after_model(text: TextData, model, tokenizer, aux_reward, device) -> TextData:
    """The dataset's hook once the starting model exists: the pairs it asks to build from the model's
    own samples (`TextData.requests_after_model`), else the data as it is."""
    for _ in text.requests_after_model():
        text = pairs_from_model_samples(text, model, tokenizer, aux_reward, device)
    return text


def pairs_from_model_samples(text: TextData, model, tokenizer, aux_reward, device) -> TextData:
    """Pairs from `samples_per_prompt` completions of each prompt by the starting model (the reference),
    ranked by the request's aux reward (the DPO paper's IMDb pairs)."""
    from dataclasses import replace

    from prefopt.config import GenerationConfig
    from prefopt.data.imdb import pairs_from_samples
    from prefopt.models.sampling import sample

    request = text.pairs_from_samples
    cfg = GenerationConfig(num_samples=request.samples_per_prompt, max_new_tokens=request.max_new_tokens)
    table = SequenceTable(tokenizer, text.max_prompt_tokens, text.max_response_tokens, text.max_length)
    scorer = aux_reward.components[request.scorer]
    was_training = model.training
    model.eval()
    splits = {}
    for name, prompts in (("train", request.train_prompts), ("eval", request.eval_prompts)):
        ids = [table.prompt_ids[table.prompt(p)] for p in prompts]
        samples, _ = sample(model, tokenizer, ids, cfg, device, request.seed)
        flat = [y for row in samples for y in row]
        repeated = [p for p in prompts for _ in range(cfg.num_samples)]
        scores = score_responses(scorer, repeated, flat, progress=progress_enabled()).reshape(
            len(prompts), -1
        )
        splits[name] = pairs_from_samples(
            prompts, samples, scores.tolist(), request.max_pairs_per_prompt, request.seed
        )
        log.info(
            "%s: %d pairs from %d prompts x %d samples",
            name,
            len(splits[name]),
            len(prompts),
            cfg.num_samples,
        )
    model.train(was_training)
    for name, pairs in splits.items():
        if not len(pairs):
            raise ValueError(f"dataset: no {name} pair: every prompt's samples scored alike")
    report = {**text.report, "sampled_pairs": {k: len(v) for k, v in splits.items()}}
    return replace(text, train=splits["train"], eval=splits["eval"], report=report, pairs_from_samples=None)


def data_vocabulary(text: TextData) -> list[str]:
    """Every word of the data (for the embedded word tokenizer), chat messages' roles and contents too."""
    known = text.ground_truth.vocabulary()
    if known is not None:  # a ground truth knows every word of its prompts and candidates
        return known

    def words(value) -> list[str]:
        if isinstance(value, str):
            return value.split()
        return render_prompt(None, value).split()  # messages, as a tokenizer without a template sees them

    pairs = (text.train, text.eval)
    vocabulary = {
        w for p in pairs for column in (p.prompts, p.chosen, p.rejected) for t in column for w in words(t)
    }
    for request in text.requests_after_model():  # prompts whose responses the model will write
        vocabulary |= {w for p in (*request.train_prompts, *request.eval_prompts) for w in words(p)}
    return sorted(vocabulary)
