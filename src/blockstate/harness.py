"""lm-evaluation-harness adapter (the optional extra `blockstate[lm-eval]`).

Importing this module registers the model type "blockstate" with `lm_eval`:

    import blockstate.harness  # noqa: F401  (registers "blockstate")
    import lm_eval
    results = lm_eval.simple_evaluate(model="blockstate",
                                      model_args="pretrained=runs/my-run,batch_size=8",
                                      tasks=["lambada_openai"])

or from the shell, `python -m blockstate.harness --model blockstate --model_args
pretrained=runs/my-run --tasks ...` (lm_eval's own command line, with the model registered;
`python -m blockstate.harness --tasks-path` prints the folder of the bundled offline tasks, for
`--include_path`). `pretrained` is anything `blockstate.load` takes: a run directory, a checkpoint
step directory or a `blockstate export` / `save_pretrained` directory with its tokenizer.

`batch_size` and `device` may come from `--model_args` or from lm_eval's own flags; a value in
`--model_args` wins (lm_eval's command line always passes its defaults, batch_size 1 and device
cuda:0). A CUDA device on a machine without CUDA falls back to the CPU with a notice.
`batch_size=auto` is the largest of 1, 2, 4, ... and `max_batch_size` (default 64) whose rows of
`max_length` tokens fit in GPU memory, probed once at load; on the CPU it is refused (give a number).

How the three request types are scored:

- `loglikelihood(context, continuation)`: split at token boundaries as lm_eval's HF adapter does:
  whitespace at the end of the context moves to the start of the continuation, and the
  continuation's tokens are those of encode(context + continuation) after encode(context). When a
  merge crosses the boundary inside a word (encode(context) is then not a prefix of the joint
  encoding), the split backs off to the joint encoding's last token boundary inside the context:
  the tokens that hold any character of the continuation are scored. The model always reads BOS
  then the joint encoding (the text itself), cut to its last `max_length` tokens.
- `loglikelihood_rolling(text)`: the document as `blockstate eval` reads it: BOS then the text,
  in consecutive windows of `max_length` inputs that overlap by one token (each token predicted
  once, every window's first input the previous window's last target). The sum is the negative of
  `blockstate eval`'s summed loss over the same tokens (the document's EOS, which eval also scores,
  is not part of a harness document). A BST reads any length, so a large `max_length` scores a
  whole document in one window.
- `generate_until(context, gen_kwargs)`: greedy (or sampled, with `do_sample` and `temperature`)
  through the model's recurrent inference cache, `max_gen_toks` tokens at most (default 256),
  cut at the first `until` string; the context keeps its last `max_length - max_gen_toks` tokens.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 64
# what lm_eval's command line passes when its flags are not given
_CLI_DEFAULTS = {"batch_size": "1", "device": "cuda:0", "max_batch_size": "None"}


def merge_model_arguments(model_args: dict[str, Any], cli: dict[str, Any] | None) -> dict[str, Any]:
    """The constructor's keyword arguments from `--model_args` and lm_eval's flags (`cli`, None where
    not given): a key in both takes the `--model_args` value, with a notice when the flag's value is
    not lm_eval's default (so was set on purpose) and differs."""
    merged = dict(model_args)
    for key, value in (cli or {}).items():
        if value is None:
            continue
        if key not in merged:
            merged[key] = value
        elif str(merged[key]) != str(value) and str(value) != _CLI_DEFAULTS.get(key):
            logger.warning("blockstate: %s=%s from --model_args overrides --%s %s", key, merged[key],
                           key, value)
    return merged


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch device; None or "auto": CUDA when there is one, else the CPU. A CUDA (or
    MPS) device that this machine lacks falls back to the CPU with a one-line notice."""
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        requested = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a torch device; give e.g. cpu, cuda or cuda:0") from None
    lacking = ((requested.type == "cuda" and not torch.cuda.is_available())
               or (requested.type == "mps" and not torch.backends.mps.is_available()))
    if lacking:
        logger.warning("blockstate: %s is not available on this machine; evaluating on the cpu", device)
        return torch.device("cpu")
    return requested


def _out_of_memory(error: RuntimeError) -> bool:
    """Whether `error` is the GPU running out of memory (cuFFT, which the FFT convolution uses, says
    so in its own words)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        words in str(error) for words in ("out of memory", "CUFFT_ALLOC_FAILED"))


def largest_batch(runs: Callable[[int], None], limit: int) -> int:
    """The largest of 1, 2, 4, ... (powers of two below `limit`, then `limit`) for which `runs(batch)`
    does not run out of GPU memory, trying them in increasing order until one does."""
    candidates = [1 << k for k in range(limit.bit_length()) if 1 << k < limit] + [limit]
    best = 0
    for batch in candidates:
        try:
            runs(batch)
        except RuntimeError as error:
            if not _out_of_memory(error):
                raise
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        best = batch
    if best == 0:
        raise RuntimeError("batch_size=auto: even one row does not fit in GPU memory; lower max_length")
    return best


