"""`prefopt evaluate <run dir or checkpoint> [key=value ...]`: the evaluation stage on a saved model, no
training: the held-out preference metrics and the generation eval (`eval.generate`), into a new run dir.

A run dir is evaluated with its own resolved config (`config.yaml`), its `checkpoint/` as the policy and,
when it trained a hub/local model, that starting model as the reference. A bare checkpoint dir needs the
data named by overrides (e.g. `dataset=hh_rlhf dataset.path=...`). Overrides are dotted `key=value` pairs
(or `group=option`, e.g. `logger=none`) applied last, e.g. `eval.generation.judge=llm
+eval.generation.llm.model=gpt-4o`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def evaluation_config(target: Path, overrides: list[str]) -> tuple[dict, Path]:
    """The resolved config of the evaluation run and its run dir."""
    from prefopt.models.pretrained import PretrainedModelConfig

    run_config = target / "config.yaml"
    if run_config.is_file():  # a run dir
        raw = OmegaConf.to_container(OmegaConf.load(run_config))
        checkpoint, out = target / "checkpoint", target / "evaluate" / time.strftime("%Y-%m-%d_%H-%M-%S")
        started_from = raw["model"].get("name_or_path") if raw["model"].get("name") == "pretrained" else None
    else:  # a checkpoint: the default config, data from the overrides
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = OmegaConf.to_container(compose("train"), resolve=False)
        checkpoint, out = target, Path("outputs") / "evaluate" / time.strftime("%Y-%m-%d_%H-%M-%S")
        started_from = None
    if not (checkpoint / "config.json").is_file() and not (checkpoint / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no saved model (config.json or adapter_config.json)")
    model = asdict(PretrainedModelConfig(name_or_path=str(checkpoint)))
    model["reference_name_or_path"] = started_from  # the run's own reference; None: the checkpoint itself
    raw["model"] = {"name": "pretrained", **model}
    raw["trainer"] |= {"max_steps": 0, "save_checkpoint": False}
    raw["trainer"]["reference_fit"]["enabled"] = False
    raw["eval"] |= {"at_start": False, "generate": True}
    config = OmegaConf.create(raw)
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+")
        option = CONF_DIR / key / f"{value}.yaml"
        if "." not in key and option.is_file():  # group=option: that option's node (e.g. logger=none)
            config[key] = OmegaConf.load(option)
        else:
            OmegaConf.update(config, key, OmegaConf.create({"v": value}).v if value else None)
    return OmegaConf.to_container(config), out


def main(argv: list[str]) -> int:
    from prefopt.config import ConfigError, load_run_config, register_resolvers
    from prefopt.training.train import train

    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    register_resolvers()
    try:
        raw, run_dir = evaluation_config(Path(argv[0]), argv[1:])
        rc = load_run_config(OmegaConf.create(raw))
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"prefopt evaluate: {error}", file=sys.stderr)
        return 2
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(rc.raw))
    handlers = [logging.StreamHandler(), logging.FileHandler(run_dir / "evaluate.log")]
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", handlers=handlers
    )
    if rc.model.reference_name_or_path is None:
        log.warning("no reference model recorded: the checkpoint is its own reference (win rate 1/2)")
    summary = train(rc, run_dir)
    log.info("evaluation written to %s", run_dir)
    return 0 if summary["status"] == "completed" else 1
