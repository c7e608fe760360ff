"""Command-line interface: `blockstate train | eval | generate | export | corpora | models | bench |
reproduce | tasks` (docs/cli.md; `blockstate COMMAND --help` lists each command's flags and
defaults)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from . import __version__
from .registry import SIZES, TAGS, list_models, model_config, presets


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, once: "(default: X)" is added unless the text
    already names its default, or the flag is a switch (store_true) or prints and exits."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings or action.nargs == 0
                or action.default is argparse.SUPPRESS or action.default is False or action.required):
            return text
        default = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {default})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        # never break a flag or a value at its hyphen (--max-time, bst-sh-s4)
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one --help away), and values that start with
    a minus sign (`--max-time -5m`) read as values, so that their own check names the problem.
    Help shows every option's default (`_HelpFormatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\d")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(name: str, size: str) -> int:
    from .resources import count_parameters

    return count_parameters(name, size, {})


def cmd_models(args: argparse.Namespace) -> int:
    sizes = args.sizes.split(",") if args.sizes else list(SIZES)
    tags = tuple(t for t in args.tag.split(",") if t) if args.tag else ()
    rows = [[p.name] + [f"{_count(p.name, s) / 1e6:.2f}M" for s in sizes]
            + [",".join(t for t in TAGS if t in p.tags)] for p in presets(*tags)]
    header = ["model"] + sizes + ["tags"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return 0


def add_train_flags(p: argparse.ArgumentParser,
                    extra: dict[str, list[tuple[tuple, dict]]] | None = None) -> None:
    """One flag per TrainConfig field (but `model_overrides`, which is --set), with its type,
    choices and help from the dataclass and `train_config.FIELD_HELP`, in the argument groups of
    `train_config.FIELD_GROUPS`; `extra` adds the command line's own flags (argparse arguments) to
    the groups it names. Every TrainConfig flag's default is None, so that the flags a user gave
    can be told from the config file's and the dataclass's values; the help shows the dataclass's
    default, once."""
    import dataclasses

    from .train_config import FIELD_CHOICES, FIELD_GROUPS, FIELD_HELP, TrainConfig

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    extra = dict(extra or {})
    for title, names in FIELD_GROUPS.items():
        group = p.add_argument_group(title)
        for args, kwargs in extra.pop(title, []):
            group.add_argument(*args, **kwargs)
        for name in names:
            if name != "model_overrides":
                _add_field_flag(group, fields[name], FIELD_HELP[name], FIELD_CHOICES.get(name))
    if extra:
        raise ValueError(f"unknown argument group(s) {sorted(extra)}")


def _add_field_flag(group, f, help_text: str, choices) -> None:
    import dataclasses

    flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split("|")[0].strip()
    default = f.default if f.default is not dataclasses.MISSING else None
    if "default" not in help_text.lower():  # else the text says what the default is
        help_text = f"{help_text} (default: {'none' if default is None else default})"
    if kind == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        return
    convert = {"int": int, "float": float}.get(kind, str)
    if f.name == "max_time":
        convert = str  # a duration: 90s, 5m, 1.5h
    allowed = choices() if choices else None
    # a long list of choices (the model presets) is named by the help text, not the usage line
    metavar = f.name.upper() if allowed and len(",".join(allowed)) > 40 else None
    group.add_argument(flag, type=convert, default=None, choices=allowed, metavar=metavar,
                       help=help_text)


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected FIELD=VALUE, e.g. --set n_layers=4 or "
                         f"--set ssm.state_size=32")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train import train
    from .train_config import TrainConfig, read_config_file

    fields: dict = {}
    if args.config:
        fields.update(read_config_file(args.config))
    if args.set and not isinstance(fields.get("model_overrides", {}), dict):
        raise ValueError(f"model_overrides={fields['model_overrides']!r} is not valid; it must be a "
                         f"table of model fields (e.g. [model_overrides] n_layers = 4)")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "model_overrides" and getattr(args, f.name) is not None}
    fields.update(given)
    if args.set:
        fields["model_overrides"] = {**fields.get("model_overrides", {}),
                                     **dict(parse_override(t) for t in args.set)}
    if fields.get("init_from") and not args.resume:  # a fine-tune: the checkpoint's model, unless given
        from .train import with_init_settings

        fields = with_init_settings(fields, fields["init_from"])
    config = TrainConfig.from_dict(fields)
    requested = set(fields)  # what the user asked for: flags, --set and the config file
    summary = train(config, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                    allow_changed_data=args.allow_changed_data, requested=requested,
                    override=args.override)
    if summary.get("interrupted"):
        print(f"blockstate: {summary['interrupted']}: stopped at step {summary['step']}; resume with "
              f"`blockstate train --out {args.out} --resume`", file=sys.stderr)
        return 143 if summary["interrupted"] == "SIGTERM" else 130
    if summary.get("validation") is None:  # not the main process
        return 0
    val = summary["validation"]
    shape = summary["shape"]
    rows = [
        ("model", f"{config.model}, {summary['parameters'] / 1e6:.2f}M parameters: width "
                  f"{shape['d_model']} x {shape['n_layers']} layers, W={shape['block_size']}, "
                  f"L={shape['seq_len']}; batch {shape['batch_size']}, lr {shape['lr']:g}"),
        ("steps / tokens", f"{summary['step']:,} / {summary['tokens']:,}"),
        ("training time", f"{summary['elapsed_s'] / 60:.1f} min"),
        ("training tokens/s", f"{summary['tokens_per_s']:,.0f}"),
        ("validation perplexity (per token)", f"{val['perplexity']:.3f}"),
        ("validation bits per byte", f"{val['bits_per_byte']:.3f}"),
        ("unigram perplexity (baseline)", f"{summary['unigram_perplexity']:.3f}"),
    ]
    print(f"\n| {args.out} | |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    if summary.get("sample"):
        print(f"\nsample (prompt, then the model's continuation):\n{summary['sample']['prompt']}"
              f"\u2502{summary['sample']['continuation']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint, plot_loss_by_position

    lengths = None
    if args.lengths is not None:
        lengths = _int_list(args.lengths, "--lengths")
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens {args.max_tokens} must be >= 1 (or 0 for the whole split)")
    _device(args.device)
    for flag, path in (("--output", args.output), ("--plot", args.plot)):
        if path and Path(path).is_dir():
            raise ValueError(f"{flag} {path} is a directory; give a file name")
    if args.batch_tokens < 1:
        raise ValueError(f"--batch-tokens {args.batch_tokens} must be >= 1")
    result = evaluate_checkpoint(args.checkpoint, args.data, lengths, split=args.split,
                                 max_tokens=args.max_tokens or None, device=args.device,
                                 batch_tokens=args.batch_tokens, cache_dir=args.cache_dir,
                                 precision=args.precision)
    if args.plot:
        plot_loss_by_position(result, args.plot)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['checkpoint']} (step {result['step']}) on {result['data']} [{result['split']}]")
    print("| length | perplexity | bits/byte | tokens |\n|---|---|---|---|")
    for length, m in result["lengths"].items():
        print(f"| {length} | {m['perplexity']:.3f} | {m['bits_per_byte']:.4f} | {m['tokens']:,} |")
    return 0


def _apply_threads(threads: int) -> None:
    """--threads of generate, bench and tasks: 0 keeps torch's default."""
    if threads < 0:
        raise ValueError(f"--threads {threads}: give 0 (torch's default) or a positive count")
    if threads:
        torch.set_num_threads(threads)