@register_model("blockstate")
class BlockStateHarnessLM(LM):
    """A blockstate model for lm-evaluation-harness; see the module docstring."""

    def __init__(self, pretrained: str, device: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | str | None = None, max_length: int | str | None = None,
                 seed: int | str = 0, **unused: Any):
        super().__init__()
        from .loading import load

        if unused:
            ignored = ", ".join(f"{key}={value}" for key, value in unused.items())
            logger.warning("blockstate: ignoring model arguments %s (known: pretrained, device, batch_size, "
                           "max_batch_size, max_length, seed)", ignored)
        target = resolve_device(device)
        automatic = str(batch_size).startswith("auto")
        if automatic and target.type != "cuda":
            raise ValueError(f"batch_size={batch_size!r} finds the largest batch that fits in GPU memory; "
                             f"on {target.type} give a number instead, e.g. batch_size=8")
        model, tokenizer = load(pretrained, target)
        if tokenizer is None:
            raise ValueError(f"{pretrained} holds no tokenizer; export the model with its tokenizer "
                             f"(blockstate export RUN DIR)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self._token_bytes = tokenizer.token_byte_lengths()
        self.max_length = int(max_length) if max_length else model.config.max_seq_len
        self.seed = int(seed)
        if self.max_length < 2:
            raise ValueError(f"need max_length >= 2, got {max_length!r}")
        if automatic:
            limit = int(max_batch_size) if max_batch_size not in (None, "None") else DEFAULT_MAX_BATCH_SIZE
            self.batch_size = largest_batch(self._forward_pad_rows, limit)
            logger.warning("blockstate: batch_size=auto -> %d (rows of %d tokens, max_batch_size=%d)",
                           self.batch_size, self.max_length, limit)
        else:
            try:
                self.batch_size = int(batch_size)
            except ValueError:
                self.batch_size = 0
            if self.batch_size < 1:
                raise ValueError(f"batch_size={batch_size!r} is not valid; give an integer >= 1 or auto")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None):
        return cls(**merge_model_arguments(arg_dict, additional_config))

    @torch.no_grad()
    def _forward_pad_rows(self, batch: int) -> None:
        """The scoring forward pass on `batch` rows of `max_length` tokens (to probe memory)."""
        inputs = torch.full((batch, self.max_length), self.tokenizer.pad_id, device=self._device)
        F.log_softmax(self.model(inputs).float(), dim=-1)

    # ---- scoring
    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """For each (tokens, n): the summed log-probability of the last n tokens given the ones
        before them, and whether each of them is the greedy choice. Rows run in batches of
        `batch_size`, longest first, right-padded (padding after a row cannot change it)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(rows[i][0]) for i in chunk) - 1
            inputs = torch.full((len(chunk), width), self.tokenizer.pad_id, dtype=torch.long)
            for r, i in enumerate(chunk):
                tokens = rows[i][0]
                inputs[r, :len(tokens) - 1] = torch.tensor(tokens[:-1])
            logprobs = F.log_softmax(self.model(inputs.to(self._device)).float(), dim=-1).cpu()
            for r, i in enumerate(chunk):
                tokens, n = rows[i]
                positions = torch.arange(len(tokens) - 1 - n, len(tokens) - 1)
                targets = torch.tensor(tokens[-n:])
                picked = logprobs[r, positions, targets]
                greedy = bool((logprobs[r, positions].argmax(-1) == targets).all())
                out[i] = (float(picked.double().sum()), greedy)
        return out

    def split(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(the joint encoding of context and continuation, how many of its last tokens are the
        continuation's), split as the module docstring says."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not continuation:
            raise ValueError(f"empty continuation to score after context {context[-40:]!r}")
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        if whole[:len(context_ids)] == context_ids:
            shared = len(context_ids)
        else:  # a merge across the boundary: the joint encoding's last token end inside the context
            ends = np.cumsum(self._token_bytes[whole])  # (tokens,) bytes up to the end of each
            shared = int(np.searchsorted(ends, len(context.encode()), side="right"))
        return whole, len(whole) - shared

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = []
        for request in requests:
            whole, n = self.split(*request.args)
            tokens = [self.tokenizer.bos_id] + whole
            rows.append((tokens[-(self.max_length + 1):], min(n, self.max_length)))
        return self._score(rows)

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text)
            spans = (ids[k:k + self.max_length + 1] for k in range(0, len(ids) - 1, self.max_length))
            windows = [(span, len(span) - 1) for span in spans]  # every token after the first
            results.append(sum(logprob for logprob, _ in self._score(windows)))
        return results

    def generate_until(self, requests) -> list[str]:
        outputs = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", 256))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0)) if sample else 0.0
            prompt = [self.tokenizer.bos_id] + self.tokenizer.encode(context)
            prompt = prompt[-max(1, self.max_length - new):]
            ids = self.model.generate([prompt], new, temperature=temperature, seed=self.seed,
                                      stop=(self.tokenizer.eos_id,))[0][len(prompt):]
            ids = [t for t in ids if t != self.tokenizer.eos_id]
            text = self.tokenizer.decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            outputs.append(text)
        return outputs


def main() -> None:
    """lm_eval's command line with the "blockstate" model registered; `--tasks-path` alone prints
    the folder of the bundled offline tasks (for `--include_path`)."""
    if sys.argv[1:] == ["--tasks-path"]:
        from .lm_eval_tasks import TASKS_PATH

        print(TASKS_PATH)
        return
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()


__all__ = ["BlockStateHarnessLM"]
