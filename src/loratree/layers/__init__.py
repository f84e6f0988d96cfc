"""Thin ``nn.Module`` wrappers over ``ops``: LoRA layers that hold adapter slots."""

from loratree.layers.base import LoraModule, SlotSpec
from loratree.layers.context import SlotContext
from loratree.layers.conv import LoraConv
from loratree.layers.embedding import LoraEmbedding
from loratree.layers.full_copy import FullCopy
from loratree.layers.linear import LoraLinear
from loratree.layers.nf4 import NF4Linear
from loratree.layers.param import LoraParam, ParamHost
from loratree.layers.prefix import PrefixBank, PrefixEncoder, PrefixGeometry
from loratree.layers.tokens import TokenRows

__all__ = ["FullCopy", "LoraConv", "LoraEmbedding", "LoraLinear", "LoraModule", "LoraParam",
           "NF4Linear", "ParamHost", "PrefixBank", "PrefixEncoder", "PrefixGeometry",
           "SlotContext", "SlotSpec", "TokenRows"]
