"""transformers' `generate` against blockstate's own `generate`: seconds for N new tokens.

    OMP_NUM_THREADS=1 python scripts/bench_hf_generate.py --out docs/benchmarks/hf_generate

For each preset (tiny size, random weights, one thread, batch 1, a 16-token prompt, greedy): the
time of blockstate's `model.generate(prompt, N, temperature=0)`, of `transformers`' `generate`
through `blockstate.hf.BlockStateForCausalLM` on blockstate's one-token cache (the default,
`use_cache=True`), and of the same without a cache (`use_cache=False`: the whole sequence recomputed
for every token, what `transformers`' `generate` did before the cache bridge). Median of
`--rounds` interleaved rounds; every path must give the same tokens. Writes `<out>.json` and
`<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import blockstate
from blockstate.hf import BlockStateConfig, BlockStateForCausalLM


def measure(preset: str, new_tokens: int, rounds: int, prompt_length: int = 16) -> dict:
    torch.manual_seed(0)
    model = blockstate.build_model(preset, "tiny", init_std=0.1).eval()
    hf = BlockStateForCausalLM(BlockStateConfig(**model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_length))
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                "eos_token_id": None, "pad_token_id": 0}
    paths = {
        "blockstate generate": lambda: model.generate(prompt, new_tokens, temperature=0)[0],
        "transformers generate (cache)": lambda: hf.generate(prompt, **settings)[0].tolist(),
        "transformers generate (no cache)": lambda: hf.generate(prompt, use_cache=False,
                                                                **settings)[0].tolist(),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    outputs = {}
    for name, fn in paths.items():       # warm-up, and the tokens each path gives
        outputs[name] = fn()
    for _ in range(rounds):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    same = len({tuple(tokens) for tokens in outputs.values()}) == 1
    return {"preset": preset, "size": "tiny", "prompt_tokens": prompt_length,
            "new_tokens": new_tokens, "same_tokens": same,
            "seconds": {name: statistics.median(t) for name, t in times.items()},
            "best_seconds": {name: min(t) for name, t in times.items()},
            "all_seconds": times}


def markdown(report: dict) -> str:
    lines = [f"# transformers' generate vs blockstate's generate ({report['new_tokens']} new "
             f"tokens)", "", f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}; torch {report['torch']}, transformers "
             f"{report['transformers']}; {report['threads']} thread(s); tiny size, random "
             f"weights, batch 1, {report['prompt_tokens']}-token prompt, greedy; best (median) of "
             f"{report['rounds']} interleaved rounds: the machine is shared, so the best round is "
             f"the closer estimate of the cost and the median shows the noise.", "",
             "| preset | blockstate generate (s) | transformers generate, cache (s) | "
             "transformers generate, no cache (s) | cache / blockstate | same tokens |",
             "|---|---|---|---|---|---|"]
    names = ("blockstate generate", "transformers generate (cache)",
             "transformers generate (no cache)")
    for row in report["rows"]:
        best, median = row["best_seconds"], row["seconds"]
        cells = [f"{best[n]:.3f} ({median[n]:.3f})" for n in names]
        ratio = best[names[1]] / best[names[0]]
        lines.append(f"| {row['preset']} | {' | '.join(cells)} | {ratio:.2f}x | "
                     f"{'yes' if row['same_tokens'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _machine() -> str:
    from blockstate.reporting import machine_info

    info = machine_info(torch.device("cpu"))
    load = ", ".join(f"{x:.1f}" for x in info["load_average_at_start"])
    return f"{info['cpu']} ({info['cpus']} CPUs, load average {load} at start)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="bst-sh-s4,bst-mf-s4,bst-sh-ssd,brt")
    parser.add_argument("--new-tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    import transformers

    rows = [measure(p, args.new_tokens, args.rounds) for p in args.presets.split(",")]
    report = {"command": "OMP_NUM_THREADS=1 python scripts/bench_hf_generate.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": _machine(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "threads": args.threads, "new_tokens": args.new_tokens, "prompt_tokens": 16,
              "rounds": args.rounds, "rows": rows}
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
    return 0 if all(row["same_tokens"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
