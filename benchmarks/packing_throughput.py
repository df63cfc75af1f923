"""Real (non-padding) tokens per second of the DPO train step, padded vs packed rows vs shared prompts, fixed
vs variable lengths.

A random 5.5 M-parameter Llama (vocabulary 8192, width 256, 4 layers, MLP 768) on CPU with one thread, 8
pairs per step (16 sequences): fixed lengths (prompt 64 + response 64 tokens) against variable ones
(prompt 8-128, response 4-128, uniform). Each step is the loop's: make_batch, pair_loss (forward, chunked
log-probs, DPO loss), backward, AdamW step. The six cases run interleaved, `--rounds` rounds of
`--steps` steps each, and the median round counts. Time is the process's CPU time (one thread), so other
work on a shared machine does not count. The reference pass over a table of variable sequences is timed
too: the old layout (256 rows in table order, padded) against the new (length-sorted passes, padded,
packed, or grouped by prompt).

    .venv/bin/python benchmarks/packing_throughput.py [--rounds 5] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prefopt.data.batching import PairSplit, SequenceTable, make_batch
from prefopt.data.layout import Packing
from prefopt.data.packing import pack, prompt_group_passes, share_prompts, whole_table_passes
from prefopt.engine.reference import all_sequence_logps as _all_sequence_logps
from prefopt.engine.step import LossInputs, pair_loss
from prefopt.models.logps import model_logps
from prefopt.models.tiny import TinyModelConfig, build_tiny
from prefopt.objectives import OBJECTIVES
from prefopt.objectives.dpo import DPOConfig

VOCABULARY = [f"w{i}" for i in range(8192 - 3)]  # + 3 special tokens = 8192
LENGTHS = {"fixed": ((64, 64), (64, 64)), "variable": ((8, 128), (4, 128))}  # (prompt, response) ranges


def build_model():
    """The embedded model's builder at 5.5 M parameters, and its word tokenizer of VOCABULARY."""
    torch.manual_seed(0)
    shape = dict(
        hidden_size=256, num_layers=4, num_heads=4, intermediate_size=768, max_position_embeddings=512
    )
    return build_tiny(TinyModelConfig(**shape), VOCABULARY)


def words(generator: torch.Generator, count: int) -> str:
    return " ".join(VOCABULARY[i] for i in torch.randint(len(VOCABULARY), (count,), generator=generator))


def pairs(tokenizer, lengths, num_pairs: int, seed: int) -> tuple[SequenceTable, PairSplit]:
    """`num_pairs` pairs; response lengths count the EOS the table appends."""
    (p_lo, p_hi), (r_lo, r_hi) = lengths
    generator = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=generator))  # noqa: E731
    table = SequenceTable(tokenizer, max_prompt_tokens=p_hi, max_response_tokens=r_hi)
    prompts, chosen, rejected = [], [], []
    for _ in range(num_pairs):
        prompts.append(words(generator, draw(p_lo, p_hi)))
        chosen.append(words(generator, draw(r_lo, r_hi) - 1))
        rejected.append(words(generator, draw(r_lo, r_hi) - 1))
    _, prompt_ids, chosen_ids, rejected_ids = table.add_pairs(prompts, chosen, rejected)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    split = PairSplit(as_long(chosen_ids), as_long(rejected_ids), torch.ones(num_pairs), as_long(prompt_ids))
    return table, split


