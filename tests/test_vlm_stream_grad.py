"""The teacher-forced pass runs the VLM stream without autograd exactly where no gradient through it can reach a
trainable parameter (``PretzelModel.vlm_stream_needs_grad``): no VLM module runs a backward there, and every
trainable gradient equals the one of a pass that keeps the VLM stream in the graph; where a path does carry gradient
(LoRA on the VLM, a trainable adapter, a non-constant adapter read through ``W_v`` or a later position) the VLM
stream stays in the graph, and cutting it would change the gradients."""

import pytest
import torch
from peft import LoraConfig

from diffusers_starflow2.models.vlm_stream import VLMStream
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components
from diffusers_starflow2.training.lora import vlm_lora_targets
from diffusers_starflow2.training.train_starflow2 import STAGE_GROUPS
from diffusers_starflow2.utils.sequence import encode_conversation, pad_layouts

IMAGE = {"type": "image"}
# the global backward hook sees every module, including those whose outputs are not tensors
pytestmark = [
    pytest.mark.filterwarnings("ignore:For backward hooks to be called"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def _components(stage, adapter=False, skip_v=False):
    """Tiny components as stage 1 leaves them (flows trained away from their zero-initialised outputs, the skips
    and the adapter's output projection still zero), trainable as in ``stage``; ``adapter`` / ``skip_v`` give the
    adapter's output projection / ``W_v`` non-zero weights (a model trained further, e.g. a stage-3 checkpoint
    fine-tuned again in stage 1)."""
    c = build_tiny_starflow2_components(perturb=0.05)
    transformer, vlm = c["transformer"], c["vlm"]
    with torch.no_grad():
        for layer in (transformer.adapter.proj_out, transformer.skip_v, transformer.skip_t):
            for p in layer.parameters():
                p.zero_()
        if adapter:
            transformer.adapter.proj_out.weight.normal_(0, 0.2)
        if skip_v:
            transformer.skip_v.weight.normal_(0, 0.2)
    vlm.requires_grad_(False)
    transformer.requires_grad_(False)
    for group in STAGE_GROUPS[stage]:
        getattr(transformer, group).requires_grad_(True)
    transformer.train()
    return c


def _batch(c, layout):
    """``"caption"``: one scored image per sample; ``"two_images"``: a context image, then a scored one;
    ``"understanding"``: an image and a scored answer after it."""
    tokenizer, N = c["tokenizer"], c["transformer"].num_latents
    if layout == "caption":
        conversations = [[{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": [IMAGE]}]] * 2
    elif layout == "two_images":
        conversations = [
            [
                {"role": "user", "content": [IMAGE, {"type": "text", "text": "make it blue"}]},
                {"role": "assistant", "content": [IMAGE]},
            ]
        ] * 2
    else:
        conversations = [
            [
                {"role": "user", "content": [IMAGE, {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": "a circle"},
            ]
        ] * 2
    layouts = [encode_conversation(tokenizer, m, N) for m in conversations]
    ids, latent_mask, attention_mask, assistant = pad_layouts(layouts, tokenizer.pad_token_id, side="right")
    M = int(latent_mask.sum()) // N
    gen = torch.Generator().manual_seed(0)
    batch = dict(
        input_ids=ids,
        latent_mask=latent_mask,
        images=torch.randn(M, 4, 4, 4, generator=gen),
        noise_level=torch.tensor([0.1, 0.2]),
        attention_mask=attention_mask,
        image_loss_mask=torch.tensor([layout == "caption" or m % 2 == 1 for m in range(M)]),
    )
    if layout == "understanding":
        text_mask = assistant & ~latent_mask
        text_mask[:, 1:] &= ~latent_mask[:, :-1]
        batch["text_loss_mask"] = text_mask
    return batch


def _run(c, batch, vlm_requires_grad=None):
    """Trainable gradients after one pass and its backward, and the number of backwards of the VLM stream's modules
    (the decoder; the LM head, which a text loss reads after the stream, is the text head's business)."""
    transformer, vlm = c["transformer"], c["vlm"]
    vlm_modules = {id(m) for m in vlm.get_decoder().modules()}
    calls = []
    hook = torch.nn.modules.module.register_module_full_backward_hook(
        lambda module, grad_in, grad_out: calls.append(1) if id(module) in vlm_modules else None
    )
    try:
        transformer.zero_grad(set_to_none=True)
        vlm.zero_grad(set_to_none=True)
        out = transformer(VLMStream(vlm), **batch, vlm_requires_grad=vlm_requires_grad)
        out.loss.backward()
    finally:
        hook.remove()
    named = [*transformer.named_parameters(), *(("vlm." + n, p) for n, p in vlm.named_parameters())]
    grads = {n: p.grad.clone() for n, p in named if p.requires_grad and p.grad is not None}
    return grads, len(calls), out.loss.detach()


def _assert_equal(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), (name, (a[name] - b[name]).abs().max())


def _differs(a, b):
    return any(not torch.allclose(a[n], b[n], atol=1e-6, rtol=0) for n in a)


def decision(c, batch):
    t = c["transformer"]
    keys = ("latent_mask", "image_loss_mask", "text_loss_mask", "images")
    return t.vlm_stream_needs_grad(VLMStream(c["vlm"]), *(batch.get(k) for k in keys))


def test_stage1_from_initialisation_runs_no_vlm_backward():
    c = _components(1)
    batch = _batch(c, "caption")
    assert decision(c, batch) is False
    grads, calls, loss = _run(c, batch)
    kept, kept_calls, kept_loss = _run(c, batch, vlm_requires_grad=True)  # the VLM stream in the graph, as before
    assert calls == 0 and kept_calls > 0
    assert torch.equal(loss, kept_loss)
    _assert_equal(grads, kept)
    trainable = {n for n, p in c["transformer"].named_parameters() if p.requires_grad}
    assert set(grads) == trainable  # every trainable parameter still gets a gradient (optimisers and DDP see it)


@pytest.mark.parametrize(
    "adapter, skip_v, layout, carries",
    [
        (True, True, "caption", True),  # W_v h at the image's own latents
        (True, False, "two_images", True),  # P_txt(h) of the text between the context image and the scored one
        (True, False, "understanding", True),  # the text head after the image (with a text loss)
        (True, False, "caption", False),  # nothing reads h where it depends on the latents
        (False, True, "two_images", False),  # a constant adapter: nothing flows back into the latents
    ],
)
def test_stage1_decision_follows_the_graph(adapter, skip_v, layout, carries):
    c = _components(1, adapter=adapter, skip_v=skip_v)
    batch = _batch(c, layout)
    assert decision(c, batch) is carries
    grads, calls, _ = _run(c, batch)
    kept, kept_calls, _ = _run(c, batch, vlm_requires_grad=True)
    cut, cut_calls, _ = _run(c, batch, vlm_requires_grad=False)
    assert (calls > 0) is carries and kept_calls > 0 and cut_calls == 0
    _assert_equal(grads, kept)  # the decided pass gives the full pass's gradients
    assert _differs(cut, kept) is carries  # and cutting the VLM stream where it carries gradient would not


@pytest.mark.parametrize("stage, layout", [(2, "understanding"), (3, "understanding"), (3, "two_images")])
def test_stages_training_through_the_vlm_keep_its_backward(stage, layout):
    c = _components(stage, adapter=True)
    batch = _batch(c, layout)
    assert decision(c, batch) is True
    grads, calls, _ = _run(c, batch)
    assert calls > 0


def test_lora_on_the_vlm_keeps_its_backward():
    c = _components(1)
    vlm = c["vlm"]
    vlm.add_adapter(LoraConfig(r=2, init_lora_weights="gaussian", target_modules=vlm_lora_targets(vlm)))
    batch = _batch(c, "caption")
    assert decision(c, batch) is True
    grads, calls, _ = _run(c, batch)
    assert calls > 0 and any(n.startswith("vlm.") for n in grads)


def test_no_grad_needs_no_vlm_graph():
    c = _components(3, adapter=True)
    with torch.no_grad():
        assert decision(c, _batch(c, "understanding")) is False