def _check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= seed < 2**63:
        raise ValueError(f"{flag} {seed} is out of range; give an integer in [0, 2**63)")


def cmd_generate(args: argparse.Namespace) -> int:
    from .loading import load

    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompt-file FILE")
    _apply_threads(args.threads)
    if args.prompt_file is not None:
        if Path(args.prompt_file).is_dir():
            raise ValueError(f"--prompt-file {args.prompt_file} is a directory; give a text file")
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--prompt-file {args.prompt_file} is not UTF-8 text") from None
    else:
        prompt = args.prompt
    _check_seed(args.seed)
    model, tokenizer = load(args.checkpoint, _device(args.device))
    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} was saved without a tokenizer; generate from Python "
                         "with token ids instead")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    new: list[int] = []
    shown = 0
    sys.stdout.write(prompt)

    def stream(row: int, token: int) -> None:
        nonlocal shown
        new.append(token)
        text = tokenizer.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)

    stop = [tokenizer.eos_id] if args.stop_at_eos else []
    model.generate([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=stop, on_token=stream)
    sys.stdout.write(tokenizer.decode(new)[shown:] + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .loading import load_with_checkpoint

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory; choose a new one")
    model, tokenizer, checkpoint = load_with_checkpoint(args.run)
    model.save_pretrained(out, tokenizer, export_card(checkpoint))
    print(f"{checkpoint.path} (step {checkpoint.step}) -> {out}: config.json, model.safetensors, "
          f"remote code, tokenizer, generation config, README.md "
          f"({model.num_parameters():,} parameters)")
    if args.push_to_hub:
        from .pretrained import push_to_hub

        info = push_to_hub(model, args.push_to_hub, private=args.private or None, directory=out)
        print(f"uploaded to https://huggingface.co/{args.push_to_hub} "
              f"({getattr(info, 'oid', None) or info})")
    return 0


def export_card(checkpoint) -> dict:
    """What an export's model card says about its training run: the training config's model,
    size, data, tokenizer and budget, the steps, tokens and time trained, and the run's last
    validation numbers (its summary.json) when the run finished at this checkpoint."""
    state = checkpoint.train_state or {}
    train = state.get("train_config") or {}
    card = {key: train.get(key) for key in ("model", "size", "data", "tokenizer", "vocab_size",
                                            "seq_len", "batch_size", "lr", "max_steps",
                                            "max_tokens", "max_time")}
    card.update({"steps": state.get("step", checkpoint.step), "tokens": state.get("tokens"),
                 "training time (s)": state.get("elapsed")})
    summary = Path(checkpoint.path).parent.parent / "summary.json"
    try:
        finished = json.loads(summary.read_text(encoding="utf-8"))
        validation = (finished.get("validation") if finished.get("step") == checkpoint.step
                      else None)                     # the summary of this checkpoint's step only
    except (OSError, ValueError, AttributeError):
        validation = None
    if isinstance(validation, dict):
        card.update({f"validation {key}": value for key, value in validation.items()})
    elif validation is not None:
        card["validation"] = validation
    return card


def cmd_corpora(args: argparse.Namespace) -> int:
    from .data import list_corpora

    corpora = list_corpora()
    if args.json:
        print(json.dumps(corpora))
        return 0
    for c in corpora:
        if c["available"]:
            size = f"{c['documents']:,} documents, {c['bytes'] / 1e6:.1f} MB at {c['location']}"
        else:
            size = f"not available: {c['hint']}"
        print(f"{c['name']:<14} {size}\n{'':<14} {c['description']}")
    return 0


def _int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < minimum:
        raise ValueError(f"{flag} {text!r}: expected integers >= {minimum}")
    return values


def _bench_start(args: argparse.Namespace) -> tuple[Path | None, str]:
    """What every suite does first: --threads, --device (where the suite has it) and the flags
    that must be >= 1; returns the output path and the command line the report records."""
    _apply_threads(args.threads)
    if hasattr(args, "device"):
        _device(args.device)
    for name in ("repeats", "length", "new_tokens"):
        if getattr(args, name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    return (Path(args.out) if args.out else None), "blockstate bench " + " ".join(args.argv)


def _bench_presets(args: argparse.Namespace) -> list[str]:
    presets = args.models.split(",") if args.models else list_models()
    unknown = sorted(set(presets) - set(list_models()))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(list_models())}")
    return presets


def cmd_bench_layers(args: argparse.Namespace) -> int:
    from .bench.layers import LAYERS, run_layers

    out, command = _bench_start(args)
    widths = []
    for item in args.widths.split(","):
        width, _, heads = item.partition(":")
        if not (width.isdigit() and heads.isdigit()) or int(heads) < 1 or int(width) % int(heads):
            raise ValueError(f"--widths item {item!r}: expected WIDTH:HEADS with HEADS dividing WIDTH")
        widths.append((int(width), int(heads)))
    lengths = _int_list(args.lengths, "--lengths")
    if any(n % 128 for n in lengths):
        raise ValueError(f"--lengths {args.lengths}: lengths must be multiples of the window (128)")
    layers = list(LAYERS) if args.layers == "all" else args.layers.split(",")
    compiled = args.compile.split(",") if args.compile else []
    unknown = sorted(set(layers + compiled) - set(LAYERS))
    if unknown:
        raise ValueError(f"unknown layer(s) {unknown}; known: {', '.join(LAYERS)}")
    run_layers(out, widths, lengths, layers, batch=args.batch, device=args.device, dtype=args.dtype,
               repeats=args.repeats, budget_s=args.budget, max_seconds=args.max_seconds,
               compile_layers=tuple(compiled), command=command)
    return 0


def cmd_bench_models(args: argparse.Namespace) -> int:
    from .bench.models import run_models

    out, command = _bench_start(args)
    run_models(out, _bench_presets(args), args.size, args.batch, args.length, args.steps,
               args.device, command)
    return 0


def cmd_bench_generation(args: argparse.Namespace) -> int:
    from .bench.generation import run_generation

    out, command = _bench_start(args)
    run_generation(out, _bench_presets(args), args.size, _int_list(args.lengths, "--lengths"),
                   _int_list(args.batches, "--batches"), args.new_tokens, device=args.device,
                   command=command)
    return 0


def cmd_bench_imports(args: argparse.Namespace) -> int:
    from .bench.imports import run_imports

    out, command = _bench_start(args)
    run_imports(out, repeats=args.repeats, command=command)
    return 0


def cmd_bench_quality(args: argparse.Namespace) -> int:
    from .bench.quality import run_quality

    out, command = _bench_start(args)
    corpora = [c for c in args.data.split(",") if c]
    if not corpora or args.minutes <= 0:
        raise ValueError("quality: give --data with at least one corpus and --minutes > 0")
    also = [m for m in args.also.split(",") if m]
    run_quality(out, corpora, args.minutes, Path(args.runs_dir), eval_tokens=args.eval_tokens,
                cache_dir=args.cache_dir, overwrite=args.overwrite, command=command, also=also)
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import ZOO, reproduce

    corpora = [c for c in args.corpora.split(",") if c]
    models = tuple(args.models.split(",")) if args.models else ZOO
    seeds = tuple(_int_list(args.seeds, "--seeds", minimum=0)) if args.seeds else None
    reproduce(args.scale, corpora, args.out, device=args.device, models=models,
              ablations=not args.no_ablations, seeds=seeds, max_tokens=args.max_tokens,
              command="blockstate reproduce " + " ".join(args.argv))
    print(f"results: {Path(args.out) / 'results.md'}")
    return 0


def _task_params(items: list[str], flag: str) -> list[dict[str, int]]:
    """`--param lag=8,24 --param length=8` -> every combination [{lag: 8, length: 8}, ...]."""
    combos: list[dict[str, int]] = [{}]
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag} {item!r}: expected NAME=VALUE[,VALUE...]")
        try:
            parsed = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag} {item!r}: values must be integers") from None
        if not parsed:
            raise ValueError(f"{flag} {item!r}: no values")
        combos = [{**c, name.strip(): v} for c in combos for v in parsed]
    return combos


