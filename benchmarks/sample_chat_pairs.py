"""Chat pairs written by a real model: two sampled answers per user question, for `dpo_throughput.py --pairs`.

    python benchmarks/sample_chat_pairs.py --model smollm2 --pairs 96 --out /tmp/smollm2-chat-pairs.jsonl

The questions are distinct (a template x a topic, shuffled with the seed), so no two pairs share a prompt;
each answer is the model's own, sampled through its chat template and cut at its end of turn
(`prefopt.models.sampling`), at most `--max-new-tokens` tokens. Which answer is "chosen" does not matter
for throughput; the first sample is. Pairs whose two answers are equal or empty are skipped.

With `--turns T`, a pair's prompt is a conversation the way HH-RLHF's are: 1 to T user turns (uniform,
seeded), each earlier one answered by one sample of the model and followed by a follow-up question; the
pair is two answers to the last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

TEMPLATES = [
    "Give me three tips for {}.",
    "Explain {} to a ten-year-old.",
    "What are common mistakes people make with {}?",
    "Write a short paragraph about {}.",
    "How do I get started with {}?",
    "What should a beginner know about {}?",
]
TOPICS = [
    "baking bread", "learning the guitar", "saving money", "running a marathon", "growing tomatoes",
    "writing a cover letter", "learning Spanish", "public speaking", "caring for a cat",
    "camping in the rain", "making coffee", "painting with watercolours", "studying for exams",
    "cycling to work", "cleaning a kitchen", "planning a trip to Japan", "keeping a journal",
    "learning to swim", "building a bookshelf", "meditation", "taking better photos", "cooking rice",
    "training a puppy", "reading more books", "playing chess",
]  # fmt: skip


FOLLOW_UPS = [
    "Can you give me an example?", "Why is that?", "What else should I know?",
    "Can you make that shorter?", "What would you do first?", "Is there a common mistake to avoid?",
]  # fmt: skip


def questions(count: int, seed: int) -> list[str]:
    every = [t.format(topic) for t, topic in itertools.product(TEMPLATES, TOPICS)]
    if count > len(every):
        raise SystemExit(f"--pairs {count}: at most {len(every)} distinct questions")
    random.Random(seed).shuffle(every)
    return every[:count]


def main(argv=None) -> None:
    import torch
    from dpo_data import chat_ids  # benchmarks/ is on sys.path: this file runs as a script
    from dpo_throughput import resolve_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefopt.config.schemas import GenerationConfig
    from prefopt.models.sampling import sample

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a local checkpoint dir or a conf/model preset")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--turns", type=int, default=1, help="user turns per prompt: 1 to this many")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model, "float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    asked = questions(min(args.pairs * 2, len(TEMPLATES) * len(TOPICS)), args.seed)  # spares for skips
    prompts = [[{"role": "user", "content": q}] for q in asked]

    def asking(conversations: list[list[dict]]) -> list[list[int]]:  # the ids up to the assistant's turn
        return [chat_ids(tokenizer, c, generation_prompt=True) for c in conversations]

    rng = random.Random(args.seed)
    earlier_turns = [rng.randrange(args.turns) for _ in prompts]
    one_answer = GenerationConfig(num_samples=1, max_new_tokens=args.max_new_tokens)
    for depth in range(max(earlier_turns, default=0)):  # grow the conversations that go deeper
        growing = [p for p, n in zip(prompts, earlier_turns) if n > depth]
        seed = args.seed + depth + 1
        replies, _ = sample(model, tokenizer, asking(growing), one_answer, "cpu", seed)
        for conversation, (reply,) in zip(growing, replies):
            conversation.append({"role": "assistant", "content": reply.strip() or "I am not sure."})
            conversation.append({"role": "user", "content": rng.choice(FOLLOW_UPS)})
    ids = asking(prompts)
    sampling = GenerationConfig(num_samples=2, max_new_tokens=args.max_new_tokens)  # what `sample` reads
    answers, _ = sample(model, tokenizer, ids, sampling, "cpu", args.seed)
    rows = []
    for prompt, (first, second) in zip(prompts, answers):
        if first.strip() and second.strip() and first != second and len(rows) < args.pairs:
            turn = lambda text: [{"role": "assistant", "content": text.strip()}]  # noqa: E731
            rows.append({"prompt": prompt, "chosen": turn(first), "rejected": turn(second)})
    if len(rows) < args.pairs:
        raise SystemExit(f"only {len(rows)} usable pairs; lower --pairs or raise --max-new-tokens")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} pairs written to {args.out}")


if __name__ == "__main__":
    main()
