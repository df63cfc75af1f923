"""The DPO throughput benchmark's Markdown: one table of every configuration, the issue's targets, and the
equal-results check of the losses."""

from __future__ import annotations

LOSS_ATOL = 5e-5  # fp32 on CPU, 20 steps: the two tools measured 7e-6 apart at most (2026-12)
LOSS_ATOL_MODEL = 1e-4  # fp32, a real model (--model): 30 layers of rounding, not 4
LOSS_ATOL_BF16 = 5e-2  # bf16 on a GPU: a looser bound, not a claim of equal results
PREFOPT, DEFAULT, PRECOMPUTE = "auto", "default", "precompute"
MEMORY = {
    "cuda": "torch.cuda.max_memory_allocated over the whole run (in brackets: to the last optimizer step).",
    "cpu": "the run's ru_maxrss at its end, the save included (in brackets: at the last optimizer step).",
}


def _find(summary: dict, tool: str, variant: str, lengths: str) -> dict | None:
    for config, result in summary.items():
        if (config.tool, config.variant, config.lengths) == (tool, variant, lengths):
            return result
    return None


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    return f"{a[key] / b[key]:.2f}x" if a and b else "-"


def table(summary: dict, device: str) -> list[str]:
    cpu = device != "cuda"
    memory = "peak RSS, MiB" if cpu else "peak CUDA memory allocated, GiB"
    memory += " (to the last step)"
    head = ["lengths", "run", "s per step", "real tokens/s", "vs TRL default", "vs TRL precompute"]
    head += ["vs own fixed"]
    head += ["real tokens per CPU s (vs TRL default, precompute)"] if cpu else []
    head += ["padding share", "positions per real token", "MFU", memory, "end to end (s)", "vs TRL default"]
    head += ["end to end, CPU s (vs TRL default)"] if cpu else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, r in summary.items():
        default = _find(summary, "trl", DEFAULT, config.lengths)
        precompute = _find(summary, "trl", PRECOMPUTE, config.lengths)
        fixed = _find(summary, config.tool, config.variant, "fixed") if config.lengths == "variable" else None
        layout = " (shared prompts)" if r.get("shared_prompts") else " (packed rows)" if r["packed"] else ""
        name = config.name + (layout if config.tool == "prefopt" else "")
        cells = [config.lengths, name, f"{r['seconds_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}"]
        cells += [_ratio(r, default, "tokens_per_s")]
        cells += [_ratio(r, precompute, "tokens_per_s"), _ratio(r, fixed, "tokens_per_s")]
        if cpu:
            ratios = [_ratio(r, t, "tokens_per_cpu_s") for t in (default, precompute)]
            cells += [f"{r['tokens_per_cpu_s']:,.0f} ({', '.join(ratios)})"]
        cells += [f"{r['padding_share']:.1%}", f"{r['positions_per_token']:.2f}"]
        cells += [f"{r['mfu']:.1%}" if "mfu" in r else "-"]
        unit, digits = (2**20, 0) if cpu else (2**30, 2)
        peaks = [f"{r[k] / unit:,.{digits}f}" for k in ("peak_memory_bytes", "peak_memory_train_bytes")]
        cells += [f"{peaks[0]} ({peaks[1]})"]
        cells += [f"{r['end_to_end_s']:.1f}", _ratio(r, default, "end_to_end_s")]
        if cpu:
            cells += [f"{r['end_to_end_cpu_s']:.1f} ({_ratio(r, default, 'end_to_end_cpu_s')})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _target_line(
    what: str, ours: dict | None, theirs: dict | None, key: str, cpu_key: str | None, bound, at_least
) -> list[str]:
    """'- met: <what> (measured <ratio>x)' for ours / theirs against `bound` (at least or at most), by
    wall-clock time with CPU time beside it; nothing when a run is missing."""
    if not (ours and theirs):
        return []
    value = ours[key] / theirs[key]
    met = value >= bound if at_least else value <= bound
    by_cpu = f"; {ours[cpu_key] / theirs[cpu_key]:.2f}x by CPU time" if cpu_key in ours else ""
    return [f"- {'met' if met else '**not met**'}: {what} (measured {value:.2f}x{by_cpu})"]


