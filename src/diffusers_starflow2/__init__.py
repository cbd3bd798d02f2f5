"""STARFlow2 for diffusers: unified text-image generation with autoregressive normalizing flows.

Everything public is imported eagerly: diffusers resolves pipeline components through this module.
"""

import sys

from .loaders import StarFlow2LoraLoaderMixin
from .models import (
    AutoencoderFAE,
    AutoregressiveFlowBlock,
    FlowKVCache,
    PretzelModel,
    StarFlowTransformerModel,
    StarFlowTransformerOutput,
    VLMStream,
)
from .pipelines import (
    IMAGE_PLACEHOLDER,
    StarFlow2ConversationState,
    StarFlow2EditPipeline,
    StarFlow2EditPipelineOutput,
    StarFlow2EditState,
    StarFlow2InterleavedOutput,
    StarFlow2InterleavedPipeline,
    StarFlow2Pipeline,
    StarFlow2PipelineOutput,
    StarFlowPipeline,
    StarFlowPipelineOutput,
)
from .schedulers import GuidanceSpec, TarFlowScheduler, TarFlowSchedulerOutput
from .utils.hub import EMBEDDED_MODEL, register_with_diffusers
from .utils.torch_utils import quiet_empty_float32_warning

__version__ = "0.1.0"

register_with_diffusers(sys.modules[__name__])
quiet_empty_float32_warning()
