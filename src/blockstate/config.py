"""Model configuration: one dataclass, validated up front, serializable to and from JSON.

Defaults follow `paper.md` (Fathi et al. 2023, section 3 and appendix) where the paper specifies a
value; choices the paper leaves open are documented next to the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

CONTEXT_VARIANTS = ("sh", "mh", "mf")
SSM_KERNELS = ("s4", "s4d", "unstruct", "explicit", "ssd")
# One decay per head (Mamba-2), one per head and state dimension (S6), a complex one per head and
# pair of state dimensions (a rotating state, S4D-Lin's initialization with an input-dependent step),
# or one real decay per head with a rotation per pair of state dimensions (computed as the first kind
# with B and C rotated by the input-dependent phases)
SSD_DECAYS = ("head", "state", "complex", "rotary")
PAIRED_SSD_DECAYS = ("complex", "rotary")  # the kinds that pair state dimensions into complex modes
S4D_INITS = ("lin", "inv", "real")
SELF_ATTENTION_MODES = ("block", "sliding", "full")
SSM_METHODS = ("auto", "fft", "chunked")
CONTEXT_NORMS = ("none", "rms")
CONTEXT_ACTIVATIONS = ("gelu", "none")
# "bst": the paper's model. Baselines (paper section 4): "gss-hybrid" puts Gated State Space layers
# and "brt" Block-Recurrent layers where "bst" puts BST layers; "transformer-xl" makes every layer a
# segment-recurrent one. The Transformer and Slide baselines are "bst" with no BST layers and full
# or sliding-window self-attention. "samba" (Ren et al. 2024, not in the paper) alternates Mamba
# layers of the selective SSM (at `bst_layers`) with sliding-window attention layers.
ARCHS = ("bst", "gss-hybrid", "brt", "transformer-xl", "samba")

# The paper's 12-layer model puts BST layers at layers 1, 7 and 9 (0-based 0, 6, 8).
PAPER_DEPTH = 12
PAPER_BST_LAYERS = (0, 6, 8)


def scale_bst_layers(n_layers: int, reference: tuple[int, ...] = PAPER_BST_LAYERS,
                     reference_depth: int = PAPER_DEPTH) -> tuple[int, ...]:
    """Place layers at the same relative depths as `reference`; layer 0 stays if it is there."""
    placed = {min(n_layers - 1, round(i * n_layers / reference_depth)) for i in reference}
    if 0 in reference:
        placed.add(0)
    return tuple(sorted(placed))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed values: {', '.join(allowed)}")


_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,),
                                       "bool": (bool,), "None": (type(None),)}


def check_value_type(name: str, value: Any, wanted: str) -> None:
    """Raise ValueError unless `value` has the annotated type `wanted` (int, float, str, bool, None,
    tuple[...] / list[...] / dict[...] and unions of them; bool is not accepted as a number) and,
    if a float, is finite."""
    allowed: list[type] = []
    for part in (p.strip() for p in wanted.split("|")):
        base = part.split("[", 1)[0]
        allowed += {"tuple": [tuple, list], "list": [list, tuple], "dict": [dict]}.get(
            base, list(_TYPES.get(base, (object,))))
    numeric = isinstance(value, bool) and bool not in allowed
    if numeric or not isinstance(value, tuple(allowed)):
        raise ValueError(f"{name}={value!r} is not valid; it must be of type {wanted}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is not valid; it must be a finite number")


def check_field_types(obj: Any) -> None:
    """`check_value_type` for every field of the dataclass instance `obj`."""
    for f in dataclasses.fields(obj):
        check_value_type(f.name, getattr(obj, f.name), str(f.type))


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid; it must be an integer >= 1")


@dataclass
class ModelConfig:
    """Hyper-parameters of a Block-State Transformer language model.

    Notation of the paper: D = `d_model`, H = `n_heads`, W = `block_size`, N = `ssm_state_size`,
    S = `num_context_states`, L = `max_seq_len` (training length).
    """

    arch: str = "bst"               # bst | gss-hybrid | brt | transformer-xl | samba (see ARCHS)
    vocab_size: int = 256
    d_model: int = 256              # D: residual stream width
    n_layers: int = 6
    n_heads: int = 4                # H
    head_dim: int | None = None     # defaults to d_model // n_heads; the -L models use 12 x 128
    d_ff: int | None = None         # ReLU MLP width; defaults to 4 * d_model
    block_size: int = 128           # W: tokens per block
    max_seq_len: int = 1024         # training length; unstructured kernels are defined up to it
    # Indices (0-based) of BST layers (for the baselines: of their GSS or recurrent layers); the
    # others are attention layers. None places them like the paper's (0, 6, 8) of 12, scaled.
    bst_layers: tuple[int, ...] | None = None
    context_variant: str = "sh"     # sh | mh | mf: how SSM outputs become context states
    # s4 (DPLR) | s4d (diagonal) | unstruct (implicit MLP) | explicit | ssd (selective: input-
    # dependent, Mamba-2's state-space duality; see ssm/selective.py)
    ssm_kernel: str = "s4"
    ssm_state_size: int = 16        # N
    num_context_states: int = 32    # S: MF context states
    # Block-Recurrent Transformer (arch "brt"): its number of recurrent states; None means one per
    # position of a block (W, as the paper's Rec:fixed:skip baseline with 512 states at W = 512).
    recurrent_states: int | None = None
    # Segment-recurrent baselines (arch "transformer-xl" and "brt") carry, per layer, the inputs of
    # the last `memory_length` positions into the next training sequence of the same document, and
    # every query attends to its own block and the `memory_length` positions before it. None means
    # 4W for transformer-xl (2048 at W = 512, the paper's Trsf-XL:2048) and W for brt (its sliding
    # window). A multiple of block_size.
    memory_length: int | None = None
    gss_expansion: int = 3          # F / D of Gated State Space layers (gss-hybrid)
    # The SSM runs on a down-projection of width d_model // ssm_width_divisor
    # (paper: D/4 for SH and MH, D/8 for MF; None picks that default, and for arch "samba" the
    # Mamba layers' expansion to 2D).
    ssm_width_divisor: int | None = None
    # How SSM outputs become context states before their key/value maps: the activation on the
    # SSM outputs, and "rms" to RMS-normalize them (learned gain) with a unit-scale lift, so that
    # context keys/values start at the scale of self-attention's; "none" chains three
    # Normal(0, init_std) maps instead.
    context_activation: str = "gelu"
    context_norm: str = "none"
    # SH/MH, not in the paper: each BST layer also adds a linear map of its context outputs (after
    # the activation) to the residual stream, beside the cross-attention: a read of the state
    # that does not pass through a softmax over the block (bst-recommended sets it; MQAR beyond
    # the window is learned with it, docs/results/recommended.md).
    context_direct: bool = False
    # How the SSM convolution is computed (same function, different cost): "fft", "chunked" (S4/S4D
    # only: chunk-wise matrix products and a state scan, no FFT) or "auto" (chunked on CPU for
    # S4/S4D, FFT otherwise); `ssm_chunk_size` is the chunk length T of the chunked path.
    ssm_method: str = "auto"
    ssm_chunk_size: int = 64
    s4d_init: str = "inv"           # S4D-Inv, S4D-Lin or S4D-Real (no rotation) initialization of A
    # The selective kernel (ssm_kernel="ssd"): heads per SSM channel, each with its own step size
    # and decay (None: as many as give heads of at least 4 dimensions, at most 8), and the decay:
    # "head", one scalar per head (Mamba-2), "state", one per head and state dimension (Mamba's
    # S6: N time scales per head, A_n = n + 1 at initialization), or "complex", the N real state
    # dimensions of a head taken as N/2 complex modes that decay and rotate by dt_t A_m with
    # A_m = -1/2 + i pi m at initialization (S4D-Lin), so that the phase of a mode counts the
    # steps the input chose to take; or "rotary", the same modes with one real part per head
    # (a Mamba-2 decay) and a frequency per mode, equal to "complex" at initialization and about
    # as fast as "head" (B_t and C_t are rotated by the phases, then the scalar-decay scan runs).
    ssd_heads: int | None = None
    ssd_decay: str = "head"
    ssd_bc_norm: bool = False       # RMS-normalize the selective kernel's B_t and C_t (learned gains)
    # Rotating kinds ("complex", "rotary"): the first `ssd_still_modes` modes of each head start at
    # frequency zero instead of pi m, so that they decay without turning (still learned). A key
    # held in a turning mode is read back with a phase that depends on how far back it was written;
    # still modes hold it unturned, which associative recall needs, while the turning modes keep
    # the positions apart that selective copying needs.
    ssd_still_modes: int = 0
    dt_min: float = 1e-3            # range of the initial SSM step size (log-uniform)
    dt_max: float = 1e-1
    unstruct_decay: float = 2.0     # alpha in K(t) = exp(-alpha t) MLP(PosEmb(t)), t in [0, 1)
    unstruct_hidden: int = 64       # hidden width of the implicit filter MLP
    unstruct_frequencies: int = 8   # sin/cos positional features of t per frequency
    explicit_squash: float = 1e-3   # Fu et al. 2023: soft-threshold lambda of explicit kernels
    explicit_smooth: int = 3        # Fu et al. 2023: average-pool width of explicit kernels
    # Self-attention inside a block sees the block only ("block", as in the paper's listing) or the
    # current and the previous block ("sliding", the Block-Recurrent Transformer's window); "full"
    # is ordinary causal attention over the whole sequence (the Transformer baseline).
    self_attention: str = "block"
    rel_pos_buckets: int = 32       # T5-style relative position bias of self-attention
    rel_pos_max_distance: int = 128
    qk_norm: bool = True            # L2-normalized queries/keys with a learned per-head scale
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # The output head shares the embedding's weights (the paper's and GPT-2's choice); False gives
    # it a weight of its own (vocab_size x d_model more parameters). Tied, a value token's output
    # row is also its input embedding, so a value token's prediction and its reading are one
    # vector (bst-recommended unties them).
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.bst_layers is not None:
            self.bst_layers = tuple(self.bst_layers)
        self.validate()

    # ---------------------------------------------------------------- derived values
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def resolved_bst_layers(self) -> tuple[int, ...]:
        if self.bst_layers is not None:
            return self.bst_layers
        return scale_bst_layers(self.n_layers)

    @property
    def resolved_recurrent_states(self) -> int:
        return self.recurrent_states if self.recurrent_states is not None else self.block_size

    @property
    def carries_memory(self) -> bool:
        """Whether the model carries memory from one training sequence to the next."""
        return self.arch in ("transformer-xl", "brt")

    @property
    def resolved_memory_length(self) -> int:
        """Positions of attention memory before each block (0 for models that carry none)."""
        if not self.carries_memory:
            return 0
        if self.memory_length is not None:
            return self.memory_length
        return 4 * self.block_size if self.arch == "transformer-xl" else self.block_size

    @property
    def ssm_width(self) -> int:
        if self.arch == "samba" and self.ssm_width_divisor is None:
            return 2 * self.d_model  # Mamba's expansion E = 2D
        divisor = self.ssm_width_divisor
        if divisor is None:
            divisor = 8 if self.context_variant == "mf" else 4
        return max(1, self.d_model // divisor)

    @property
    def constant_inference_state(self) -> bool:
        """Whether generation keeps a cache whose size does not grow with the context: false with
        full self-attention (its keys/values grow) and with unstructured or explicit kernels in an
        SSM layer (their streamed convolution keeps the input history); true otherwise (sliding or
        block attention windows, S4/S4D/selective states, recurrent states, bounded memories)."""
        if self.self_attention == "full" and self.arch != "transformer-xl":  # XL always slides
            return False
        has_ssm = self.arch in ("bst", "gss-hybrid", "samba") and bool(self.resolved_bst_layers)
        return not (has_ssm and self.ssm_kernel in ("unstruct", "explicit"))

    @property
    def ssm_channels(self) -> int:
        """C: number of SSM filters per SSM width channel (1 for SH, H for MH, S for MF)."""
        return {"sh": 1, "mh": self.n_heads, "mf": self.num_context_states}[self.context_variant]

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        check_field_types(self)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "block_size", "max_seq_len",
                     "ssm_state_size", "num_context_states", "unstruct_hidden",
                     "unstruct_frequencies", "explicit_smooth", "rel_pos_buckets",
                     "rel_pos_max_distance", "ssm_chunk_size"):
            _positive(name, getattr(self, name))
        _choice("arch", self.arch, ARCHS)
        _positive("gss_expansion", self.gss_expansion)
        for name in ("head_dim", "d_ff", "ssm_width_divisor", "recurrent_states", "memory_length",
                     "ssd_heads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; choose n_heads "
                f"among the divisors of d_model or set head_dim explicitly")
        if self.memory_length is not None:
            if not self.carries_memory:
                raise ValueError(f"memory_length={self.memory_length} is only used by the segment-"
                                 f"recurrent archs transformer-xl and brt, not arch={self.arch!r}")
            if self.memory_length % self.block_size:
                raise ValueError(f"memory_length={self.memory_length} must be a multiple of "
                                 f"block_size={self.block_size}")
        if self.recurrent_states is not None and self.arch != "brt":
            raise ValueError(f"recurrent_states={self.recurrent_states} is only used by arch='brt', "
                             f"not arch={self.arch!r}")
        _choice("context_variant", self.context_variant, CONTEXT_VARIANTS)
        _choice("ssm_kernel", self.ssm_kernel, SSM_KERNELS)
        _choice("s4d_init", self.s4d_init, S4D_INITS)
        _choice("self_attention", self.self_attention, SELF_ATTENTION_MODES)
        _choice("ssm_method", self.ssm_method, SSM_METHODS)
        _choice("context_norm", self.context_norm, CONTEXT_NORMS)
        _choice("context_activation", self.context_activation, CONTEXT_ACTIVATIONS)
        if self.context_direct and self.context_variant == "mf":
            raise ValueError("context_direct=True reads the SSM outputs at every position, which MF "
                             "does not compute (it reads block ends); use context_variant 'sh' or 'mh'")
        if self.ssm_kernel == "ssd" and self.ssm_method == "fft":
            raise ValueError("ssm_kernel='ssd' is input-dependent and has no kernel to FFT; use "
                             "ssm_method='auto' or 'chunked'")
        _choice("ssd_decay", self.ssd_decay, SSD_DECAYS)
        if self.ssm_kernel != "ssd" and (self.ssd_heads is not None or self.ssd_decay != "head"
                                         or self.ssd_bc_norm or self.ssd_still_modes):
            raise ValueError(f"ssd_heads, ssd_decay, ssd_bc_norm and ssd_still_modes configure "
                             f"ssm_kernel='ssd', not ssm_kernel={self.ssm_kernel!r}")
        if self.ssd_still_modes and self.ssd_decay not in PAIRED_SSD_DECAYS:
            raise ValueError(f"ssd_still_modes={self.ssd_still_modes} sets the frequencies of rotating "
                             f"modes; ssd_decay={self.ssd_decay!r} has none (use "
                             f"{' or '.join(repr(d) for d in PAIRED_SSD_DECAYS)})")
        if not 0 <= self.ssd_still_modes <= self.ssm_state_size // 2:
            raise ValueError(f"ssd_still_modes={self.ssd_still_modes}; accepted: 0 to the "
                             f"{self.ssm_state_size // 2} modes of a head (ssm_state_size / 2)")
        if self.ssd_decay in PAIRED_SSD_DECAYS and self.ssm_state_size % 2:
            raise ValueError(f"ssd_decay={self.ssd_decay!r} pairs state dimensions into complex modes and "
                             f"needs an even ssm_state_size, not {self.ssm_state_size}")
        if self.ssd_heads is not None and self.ssm_width % self.ssd_heads:
            raise ValueError(f"ssd_heads={self.ssd_heads} must divide the SSM width "
                             f"{self.ssm_width} (d_model // ssm_width_divisor)")
        if self.ssm_method == "chunked" and self.ssm_kernel not in ("s4", "s4d", "ssd"):
            raise ValueError(
                f"ssm_method='chunked' needs a structured kernel (s4 or s4d), not "
                f"ssm_kernel={self.ssm_kernel!r}; use ssm_method='fft' or 'auto'")
        if self.ssm_kernel in ("s4", "s4d") and self.ssm_state_size % 2:
            raise ValueError(
                f"ssm_state_size={self.ssm_state_size} must be even for ssm_kernel="
                f"{self.ssm_kernel!r} (states come in complex-conjugate pairs)")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"dt_min={self.dt_min}, dt_max={self.dt_max}: need 0 < dt_min <= dt_max")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError(f"norm_eps={self.norm_eps} and init_std={self.init_std} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.unstruct_decay < 0:
            raise ValueError(f"unstruct_decay={self.unstruct_decay} must be >= 0")
        if self.explicit_squash < 0:
            raise ValueError(f"explicit_squash={self.explicit_squash} must be >= 0")
        if self.bst_layers is not None:
            for i in self.bst_layers:
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n_layers:
                    raise ValueError(
                        f"bst_layers={list(self.bst_layers)} contains {i!r}; layer indices must be "
                        f"integers in 0..{self.n_layers - 1} (n_layers={self.n_layers})")
            if len(set(self.bst_layers)) != len(self.bst_layers):
                raise ValueError(f"bst_layers={list(self.bst_layers)} contains duplicates")

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["bst_layers"] is not None:
            d["bst_layers"] = list(d["bst_layers"])
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown model config field(s) {unknown}; known fields: {', '.join(cls.field_names())}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model config is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("model config JSON must be an object of field names to values")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


__all__ = ["ARCHS", "ModelConfig", "scale_bst_layers"]