def targets(summary: dict) -> list[str]:
    """The issue's targets (set for the CPU shape): met or not by wall-clock time, CPU time beside it."""
    lines = []

    def check(*args):
        lines.extend(_target_line(*args))

    find = lambda tool, variant, lengths: _find(summary, tool, variant, lengths)  # noqa: E731
    ours, speed = find("prefopt", PREFOPT, "variable"), ("tokens_per_s", "tokens_per_cpu_s")
    default, precompute = find("trl", DEFAULT, "variable"), find("trl", PRECOMPUTE, "variable")
    check("variable lengths: prefopt >= 4x TRL default in real tokens/s", ours, default, *speed, 4, True)
    check("variable lengths: prefopt >= 3x TRL precompute_ref_log_probs", ours, precompute, *speed, 3, True)
    fixed = find("prefopt", PREFOPT, "fixed")
    check("prefopt variable >= 0.9x prefopt fixed lengths", ours, fixed, *speed, 0.9, True)
    for lengths in ("fixed", "variable"):
        ours, default = find("prefopt", PREFOPT, lengths), find("trl", DEFAULT, lengths)
        what = f"{lengths}: prefopt end to end <= 0.4x TRL default"
        check(what, ours, default, "end_to_end_s", "end_to_end_cpu_s", 0.4, False)
        trl = [t for t in (default, find("trl", PRECOMPUTE, lengths)) if t]
        least = min(trl, key=lambda t: t["peak_memory_bytes"]) if trl else None
        what = f"{lengths}: prefopt peak memory <= TRL's (the smaller of its two)"
        check(what, ours, least, "peak_memory_bytes", None, 1, False)
    return lines


def loss_check(summary: dict, atol: float) -> tuple[list[str], bool]:
    """Largest |loss difference| per step between each run and TRL default at the same lengths."""
    lines, agree = [], True
    for config, r in summary.items():
        reference = _find(summary, "trl", DEFAULT, config.lengths)
        if reference is None or config.variant == DEFAULT:
            continue
        steps = min(len(r["losses"]), len(reference["losses"]), 20)
        gap = max(abs(a - b) for a, b in zip(r["losses"][:steps], reference["losses"][:steps]))
        agree &= gap <= atol
        verdict = "agree" if gap <= atol else "**differ**"
        lines.append(
            f"- {config.lengths}, {config.name} vs TRL default: max |loss difference| over steps "
            f"1-{steps} = {gap:.2e} ({verdict}; losses {r['losses'][0]:.6f} -> "
            f"{r['losses'][steps - 1]:.6f})"
        )
    return lines, agree


def losses_agree(summary: dict, atol: float) -> bool:
    return loss_check(summary, atol)[1]


MODEL = """
torch {torch}, transformers {transformers}, trl {trl}, prefopt {prefopt}, Python {python}. Model `{model}`
({model_dir}): {params_m:.1f} M parameters, vocab {shape.vocab_size}, d {shape.hidden_size},
{shape.num_layers} layers, {shape.dtype}, its tokenizer and chat template. {pairs_text} Tokens as
both tools take them (the template's included): {token_ranges}. {steps} steps per run (one epoch),
steady state after {warmup_steps} warm-up steps, median of {repeats} interleaved repeats; load average
{load[0]:.1f} at the start, {load[1]:.1f} at the end (other processes shared the machine). DPO beta {beta},
AdamW at a constant lr {lr:g}, clip 1.0, both tools.
"""

SETTINGS = """
torch {torch}, transformers {transformers}, trl {trl}, prefopt {prefopt}, Python {python}. Random Llama,
shape `{shape.name}`: {params_m:.1f} M parameters, vocab {shape.vocab_size}, d {shape.hidden_size},
{shape.num_layers} layers, {shape.dtype}; {shape.pairs_per_step} pairs per step; fixed =
{shape.prompt_tokens} prompt + {shape.completion_tokens} completion tokens; variable = prompt
{shape.prompt_min}-{prompt_max}, completions {shape.completion_min}-{completion_max} (uniform, EOS
included). {steps} steps per run (one epoch), steady state after {warmup_steps} warm-up steps, median of
{repeats} interleaved repeats; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (other
processes shared the machine). DPO beta {beta}, AdamW at a constant lr {lr:g}, clip 1.0, both tools.
"""

DEFINITIONS = """
Real tokens: prompt + chosen and prompt + rejected per pair, EOS (a chat turn: the template's end of turn)
included, counted from the data for both tools alike. Tokens/s: the median over steady steps of a step's
real tokens / the wall time from the previous optimizer step's end to its own (data, forward, backward,
clip, optimizer, logging); per CPU s: the same over the process's CPU time, which other processes on a
shared machine do not inflate (one compute thread per run). Padding share: padding positions / all positions
of the policy's training forwards (counted at the decoder's input); positions per real token: those
positions / the real tokens, under 1 where a pair's prompt is computed once for its chosen and rejected
(prefopt's shared prompts; the same log-probs). S per step: the median wall time of a steady step. End to
end (wall, and CPU time on CPU): from a fresh process's first line to the end of the run: imports, model
loading, tokenizing, the reference pass (TRL precompute: in its trainer's init; TRL default: a live
reference forward every step), training, and the save of the final policy as a Hugging Face checkpoint
(prefopt's `checkpoint/`, TRL's `save_model`); prefopt also runs its final evaluation (one held-out pair).
Peak memory: {memory} {mfu} TRL runs with DPOTrainer's defaults (gradient checkpointing on; bf16 turned off
on CPU so both tools run fp32 there), `train_sampling_strategy=sequential` over rows in prefopt's batch
order; prefopt as `prefopt train model=pretrained dataset=preference` (packing: its default `auto` unless
the row says).
"""