def run_round(
    model, optimizer, table, split, inputs, steps: int, start: int, pairs: int
) -> tuple[float, int, int]:
    """(seconds, real tokens, tokens the decoder computed) over `steps` train steps of `pairs` pairs."""
    real = computed = 0
    began = time.process_time()
    for step in range(start, start + steps):
        examples = torch.arange(step * pairs, (step + 1) * pairs) % len(split)
        batch = make_batch(table, split, examples, None, False)
        loss, _ = pair_loss(model, batch, inputs, step, torch.device("cpu"))
        (loss / len(examples)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real += int(batch.rows.attention_mask.sum())
        computed += inputs.packing.arrange(batch.rows, model, "cpu").input_ids.numel()
    return time.process_time() - began, real, computed


def train_step_throughput(tokenizer, rounds: int, steps: int, pairs_per_step: int, pack_tokens) -> dict:
    model, _ = build_model()
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    data = {name: pairs(tokenizer, lengths, 8 * pairs_per_step, seed=1) for name, lengths in LENGTHS.items()}
    # The policy starts at the reference: DPO margins near 0. (Zeros would give margins of hundreds of
    # nats on variable lengths, gradients ~ sigmoid(-50) and denormal arithmetic, 10x slower on CPU.)
    with torch.no_grad():
        reference = {name: _all_sequence_logps(model, table, 256, "cpu") for name, (table, _) in data.items()}
    layouts = {
        "padded": Packing(False),
        "packed": Packing(pack_tokens=pack_tokens, share_prompts=False),
        "shared": Packing(pack_tokens=pack_tokens),  # the default: one row of prompt groups
    }
    cases = [(lengths, packing) for lengths in LENGTHS for packing in layouts]
    samples = {case: [] for case in cases}
    tokens = {case: [0, 0] for case in cases}  # real, computed
    for round_ in range(rounds + 1):  # round 0 warms up
        for lengths, packing in cases:
            table, split = data[lengths]
            inputs = LossInputs(
                objective=OBJECTIVES["dpo"],
                hparams=DPOConfig(),
                reference_logps=reference[lengths],
                aux_rewards=None,
                packing=layouts[packing],
            )
            start = round_ * steps
            seconds, real, done = run_round(
                model, optimizer, table, split, inputs, steps, start, pairs_per_step
            )
            if round_:
                samples[(lengths, packing)].append(real / seconds)
                tokens[(lengths, packing)][0] += real
                tokens[(lengths, packing)][1] += done
    medians = {case: statistics.median(values) for case, values in samples.items()}
    base = medians[("fixed", "padded")]
    print(f"\ntrain step, {pairs_per_step} pairs, median of {rounds} rounds x {steps} steps")
    print(f"{'lengths':10} {'layout':8} {'real tok/s':>11} {'vs fixed padded':>16} {'positions/token':>16}")
    for (lengths, packing), value in medians.items():
        real, done = tokens[(lengths, packing)]
        print(f"{lengths:10} {packing:8} {value:11.0f} {value / base:16.2f} {done / real:16.2f}")
    return {f"{lengths}/{packing}": value for (lengths, packing), value in medians.items()}


def positions_per_token(table: SequenceTable, passes, layout=lambda rows: rows) -> float:
    """Positions the decoder computes over the passes (padded, or as `layout` arranges them) per token."""
    computed = sum(layout(table.pad(part)).input_ids.numel() for part in passes)
    return computed / int(table.lengths().sum())


@torch.no_grad()
def reference_pass(tokenizer, num_pairs: int) -> None:
    model = build_model()[0].eval()
    table, _ = pairs(tokenizer, LENGTHS["variable"], num_pairs, seed=2)
    cpu = torch.device("cpu")
    old_passes = torch.arange(len(table)).split(256)
    began = time.process_time()
    for part in old_passes:
        model_logps(model, table.pad(part), 256)
    old = time.process_time() - began
    lengths, longest, results = table.lengths(), int(table.lengths().max()), {}
    # The passes `_all_sequence_logps` makes on CPU (16 rows, or as many tokens): what the timings below ran.
    prompt_lengths = torch.tensor([len(table.prompt_ids[p]) for p in table.sequence_prompt])
    groups = prompt_group_passes(torch.tensor(table.sequence_prompt), lengths, prompt_lengths, 16 * longest)
    cases = {
        "256 rows in table order, padded": (old, positions_per_token(table, old_passes)),
        "length-sorted, padded": (
            Packing(False),
            positions_per_token(table, whole_table_passes(lengths, 16, None)),
        ),
        "whole table packed": (
            Packing(share_prompts=False),
            positions_per_token(table, whole_table_passes(lengths, 16, longest), lambda r: pack(r, longest)),
        ),
        "grouped by prompt (shared)": (Packing(), positions_per_token(table, groups, share_prompts)),
    }
    for name, (packing, share) in cases.items():
        if isinstance(packing, Packing):
            began = time.process_time()
            _all_sequence_logps(model, table, 256, cpu, packing)
            packing = time.process_time() - began
        results[name] = (packing, share)
    real = int(lengths.sum())
    print(f"\nreference pass, {len(table)} variable sequences ({real} real tokens)")
    for name, (seconds, share) in results.items():
        print(f"  {name:31}: {real / seconds:8.0f} real tok/s, {share:.2f} positions per real token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=8, help="pairs per train step")
    parser.add_argument(
        "--pack-tokens", type=int, default=None, help="trainer.layout.pack_tokens (default: longest)"
    )
    parser.add_argument("--reference-pairs", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, tokenizer = build_model()
    train_step_throughput(tokenizer, args.rounds, args.steps, args.pairs, args.pack_tokens)
    reference_pass(tokenizer, args.reference_pairs)


if __name__ == "__main__":
    main()
