"""generate(): chat template in, reply out; greedy parity with model.generate, streaming, stop strings, media."""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune.errors import ConfigError
from slimtune.infer import generate

MESSAGES = [{"role": "user", "content": "Write code: def add(a, b):"}]


@pytest.fixture(scope="module")
def text_model(tiny_dir):
    path = tiny_dir("e2b", text_only=True)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_greedy_is_deterministic_and_equals_model_generate(text_model):
    model, tok = text_model
    first = generate(model, tok, MESSAGES, max_new_tokens=12, temperature=0)
    assert first == generate(model, tok, MESSAGES, max_new_tokens=12, temperature=0)
    assert first  # the random tiny model does say something

    inputs = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=12)
    assert first == tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_concatenates_to_reply(text_model, temperature):
    model, tok = text_model
    kwargs = {"max_new_tokens": 8, "temperature": temperature, "seed": 7}
    reply = generate(model, tok, MESSAGES, **kwargs)
    pieces = list(generate(model, tok, MESSAGES, stream=True, **kwargs))
    assert len(pieces) > 1 and "".join(pieces) == reply


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(text_model):
    model, tok = text_model
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tok, MESSAGES, max_new_tokens=6, temperature=1.0, top_k=0, min_p=0.05, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == generate(model, tok, MESSAGES, max_new_tokens=6, temperature=1.0, top_k=0, min_p=0.05, seed=3)


def test_stop_strings_cut_the_reply(text_model):
    model, tok = text_model
    full = generate(model, tok, MESSAGES, max_new_tokens=12, temperature=0)  # same call as the greedy test
    stop = full[3:5]  # a string the greedy reply is known to contain
    cut = generate(model, tok, MESSAGES, max_new_tokens=12, temperature=0, stop=[stop, "never-there"])
    assert cut == full[: full.index(stop)]
    assert stop not in cut
    streamed = list(generate(model, tok, MESSAGES, max_new_tokens=12, temperature=0, stop=stop, stream=True))
    assert "".join(streamed) == cut


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, r"temperature=-0.1 must be >= 0"),
        ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
        ({"top_k": -1}, r"top_k=-1 must be >= 0"),
        ({"min_p": 2.0}, r"min_p=2.0 must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty=0.0 must be > 0"),
        ({"max_new_tokens": 0}, r"max_new_tokens=0 must be an integer >= 1"),
        ({"stop": [""]}, r"stop=\[''\] must be a non-empty string"),
    ],
)
def test_invalid_settings_raise_config_error(text_model, kwargs, message):
    model, tok = text_model
    with pytest.raises(ConfigError, match=message):
        generate(model, tok, MESSAGES, **kwargs)
    with pytest.raises(ConfigError, match=message):  # raised at the call, not on first iteration
        generate(model, tok, MESSAGES, stream=True, **kwargs)


def test_all_problems_reported_at_once(text_model):
    model, tok = text_model
    with pytest.raises(ConfigError, match=r"temperature=-1.*top_p=2"):
        generate(model, tok, MESSAGES, temperature=-1, top_p=2)


def test_errors_in_the_generation_thread_surface(text_model, monkeypatch):
    model, tok = text_model

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        list(generate(model, tok, MESSAGES, stream=True))


def test_closing_a_stream_stops_generation(text_model):
    model, tok = text_model
    seen = []
    real_generate = model.generate

    def spy(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        seen.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = spy
    try:
        stream = generate(model, tok, MESSAGES, max_new_tokens=200, temperature=1.0, seed=0, stream=True)
        next(stream)
        stream.close()  # joins the worker; generation must have stopped early
    finally:
        del model.generate
    assert seen and seen[0] < 200


def test_media_needs_a_processor(text_model):
    model, tok = text_model
    from PIL import Image

    with pytest.raises(ConfigError, match="need the model's processor"):
        generate(model, tok, MESSAGES, images=[Image.new("RGB", (8, 8))])


def _write_wav(path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())


@pytest.fixture(scope="module")
def mm_model(tiny_dir):
    """The tiny multimodal model with a Gemma4Processor built without its (torchvision-only) video processor."""
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessorPil,
        Gemma4Processor,
    )
    from transformers.processing_utils import ProcessorMixin

    path = tiny_dir("e2b", text_only=False)
    model = Gemma4ForConditionalGeneration.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    vision = model.config.vision_config
    image_proc = Gemma4ImageProcessorPil(
        patch_size=vision.patch_size, pooling_kernel_size=vision.pooling_kernel_size, max_soft_tokens=70
    )
    features = Gemma4AudioFeatureExtractor(feature_size=model.config.audio_config.subsampling_conv_channels[0])
    # transformers insists on a torchvision video processor, which this CPU image lacks; images/audio do not use it.
    mp = pytest.MonkeyPatch()
    mp.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: arg)
    try:
        processor = Gemma4Processor(features, image_proc, tok, None, chat_template=tok.chat_template, image_seq_length=70)
    finally:
        mp.undo()
    return model, processor


def test_images_and_audio_go_through_the_processor(mm_model, tmp_path):
    from PIL import Image

    model, processor = mm_model
    image_path = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(image_path)
    wav_path = tmp_path / "clip.wav"
    _write_wav(wav_path, np.sin(np.linspace(0, 2000, 8000)) * 0.3, rate=8000)  # resampled to 16 kHz

    seen = {}
    real_generate = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_generate(*args, **kwargs)

    model.generate = spy
    try:
        reply = generate(model, processor, "Describe.", images=[image_path], audio=[wav_path], max_new_tokens=5,
                         temperature=0)
        streamed = "".join(generate(model, processor, "Describe.", images=[image_path], audio=[wav_path],
                                    max_new_tokens=5, temperature=0, stream=True))
    finally:
        del model.generate
    assert isinstance(reply, str) and streamed == reply
    ids = seen["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_id) > 0 and ids.count(model.config.audio_token_id) > 0
    assert seen["pixel_values"].dtype == model.dtype and "input_features" in seen
    assert ids.count(processor.tokenizer.bos_token_id) == 1  # the template's <bos>, not a second one
