"""The VLM stream of STARFlow2: a frozen (M-)RoPE causal language model run on an interleaved text/image sequence.

STARFlow2 feeds one sequence of text tokens and image-latent spans

    ... text ... <|vision_start|> x_0 ... x_{N-1} <|vision_end|> ... text ...

through a pretrained VLM. Image latents bypass the VLM's vision tower: an adapter maps them to `inputs_embeds`, and
they receive exactly the 3-axis M-RoPE position ids Qwen2.5-VL assigns to an image grid, so the frozen VLM sees
them where it is used to seeing images. Text logits come from the VLM's own LM head.
"""

import functools
import inspect
from importlib import resources

import torch
from torch import nn
from transformers import Cache, DynamicCache, PreTrainedModel, Qwen2_5_VLConfig

from .attention import attention_mask as build_attention_mask
from .attention import decode_rows_mask, static_attention
from .embeddings import MROPE_MODEL_TYPES, apply_rope


@functools.cache
def _cache_argument(decoder_cls: type) -> str:
    # transformers renamed the decoder's cache argument from `past_key_values` to `cache` (5.24; the old name is
    # removed in 5.40): pass whichever name this version's decoder takes.
    return "cache" if "cache" in inspect.signature(decoder_cls.forward).parameters else "past_key_values"


