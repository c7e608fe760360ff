"""Layers of the language model: attention layers, BST layers and the baselines' layers."""

from .block import BlockAttentionLayer, XLLayer
from .brt import BlockRecurrentLayer
from .bst import BSTLayer, ContextStates, MFContext, MHContext, SHContext, build_context_states
from .gss import GSSLayer
from .samba import MambaLayer

__all__ = ["BlockAttentionLayer", "BlockRecurrentLayer", "BSTLayer", "ContextStates", "GSSLayer",
           "MambaLayer", "MFContext", "MHContext", "SHContext", "XLLayer", "build_context_states"]
