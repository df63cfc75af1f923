"""DPO throughput: prefopt against TRL's DPOTrainer on the same model, pairs and batches (`make bench`).

    python benchmarks/dpo_throughput.py                         # CPU: 5.5 M random Llama; GPU: 1B shape
    python benchmarks/dpo_throughput.py --steps 10 --repeats 1  # a quick look
    python benchmarks/dpo_throughput.py --packing auto,rows,false    # prefopt's layouts
    python benchmarks/dpo_throughput.py --check-losses          # only the equal-results check (20 steps)
    python benchmarks/dpo_throughput.py --model smollm2 --lengths variable --steps 10 --repeats 1
                                                                # a real model on chat pairs

One random Llama is saved with save_pretrained and both tools load it; the pairs (fixed or variable lengths,
one seeded generator) are prefopt's `dataset=preference` files and, in the order prefopt's sampler draws
them, TRL's sequentially read rows, so every step of every run trains on the same pairs. `--model` names a
real model instead (a local checkpoint dir, a conf/model preset such as `smollm2`, resolved as prefopt
resolves it: offline the converted checkpoint of its GGUF package, or a hub id): both tools load that one
directory, with its tokenizer, and train on chat pairs (messages, the same rows for both). Each
configuration runs in its own process on one thread (`benchmarks/dpo_runs.py`), the tools interleaved within
each repeat so machine noise falls on all of them; the table gives medians over repeats. Prints one
Markdown table and writes it to benchmarks/results/<date>-<device>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import dpo_data  # benchmarks/ is on sys.path: this file runs as a script
import dpo_report

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Config:
    name: str  # row label
    tool: str  # prefopt | trl
    variant: (
        str  # prefopt: auto | rows (auto, share_prompts=false) | false (padded); trl: default | precompute
    )
    lengths: str  # fixed | variable


def configs(lengths: list[str], packing: list[str]) -> list[Config]:
    """Per length setting: prefopt (each packing mode), TRL default, TRL with precomputed reference logps."""
    label = {
        "auto": "prefopt",
        "rows": "prefopt, share_prompts=false",
        "false": "prefopt, padded (packing=false)",
    }
    out = []
    for length in lengths:
        out += [Config(label[mode], "prefopt", mode, length) for mode in packing]
        out += [Config("TRL default", "trl", "default", length)]
        out += [Config("TRL precompute_ref_log_probs", "trl", "precompute", length)]
    return out


def resolve_model(model: str, dtype: str) -> Path:
    """`--model` as a local checkpoint dir: a dir as given; a conf/model preset as prefopt resolves it (its
    GGUF package's converted checkpoint offline, so TRL loads the very weights prefopt trains); else (or a
    preset that resolves to a hub id) the hub's copy, downloaded once."""
    from omegaconf import OmegaConf

    from prefopt import CONF_DIR
    from prefopt.models.gguf import resolve_checkpoint

    if Path(model).expanduser().is_dir():
        return Path(model).expanduser().resolve()
    preset = Path(CONF_DIR) / "model" / f"{model}.yaml"
    if preset.is_file():
        cfg = OmegaConf.load(preset)
        model = resolve_checkpoint(
            cfg.name_or_path,
            dtype,
            cfg.get("gguf_file"),
            cfg.get("gguf_package"),
            cfg.get("source") or "auto",
            cfg.get("revision"),
        )
        if Path(model).is_dir():
            return Path(model)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model))


