"""Reference log-probs cached on disk across runs.

The frozen reference's summed response log-prob of every table sequence, lp_ref(s) = sum_t log pi_ref(y_t |
x, y_<t), is computed in one pass (`prepare._all_sequence_logps`) and stored as one (S,) float32 tensor in
`$PREFOPT_CACHE/reference_logps/<key>.safetensors` (default `~/.cache/prefopt`, beside the fitted
references). The key is a sha256 of everything the values depend on:

- the reference's weights as it holds them in memory (names, dtypes, shapes and bytes: this covers a hub or
  local checkpoint, its dtype, a merged adapter and the tiny model's reference fit alike) and its
  architecture config; under LoRA the reference is the policy with its adapters disabled, so the adapters
  are left out;
- the tokenizer (its serialized backend, special tokens, chat template);
- the table's token ids (every prompt and response and how sequences pair them: data, templates and
  truncation) and its length limits;
- the settings of the pass (chunking, precision), the device it runs on (and the CPU thread count: CPU
  results are bit-identical per thread count), torch / transformers / peft versions and the source of the
  code that computes the pass, so a changed implementation never reads stale values.

A hit reads the values and runs no forward pass. Each entry carries the sha256 of its tensor's bytes in its
safetensors metadata, checked on read: a damaged entry (a digest that does not match, a truncated or
unparsable file, another key's or shape's tensor) is deleted and recomputed with one warning naming the
file. Writes are atomic (a temporary file renamed into place), so parallel jobs never read half a file; a
cache dir that cannot be written (read-only, no permission, disk full) is one warning and the run goes on
uncached.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prefopt.data.batching import SequenceTable
from prefopt.engine.reference_fit import cache_dir as fit_cache_dir
from prefopt.engine.reference_fit import hash_weights
from prefopt.models.shared_prompt_attention import IMPLEMENTATION as SHARED_PROMPT_SDPA

log = logging.getLogger(__name__)
FORMAT = 2  # bump when the stored layout or the key's meaning changes
CODE_MODULES = (  # the code whose source the values depend on
    "prefopt.models.logps",
    "prefopt.data.packing",
    "prefopt.models.shared_prompt_attention",
    "prefopt.engine.prepare",
)
CODE_PACKAGES = ("torch", "transformers", "peft")
KEY_CHARS_LOGGED = 12


def cache_dir() -> Path:
    return fit_cache_dir().parent / "reference_logps"


def cached_reference_logps(
    reference, table: SequenceTable, compute: Callable[[], Tensor], device, enabled: bool = True, **settings
) -> tuple[Tensor, str]:
    """(S,) reference log-probs of every table sequence, on `device`, and how they were obtained: "hit"
    (read from the cache), "miss" (computed by `compute()` and stored) or "off" (computed, cache disabled).
    `settings`: what else changes the values (e.g. chunk_tokens, precision)."""
    if not enabled:
        return compute(), "off"
    key = reference_key(reference, table, device, **settings)
    cached = load(key, len(table))
    if cached is not None:
        log.info("reference log-probs: cache hit (key %s), %d sequences", key[:KEY_CHARS_LOGGED], len(table))
        return cached.to(device), "hit"
    logps = compute()
    store(key, logps)
    log.info(
        "reference log-probs: cache miss (key %s), %d sequences computed and stored in %s",
        key[:KEY_CHARS_LOGGED],
        len(table),
        cache_dir(),
    )
    return logps, "miss"


def reference_key(reference, table: SequenceTable, device, **settings) -> str:
    parts = {
        "format": FORMAT,
        "model": model_fingerprint(reference),
        "tokenizer": tokenizer_fingerprint(table.tokenizer),
        "sequences": sequences_fingerprint(table),
        "limits": asdict(table.limits),
        "settings": settings,
        "device": device_signature(torch.device(device)),
        "code": code_fingerprint(),
    }
    return _sha256_json(parts)


def model_fingerprint(reference) -> str:
    """sha256 of the weights the reference computes with and of its architecture config."""
    from prefopt.models.lora import AdapterDisabledReference

    adapters_off = isinstance(reference, AdapterDisabledReference)
    module = reference.policy if adapters_off else reference
    digest = hashlib.sha256()
    # disabled adapters do not take part in pi_ref
    hash_weights(
        digest, ((n, t) for n, t in module.state_dict().items() if not (adapters_off and "lora_" in n))
    )
    config = {
        k: v
        for k, v in module.config.to_dict().items()
        if not k.startswith("_") and k not in {"name_or_path", "transformers_version"}
    }
    attention = getattr(module.config, "_attn_implementation", None)
    # Shared-prompt attention is sdpa per group (the layout itself is keyed with the pass settings).
    config["attn_implementation"] = "sdpa" if attention == SHARED_PROMPT_SDPA else attention
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the serialized tokenizer (a fast tokenizer's backend JSON, else its vocabulary), its
    special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:
        serialized = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    parts = {
        "class": type(tokenizer).__name__,
        "serialized": serialized,
        "special_tokens": tokenizer.special_tokens_map,
        "special_ids": [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return _sha256_json(parts)


def sequences_fingerprint(table: SequenceTable) -> str:
    """sha256 of the exact token ids of every prompt and response, and of each sequence's pairing."""
    digest = hashlib.sha256()
    for name, rows in (("prompts", table.prompt_ids), ("responses", table.response_ids)):
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        for part in (name.encode(), lengths.tobytes(), ids.tobytes()):
            digest.update(part)
    for pairing in (table.sequence_prompt, table.sequence_response):
        digest.update(np.asarray(pairing, dtype=np.int64).tobytes())
    return digest.hexdigest()


