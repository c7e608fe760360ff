"""lm-evaluation-harness adapter (the optional extra `blockstate[lm-eval]`).

Importing this module registers the model type "blockstate" with `lm_eval`:

    import blockstate.harness  # noqa: F401  (registers "blockstate")
    import lm_eval
    results = lm_eval.simple_evaluate(model="blockstate",
                                      model_args="pretrained=runs/my-run,batch_size=8",
                                      tasks=["lambada_openai"])

or from the shell, `python -m blockstate.harness --model blockstate --model_args
pretrained=runs/my-run --tasks ...` (lm_eval's own command line, with the model registered).
`pretrained` is anything `blockstate.load` takes: a run directory, a checkpoint step directory or a
`blockstate export` / `save_pretrained` directory with its tokenizer.

How the three request types are scored:

- `loglikelihood(context, continuation)`: the continuation's tokens are those of the joint
  encoding after the context's (so a SentencePiece merge across the boundary is scored as the
  model would see it); the sequence starts with BOS and is cut to its last `max_length` tokens.
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

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model


@register_model("blockstate")
class BlockStateHarnessLM(LM):
    """A blockstate model for lm-evaluation-harness; see the module docstring."""

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 1,
                 max_length: int | str | None = None, seed: int | str = 0, **unused: Any):
        super().__init__()
        from .loading import load

        model, tokenizer = load(pretrained, device)
        if tokenizer is None:
            raise ValueError(f"{pretrained} holds no tokenizer; export the model with its tokenizer "
                             f"(blockstate export RUN DIR)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = 1 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_length = int(max_length) if max_length else model.config.max_seq_len
        self.seed = int(seed)
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {batch_size!r} and "
                             f"{max_length!r}")

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

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        rows = []
        for request in requests:
            context, continuation = request.args
            context_ids = self.tokenizer.encode(context)
            whole = self.tokenizer.encode(context + continuation)
            shared = len(context_ids) if whole[:len(context_ids)] == context_ids else 0
            if not continuation or len(whole) == shared:
                raise ValueError(f"empty continuation to score after context {context[-40:]!r}")
            tokens = [self.tokenizer.bos_id] + whole
            n = len(whole) - shared
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
    """lm_eval's command line with the "blockstate" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()


__all__ = ["BlockStateHarnessLM"]