def _curriculum(items: list[str]) -> tuple[tuple[int, tuple[tuple[str, int], ...]], ...]:
    """`--curriculum 1500:num_pairs=8,gap=32` -> ((1500, (("gap", 32), ("num_pairs", 8))),)."""
    stages = []
    for item in items:
        steps, sep, params = item.partition(":")
        try:
            count = int(steps)
            changed = dict(parse_override(p) for p in params.split(",") if p.strip())
            if not sep or not changed or not all(type(v) is int for v in changed.values()):
                raise ValueError
        except ValueError:
            raise ValueError(f"--curriculum {item!r}: expected STEPS:NAME=V[,NAME=V...] with "
                             f"integers, e.g. 1500:num_pairs=8") from None
        stages.append((count, tuple(sorted(changed.items()))))
    return tuple(stages)


def _filler_stage(item: str | None) -> tuple[int, float] | tuple[int, float, int] | tuple[()]:
    """`--skip-filler-stage 1000:2` -> (1000, 2.0); `1000:2:100` -> (1000, 2.0, 100); None -> ()."""
    if item is None:
        return ()
    parts = item.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        stage = (int(parts[0]), float(parts[1]), *(int(p) for p in parts[2:]))
        if stage[0] < 1 or not stage[1] > 0 or any(every < 1 for every in stage[2:]):
            raise ValueError
    except ValueError:
        raise ValueError(f"--skip-filler-stage {item!r}: expected STEPS:FACTOR[:EVERY] with STEPS "
                         f">= 1, FACTOR > 0 and EVERY >= 1, e.g. 1000:2 or 1000:2:100") from None
    return stage


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS, Run, Settings, make_task, run_all, write_report
    from .tasks.runner import SUITE_SIZE, curriculum_tasks

    if args.action == "list":
        for name, cls in TASKS.items():
            print(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        return 0
    command = "blockstate tasks " + " ".join(args.argv)
    if not args.out:
        raise ValueError(f"tasks {args.action} needs --out DIR")
    if args.action == "report":
        print(f"report: {write_report(args.out, command)}")
        return 0
    _apply_threads(args.threads)
    if args.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    if args.skip_filler is not None and not args.skip_filler > 0:
        raise ValueError(f"--skip-filler must be > 0, got {args.skip_filler}")
    if args.skip_filler is not None and args.skip_filler_stage is not None:
        raise ValueError("--skip-filler scores trained models skipping filler; with "
                         "--skip-filler-stage they train and are scored skipping: give one of them")
    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; known tasks: {', '.join(TASKS)}")
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(list_models()))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(list_models())}")
    overrides = dict(parse_override(item) for item in args.set)
    device = _device(args.device)
    eval_params = _task_params(args.eval_param, "--eval-param") if args.eval_param else None
    for params in _task_params(args.param, "--param"):  # validate everything before training
        for extra in eval_params or [{}]:
            make_task(args.task, **{**params, **extra})
    for model in models:
        model_config(model, SUITE_SIZE, **overrides)
    settings = Settings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                        eval_sequences=args.eval_sequences, ssm_lr_scale=args.ssm_lr_scale,
                        curriculum=_curriculum(args.curriculum),
                        filler_stage=_filler_stage(args.skip_filler_stage))
    for params in _task_params(args.param, "--param"):  # each stage is a task of one vocabulary
        curriculum_tasks(Run(args.task, tuple(sorted(params.items())), models[0], 0), settings)
    changed = {**overrides, **({"ssm_lr_scale": args.ssm_lr_scale} if args.ssm_lr_scale != 1 else {})}
    suffix = args.label or ",".join(f"{k}={v}" for k, v in changed.items())
    runs = [Run(args.task, tuple(sorted(params.items())), model, seed,
                tuple(sorted(overrides.items())), f"{model}[{suffix}]" if suffix else "")
            for params in _task_params(args.param, "--param") for model in models
            for seed in _int_list(args.seeds, "--seeds", minimum=0)]
    run_all(runs, settings, args.out, eval_params, device=device,
            checkpoint_every=args.checkpoint_every, keep_models=args.keep_models,
            skip_factor=args.skip_filler)
    print(f"report: {write_report(args.out, command)}")
    return 0


