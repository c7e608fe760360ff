"""The built-in components (`blockstate.components`): importing this module registers every kind
of every group, as each is registered by the module that implements it.

    arch     bst (layers/bst.py), transformer-xl (layers/block.py), brt (layers/brt.py),
             gss-hybrid (layers/gss.py), samba (layers/samba.py)
    ssm      s4, s4d, unstruct, explicit (ssm/kernels.py), ssd (ssm/selective.py)
    decay    head, state, complex, rotary (ssm/selective.py)
    context  sh, mh, mf (layers/bst.py)
"""

from __future__ import annotations

from .layers.block import TransformerXLArch
from .layers.brt import BRTArch
from .layers.bst import BSTArch, MFOptions, MHOptions, SHOptions
from .layers.gss import GSSHybridArch
from .layers.samba import SambaArch
from .ssm.kernels import ExplicitOptions, S4DOptions, S4Options, UnstructOptions
from .ssm.selective import ComplexDecay, HeadDecay, RotaryDecay, SelectiveOptions, StateDecay

BUILTIN_COMPONENTS = (BSTArch, TransformerXLArch, BRTArch, GSSHybridArch, SambaArch, S4Options,
                   S4DOptions, UnstructOptions, ExplicitOptions, SelectiveOptions, HeadDecay,
                   StateDecay, ComplexDecay, RotaryDecay, SHOptions, MHOptions, MFOptions)

__all__ = ["BUILTIN_COMPONENTS"]
