from .autoencoder_fae import AutoencoderFAE, FAELossOutput, fae_paper_config, fae_small_config
from .flow_block import AutoregressiveFlowBlock, FlowKVCache
from .transformer_pretzel import PretzelCache, PretzelModel, PretzelOutput, pretzel_paper_config
from .transformer_starflow import StarFlowTransformerModel, StarFlowTransformerOutput
from .vlm_stream import VLMStream
