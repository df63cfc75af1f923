"""What both tools of the DPO throughput benchmark are given: one model shape, one set of preference pairs,
one tokenizer, one saved random Llama, one batch order. Imports neither trl nor anything that needs a GPU.

Token ids are drawn first and written as text through a word-level tokenizer (word "t<i>" is token i, no
BOS), so a text's length in words is its length in tokens and both tools tokenize it to the same ids.
A completion's length counts its EOS: prefopt appends EOS to a response, TRL to the completion text.

A real model (`--model`) trains on chat pairs instead: one user message and two assistant turns of common
words (each one token after a space in the model's tokenizer), seeded, their lengths in words drawn as the
random Llama's are in tokens; their ids are taken as TRL's DPOTrainer takes conversational rows (prefopt's
chat tokenization is the same): the prompt through the template's generation prompt, a completion the
conversation's ids after the prompt's, through the template's end of turn.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

LENGTHS = ("fixed", "variable")


@dataclass(frozen=True)
class Shape:
    """A random Llama and the pairs it trains on."""

    name: str
    vocab_size: int  # the last two ids are <pad> and <eos>
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    dtype: str  # weights as saved and trained: float32 | bfloat16
    pairs_per_step: int
    prompt_tokens: int  # fixed lengths; variable ones are uniform in [prompt_min, 2 * prompt_tokens]
    completion_tokens: int  # EOS included; variable: uniform in [completion_min, 2 * completion_tokens]
    prompt_min: int
    completion_min: int  # >= 2: a completion has at least one word before its EOS

    def prompt_range(self, lengths: str) -> tuple[int, int]:
        fixed = (self.prompt_tokens, self.prompt_tokens)
        return fixed if lengths == "fixed" else (self.prompt_min, 2 * self.prompt_tokens)

    def completion_range(self, lengths: str) -> tuple[int, int]:
        fixed = (self.completion_tokens, self.completion_tokens)
        return fixed if lengths == "fixed" else (self.completion_min, 2 * self.completion_tokens)

    @property
    def max_tokens(self) -> int:
        """The longest prompt + completion either length setting makes."""
        return 2 * (self.prompt_tokens + self.completion_tokens)


SHAPES = {
    # 5.5 M parameters (2.1 M of them the tied embedding), runs on one CPU thread.
    "cpu": Shape("cpu", 8192, 256, 768, 4, 4, 4, "float32", 8, 64, 64, 8, 4),
    # Llama-3.2-1B's shape (1236 M parameters, tied embedding), bf16, as ../shared/bench/trl_dpo.py.
    "gpu-1b": Shape("gpu-1b", 128256, 2048, 8192, 16, 32, 8, "bfloat16", 8, 256, 256, 32, 16),
}


@dataclass(frozen=True)
class Pair:
    """Token ids; chosen and rejected end with EOS."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens both tools forward: prompt + chosen and prompt + rejected."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


def pad_id(shape: Shape) -> int:
    return shape.vocab_size - 2


def eos_id(shape: Shape) -> int:
    return shape.vocab_size - 1


def make_pairs(shape: Shape, lengths: str, count: int, seed: int = 0) -> list[Pair]:
    """`count` pairs of random words, lengths fixed or uniform in the shape's ranges; chosen != rejected."""
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {LENGTHS}, got {lengths!r}")
    draw = random.Random(f"{shape.name}/{lengths}/{seed}")
    words = lambda n: [draw.randrange(shape.vocab_size - 2) for _ in range(n)]  # noqa: E731
    pairs = []
    while len(pairs) < count:
        p = draw.randint(*shape.prompt_range(lengths))
        c, r = (draw.randint(*shape.completion_range(lengths)) for _ in range(2))
        chosen, rejected = words(c - 1) + [eos_id(shape)], words(r - 1) + [eos_id(shape)]
        if chosen != rejected:
            pairs.append(Pair(words(p), chosen, rejected))
    return pairs