MFU = """
MFU = model FLOPs of the policy update per step (6 x matmul weights, lm_head included, x real tokens, + 6 x
layers x d x n^2 causal attention per sequence of n tokens) / step time / {peak_tflops:g} TFLOP/s; the
reference's forward, live or precomputed, is not counted. The FLOPs are those of the pairs as TRL runs them
(prompt + chosen, prompt + rejected), so a shared prompt's saved work counts as done.
"""


def _prose(template: str, **fields) -> str:
    return " ".join(template.format(**fields).split())


def _token_ranges(env: dict) -> str:
    ranges = []
    for lengths, d in env["lengths"].items():
        (p0, p1), (c0, c1) = d["prompt_tokens"], d["completion_tokens"]
        ranges.append(f"{lengths}: prompts {p0}-{p1}, completions {c0}-{c1}")
    return "; ".join(ranges)


WORD_PAIRS = """
Chat pairs: one user message, two assistant turns, of common words (one token each after a space), seeded;
{shape.pairs_per_step} pairs per step; fixed = {shape.prompt_tokens}-word questions and
{shape.completion_tokens}-word answers, variable = {shape.prompt_min}-{prompt_max} and
{shape.completion_min}-{completion_max} words (uniform).
"""

FILE_PAIRS = """
Chat pairs (lengths `file`): the first rows of `{pairs}`, a prompt conversation and two assistant answers
each, in file order; {shape.pairs_per_step} pairs per step.
"""


def model_targets(summary: dict) -> list[str]:
    """Issue 17's targets for a real model (SmolLM2 on CPU), on the measured lengths setting."""
    lines = []
    lengths = next((k for k in ("file", "variable", "fixed") if _find(summary, "prefopt", PREFOPT, k)), None)
    ours = _find(summary, "prefopt", PREFOPT, lengths)
    default, precompute = _find(summary, "trl", DEFAULT, lengths), _find(summary, "trl", PRECOMPUTE, lengths)
    for what, theirs, key, cpu_key, bound, at_least in (
        ("prefopt >= 4x TRL default per step", default, "tokens_per_s", "tokens_per_cpu_s", 4, True),
        (
            "prefopt >= 3.3x TRL precompute per step",
            precompute,
            "tokens_per_s",
            "tokens_per_cpu_s",
            3.3,
            True,
        ),
        ("prefopt end to end <= 0.35x TRL default", default, "end_to_end_s", "end_to_end_cpu_s", 0.35, False),
        ("prefopt peak RSS <= 0.8x TRL default's", default, "peak_memory_bytes", None, 0.8, False),
    ):
        lines += _target_line(f"{lengths}: {what}", ours, theirs, key, cpu_key, bound, at_least)
    return lines


def render(env: dict, summary: dict, atol: float, device: str) -> str:
    check, _ = loss_check(summary, atol)
    model = f"{env['model']}, " if env.get("model") else ""
    return "\n".join(
        [
            f"# DPO throughput: prefopt vs TRL DPOTrainer, {model}{env['date']}, {env['device']}",
            "",
            _prose(
                MODEL if env.get("model") else SETTINGS,
                token_ranges=_token_ranges(env),
                **env,
                params_m=env["params"] / 1e6,
                prompt_max=2 * env["shape"].prompt_tokens,
                completion_max=2 * env["shape"].completion_tokens,
                pairs_text=_prose(
                    FILE_PAIRS if env.get("pairs") else WORD_PAIRS,
                    **env,
                    prompt_max=2 * env["shape"].prompt_tokens,
                    completion_max=2 * env["shape"].completion_tokens,
                ),
            ),
            "",
            *table(summary, device),
            "",
            _prose(DEFINITIONS, memory=MEMORY[device], mfu=_prose(MFU, **env) if device == "cuda" else ""),
            "",
            *(
                ["Targets (issue 17, a real model on CPU):", *model_targets(summary)]
                if env.get("model")
                else ["Targets (issue 11, set for the CPU shape):", *targets(summary)]
            ),
            "",
            "Equal results (same initial weights, pairs, batches and order; fp32 on CPU): tolerance |loss "
            f"difference| <= {atol:g} at every step.",
            *check,
            "",
        ]
    )