class VLMStream(nn.Module):
    """
    Runs the language model of a (vision-)language model on precomputed `inputs_embeds` with explicit positions.

    Wraps a [`~transformers.Qwen2_5_VLForConditionalGeneration`] (M-RoPE) or any causal LM exposing the usual
    `get_decoder()` / `get_input_embeddings()` / `get_output_embeddings()` accessors (1-D RoPE). The vision tower is
    never used: STARFlow2 supplies image embeddings itself. The wrapper owns no parameters besides `vlm`'s and does
    not freeze it; freezing (or LoRA) is the caller's decision.

    Args:
        vlm ([`~transformers.PreTrainedModel`]): The causal (vision-)language model.
    """

    def __init__(self, vlm: PreTrainedModel):
        super().__init__()
        self.vlm = vlm
        self.uses_mrope = vlm.config.model_type in MROPE_MODEL_TYPES
        self.hidden_size = vlm.config.get_text_config().hidden_size

    @property
    def decoder(self) -> PreTrainedModel:
        """The bare decoder stack (for Qwen2.5-VL: `vlm.model.language_model`), ending with the final norm."""
        # A property rather than an attribute so the decoder's weights are not registered twice in `state_dict`.
        return self.vlm.get_decoder()

    def embed_tokens(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Token embeddings `(B, T, D)` of `input_ids` `(B, T)` from the VLM's input embedding table."""
        return self.vlm.get_input_embeddings()(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits `(B, T, V)` from final-norm hidden states `(B, T, D)` via the VLM's LM head."""
        return self.vlm.get_output_embeddings()(hidden)

    def _expand_position_ids(self, position_ids: torch.LongTensor, batch_size: int, seq_len: int) -> torch.Tensor:
        """Broadcast shared position ids over the batch: `(3, B, T)` for M-RoPE models, `(B, T)` otherwise."""
        if self.uses_mrope:
            valid = position_ids.ndim in (2, 3) and position_ids.shape[0] == 3
            expected = "(3, T) or (3, B, T)"
        else:
            valid = position_ids.ndim in (1, 2)
            expected = "(T,) or (B, T)"
        if not valid or position_ids.shape[-1] != seq_len:
            raise ValueError(
                f"`position_ids` must have shape {expected} with T={seq_len}, got {tuple(position_ids.shape)}."
            )
        if self.uses_mrope and position_ids.ndim == 2:
            position_ids = position_ids[:, None]  # (3, 1, T)
        elif not self.uses_mrope and position_ids.ndim == 1:
            position_ids = position_ids[None]  # (1, T)
        return position_ids.expand(*position_ids.shape[:-2], batch_size, seq_len)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Cache]:
        """
        Run the language model on `inputs_embeds`, appending to `cache`.

        Args:
            inputs_embeds (`torch.Tensor` of shape `(B, T, D)`): Text embeddings and/or adapted image latents.
            position_ids (`torch.LongTensor`):
                `(3, T)` or `(3, B, T)` M-RoPE ids for M-RoPE models, `(T,)` or `(B, T)` otherwise; see
                [`position_ids`]. They must continue the positions already in the cache.
            cache ([`~transformers.Cache`], *optional*):
                Cache of the preceding tokens; a new [`~transformers.DynamicCache`] is created when `None`. It is
                updated in place (use `crop(n)` to roll it back).
            attention_mask (`torch.Tensor` of shape `(B, T_past + T)`, *optional*): 1 for real tokens, 0 for padding.

        Returns:
            `tuple[torch.Tensor, Cache]`: hidden states `(B, T, D)` after the final norm, and the updated cache.
        """
        batch_size, seq_len, _ = inputs_embeds.shape
        position_ids = self._expand_position_ids(position_ids, batch_size, seq_len)
        if cache is None:
            # Always run with a cache: besides enabling incremental decoding, transformers only reinterprets
            # non-contiguous position ids as packed sequences when there is neither a cache nor a mask.
            cache = DynamicCache(config=self.decoder.config)
        if attention_mask is not None and attention_mask.ndim == 2 and attention_mask.device.type == "meta":
            # transformers reads the padding mask's values to decide whether SDPA may skip it; on `meta` there are
            # none, so it gets the dense (B, 1, T, T_past + T) boolean mask instead (what it would build itself)
            past = attention_mask.shape[1] - seq_len
            positions = torch.arange(past, past + seq_len, device=attention_mask.device)
            attention_mask = build_attention_mask(positions, past + seq_len, attention_mask)  # (B, 1, T, T_past + T)
        # Calling the decoder directly (not `vlm.model`) bypasses Qwen2.5-VL's vision-token merging and its stateful
        # `rope_deltas`: positions come from the caller only.
        outputs = self.decoder(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **{_cache_argument(type(self.decoder)): cache},
        )
        return outputs.last_hidden_state, cache

    # -- static decode path: the decoder's own layers over fixed-size key/value buffers ---------------------------

    @property
    def supports_static_decode(self) -> bool:
        """Whether :meth:`static_layers` can run this decoder: Qwen2-style layers (``self_attn.{q,k,v,o}_proj``,
        ``mlp``, ``input_layernorm`` / ``post_attention_layernorm``, a shared ``rotary_emb`` and final ``norm``), full
        attention in every layer."""
        decoder = self.decoder
        layers = getattr(decoder, "layers", None)
        if not layers or not all(hasattr(decoder, name) for name in ("rotary_emb", "norm")):
            return False
        if any(kind != "full_attention" for kind in getattr(decoder.config, "layer_types", None) or []):
            return False
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
        return all(
            all(hasattr(layer.self_attn, name) for name in names)
            and all(hasattr(layer, name) for name in ("mlp", "input_layernorm", "post_attention_layernorm"))
            for layer in layers
        )

    def static_buffers(self, cache: Cache, capacity: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of every layer of ``cache`` copied into buffers ``(B, H_kv, capacity, D)`` (slots after the
        cached positions are zero), for :meth:`static_layers`; :meth:`write_back` returns them to the cache."""
        keys, values = [], []
        for layer in cache.layers:
            for cached, buffers in ((layer.keys, keys), (layer.values, values)):
                B, H, T, D = cached.shape
                buffer = cached.new_zeros(B, H, capacity, D)
                buffer[:, :, :T] = cached
                buffers.append(buffer)
        return keys, values

    @staticmethod
    def write_back(cache: Cache, keys: list[torch.Tensor], values: list[torch.Tensor], length: int) -> None:
        """Make ``cache`` hold the first ``length`` slots of :meth:`static_buffers`' buffers (views: a transformers
        cache grows by concatenation, so later positions never write into them)."""
        for layer, k, v in zip(cache.layers, keys, values):
            layer.keys, layer.values = k[:, :, :length], v[:, :, :length]

    def static_layers(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        slots: torch.LongTensor,
        key_padding_mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        filled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder over new positions with every shape fixed by the inputs and the buffers, as one compiled graph
        traces it: the decoder's own modules (norms, projections, MLPs, rotary embedding), so the same weights and
        arithmetic as :meth:`forward`, with the attention over whole buffers under a mask.

        Args:
            inputs_embeds (`torch.Tensor` of shape `(B, T, D)`): New positions.
            position_ids (`torch.LongTensor`): Their ids, `(3, B, T)` (M-RoPE) or `(B, T)`, see [`position_ids`].
            slots (`torch.LongTensor` of shape `(T,)`): Buffer slots the new keys/values are written to.
            key_padding_mask (`torch.Tensor` of shape `(B, S)`): True at real slots (the new ones included).
            keys, values (`list[torch.Tensor]`): One `(B, H_kv, S, D_h)` buffer per layer (:meth:`static_buffers`).
            filled (`torch.Tensor`, *optional*): 0-dim int64 CPU tensor, the slots written after this step (the
                attention reads no further; see `attention.static_attention`).

        Returns:
            `torch.Tensor`: hidden states `(B, T, D)` after the final norm.
        """
        decoder = self.decoder
        config = decoder.config
        B, T, _ = inputs_embeds.shape
        H, H_kv = config.num_attention_heads, config.num_key_value_heads
        # the decoder's own tables, in transformers' layout (channel i pairs with i + D_h/2): (2, B, 1, T, D_h)
        rope = torch.stack(decoder.rotary_emb(inputs_embeds, position_ids))[:, :, None]
        allowed = build_attention_mask(slots, keys[0].shape[2], key_padding_mask)
        mask = decode_rows_mask(allowed, inputs_embeds.dtype, H_kv, H // H_kv)
        h = inputs_embeds
        for layer, k_buf, v_buf in zip(decoder.layers, keys, values):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(B, T, H, attn.head_dim).transpose(1, 2)  # (B, H, T, D_h)
            k = attn.k_proj(x).view(B, T, H_kv, attn.head_dim).transpose(1, 2)  # (B, H_kv, T, D_h)
            v = attn.v_proj(x).view(B, T, H_kv, attn.head_dim).transpose(1, 2)
            q, k = apply_rope(q, rope, halves=True), apply_rope(k, rope, halves=True)
            k_buf.index_copy_(2, slots, k)
            v_buf.index_copy_(2, slots, v)
            # query heads sharing a key head (transformers' repeat_kv order) as the rows of one product
            q = q.reshape(B * H_kv, (H // H_kv) * T, attn.head_dim) * attn.scaling
            out = static_attention(q, k_buf.flatten(0, 1), v_buf.flatten(0, 1), mask, filled)
            out = out.view(B, H, T, attn.head_dim).transpose(1, 2).reshape(B, T, H * attn.head_dim)
            h = h + attn.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return decoder.norm(h)


def qwen2_5_vl_7b_config() -> Qwen2_5_VLConfig:
    """The configuration of STARFlow2's VLM, Qwen2.5-VL-7B-Instruct, as published with its weights (shipped in the
    package, no hub access): language model width 3584, 28 layers, 28 heads and 4 key/value heads, MLP 18944,
    vocabulary 152064, RoPE theta 1e6 with M-RoPE sections (16, 24, 24); vision tower depth 32, width 1280, 16 heads,
    MLP 3420, patch 14, merge 2, output width 3584, full attention in blocks 7, 15, 23, 31.  Build the model on
    ``torch.device("meta")`` to dry-run the paper's size without allocating it."""
    folder = resources.files("diffusers_starflow2") / "configs" / "qwen2_5_vl_7b_instruct"
    with resources.as_file(folder) as path:
        return Qwen2_5_VLConfig.from_pretrained(path)