# Common English words; a chat pair's text is drawn from those that are one token after a space.
WORDS = """
the of and to in is that it for on with as was at by from this have not are but or be one all would there
their what so up out if about who get which go when make can like time no just him know take people into
year your good some could them see other than then now look only come its over think also back after use two
how our work first well way even new want because any these give day most us river house light water stone
green small old garden road city night morning winter summer book letter music song paper table window door
tree field hill mountain sea ship train bridge market street school friend family child teacher doctor story
question answer idea plan reason problem simple quiet bright warm cold early late fast slow happy
careful clear strong soft long short open close read write walk carry build cook paint learn help bring keep
""".split()  # noqa: SIM905 (a paragraph of words reads better than a list of strings)


@dataclass(frozen=True)
class ChatPair:
    """A conversational row (TRL's format, and prefopt's `dataset=preference` messages) and its token ids as
    both tools take them; `tokens` as `Pair.tokens`."""

    chat: dict  # {"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}
    prompt: list[int]  # through the chat template's generation prompt
    chosen: list[int]  # the conversation's ids after the prompt's: the turn through its end of turn
    rejected: list[int]

    tokens = Pair.tokens


def chat_words(tokenizer) -> list[str]:
    """The words of `WORDS` that `tokenizer` encodes as one token after a space (a word is then a token)."""
    ids = tokenizer([" " + w for w in WORDS], add_special_tokens=False)["input_ids"]
    return sorted({w for w, i in zip(WORDS, ids) if len(i) == 1})


def chat_ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    """TRL's tokenization of conversational input: the chat template, tokenized by it."""
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt
    )["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def make_chat_pairs(shape: Shape, lengths: str, count: int, tokenizer, seed: int = 0) -> list[ChatPair]:
    """`count` chat pairs: a question of p words, answers of c and r words (p, c, r drawn as `make_pairs`
    draws token counts; the final punctuation counts as one), tokenized as TRL does."""
    if lengths not in LENGTHS:
        raise ValueError(f"lengths must be one of {LENGTHS}, got {lengths!r}")
    draw = random.Random(f"chat/{shape.name}/{lengths}/{seed}")
    vocab = chat_words(tokenizer)

    def sentence(n: int, end: str) -> str:
        words = [draw.choice(vocab) for _ in range(max(n - 1, 1))]
        return " ".join([words[0].capitalize(), *words[1:]]) + end

    pairs = []
    while len(pairs) < count:
        p = draw.randint(*shape.prompt_range(lengths))
        c, r = (draw.randint(*shape.completion_range(lengths)) for _ in range(2))
        prompt = [{"role": "user", "content": sentence(p, "?")}]
        chosen, rejected = ([{"role": "assistant", "content": sentence(n, ".")}] for n in (c, r))
        if chosen != rejected:
            pairs.append(chat_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tokenizer))
    return pairs


def chat_pair(row: dict, tokenizer) -> ChatPair:
    """A conversational {prompt, chosen, rejected} row with its token ids as TRL takes them: the prompt
    through the generation prompt, each answer from where prompt and conversation diverge."""
    prompt_ids = chat_ids(tokenizer, row["prompt"], generation_prompt=True)
    whole = [chat_ids(tokenizer, row["prompt"] + row[side]) for side in ("chosen", "rejected")]
    cut = min(common_prefix(prompt_ids, w) for w in whole)
    return ChatPair(row, prompt_ids[:cut], whole[0][cut:], whole[1][cut:])


