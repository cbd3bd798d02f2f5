from .autoencoder_fae import AutoencoderFAE, FAELossOutput, fae_paper_config, fae_small_config
from .cache_utils import FlowKVCache, PretzelCache
from .flow_block import AutoregressiveFlowBlock
from .transformer_pretzel import PretzelModel, PretzelOutput, pretzel_paper_config
from .transformer_starflow import StarFlowTransformerModel, StarFlowTransformerOutput
from .vlm_stream import VLMStream
