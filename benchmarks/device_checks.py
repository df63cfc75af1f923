"""The checks that need an accelerator, in one short run: `python benchmarks/device_checks.py` on a GPU host
(see ../shared/gpu/README.md for the wheels), `--device cpu` here to check the script itself.

1. Layouts on the device: log-probs and gradients of a random Llama (grouped-query attention) from one row
   of shared prompts, from packed rows and from flash attention's varlen row (when flash-attn is installed)
   against padded rows; fp32 with TF32 off (asserted to 1e-4), and under bf16 autocast (reported).
2. Liger's fused linear + cross-entropy against the chunked log-probs, when liger-kernel is installed.
3. The real entry under torchrun with FSDP2 (`trainer=fsdp`, `trainer.distributed.param_dtype=bfloat16`)
   against one plain process on the embedded default: both finish, and their loss curves are printed side by
   side.

Prints one line per check and exits 1 if an asserted one fails. The throughput benchmark is separate:
`python benchmarks/dpo_throughput.py` (the Llama-3.2-1B shape on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FAILED: list[str] = []


def report(name: str, value: float, bound: float | None) -> None:
    ok = bound is None or value <= bound
    if not ok:
        FAILED.append(name)
    verdict = "reported" if bound is None else ("ok" if ok else "FAILED")
    print(f"{name:58} {value:10.2e}  {verdict}" + (f" (bound {bound:g})" if bound is not None else ""))


def llama(attn_implementation: str, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).to(device)


def pair_rows(device):
    """Eight pairs of variable lengths, chosen and rejected sharing their prompt, as padded rows."""
    from prefopt.data.batching import PaddedSequences

    generator = torch.Generator().manual_seed(1)
    sequences, prompts = [], []
    for _ in range(8):
        prompt = torch.randint(
            1, 512, (int(torch.randint(4, 40, (1,), generator=generator)),), generator=generator
        )
        for _ in range(2):
            response = torch.randint(
                1, 512, (int(torch.randint(2, 40, (1,), generator=generator)),), generator=generator
            )
            sequences.append(torch.cat([prompt, response]))
            prompts.append(len(prompt))
    width = max(map(len, sequences))
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask, response_mask = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for i, sequence in enumerate(sequences):
        ids[i, : len(sequence)], mask[i, : len(sequence)] = sequence, 1
        response_mask[i, prompts[i] : len(sequence)] = True
    return PaddedSequences(ids, mask, response_mask, torch.tensor(prompts)).to(device)


def logps_and_grads(model, rows, packing, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(rows.input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        logps = packing.logps(model, rows)
    logps.sum().backward()
    return logps.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])


def check_layouts(device) -> None:
    from prefopt.data.layout import Packing

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rows = pair_rows(device)
    implementations = ["sdpa"]
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        print("flash-attn not installed: its varlen layout is not checked")
    else:
        implementations += ["flash_attention_2"] if device.type == "cuda" else []
    for implementation in implementations:
        model = llama(implementation, device)
        layouts = {"shared prompts": Packing(), "packed rows": Packing(share_prompts=False)}
        for autocast in (False, True):
            padded = logps_and_grads(model, rows, Packing(False), autocast)
            for name, packing in layouts.items():
                arranged = packing.arrange(rows, model, device)
                layout = "shared" if getattr(arranged, "segments", None) else type(arranged).__name__
                logps, grads = logps_and_grads(model, rows, packing, autocast)
                scale = padded[1].abs().max()
                precision = "bf16 autocast" if autocast else "fp32"
                label = f"{implementation}, {name} ({layout}), {precision}"
                report(f"{label}: logps", (logps - padded[0]).abs().max().item(), None if autocast else 1e-4)
                report(
                    f"{label}: grads / max",
                    ((grads - padded[1]).abs().max() / scale).item(),
                    None if autocast else 1e-4,
                )


def check_liger(device) -> None:
    from prefopt.models.logps import _chunk_logps, _liger, fused_kernel_applies, fused_token_logps

    if _liger() is None:
        print("liger-kernel not installed: the fused kernel is not checked")
        return
    torch.manual_seed(0)
    head = torch.nn.Linear(128, 4096, bias=False).to(device)
    hidden, targets = torch.randn(300, 128, device=device), torch.randint(0, 4096, (300,), device=device)
    print(f"fused kernel applies on {device}: {fused_kernel_applies(head, hidden)}")
    with torch.no_grad():
        fused, chunked = fused_token_logps(head, hidden, targets), _chunk_logps(head, hidden, targets)
    report("liger fused linear + cross-entropy vs chunked", (fused - chunked).abs().max().item(), 1e-3)


def check_fsdp(device, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        common = ["train", "logger=none", f"trainer.max_steps={steps}", "trainer.log_every_steps=1"]
        common += [f"trainer.device={device.type}"]
        runs = {
            "single": [sys.executable, "-m", "prefopt.cli", *common, "trainer.distributed.strategy=single"],
            "fsdp": [
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                "-m", "prefopt.cli", *common, "trainer=fsdp",
                *(["trainer.distributed.param_dtype=bfloat16"] if device.type == "cuda" else []),
            ],
        }  # fmt: skip
        curves = {}
        for name, command in runs.items():
            run_dir = Path(tmp) / name
            env = {**os.environ, "CI": "true", "WANDB_MODE": "disabled"}
            done = subprocess.run(
                [*command, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                FAILED.append(f"{name} run")
                print(f"{name} run FAILED (exit {done.returncode}):\n{done.stderr[-2000:]}")
                return
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            curves[name] = [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]
        print(f"losses by step, one process vs FSDP2 under torchrun ({device.type}):")
        for step, (a, b) in enumerate(zip(curves["single"], curves["fsdp"]), start=1):
            print(f"  {step:3d}  {a:.6f}  {b:.6f}")
        report(
            "FSDP2 vs one process: max |loss difference|",
            max(abs(a - b) for a, b in zip(*curves.values())),
            None,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="steps of the FSDP2 check")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}")
    check_layouts(device)
    check_liger(device)
    check_fsdp(device, args.steps)
    if FAILED:
        raise SystemExit(f"failed: {', '.join(FAILED)}")
    print("all asserted checks passed")


if __name__ == "__main__":
    main()
