"""Benchmarks, one module per job (`blockstate bench SUITE`, docs/speed.md):

- `layers`: single layers against the baselines by length (time, peak memory, counted FLOPs);
- `models`: training tokens/s and MFU of the presets;
- `generation`: the one-token decoding step and the inference cache by context length;
- `quality`: the main job against the `transformer` preset with nanoGPT's CPU recipe, in equal
  minutes;
- `imports`: the import time against torch's;

and what they share: `timing` (timed calls, peak memory, the machine's matmul and FFT rates),
`flops` (the FLOP formulas `torch.utils.flop_counter` lacks) and `report` (the output files).
"""

from ..reporting import machine_info, markdown_table
from .flops import flop_formulas
from .generation import generation_markdown, run_generation
from .imports import IMPORTS, imports_markdown, run_imports
from .layers import (
    BENCH_LAYERS,
    LAYERS,
    build_layer,
    cpu_peak_memory,
    layer_calls,
    layer_config,
    layers_markdown,
    measure_layer,
    run_layers,
)
from .models import models_markdown, run_models
from .quality import quality_markdown, run_quality
from .report import write_outputs
from .timing import measure_call, measure_machine, timed_calls

__all__ = ["BENCH_LAYERS", "IMPORTS", "LAYERS", "build_layer", "cpu_peak_memory", "flop_formulas",
           "generation_markdown", "imports_markdown", "layer_calls", "layer_config",
           "layers_markdown", "machine_info", "markdown_table", "measure_call", "measure_layer",
           "measure_machine", "models_markdown", "quality_markdown", "run_generation",
           "run_imports", "run_layers", "run_models", "run_quality", "timed_calls",
           "write_outputs"]
