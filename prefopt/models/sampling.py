"""Sampling responses from a causal LM: batched `generate` with left padding and the KV cache, stopping at
the tokenizer's EOS, the generation config's EOS and the chat template's end-of-turn token."""

from __future__ import annotations

import torch

from prefopt.progress import progress

END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")  # ChatML, Gemma, Llama 3, Phi 3


def stop_token_ids(model, tokenizer) -> list[int]:
    """Where a response ends: the tokenizer's EOS, the model's generation config's EOS (an int or a list,
    e.g. Gemma's [<eos>, <end_of_turn>]), and an end-of-turn token the chat template writes (a GGUF's
    config may name only <eos> while the template closes turns with <end_of_turn>)."""
    stops = {tokenizer.eos_token_id}
    generation = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops |= set(generation if isinstance(generation, list | tuple) else [generation])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        added = getattr(tokenizer, "get_added_vocab", dict)()
        special = set(getattr(tokenizer, "all_special_tokens", [])) | set(added)
        stops |= {tokenizer.convert_tokens_to_ids(t) for t in END_OF_TURN if t in template and t in special}
    return sorted(t for t in stops if isinstance(t, int))


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], cfg, device, seed: int) -> tuple[list, list]:
    """`cfg.num_samples` responses per prompt: batched `generate` with left padding and the KV cache.
    Returns texts (P, S) (cut at a stop token, special tokens dropped) and their token counts."""
    texts, counts, _ = sample_until_stop(model, tokenizer, prompt_ids, cfg, device, seed)
    return texts, counts


@torch.no_grad()
def sample_until_stop(
    model, tokenizer, prompt_ids: list[list[int]], cfg, device, seed: int, sampled_ids: list | None = None
) -> tuple:
    """`sample`, and per sample whether it ended at a stop token (`stop_token_ids`) rather than at
    `cfg.max_new_tokens`: texts (P, S), token counts (P, S), finished (P, S). `sampled_ids`, when given,
    gets each prompt's (S,) sampled token ids appended, the stop token included (for `sample_kl`)."""
    torch.manual_seed(seed)
    stops, pad = stop_token_ids(model, tokenizer), tokenizer.pad_token_id
    texts, counts, finished = [], [], []
    batches = range(0, len(prompt_ids), cfg.batch_size)
    for start in progress(batches, desc="generate", unit="batch"):
        chunk = prompt_ids[start : start + cfg.batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
        out = model.generate(
            input_ids,
            attention_mask=attention,
            max_new_tokens=cfg.max_new_tokens,
            num_return_sequences=cfg.num_samples,
            pad_token_id=pad,
            eos_token_id=stops,
            **(sampling if cfg.temperature > 0 else {"do_sample": False}),
        )[:, width:]
        for row in range(len(chunk)):
            group = out[row * cfg.num_samples : (row + 1) * cfg.num_samples].tolist()
            ends = [next((i for i, t in enumerate(seq) if t in stops), None) for seq in group]
            if sampled_ids is not None:
                sampled_ids.append([seq if end is None else seq[: end + 1] for seq, end in zip(group, ends)])
            ids = [seq if end is None else seq[:end] for seq, end in zip(group, ends)]
            ids = [[t for t in seq if t != pad] for seq in ids]
            texts.append([tokenizer.decode(seq, skip_special_tokens=True) for seq in ids])
            counts.append([len(seq) for seq in ids])
            finished.append([end is not None for end in ends])
    return texts, counts, finished