def prepare_workspace(
    shape: dpo_data.Shape,
    steps: int,
    seed: int,
    root: Path,
    model_dir: Path | None = None,
    pairs_file: Path | None = None,
) -> dict:
    """The model (saved, or `model_dir`), and per length setting (`pairs_file`: its pairs, the setting
    "file") the data files, TRL's rows, each step's pairs, and prefopt's token limits (none cuts a pair)."""
    if model_dir is None:
        params, tokenizer = dpo_data.save_random_llama(shape, root / "model", seed), None
    else:
        from transformers import AutoTokenizer

        params, tokenizer = dpo_data.count_parameters(model_dir), AutoTokenizer.from_pretrained(model_dir)
    count = steps * shape.pairs_per_step  # one epoch: every pair once
    data = {"params": params, "model": str(model_dir or root / "model")}
    for lengths in ("file",) if pairs_file else dpo_data.LENGTHS:
        if pairs_file:
            train, held_out = dpo_data.read_chat_pairs(pairs_file, count, tokenizer)
        elif tokenizer is None:
            train = dpo_data.make_pairs(shape, lengths, count, seed)
            held_out = dpo_data.make_pairs(shape, lengths, 1, seed + 1)  # prefopt's final evaluation reads it
        else:
            train = dpo_data.make_chat_pairs(shape, lengths, count, tokenizer, seed)
            held_out = dpo_data.make_chat_pairs(shape, lengths, 1, tokenizer, seed + 1)
        order = dpo_data.batch_order(len(train), shape.pairs_per_step, steps, seed)
        dpo_data.write_dataset(root / lengths, train, held_out)
        (root / lengths / "trl_rows.json").write_text(json.dumps(dpo_data.trl_rows(train, order)))
        pairs = train + held_out
        completions = [len(y) for p in pairs for y in (p.chosen, p.rejected)]
        data[lengths] = {
            "step_tokens": dpo_data.step_tokens(train, order),
            "step_flops": dpo_data.step_flops(shape, train, order),
            "prompt_tokens": (min(len(p.prompt) for p in pairs), max(len(p.prompt) for p in pairs)),
            "completion_tokens": (min(completions), max(completions)),
            "max_prompt_tokens": max(2 * shape.prompt_tokens, max(len(p.prompt) for p in pairs)),
            "max_response_tokens": max(2 * shape.completion_tokens, max(completions)),
        }
    return data


