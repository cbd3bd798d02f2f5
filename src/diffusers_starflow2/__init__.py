"""STARFlow2 for diffusers: unified text-image generation with autoregressive normalizing flows.

Everything public is imported eagerly: diffusers resolves pipeline components through this module.
"""

from .models import AutoregressiveFlowBlock, FlowKVCache, StarFlowTransformerModel, StarFlowTransformerOutput
from .schedulers import TarFlowScheduler, TarFlowSchedulerOutput

__version__ = "0.1.0"