def _device(name: str) -> torch.device:
    from .device import resolve_device

    try:
        return resolve_device(name)
    except ValueError as error:
        raise ValueError(f"--{error}") from None


def _add_models_parser(sub) -> None:
    p = sub.add_parser("models", help="list model presets, their parameter counts and tags")
    p.add_argument("--sizes", default=None, help="comma-separated sizes (default: all)")
    p.add_argument("--tag", default=None, help="comma-separated tags: only presets with all of them "
                                               f"({', '.join(TAGS)})")
    p.set_defaults(func=cmd_models)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on a corpus",
                       description="Train a model on a corpus into a run directory (--out). Every "
                                   "option is also a key of a --config file (TOML, JSON or YAML; "
                                   "flags win over the file); docs/cli.md.")
    add_train_flags(p, extra={
        "run": [
            (("--out",), dict(required=True, help="run directory (checkpoints, metrics, tokenizer)")),
            (("--config",), dict(default=None, metavar="FILE",
                                 help="TOML, JSON (or YAML) file of training options; a run's "
                                      "train_config.json trains that run again")),
        ],
        "model": [
            (("--set",), dict(action="append", metavar="FIELD=VALUE",
                              help="model config override, e.g. --set n_layers=4, --set "
                                   "ssm.state_size=32 or --set ssm=s4d (repeatable; default: "
                                   "the preset's)")),
        ],
        "checkpointing and fine-tuning": [
            (("--resume",), dict(
                nargs="?", const=True, default=False, metavar="STEP_DIR",
                help="continue the run in --out exactly, from its newest intact checkpoint or from "
                     "the given checkpoint step directory; the budgets given replace the run's "
                     "(--max-time counts the run's whole training time), and so may the options "
                     "that change only the output (logging and output, --save-every); others "
                     "need --override")),
            (("--override",), dict(action="store_true",
                                   help="with --resume, apply settings that differ from the run's "
                                        "(otherwise refused; budgets and output options may always "
                                        "change)")),
            (("--overwrite",), dict(action="store_true",
                                    help="replace the run in --out (removes only a run's own files, "
                                         "after everything is checked)")),
            (("--allow-changed-data",), dict(action="store_true",
                                             help="resume even though the corpus changed since "
                                                  "the run started")),
        ],
        "logging and output": [
            (("--quiet",), dict(action="store_true", help="no progress bar or log lines")),
        ],
    })
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint: perplexity, bits per byte, by length")
    p.add_argument("checkpoint", help="run directory or checkpoint directory")
    p.add_argument("--data", default=None,
                   help="corpus name, directory, .jsonl or text file (default: the run's corpus)")
    p.add_argument("--lengths", default=None,
                   help="comma-separated evaluation lengths (default: the run's training length)")
    p.add_argument("--cache-dir", default=None,
                   help="directory of tokenized corpora (default: ~/.cache/blockstate)")
    p.add_argument("--batch-tokens", type=int, default=8192,
                   help="tokens per evaluation batch (windows per batch = this / length, at least 1)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="the corpus split evaluated")
    p.add_argument("--max-tokens", type=int, default=200_000,
                   help="tokens evaluated per length, spread over the split (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    p.add_argument("--plot", default=None, help="PNG of loss by position (needs matplotlib)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast of the forward pass: auto (bf16 on CUDA, fp32 elsewhere), fp32 "
                        "or bf16")
    p.set_defaults(func=cmd_eval)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's model and tokenizer as a self-contained "
                                      "directory that plain transformers loads "
                                      "(trust_remote_code=True): config.json, model.safetensors, "
                                      "the modeling code, tokenizer files, generation config, "
                                      "model card")
    p.add_argument("run", help="run directory or checkpoint directory")
    p.add_argument("out", help="new (or empty) output directory")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="then upload the export to this Hugging Face Hub repository (created if "
                        "missing; log in first with `hf auth login`)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    p.set_defaults(func=cmd_export)