def run_one(
    config: Config, repeat: int, args, shape: dpo_data.Shape, root: Path, device: str, data: dict
) -> dict:
    run_dir = root / "runs" / f"{config.tool}-{config.variant}-{config.lengths}-r{repeat}"
    run_dir.mkdir(parents=True)
    spec = {
        **asdict(config),
        "packing": config.variant,
        "shape": asdict(shape),
        "steps": args.steps,
        "lr": args.lr,
        "beta": args.beta,
        "seed": args.seed,
        "device": device,
        "model": data["model"],
        "max_prompt_tokens": data[config.lengths]["max_prompt_tokens"],
        "max_response_tokens": data[config.lengths]["max_response_tokens"],
        "data": str(root / config.lengths),
        "trl_rows": str(root / config.lengths / "trl_rows.json"),
        "run_dir": str(run_dir),
        "out": str(run_dir / "result.json"),
    }
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_CACHE": str(run_dir / "hf-datasets"),  # no run reuses another's tokenized data
        "PREFOPT_CACHE": str(run_dir / "prefopt-cache"),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "CI": "true",  # no progress bars
    }
    with open(run_dir / "log.txt", "w") as log:
        done = subprocess.run(
            [sys.executable, str(HERE / "dpo_runs.py"), str(run_dir / "spec.json")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        tail = (run_dir / "log.txt").read_text().splitlines()[-30:]
        raise SystemExit(
            f"{config} failed (exit {done.returncode}); {run_dir}/log.txt ends:\n" + "\n".join(tail)
        )
    for heavy in ("prefopt", "trl", "hf-datasets", "prefopt-cache"):  # checkpoints: GBs at the 1B shape
        shutil.rmtree(run_dir / heavy, ignore_errors=True)
    return json.loads((run_dir / "result.json").read_text())


def measure(record: dict, data: dict, warmup_steps: int, peak_flops: float | None) -> dict:
    """One run's numbers: steady-state medians over the steps after `warmup_steps`, by wall and CPU time."""
    steady = range(max(warmup_steps, 1), len(record["step_ends"]))  # step k + 1 ends at ends[k]
    tokens = data["step_tokens"]

    def seconds(ends: list[float]) -> list[float]:
        return [ends[k] - ends[k - 1] for k in steady]

    wall, cpu = seconds(record["step_ends"]), seconds(record["step_cpu_ends"])
    real = sum(tokens[: len(record["step_ends"])])
    shared = record.get("shared_prompt_forwards", 0) == record["forwards"] > 0  # every position a token
    out = {
        "seconds_per_step": statistics.median(wall),
        "tokens_per_s": statistics.median(tokens[k] / s for k, s in zip(steady, wall)),
        "tokens_per_cpu_s": statistics.median(tokens[k] / s for k, s in zip(steady, cpu)),
        "padding_share": 0.0 if shared or not record["positions"] else 1 - real / record["positions"],
        "positions_per_token": record["positions"] / real,  # 0: not a Llama (its forwards are not counted)
        "packed": record["packed_forwards"] == record["forwards"] > 0,
        "shared_prompts": shared,
        "peak_memory_bytes": record["peak_memory_bytes"],
        "peak_memory_train_bytes": record["peak_memory_train_bytes"],
        "end_to_end_s": record["end_to_end_s"],
        "end_to_end_cpu_s": record["end_to_end_cpu_s"],
        "losses": record["losses"],
    }
    if peak_flops:
        out["mfu"] = statistics.median(data["step_flops"][k] / s / peak_flops for k, s in zip(steady, wall))
    return out


def median_over_repeats(runs: list[dict]) -> dict:
    keys = ["tokens_per_s", "tokens_per_cpu_s", "padding_share", "positions_per_token", "peak_memory_bytes"]
    keys += ["peak_memory_train_bytes", "seconds_per_step"]
    keys += ["end_to_end_s"]
    keys += ["end_to_end_cpu_s", "mfu"]
    out = {k: statistics.median(r[k] for r in runs) for k in keys if k in runs[0]}
    first = runs[0]
    return out | {k: first[k] for k in ("packed", "shared_prompts", "losses")} | {"repeats": len(runs)}


def tree_state() -> tuple[str, str]:
    """(HEAD's short hash, with a note when tracked files differ from it; a digest of those differences)."""
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=HERE).stdout  # noqa: E731
    diff = git("diff", "HEAD")
    label = git("rev-parse", "--short", "HEAD").strip() + (" (with uncommitted changes)" if diff else "")
    return label, hashlib.sha256(diff.encode()).hexdigest()


def environment(device: str, shape: dpo_data.Shape, args, data: dict, tree: str) -> dict:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        import psutil

        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
        name = f"CPU ({model}, {psutil.cpu_count()} cores), 1 thread per run"
    return {
        "date": datetime.date.today().isoformat(),
        "device": name,
        "device_slug": "cpu" if device == "cpu" else name.lower().replace(" ", "-"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl_version,
        "prefopt": tree,
        "python": sys.version.split()[0],
        "shape": shape,
        "params": data["params"],
        "model": args.model,
        "model_dir": data["model"],
        "pairs": str(args.pairs) if args.pairs else None,
        "lengths": {k: v for k, v in data.items() if k in (*dpo_data.LENGTHS, "file")},
        "pairs_per_step": shape.pairs_per_step,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "lr": args.lr,
        "beta": args.beta,
        "peak_tflops": args.peak_tflops,
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(dpo_data.SHAPES), help="default: gpu-1b on CUDA, else cpu")
    ap.add_argument(
        "--model",
        help="a real model instead of the random Llama: a local checkpoint dir, a conf/model preset "
        "(smollm2: offline its GGUF package's converted checkpoint) or a hub id; it trains on chat pairs "
        "with the shape's batch, lengths (in words) and dtype",
    )
    ap.add_argument(
        "--pairs",
        type=Path,
        help="with --model: a JSONL of conversational {prompt, chosen, rejected} rows (e.g. the model's own "
        "answers from benchmarks/sample_chat_pairs.py) instead of generated word pairs; lengths 'file'",
    )
    ap.add_argument("--pairs-per-step", type=int, help="default: the shape's (8)")
    ap.add_argument(
        "--prompt-tokens", type=int, help="fixed prompt length (variable: up to 2x); default: the shape's"
    )
    ap.add_argument("--completion-tokens", type=int, help="the same for completions")
    ap.add_argument("--steps", type=int, help="optimizer steps per run (one epoch of its pairs); default 20")
    ap.add_argument("--warmup-steps", type=int, default=4, help="first steps left out of the steady state")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lengths", default="fixed,variable", help="fixed, variable or both")
    ap.add_argument(
        "--packing",
        default="auto",
        help="prefopt layouts to run: auto (its default), rows (trainer.layout.share_prompts=false), "
        "false (padded)",
    )
    ap.add_argument("--lr", type=float, default=1e-4, help="constant learning rate, no warm-up, both tools")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--check-losses",
        action="store_true",
        help="only the equal-results check: prefopt and TRL default, 20 steps (10 with --model), one repeat",
    )
    ap.add_argument(
        "--loss-atol",
        type=float,
        help=f"default: {dpo_report.LOSS_ATOL} (fp32), {dpo_report.LOSS_ATOL_MODEL} with --model (fp32), "
        f"bf16 on a GPU: {dpo_report.LOSS_ATOL_BF16}",
    )
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="where the table is written")
    ap.add_argument(
        "--workdir", type=Path, help="keep the model, data and run logs here (default: a temp dir)"
    )
    args = ap.parse_args(argv)
    if args.check_losses:
        args.steps = args.steps or (10 if args.model else 20)
        args.repeats, args.packing = 1, "auto"
    args.steps = args.steps or 20
    if args.pairs:
        if not args.model:
            ap.error("--pairs needs --model (its tokenizer and chat template)")
        args.lengths = "file"
    if args.steps <= args.warmup_steps:
        ap.error("--steps must exceed --warmup-steps")
    return args


