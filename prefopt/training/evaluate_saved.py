"""`prefopt evaluate <run dir or checkpoint> [key=value ...]`: the evaluation stage on a saved model, no
training: the held-out preference metrics (and the exact ones on the synthetic task) and the generation
eval (`eval.generate`), into a new run dir, `<run dir>/evaluate/<date>_<time>`.

A run dir is evaluated as it trained: its resolved config (`config.yaml`) prepares the same data, tokenizer
and reference, then the policy takes the weights of its `checkpoint/` (under LoRA the adapter). The
reference is thus the run's own: its starting model (or `model.reference_name_or_path`), under LoRA the base
with the adapters off, and for the tiny model the fitted reference: summary.json's `reference_fit` records
the fit's cache key and the sha256 of the fitted weights; a cache entry with other weights is fitted again
from the run's config and seed, and a fit that still differs is a warning (the numbers then differ from the
run's). The numbers equal the run's final eval (eval.json "final"). The evaluated run dir is locked while it
is read (exit 2 while another process holds it).

A bare checkpoint dir needs the data named by overrides (e.g. `dataset=hh_rlhf dataset.path=...`); it is its
own reference (win rate 1/2). Overrides, read by Hydra's override parser and applied last as Hydra applies
them, are dotted `key=value` pairs (`+key=value` adds a key, `++key=value` sets one either way, `~key`
deletes one) or `group=option` (e.g. `logger=none`), e.g.
`eval.generation.judge=llm +eval.generation.llm.model=gpt-4o`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from omegaconf import OmegaConf

from prefopt import CONF_DIR
from prefopt.config.overrides import apply_override, parse_overrides

log = logging.getLogger(__name__)


def _new_dir(parent: Path) -> Path:
    """A fresh `<parent>/<date>_<time>` (with `-2`, `-3`, ... when one started in the same second)."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for attempt in range(1, 1000):
        path = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: no free name for {stamp}")


