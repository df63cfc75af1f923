"""Rewards from Hugging Face sequence classifiers: toxicity (HPO's R2), sentiment, and reward models.

Each loads its model once per run with `from_pretrained` (a hub id or a local directory), in eval mode on
the GPU when there is one, and scores without gradients in batches sorted by token length (less padding).
A `Classifier` keeps the logits of every input it has seen, so a text scored twice in a run is forwarded
once: `score_responses` dedups the rows of one call, this cache spans calls (e.g. training, then eval).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from omegaconf import MISSING

from prefopt.errors import ConfigError, ConfigFieldError
from prefopt.models.pretrained import (
    DTYPES,
    check_local_path,
    local_path_problem,
    require_safetensors,
    safetensors_hint,
)
from prefopt.progress import progress
from prefopt.rewards.base import AuxReward, RewardConfig, RewardFn

log = logging.getLogger(__name__)
TEXTS = ("response", "prompt+response")  # what a single-text classifier reads
FORMATS = ("auto", "chat", "pair", "concat")  # how a reward model reads (prompt, response)


@dataclass
class ClassifierConfig(RewardConfig):
    model: str = MISSING  # hub id or local directory of an AutoModelForSequenceClassification checkpoint
    batch_size: int = 32  # texts per forward pass
    max_length: int = 512  # tokens; longer inputs are cut (the tokenizer's truncation side)
    device: str = "auto"  # auto: cuda when present, else cpu; or cpu, cuda, cuda:1, ...
    dtype: str = "float32"  # weight dtype: float32 | bfloat16 | float16
    use_safetensors: bool = True  # weights from .safetensors only; false: pickles too (only ones you trust)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigFieldError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.max_length < 1:
            raise ConfigFieldError("max_length", f"must be >= 1, got {self.max_length}")
        if self.dtype not in DTYPES:
            raise ConfigFieldError("dtype", f"expected one of {list(DTYPES)}, got {self.dtype!r}")
        if not self.device.startswith(("auto", "cpu", "cuda", "mps")):
            raise ConfigFieldError("device", f"expected auto, cpu, cuda[:i] or mps, got {self.device!r}")

    def preflight(self) -> None:
        """Before anything loads: a local `model` directory exists (a hub id is looked up when it loads)."""
        problem = local_path_problem(self.model)
        if problem:
            raise ConfigFieldError("model", problem)


def _check_text(text: str) -> None:
    if text not in TEXTS:
        raise ConfigFieldError("text", f"expected one of {list(TEXTS)}, got {text!r}")


class Classifier:
    """A sequence classifier and its tokenizer; `logits(inputs)` -> (N, K) float32, cached per input.

    An input is a text, or a (prompt, response) pair tokenized as a text pair.
    """

    def __init__(self, model, tokenizer, batch_size: int, max_length: int, name: str = "classifier"):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length, self.name = batch_size, max_length, name
        self.add_special_tokens = True  # False for texts a chat template has already framed
        self.cache: dict[Any, np.ndarray] = {}  # input -> (K,) logits

    @property
    def labels(self) -> list[str]:
        id2label = self.model.config.id2label
        return [str(id2label[i]) for i in range(self.model.config.num_labels)]

    def logits(self, inputs: list) -> np.ndarray:
        new = list(dict.fromkeys(x for x in inputs if x not in self.cache))
        if new:
            self._forward(new)
        return np.stack([self.cache[x] for x in inputs]) if inputs else np.zeros((0, len(self.labels)))

    def _forward(self, inputs: list) -> None:
        import torch

        pairs = isinstance(inputs[0], tuple)
        args = ([p for p, _ in inputs], [y for _, y in inputs]) if pairs else (inputs,)
        encoded = self.tokenizer(
            *args, truncation=True, max_length=self.max_length, add_special_tokens=self.add_special_tokens
        )
        rows = [{k: encoded[k][i] for k in encoded} for i in range(len(inputs))]
        order = sorted(
            range(len(inputs)), key=lambda i: -len(rows[i]["input_ids"])
        )  # longest first: OOM early
        device = next(self.model.parameters()).device
        bar = progress(total=len(inputs), desc=f"aux_reward.{self.name}", unit="text")
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                batch = self.tokenizer.pad([rows[i] for i in chunk], return_tensors="pt").to(device)
                logits = self.model(**batch).logits.float().cpu().numpy()  # (B, K)
                for i, row in zip(chunk, logits, strict=True):
                    self.cache[inputs[i]] = row
                bar.update(len(chunk))
        bar.close()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_classifier(cfg: ClassifierConfig, name: str) -> Classifier:
    """`from_pretrained` of the model and its tokenizer; a local-looking path that is no directory, or a
    checkpoint that fails to load, raises a one-line ValueError naming aux_reward.<name>.model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    key = f"aux_reward.{name}.model"
    path = check_local_path(cfg.model, key)
    source = str(path) if path is not None else cfg.model
    opt_out, safe = f"aux_reward.{name}.use_safetensors", bool(cfg.use_safetensors)
    if safe:
        require_safetensors(path, f"{key}={cfg.model}", opt_out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        with safetensors_hint(f"{key}={cfg.model}", opt_out, safe):
            model = AutoModelForSequenceClassification.from_pretrained(
                source, dtype=getattr(torch, cfg.dtype), use_safetensors=True if safe else None
            )
    except ConfigError:  # pickled weights only: it names the opt-out
        raise
    except (OSError, ValueError) as e:  # no checkpoint there, offline, or no tokenizer files
        raise ValueError(f"{key}={cfg.model}: cannot load it ({str(e).strip().splitlines()[0]})") from e
    if tokenizer.pad_token is None:  # decoder reward models often have none
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # a decoder classifier finds the last real token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(resolve_device(cfg.device)).eval().requires_grad_(False)
    log.info("aux_reward.%s: %s on %s, labels %s", name, cfg.model, model.device, model.config.id2label)
    return Classifier(model, tokenizer, cfg.batch_size, cfg.max_length, name)


def single_texts(text: str, prompts: list[str], responses: list[str]) -> list[str]:
    if text == "response":
        return list(responses)
    return [f"{p}\n{y}" for p, y in zip(prompts, responses, strict=True)]


def label_index(classifier: Classifier, label: str, key: str) -> int:
    """The index of `label`, matched by name (any case) or given as an index."""
    names = [n.lower() for n in classifier.labels]
    if label.lower() in names:
        return names.index(label.lower())
    if label.isdigit() and int(label) < len(names):
        return int(label)
    raise ValueError(f"{key}: {label!r} is not a label of the model; its labels are {classifier.labels}")


@dataclass
class ToxicityConfig(ClassifierConfig):
    model: str = "unitary/toxic-bert"
    text: str = "response"  # response | prompt+response: what the classifier reads
    labels: list[str] | None = None  # label names to take the max over; None: all the model's labels

    def __post_init__(self):
        super().__post_init__()
        _check_text(self.text)
        if self.labels is not None and not self.labels:
            raise ConfigFieldError("labels", "an empty list selects no label; use null for all labels")


def build_toxicity(cfg: ToxicityConfig, context: Any) -> RewardFn:
    """HPO's R2 = 1 - max_k sigmoid(logit_k(y)), over the multi-label classifier's (selected) labels."""
    classifier = load_classifier(cfg, "toxicity")
    columns = [label_index(classifier, label, "aux_reward.toxicity.labels") for label in cfg.labels or []]
    columns = columns or list(range(len(classifier.labels)))

    def toxicity(prompts: list[str], responses: list[str]) -> list[float]:
        logits = classifier.logits(single_texts(cfg.text, prompts, responses))[:, columns]  # (N, K)
        return (1.0 - _sigmoid(logits).max(axis=1)).tolist()

    toxicity.classifier = classifier
    return toxicity


@dataclass
class SentimentConfig(ClassifierConfig):
    model: str = "lvwerra/distilbert-imdb"
    text: str = "response"  # response | prompt+response: what the classifier reads
    positive: str = "POSITIVE"  # the positive label: its name (any case) or its index, e.g. "1"
    score: str = "probability"  # probability: p(positive), softmax; logit_diff: its log-odds

    def __post_init__(self):
        super().__post_init__()
        _check_text(self.text)
        if self.score not in ("probability", "logit_diff"):
            raise ConfigFieldError("score", f"expected probability or logit_diff, got {self.score!r}")


def build_sentiment(cfg: SentimentConfig, context: Any) -> RewardFn:
    """r = softmax(logits)[positive], or logit_positive - logsumexp(other logits) (with two labels, the
    logit difference)."""
    classifier = load_classifier(cfg, "sentiment")
    k = label_index(classifier, cfg.positive, "aux_reward.sentiment.positive")

    def sentiment(prompts: list[str], responses: list[str]) -> list[float]:
        logits = classifier.logits(single_texts(cfg.text, prompts, responses))  # (N, K)
        log_p = logits - _logsumexp(logits)  # (N, K)
        if cfg.score == "probability":
            return np.exp(log_p[:, k]).tolist()
        others = np.delete(logits, k, axis=1)
        return (logits[:, k] - _logsumexp(others)[:, 0]).tolist()

    sentiment.classifier = classifier
    return sentiment


@dataclass
class RewardModelConfig(ClassifierConfig):
    model: str = "OpenAssistant/reward-model-deberta-v3-large-v2"
    # auto: chat when the tokenizer has a chat template, else pair; chat: messages user=prompt,
    # assistant=response through the template; pair: (prompt, response) as a text pair; concat: one text
    format: str = "auto"
    separator: str = "\n"  # format=concat: between prompt and response
    index: int = 0  # which logit is the reward (0 for a one-logit reward model)

    def __post_init__(self):
        super().__post_init__()
        if self.format not in FORMATS:
            raise ConfigFieldError("format", f"expected one of {list(FORMATS)}, got {self.format!r}")


def build_reward_model(cfg: RewardModelConfig, context: Any) -> RewardFn:
    """r(x, y) = logit_index of the reward model on (x, y), formatted as `cfg.format` says."""
    classifier = load_classifier(cfg, "reward_model")
    n_logits = len(classifier.labels)
    if not 0 <= cfg.index < n_logits:
        raise ValueError(f"aux_reward.reward_model.index: {cfg.index}, but the model has {n_logits} logits")
    tokenizer = classifier.tokenizer
    has_template = bool(getattr(tokenizer, "chat_template", None))
    form = ("chat" if has_template else "pair") if cfg.format == "auto" else cfg.format
    if form == "chat" and not has_template:
        raise ValueError(
            f"aux_reward.reward_model.format=chat: the tokenizer of {cfg.model} has no chat template"
        )
    classifier.add_special_tokens = form != "chat"  # the template writes its own BOS

    def inputs(prompts: list[str], responses: list[str]) -> list:
        rows = zip(prompts, responses, strict=True)
        if form == "pair":
            return list(rows)
        if form == "concat":
            return [f"{p}{cfg.separator}{y}" for p, y in rows]
        chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": y}] for p, y in rows]
        return [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]

    def reward_model(prompts: list[str], responses: list[str]) -> list[float]:
        return classifier.logits(inputs(prompts, responses))[:, cfg.index].astype(np.float64).tolist()

    reward_model.classifier = classifier
    return reward_model


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """(N, K) -> (N, 1)."""
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))


TOXICITY = AuxReward(build_toxicity, ToxicityConfig, "HPO R2 = 1 - max_k sigmoid(classifier logit_k(y))")
SENTIMENT = AuxReward(build_sentiment, SentimentConfig, "p(positive | y), softmax of a sentiment classifier")
REWARD_MODEL = AuxReward(build_reward_model, RewardModelConfig, "scalar logit of a reward model on (x, y)")
