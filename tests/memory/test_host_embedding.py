"""Host-offloaded embedding tables give exactly the GPU/CPU embedding's output."""

import torch

import slimtune
from slimtune.memory.host_embedding import (
    HostOffloadedEmbedding,
    offload_per_layer_embeddings,
)


def test_same_output_as_scaled_embedding(tiny_dir):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype="float32", device="cpu")
    ple = model.get_decoder().embed_tokens_per_layer
    ids = torch.randint(0, ple.num_embeddings, (3, 17))
    expect = ple(ids)
    host = HostOffloadedEmbedding.from_embedding(ple)
    assert torch.equal(host(ids), expect)


def test_offloaded_model_matches_and_keeps_table_off_the_module_state(tiny_dir):
    path = tiny_dir("e2b", text_only=True)
    model, _ = slimtune.load_model(path, dtype="float32", device="cpu")
    ids = torch.randint(5, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        expect = model(input_ids=ids).logits
    n_before = sum(p.numel() for p in model.parameters())
    assert offload_per_layer_embeddings(model)
    assert not offload_per_layer_embeddings(model)  # idempotent
    n_after = sum(p.numel() for p in model.parameters())
    table = model.get_decoder().embed_tokens_per_layer.host_weight
    assert n_before - n_after == table.numel()  # the table left the module's parameters (never moved by .to)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expect)


def test_text_model_without_ple_is_untouched(tiny_dir):
    model, _ = slimtune.load_model(tiny_dir("31b", text_only=True), device="cpu")
    assert not offload_per_layer_embeddings(model)


def test_load_model_options_keep_logits(tiny_dir):
    """The GPU defaults (host PLE table, slimtune attention) computed on CPU give the plain model's logits."""
    path = tiny_dir("e2b", text_only=True)
    plain, _ = slimtune.load_model(path, dtype="float32", device="cpu", attention="sdpa")
    fast, _ = slimtune.load_model(path, dtype="float32", device="cpu", attention="slimtune", offload_embeddings=True)
    assert isinstance(fast.get_decoder().embed_tokens_per_layer, HostOffloadedEmbedding)
    ids = torch.randint(5, plain.config.vocab_size, (2, 50))
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)