def main(argv=None) -> None:
    import torch

    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = dpo_data.SHAPES[args.shape or ("gpu-1b" if device == "cuda" else "cpu")]
    sizes = {"pairs_per_step": args.pairs_per_step, "prompt_tokens": args.prompt_tokens}
    sizes["completion_tokens"] = args.completion_tokens
    shape = dataclasses.replace(shape, **{k: v for k, v in sizes.items() if v})
    model_dir = resolve_model(args.model, shape.dtype) if args.model else None
    if model_dir:
        shape = dpo_data.model_shape(shape, model_dir, Path(args.model).name)
    lengths, packing = args.lengths.split(","), args.packing.split(",")
    todo = configs(lengths, packing)
    if args.check_losses:
        todo = [c for c in todo if c.variant in ("auto", "default")]
    if args.loss_atol is None:
        fp32 = dpo_report.LOSS_ATOL_MODEL if model_dir else dpo_report.LOSS_ATOL
        args.loss_atol = dpo_report.LOSS_ATOL_BF16 if device == "cuda" else fp32
    load_before, tree_before = os.getloadavg()[0], tree_state()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    data = prepare_workspace(shape, args.steps, args.seed, root, model_dir, args.pairs)
    peak_flops = args.peak_tflops * 1e12 if device == "cuda" else None
    runs: dict[Config, list[dict]] = {c: [] for c in todo}
    for repeat in range(1, args.repeats + 1):
        for config in todo:  # interleaved: one run of every configuration per repeat
            record = run_one(config, repeat, args, shape, root, device, data)
            result = measure(record, data[config.lengths], args.warmup_steps, peak_flops)
            runs[config].append(result)
            print(
                f"[repeat {repeat}/{args.repeats}] {config.name}, {config.lengths}: "
                f"{result['tokens_per_s']:.0f} tokens/s ({result['seconds_per_step']:.2f} s/step), "
                f"end to end {result['end_to_end_s']:.1f} s, peak RSS/memory "
                f"{result['peak_memory_bytes'] / 2**20:,.0f} MiB",
                flush=True,
            )
    if args.workdir is None:
        shutil.rmtree(root)
    summary = {c: median_over_repeats(r) for c, r in runs.items()}
    tree_after = tree_state()
    tree = tree_before[0]
    if tree_after != tree_before:  # the tree is shared: someone committed or edited while the runs ran
        tree += f", changed during the runs to {tree_after[0]}: the runs may have measured different code"
    env = environment(device, shape, args, data, tree)
    env["load"] = (load_before, os.getloadavg()[0])
    report = dpo_report.render(env, summary, args.loss_atol, device)
    print(report)
    if not args.check_losses:
        args.results.mkdir(parents=True, exist_ok=True)
        model = f"-{shape.name}" if model_dir else ""
        pairs = f"-{args.pairs.stem}" if args.pairs else ""  # another data set: its own file
        path = args.results / f"{env['date']}-{env['device_slug']}{model}{pairs}.md"
        path.write_text(report)
        print(f"written to {path}")
    if not dpo_report.losses_agree(summary, args.loss_atol):
        raise SystemExit("the losses differ beyond the tolerance (see the table)")


if __name__ == "__main__":
    main()