def _add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint, streamed as produced")
    p.add_argument("checkpoint", help="run directory, checkpoint directory or exported model "
                                      "directory")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="the text to continue (or --prompt-file)")
    p.add_argument("--prompt-file", default=None, metavar="FILE",
                   help="a UTF-8 text file to continue (or --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens generated at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0: greedy")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample from the K most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P "
                        "(nucleus sampling; default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampling")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-document token")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's own choice); on a small CPU, 1 decodes one prompt "
                        "faster, since a one-token step is a few hundred tiny operations "
                        "(docs/benchmarks/README.md)")
    p.set_defaults(func=cmd_generate)


def _add_corpora_parser(sub) -> None:
    p = sub.add_parser("corpora", help="list known corpora, their availability and size")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=cmd_corpora)


def _bench_suite(suites, name: str, help_text: str, outputs: str, device: bool = True
                 ) -> argparse.ArgumentParser:
    """A `blockstate bench` suite's parser with the flags every suite has: --out (`outputs`: the
    files it writes), --threads and, where the suite runs on a chosen device, --device."""
    p = suites.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:]
                          + " (docs/speed.md).")
    p.add_argument("--out", default=None,
                   help=f"output path without suffix: writes {outputs} (default: none, print only)")
    if device:
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own choice)")
    return p


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed, memory and quality benchmarks, one sub-command per "
                                     "suite (blockstate bench SUITE --help)",
                       description="Speed, memory and quality benchmarks against the baselines; "
                                   "each suite has its own flags (blockstate bench SUITE --help).")
    suites = p.add_subparsers(dest="suite", required=True, metavar="SUITE",
                              help="layers, models, generation, quality or imports")

    p = _bench_suite(suites, "layers", "one layer of every kind by sequence length: forward and "
                     "forward+backward time, peak memory, counted FLOPs",
                     "OUT.json, OUT.md and OUT.png")
    p.add_argument("--widths", default="512:16,256:4",
                   help="WIDTH:HEADS list (default: the paper's 512:16 and this CPU's 256:4)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536",
                   help="comma-separated sequence lengths, multiples of the window (128)")
    p.add_argument("--layers", default="all", help="comma-separated layer names or 'all'")
    p.add_argument("--compile", default=None,
                   help="also measure these layers under torch.compile (comma-separated)")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter and activation type")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after a warm-up")
    p.add_argument("--budget", type=float, default=20.0,
                   help="stop repeating a measurement after this many seconds")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="skip a length whose forward+backward is predicted to take longer")
    p.set_defaults(func=cmd_bench_layers)

    p = _bench_suite(suites, "models", "training tokens/s, FLOPs per token and MFU of the presets",
                     "OUT.json and OUT.md")
    p.add_argument("--models", default=None, help="comma-separated presets (default: all)")
    p.add_argument("--size", default="small", choices=list(SIZES), help="model size")
    p.add_argument("--batch", type=int, default=4, help="batch size")
    p.add_argument("--length", type=int, default=1024, help="sequence length")
    p.add_argument("--steps", type=int, default=3, help="timed training steps after a warm-up")
    p.set_defaults(func=cmd_bench_models)

    p = _bench_suite(suites, "generation", "one-token decoding steps and the inference cache of "
                     "the presets by context length", "OUT.json, OUT.md and OUT.png")
    p.add_argument("--models", default=None, help="comma-separated presets (default: all)")
    p.add_argument("--size", default="small", choices=list(SIZES), help="model size")
    p.add_argument("--lengths", default="1024,4096,16384,65536",
                   help="comma-separated context lengths")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=64, help="timed one-token steps per measurement")
    p.set_defaults(func=cmd_bench_generation)

    p = _bench_suite(suites, "quality", "the main job against the transformer preset with "
                     "nanoGPT's CPU hyperparameters, trained for equal minutes and scored on the "
                     "same test bytes", "OUT.json and OUT.md", device=False)
    p.add_argument("--data", default="python-stdlib,books", help="comma-separated corpora")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="training minutes of each model on each corpus")
    p.add_argument("--runs-dir", default="runs/bench-quality",
                   help="where the trained runs go (finished ones are reused)")
    p.add_argument("--eval-tokens", type=int, default=400_000,
                   help="test-split bytes scored per corpus, in pieces of about 16 KB taken in "
                        "turn from every test document")
    p.add_argument("--cache-dir", default=None,
                   help="directory of tokenized corpora (default: ~/.cache/blockstate)")
    p.add_argument("--also", default="",
                   help="comma-separated presets also trained as the main job is (size auto) and "
                        "compared with it, e.g. bst-recommended")
    p.add_argument("--overwrite", action="store_true", help="train again runs that already finished")
    p.set_defaults(func=cmd_bench_quality)

    p = _bench_suite(suites, "imports", "wall time of a fresh interpreter importing torch and "
                     "blockstate", "OUT.json and OUT.md", device=False)
    p.add_argument("--repeats", type=int, default=7, help="interpreter runs per statement")
    p.set_defaults(func=cmd_bench_imports)