def read_chat_pairs(path: Path, count: int, tokenizer) -> tuple[list[ChatPair], list[ChatPair]]:
    """`count` train pairs and one held-out pair from a JSONL file of conversational rows (e.g. the
    model's own answers, `benchmarks/sample_chat_pairs.py`), in file order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < count + 1:
        raise SystemExit(f"{path}: {len(rows)} pairs; the runs need {count} and one held out")
    pairs = [chat_pair(row, tokenizer) for row in rows[: count + 1]]
    return pairs[:count], pairs[count:]


def text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def row(pair: Pair | ChatPair) -> dict:
    """A {prompt, chosen, rejected} text row; completions without their EOS (each tool appends it) and with a
    leading space (TRL tokenizes prompt + completion as one text: the space keeps the words apart). A chat
    pair's row is its messages."""
    if isinstance(pair, ChatPair):
        return pair.chat
    completion = lambda ids: " " + text(ids[:-1])  # noqa: E731
    return {
        "prompt": text(pair.prompt),
        "chosen": completion(pair.chosen),
        "rejected": completion(pair.rejected),
    }


def batch_order(num_pairs: int, pairs_per_step: int, steps: int, seed: int) -> list[list[int]]:
    """The pairs of each step as prefopt's loop draws them (its `PairSampler`, seeded with the run's seed),
    so TRL can be handed the same batches in the same order."""
    from prefopt.data.sampler import PairSampler

    sampler = PairSampler(num_pairs, pairs_per_step, seed)
    return [sampler.next().tolist() for _ in range(steps)]


def word_tokenizer(shape: Shape):
    """Word "t<i>" is token i; <pad> and <eos> are the last two ids; no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(shape.vocab_size - 2)}
    vocab["<pad>"], vocab["<eos>"] = pad_id(shape), eos_id(shape)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def save_random_llama(shape: Shape, directory: Path, seed: int = 0) -> int:
    """A random Llama of `shape` and its tokenizer, saved by save_pretrained; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=max(4096, shape.max_tokens),
        tie_word_embeddings=True,
        rope_theta=500000.0,
        bos_token_id=None,
        eos_token_id=eos_id(shape),
        pad_token_id=pad_id(shape),
    )
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1B init is slow on a CPU
        model = LlamaForCausalLM(config).to(getattr(torch, shape.dtype))
    model.save_pretrained(directory)
    word_tokenizer(shape).save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def model_shape(base: Shape, model_dir: Path, name: str) -> Shape:
    """`base`'s dtype, batch and lengths with the architecture of the checkpoint in `model_dir`."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    return replace(
        base,
        name=name,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
    )


def count_parameters(model_dir: Path) -> int:
    """Parameters in a checkpoint's safetensors files (a tied embedding is stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(f.get_slice(key).get_shape())
    return total


def write_dataset(directory: Path, train: list[Pair], held_out: list[Pair]) -> None:
    """train.jsonl and test.jsonl in generator order: prefopt's `dataset=preference dataset.path=<dir>`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", train), ("test", held_out)):
        lines = [json.dumps(row(p)) for p in pairs]
        (directory / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def trl_rows(train: list[Pair], order: list[list[int]]) -> list[dict]:
    """The train rows in the order prefopt's sampler visits them (TRL reads them sequentially)."""
    return [row(train[i]) for step in order for i in step]


def step_tokens(train: list[Pair], order: list[list[int]]) -> list[int]:
    """Real tokens of each step, from the data."""
    return [sum(train[i].tokens for i in step) for step in order]


def step_flops(shape: Shape, train: list[Pair], order: list[list[int]]) -> list[float]:
    """Model FLOPs of each step's policy update (forward + backward, real tokens only, the reference's forward
    not counted): 6 * (decoder matmul weights + lm_head) per token, plus causal attention 6 * layers * d * n^2
    per sequence of n tokens (QK^T and AV)."""
    d, layers = shape.hidden_size, shape.num_layers
    head_dim = d // shape.num_heads
    attention = d * d * 2 + 2 * d * shape.num_kv_heads * head_dim  # q, o; k, v
    matmul = layers * (attention + 3 * d * shape.intermediate_size) + shape.vocab_size * d
    flops = []
    for step in order:
        lengths = [len(train[i].prompt) + len(y) for i in step for y in (train[i].chosen, train[i].rejected)]
        flops.append(sum(6 * matmul * n + 6 * layers * d * n * n for n in lengths))
    return flops