def device_signature(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    return {"type": device.type, "machine": platform.machine(), "threads": torch.get_num_threads()}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> dict:
    """The source of the modules that compute the pass (read once per process) and the library versions."""
    sources = {}
    for name in CODE_MODULES:
        origin = importlib.util.find_spec(name).origin
        sources[name] = hashlib.sha256(Path(origin).read_bytes()).hexdigest()
    versions = {}
    for package in CODE_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"sources": sources, "versions": versions}


def load(key: str, num_sequences: int) -> Tensor | None:
    """The cached (S,) tensor of `key`; None when absent, or (deleted, with a warning) when damaged."""
    from safetensors import SafetensorError, safe_open

    path = cache_dir() / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as stored:
            metadata = stored.metadata() or {}
            logps = stored.get_tensor("logps")
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        return _discard(path, f"does not read back: {error}")
    if metadata.get("key") != key or logps.dtype != torch.float32 or tuple(logps.shape) != (num_sequences,):
        found = f"{tuple(logps.shape)} {logps.dtype} for key {metadata.get('key')}"
        return _discard(path, f"holds {found}, expected ({num_sequences},) float32")
    if metadata.get("sha256") != tensor_sha256(logps):
        return _discard(path, "its sha256 digest does not match its values")
    return logps


def _discard(path: Path, why: str) -> None:
    """One warning naming the damaged file, which is deleted (best effort: the cache may be read-only)."""
    log.warning("reference log-probs cache: %s is damaged (%s); deleting it and recomputing", path, why)
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def tensor_sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def store(key: str, logps: Tensor) -> None:
    """Write atomically: a temporary file renamed into place (removed if anything stops the write). A failed
    write is a warning, not an error: the run has its values either way."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = cache_dir()
    staging = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".safetensors")
        os.close(handle)
        tensor = logps.detach().to("cpu", torch.float32).contiguous()
        metadata = {"key": key, "format": str(FORMAT), "sha256": tensor_sha256(tensor)}
        save_file({"logps": tensor}, staging, metadata=metadata)
        os.replace(staging, root / f"{key}.safetensors")
        staging = None
    except (OSError, SafetensorError) as error:
        log.warning("reference log-probs cache: could not write to %s (%s); not cached", root, error)
    finally:
        if staging is not None:
            Path(staging).unlink(missing_ok=True)


def free_memory(device) -> None:
    """Give back the memory of the reference model the caller just dropped (its last reader is gone)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    log.info("reference model released: its log-probs are all the run reads from here on")


def _sha256_json(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