def _add_reproduce_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="train and evaluate the model zoo, ablations and length "
                                         "generalization at a scale; write results.md")
    p.add_argument("--scale", default="tiny", choices=["tiny", "small", "base"],
                   help="model sizes, training tokens and seeds of the runs")
    p.add_argument("--corpora", default="python-stdlib", help="comma-separated corpora")
    p.add_argument("--out", required=True, help="output directory (re-running resumes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--models", default=None, help="comma-separated presets (default: the whole zoo)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scale's)")
    p.add_argument("--max-tokens", type=int, default=None, help="training tokens per run "
                                                                 "(default: the scale's)")
    p.add_argument("--no-ablations", action="store_true", help="train only the zoo, no ablations")
    p.set_defaults(func=cmd_reproduce)


def _add_tasks_parser(sub) -> None:
    p = sub.add_parser("tasks", help="synthetic long-range tasks: train presets for a fixed number "
                                     "of steps, score accuracy by distance, report")
    p.add_argument("action", choices=["run", "report", "list"],
                   help="run: train and score (then report); report: write report.md from --out; "
                        "list: the tasks")
    p.add_argument("--task", default="copying", help="task name (see `blockstate tasks list`)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=V[,V...]",
                   help="task parameter; comma-separated values sweep (repeatable)")
    p.add_argument("--eval-param", action="append", default=[], metavar="NAME=V[,V...]",
                   help="also evaluate each trained model on the task with these parameters "
                        "(e.g. a longer seq_len)")
    p.add_argument("--models", default="bst-sh-s4,slide", help="comma-separated presets")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="model config override for every model, e.g. --set ssm.state_size=64 "
                        "(an ablation; repeatable)")
    p.add_argument("--label", default="", help="name of the ablation in the report "
                                               "(default: the --set values)")
    p.add_argument("--curriculum", action="append", default=[], metavar="STEPS:NAME=V[,NAME=V...]",
                   help="train every run first for STEPS steps on the task with these parameters "
                        "changed, e.g. 1500:num_pairs=8 (repeatable: stages in order); the task "
                        "itself takes the rest of --steps, under one learning-rate schedule")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=50, help="steps of linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--ssm-lr-scale", type=float, default=1.0,
                   help="learning rate of the SSM kernel parameters relative to --lr")
    p.add_argument("--eval-sequences", type=int, default=512, help="held-out sequences per run")
    p.add_argument("--keep-models", default=None, metavar="DIR",
                   help="save each trained model as a checkpoint in DIR/TASK_KEY/NAME-seedS "
                        "(for later analysis; blockstate.loading.load_model reads it)")
    p.add_argument("--skip-filler", type=float, default=None, metavar="FACTOR",
                   help="also score each model with its long-memory selective heads skipping "
                        "positions whose step is below FACTOR times their median step (calibrated on "
                        "the task at its training length; blockstate.ssm.skip). Finished runs are "
                        "scored from their models under --keep-models")
    p.add_argument("--skip-filler-stage", default=None, metavar="STEPS:FACTOR[:EVERY]",
                   help="train the last STEPS of --steps with filler skipped at FACTOR (as "
                        "--skip-filler, calibrated when the stage starts and, with EVERY, again "
                        "every EVERY steps of it), e.g. 1000:2 or 1000:2:100; the model is scored "
                        "and kept skipping. Models without a selective SSM train as without it")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own choice)")
    p.add_argument("--device", default="cpu",
                   help="where runs train: cpu (default), cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="save a run in progress every N steps; re-running continues it (0: never)")
    p.add_argument("--out", default=None, help="output directory (re-running skips finished runs "
                                               "and continues interrupted ones)")
    p.set_defaults(func=cmd_tasks)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blockstate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"blockstate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_models_parser, _add_train_parser, _add_eval_parser, _add_export_parser,
                _add_generate_parser, _add_corpora_parser, _add_bench_parser, _add_reproduce_parser,
                _add_tasks_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    for name in ("batch", "steps"):
        if getattr(args, name, 1) < 1:
            print(f"blockstate: error: --{name} must be >= 1", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # OSError: missing files, directories, full disks, ...
        print(f"blockstate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockstate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
