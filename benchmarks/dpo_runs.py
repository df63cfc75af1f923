"""One measured run of the DPO throughput benchmark, in a fresh process (a clean memory peak, one thread,
nothing shared with the other runs): `python benchmarks/dpo_runs.py <spec.json>` writes the spec's `out` file.

prefopt runs through its real entry (`prefopt.training.train.train` on the composed config: the loading,
tokenizing, reference pass, loop and final evaluation of `prefopt train`), TRL through `DPOTrainer.train()`.
Both read the same model (the saved random Llama, or a real checkpoint) and the same pairs in the same
order, and both save the final policy as a Hugging Face checkpoint. Recorded: when each optimizer step ended
(wall and CPU time), each step's loss, the decoder positions (real and padding) of the policy's training
forwards, the peak memory to the last step and to the end, and the time from this process's first line to
the end of the run (the save included).
"""

import functools
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

STARTED, CPU_STARTED = time.perf_counter(), time.process_time()  # end to end counts from here


def clock_steps(record: dict, cuda: bool) -> None:
    """Note the wall and CPU time at the end of every optimizer step, in either tool (a step then runs from
    one step's end to the next: data, forward, backward, clip, optimizer, logging)."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def step_ended(optimizer, args, kwargs) -> None:
        if cuda:
            torch.cuda.synchronize()
        record["step_ends"].append(time.perf_counter() - STARTED)
        record["step_cpu_ends"].append(time.process_time() - CPU_STARTED)
        record["peak_memory_train_bytes"] = peak_memory(cuda)

    register_optimizer_step_post_hook(step_ended)


def peak_memory(cuda: bool) -> int:
    """The process's peak so far: CUDA memory allocated, or on CPU its peak RSS."""
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def count_decoder_positions(record: dict) -> None:
    """Count the input positions of every Llama decoder forward that builds a graph: the policy's training
    forwards in both tools (reference passes, evaluation and prefopt's packing probe run without gradients).
    A forward given position ids and no attention mask is a packed one; one given prompt groups
    (`shared_prompt_segments`) holds no padding at all."""
    import torch
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaModel.forward

    @functools.wraps(forward)
    def counted(self, input_ids=None, *args, **kwargs):
        if input_ids is not None and torch.is_grad_enabled():
            record["positions"] += input_ids.numel()
            packed = kwargs.get("attention_mask") is None and kwargs.get("position_ids") is not None
            record["packed_forwards"] += int(packed)
            record["shared_prompt_forwards"] += int(kwargs.get("shared_prompt_segments") is not None)
            record["forwards"] += 1
        return forward(self, input_ids, *args, **kwargs)

    modeling_llama.LlamaModel.forward = counted


def run_prefopt(spec: dict, record: dict) -> None:
    from hydra import compose, initialize_config_dir

    import prefopt
    from prefopt import CONF_DIR
    from prefopt.config import load_run_config, register_resolvers
    from prefopt.training.train import train

    shape, steps = spec["shape"], spec["steps"]
    overrides = [
        "logger=none",
        "model=pretrained",
        f"model.name_or_path={spec['model']}",
        f"model.dtype={shape['dtype']}",
        "dataset=preference",
        f"dataset.path={spec['data']}",
        f"dataset.max_prompt_tokens={spec['max_prompt_tokens']}",
        f"dataset.max_response_tokens={spec['max_response_tokens']}",
        "objective=dpo",
        f"objective.beta={spec['beta']}",
        f"seed={spec['seed']}",
        f"trainer.max_steps={steps}",
        f"trainer.batch_size={shape['pairs_per_step']}",
        f"trainer.optimizer.lr={spec['lr']}",
        "trainer.optimizer.lr_schedule=constant",
        "trainer.optimizer.warmup_steps=0",
        "trainer.optimizer.max_grad_norm=1.0",
        f"trainer.precision={'auto' if spec['device'] == 'cuda' else 'fp32'}",
        f"trainer.layout.packing={'auto' if spec['packing'] == 'rows' else spec['packing']}",
        f"trainer.layout.share_prompts={spec['packing'] != 'rows'}",
        "trainer.num_threads=1",
        "trainer.log_every_steps=1",
        "trainer.checkpoint.every_steps=null",
        "trainer.checkpoint.export=true",  # the final policy in <run dir>/checkpoint, as TRL's save_model
        "trainer.layout.reference_cache=false",  # the reference pass runs in every run, as TRL's does
        "eval.at_start=false",
        f"eval.eval_every_steps={steps + 1}",
    ]
    record["prefopt_source"] = str(Path(prefopt.__file__).parent)  # which tree ran
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        rc = load_run_config(compose(config_name="train", overrides=overrides))
    run_dir = Path(spec["run_dir"]) / "prefopt"
    run_dir.mkdir(parents=True, exist_ok=True)
    train(rc, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    record["losses"] = [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]


def run_trl(spec: dict, record: dict) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cuda = spec["device"] == "cuda"
    shape, losses = spec["shape"], []

    class LossRecorder(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append((out[0] if return_outputs else out).detach())  # no sync here: read at the end
            return out

    args = DPOConfig(
        output_dir=str(Path(spec["run_dir"]) / "trl"),
        per_device_train_batch_size=shape["pairs_per_step"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,  # TRL's default, and prefopt's
        beta=spec["beta"],
        seed=spec["seed"],
        bf16=cuda,  # TRL's default is bf16 everywhere; fp32 on CPU, as prefopt, for equal results
        model_init_kwargs={"dtype": shape["dtype"]},
        precompute_ref_log_probs=spec["variant"] == "precompute",
        max_length=None,  # no truncation (the pairs are within both tools' limits)
        train_sampling_strategy="sequential",  # the rows come in prefopt's batch order
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )  # everything else, gradient checkpointing included, is TRL's default
    rows = json.loads(Path(spec["trl_rows"]).read_text())
    trainer = LossRecorder(
        model=spec["model"],
        args=args,
        train_dataset=Dataset.from_list(rows),
    )
    trainer.train()
    trainer.save_model()  # the final policy (and tokenizer) in output_dir, as prefopt's checkpoint/
    record["losses"] = [float(loss) for loss in losses]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger(__name__).info(
        "%s %s, started %.2f s ago", spec["tool"], spec["variant"], time.perf_counter() - STARTED
    )
    import torch

    torch.set_num_threads(1)
    record = {
        "positions": 0,
        "packed_forwards": 0,
        "shared_prompt_forwards": 0,
        "forwards": 0,
        "step_ends": [],
        "step_cpu_ends": [],
    }
    count_decoder_positions(record)
    clock_steps(record, spec["device"] == "cuda")
    {"prefopt": run_prefopt, "trl": run_trl}[spec["tool"]](spec, record)
    record["end_to_end_s"] = time.perf_counter() - STARTED
    record["end_to_end_cpu_s"] = time.process_time() - CPU_STARTED
    record["peak_memory_bytes"] = peak_memory(spec["device"] == "cuda")
    record["threads"] = torch.get_num_threads()
    record["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    Path(spec["out"]).write_text(json.dumps(record))


if __name__ == "__main__":
    main()
