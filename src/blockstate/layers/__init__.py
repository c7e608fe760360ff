"""Layers of the language model: block attention layers and Block-State Transformer layers."""

from .block import BlockAttentionLayer
from .bst import BSTLayer, ContextStates

__all__ = ["BlockAttentionLayer", "BSTLayer", "ContextStates"]