def evaluation_config(target: Path, overrides: list[str]) -> tuple[dict, Path, Path | None]:
    """The resolved config of the evaluation, the folder its run dir goes in and the evaluated run dir
    (None: a checkpoint)."""
    from prefopt.config.aliases import rewrite_overrides, upgrade_config
    from prefopt.models.pretrained import PretrainedModelConfig

    parsed = parse_overrides(rewrite_overrides(overrides))  # old keys renamed; a malformed one fails here
    run_config = target / "config.yaml"
    if run_config.is_file():  # a run dir: its own model config, the checkpoint's weights loaded later
        raw = OmegaConf.to_container(OmegaConf.load(run_config))
        moved = upgrade_config(raw)  # a run from before the trainer's split
        if moved:
            log.warning("%s: read with the keys of this release (%s moved)", run_config, ", ".join(moved))
        source, checkpoint = target, target / "checkpoint"
        out = target / "evaluate"
    else:  # a checkpoint: the default config, data from the overrides, the checkpoint its own reference
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = OmegaConf.to_container(compose("train"), resolve=False)
        source, checkpoint = None, target
        out = Path("outputs") / "evaluate"
        raw["model"] = {"name": "pretrained", **asdict(PretrainedModelConfig(name_or_path=str(checkpoint)))}
    if not (checkpoint / "config.json").is_file() and not (checkpoint / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no saved model (config.json or adapter_config.json)")
    raw["trainer"]["checkpoint"] |= {"export": False, "resume": None}
    raw["eval"] |= {"at_start": False, "generate": True}
    config = OmegaConf.create(raw)
    for override in parsed:
        apply_override(config, override)
    return OmegaConf.to_container(config), out, source


def evaluate_run(rc, out: Path, source: Path | None) -> dict:
    """Prepare the run as it trained, load its checkpoint into the policy (when `source` is a run dir) and
    run the evaluation stage at the run's final step; writes eval.json and summary.json into `out`
    atomically and returns the summary."""
    from prefopt.engine.prepare import prepare
    from prefopt.evaluation.evaluate import evaluate
    from prefopt.files import atomic_write_json
    from prefopt.training.loop_state import planned_steps
    from prefopt.training.run_summary import brief, generation_eval, run_name
    from prefopt.training.setup import autocast_for, configure_torch, speed_up
    from prefopt.training.tracking import Tracker

    device = configure_torch(rc.trainer.device, rc.trainer.num_threads, rc.seed)
    run = prepare(rc, device)
    reference = {"source": "the checkpoint itself"}
    if source is not None:
        run, reference = _runs_own_reference(rc, run, source, device)
        load_policy_weights(run.policy, source / "checkpoint")
        load_value_head(run.inputs.value_head, source / "checkpoint")
        run.inputs.policy_is_reference = False  # the policy is the trained one now
    # the run's last step, as the loop computed it
    step = planned_steps(rc.trainer.max_steps, rc.trainer.epochs, rc.trainer.batch_size, len(run.train))
    run.inputs.packing.packs(run.policy, device)  # as the loop does before its first step
    speed_up(run.policy, rc.trainer)
    tracker = Tracker(rc.logger, out, rc.raw, run_name(rc), None)
    try:
        metrics, detail = evaluate(
            run, step, rc.eval.batch_size, device, autocast_for(rc.trainer.precision, device)
        )
        tracker.log(metrics, step)
        if rc.eval.generate:
            metrics |= generation_eval(rc, run, out, device, tracker, step)
        tracker.summary(metrics)
    finally:
        tracker.finish()
    log.info("eval @ step %d: %s", step, brief(metrics))
    atomic_write_json(out / "eval.json", {"final": {**metrics, **detail}, "task": run.truth.record()})
    summary = {
        "status": "completed",
        "evaluated": str(source or rc.model.name_or_path),
        "step": step,
        "final_eval": metrics,
        "reference": reference,
        "reference_fit": run.reference_fit,
        "data": run.data_report,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _runs_own_reference(rc, run, source: Path, device) -> tuple[object, dict]:
    """The prepared run, whose reference is `source`'s own, and how it was obtained. A fitted reference
    whose weights differ from the digest the run recorded is fitted again (cache off), deterministically
    from the run's config and seed."""
    from prefopt.engine.prepare import prepare
    from prefopt.files import read_json

    path = rc.model.reference_name_or_path  # every model config names its reference (None: the start)
    if run.reference_fit is None:
        return run, {"source": path or "the run's starting model (under LoRA: adapters off)"}
    summary = source / "summary.json"
    recorded = (read_json(summary).get("reference_fit") or {}) if summary.is_file() else {}
    expected = recorded.get("weights_sha256")
    if (
        expected is not None
        and run.reference_fit["weights_sha256"] != expected
        and run.reference_fit["cached"]
    ):
        log.warning(
            "the cached fitted reference (key %s) is not the one %s recorded: fitting it again",
            run.reference_fit["cache_key"],
            summary,
        )
        uncached = replace(rc.dataset.reference_fit, cache=False)  # a new config: the run's stays as it was
        run = prepare(replace(rc, dataset=replace(rc.dataset, reference_fit=uncached)), device)
    found = run.reference_fit["weights_sha256"]
    if expected is None:
        log.warning("%s records no digest of its fitted reference: it cannot be checked", summary)
    elif found != expected:
        log.warning(
            "the fitted reference (sha256 %s) is not the run's (%s in %s): the numbers will differ from the "
            "run's (another torch version, device or thread count?)",
            found[:12],
            expected[:12],
            summary,
        )
    record = {"source": "fitted", "cache_key": run.reference_fit["cache_key"], "weights_sha256": found}
    return run, record | {"matches_run": None if expected is None else found == expected}


def load_policy_weights(policy, checkpoint: Path) -> None:
    """The weights `checkpoint` (a run's export) holds, into the policy `prepare` built for that run: the
    adapter under LoRA, else every weight (a tied lm_head comes with its embeddings)."""
    from safetensors.torch import load_file

    if (checkpoint / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy, load_file(checkpoint / "adapter_model.safetensors"))
        missing, unexpected = [], result.unexpected_keys
    else:
        state = {k: v for f in sorted(checkpoint.glob("model*.safetensors")) for k, v in load_file(f).items()}
        missing, unexpected = policy.load_state_dict(state, strict=False)
        held = policy.state_dict()
        loaded = {held[k].data_ptr() for k in state if k in held}
        missing = [k for k in missing if held[k].data_ptr() not in loaded]  # tied ones are loaded
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint}: its weights do not fit the run's model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )


def load_value_head(value_head, checkpoint: Path) -> None:
    """HPO's trained critic, where the run saved one (runs before it was exported start from a new head,
    so only the metrics that read it differ from the run's)."""
    from safetensors.torch import load_file

    from prefopt.engine.distributed import VALUE_HEAD_FILE

    path = checkpoint / VALUE_HEAD_FILE
    if value_head is None:
        return
    if not path.is_file():
        log.warning("%s: no %s; the value head's metrics come from a new head", checkpoint, VALUE_HEAD_FILE)
        return
    value_head.load_state_dict(load_file(path))


def main(argv: list[str]) -> int:
    from prefopt.config import load_run_config, register_resolvers
    from prefopt.errors import ConfigError
    from prefopt.files import RunDirLock, RunDirLocked, atomic_write_text

    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0 if argv else 2
    register_resolvers()
    locks = []
    try:
        raw, parent, source = evaluation_config(Path(argv[0]), argv[1:])
        rc = load_run_config(OmegaConf.create(raw))
        if source is not None:  # the evaluated run first: never read a run still being written
            locks.append(RunDirLock(source).acquire())
        out = _new_dir(parent)
        locks.append(RunDirLock(out).acquire())
    except (ConfigError, FileNotFoundError, ValueError, RunDirLocked) as error:
        for lock in locks:
            lock.release()
        print(f"prefopt evaluate: {error}", file=sys.stderr)
        return 2
    try:
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(rc.raw))
        handlers = [logging.StreamHandler(), logging.FileHandler(out / "evaluate.log")]
        logging.basicConfig(
            level=logging.INFO,
            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
            handlers=handlers,
        )
        if source is None:
            log.warning("no reference model recorded: the checkpoint is its own reference (win rate 1/2)")
        evaluate_run(rc, out, source)
        log.info("evaluation written to %s", out)
    finally:
        for lock in reversed(locks):
            lock.release()
    return 0
