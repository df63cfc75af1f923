"""GGUF checkpoints (llama.cpp's quantized format) as ordinary safetensors checkpoints, converted once.

`model.gguf_file` names a GGUF file in `model.name_or_path` (a local directory or a hub repo);
`model.gguf_package` a pip package that installs a GGUF of the model (`GGUF_PACKAGES`), which
`model.source` picks when the hub cannot be used (both found by `prefopt.models.gguf_sources`).
transformers reads the file (`from_pretrained(dir, gguf_file=name)`, through the `gguf` package): it
dequantizes the tensors to `model.dtype` and builds the tokenizer, chat template included, from the file's
metadata. That takes 10-60 s, so the result is saved once under `$PREFOPT_MODEL_CACHE` (default
`~/.cache/prefopt/models`: not `$PREFOPT_CACHE`, so it outlives a test session's cache) in a directory
keyed by the GGUF's sha256, the dtype and the transformers version, and later runs load it in about a
second.

An entry is written to a staging directory and renamed into place (a kill leaves no half entry), under a
lock (parallel sweep jobs convert once); its `prefopt-gguf.json` holds the sha256 of every file, sealed.
An entry that does not read back as written is one warning naming it, and is converted again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from prefopt.files import (
    DamagedFile,
    atomic_write_json,
    fsync_dir,
    locked,
    read_sealed_json,
    sealed,
    sha256_file,
)
from prefopt.models.gguf_sources import (
    GGUF_PACKAGES,
    SOURCES,
    GgufError,
    gguf_path,
    model_cache_dir,
    package_gguf,
    package_installed,
    use_package,
)
from prefopt.progress import progress

# where a GGUF comes from lives in gguf_sources; pretrained.py and the tests read these names here
__all__ = [
    "GGUF_PACKAGES",
    "SOURCES",
    "GgufError",
    "converted_checkpoint",
    "entry_problem",
    "package_installed",
    "resolve_checkpoint",
]
log = logging.getLogger(__name__)
MANIFEST = "prefopt-gguf.json"
_use_package = use_package  # the tests' name for it


def resolve_checkpoint(
    name_or_path: str,
    dtype: str,
    gguf_file: str | None = None,
    gguf_package: str | None = None,
    source: str = "auto",
    revision: str | None = None,
) -> str:
    """What `from_pretrained` loads: `name_or_path` itself, or the converted checkpoint of a GGUF (the
    `gguf_file` in it, or the package's file where `source` picks the package)."""
    if gguf_file:
        return str(converted_checkpoint(gguf_path(name_or_path, gguf_file, revision), dtype))
    if gguf_package and use_package(name_or_path, gguf_package, source, revision):
        return str(converted_checkpoint(package_gguf(gguf_package), dtype))
    return name_or_path


def converted_checkpoint(gguf: Path, dtype: str) -> Path:
    """The cache entry holding `gguf` dequantized to `dtype` as safetensors, with its tokenizer; an
    intact entry is reused, a missing or damaged one (one warning naming it) is converted now."""
    import transformers

    gguf = Path(gguf)
    digest = sha256_file(gguf)
    cache = model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / f"{gguf.stem}-{digest[:16]}-{dtype}-transformers{transformers.__version__}"
    with locked(cache / f".{entry.name}.lock"):
        if entry.exists():
            problem = entry_problem(entry, digest)
            if problem is None:
                log.info("model: %s from the converted cache %s", gguf.name, entry)
                return entry
            log.warning("model: converted cache entry %s is damaged (%s); converting again", entry, problem)
            _discard(entry)
        convert(gguf, dtype, digest, entry)
    return entry


def entry_problem(entry: Path, gguf_sha256: str) -> str | None:
    """What is wrong with a cache entry (a damaged or missing manifest, another GGUF, a file whose sha256
    differs from the one recorded); None when every file reads back as written."""
    try:
        record = read_sealed_json(entry / MANIFEST)
    except (OSError, DamagedFile) as error:
        return str(error)
    if record.get("gguf_sha256") != gguf_sha256 or not record.get("files"):
        return f"{MANIFEST} describes another file"
    for name, expected in record["files"].items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name}: sha256 differs from the one recorded"
    return None


def convert(gguf: Path, dtype: str, gguf_sha256: str, entry: Path) -> None:
    """Dequantize `gguf` to `dtype`, save it (safetensors) and its tokenizer in a staging directory beside
    `entry` with a sealed manifest, then rename it to `entry`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    log.info("model: converting %s to %s safetensors, once, into %s", gguf, dtype, entry)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        with progress(total=4, desc=f"convert {gguf.name}", unit="step") as bar:
            tokenizer = _read(AutoTokenizer, gguf)
            bar.update()
            model = _read(AutoModelForCausalLM, gguf, dtype=getattr(torch, dtype))
            bar.update()
            _drop_quantization(model)  # save_pretrained refuses a model that says it is GGUF-quantized
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            bar.update()
            files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
            record = {"gguf": gguf.name, "gguf_sha256": gguf_sha256, "dtype": dtype, "files": files}
            record["transformers"] = transformers.__version__
            atomic_write_json(staging / MANIFEST, sealed(record))
            bar.update()
        if tokenizer.chat_template is None:
            log.warning("model: %s carries no chat template: chat prompts become 'role: content' lines", gguf)
        os.rename(staging, entry)
        fsync_dir(entry.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("model: %s converted in %.0f s", gguf.name, time.monotonic() - start)


def _read(auto_class, gguf: Path, **kwargs):
    """`from_pretrained(dir, gguf_file=name)`; whatever stops transformers is one line naming the file."""
    import transformers

    try:
        return auto_class.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **kwargs)
    except ImportError as error:
        first = str(error).strip().splitlines()[0]
        raise GgufError(f"{gguf}: reading GGUF needs the gguf package (pip install gguf): {first}") from error
    except Exception as error:  # noqa: BLE001 - unsupported architecture, tensor type, damaged file...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise GgufError(f"{gguf}: transformers {transformers.__version__} cannot read it: {first}") from error


def _drop_quantization(model) -> None:
    """The weights are dequantized already; only the marker that they are GGUF-quantized remains."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name, plain in (("hf_quantizer", None), ("is_quantized", False)):
        if hasattr(model, name):
            with contextlib.suppress(AttributeError):
                setattr(model, name, plain)


def _discard(entry: Path) -> None:
    """Move a damaged entry out of the way first (a rename is atomic), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".damaged", dir=entry.parent))
    os.replace(entry, trash / entry.name)
    shutil.rmtree(trash, ignore_errors=True)
