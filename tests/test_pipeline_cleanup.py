"""Every pipeline call ends its work - offload hooks freed, the step callback detached - however it ends: a stream
its consumer stops early, a callback that raises, an interrupted call. The pipeline is usable again afterwards and
gives the same outputs."""

import gc

import pytest
import torch

from diffusers_starflow2 import (
    IMAGE_PLACEHOLDER,
    StarFlow2EditPipeline,
    StarFlow2InterleavedPipeline,
    StarFlow2Pipeline,
)
from diffusers_starflow2.testing_utils import build_tiny_starflow2_components


def gen():
    return torch.Generator().manual_seed(0)


def make(cls, monkeypatch):
    pipe = cls(**build_tiny_starflow2_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device="cpu")
    freed = []
    original = pipe.maybe_free_model_hooks
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: (freed.append(1), original())[1])
    return pipe, freed


def stream_kwargs():
    return dict(max_new_tokens=2, generator=gen(), output_type="pt", callback_on_step_end=lambda p, i, t, kw: kw)


def test_a_stream_stopped_after_its_first_segment_ends_the_call(monkeypatch):
    pipe, freed = make(StarFlow2InterleavedPipeline, monkeypatch)
    prompt = ["draw a red circle", IMAGE_PLACEHOLDER, " and", IMAGE_PLACEHOLDER]
    expected = list(pipe.stream(prompt, **stream_kwargs()))
    assert len(expected) >= 2 and freed
    freed.clear()

    stream = pipe.stream(prompt, **stream_kwargs())
    first = next(stream)
    assert pipe._step_callback is not None  # the call is running
    stream.close()  # what a `for` loop left by `break` does once the generator is dropped
    assert pipe._step_callback is None and freed == [1]
    torch.testing.assert_close(first, expected[0])

    freed.clear()
    stream = pipe.stream(prompt, **stream_kwargs())
    next(stream)
    del stream
    gc.collect()
    assert pipe._step_callback is None and freed == [1]

    again = list(pipe.stream(prompt, **stream_kwargs()))  # usable again, with the same outputs
    assert len(again) == len(expected)
    for a, b in zip(again, expected):
        assert a == b if isinstance(a, str) else torch.equal(a, b)


CALLS = {
    StarFlow2Pipeline: lambda pipe, **kw: pipe("a red circle", generator=gen(), output_type="pt", **kw).images,
    StarFlow2EditPipeline: lambda pipe, **kw: (
        pipe(torch.zeros(3, 32, 32), "make it blue", generator=gen(), output_type="pt", **kw).images
    ),
    StarFlow2InterleavedPipeline: lambda pipe, **kw: pipe(
        ["a red circle", IMAGE_PLACEHOLDER], max_new_tokens=0, generator=gen(), output_type="pt", **kw
    ).images[0],
}


@pytest.mark.parametrize("cls", list(CALLS), ids=lambda c: c.__name__)
def test_a_call_whose_callback_raises_ends_the_call(cls, monkeypatch):
    pipe, freed = make(cls, monkeypatch)
    expected = CALLS[cls](pipe)
    freed.clear()

    def broken(pipe, step, noise_level, kwargs):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        CALLS[cls](pipe, callback_on_step_end=broken)
    assert pipe._step_callback is None and not pipe.interrupt and freed == [1]
    torch.testing.assert_close(CALLS[cls](pipe), expected, rtol=0, atol=0)
