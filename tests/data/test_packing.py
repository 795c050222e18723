"""Packing is exact: packed sequences give the same loss and LoRA gradients as the samples run one by one."""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.adapt.attention import enable_slimtune_attention
from slimtune.adapt.lora import lora_modules
from slimtune.data.collate import collate, count_real_tokens, count_targets
from slimtune.data.packing import pack_examples, packing_stats
from slimtune.data.tokenize import IGNORE_INDEX, Example, tokenize_chat
from slimtune.errors import DataError
from slimtune.train.step import accumulate_gradients

# Uneven lengths; several rows are longer than the tiny config's sliding window (16), so sliding layers really
# window, and multi-turn rows put loss-free user turns between assistant turns.
_ROWS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris, a city on the Seine."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green and blue."},
     {"role": "user", "content": "And two more?"}, {"role": "assistant", "content": "Yellow and purple, too."}],
    [{"role": "user", "content": "Tell me about the moon in a couple of sentences, please."},
     {"role": "assistant", "content": "The moon orbits the earth about once a month. Its gravity raises the "
                                      "tides, and it always shows us the same face."}],
    [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}],
]


def _setup(tiny_dir, variant, attn, dtype):
    model, tok = slimtune.load_model(tiny_dir(variant, text_only=True), dtype="float32", device="cpu")
    slimtune.add_lora(model, r=4, alpha=8, seed=1)
    with torch.no_grad():  # B starts at zero; make every adapter contribute so all gradients are non-trivial
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    if attn == "slimtune":
        enable_slimtune_attention(model)
    else:
        model.set_attn_implementation(attn)
    model.to(dtype).train()
    return model, [tokenize_chat(tok, row) for row in _ROWS]


def _two_sequences(examples):
    """Pack into exactly 2 sequences (the smallest length that allows it)."""
    total = sum(len(e.input_ids) for e in examples)
    for length in range(max((total + 1) // 2, max(len(e.input_ids) for e in examples)), total + 1):
        packed = pack_examples(examples, length)
        if len(packed) == 2:
            return packed, length
    raise AssertionError("could not pack into 2 sequences")


def _loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    loss, n = accumulate_gradients(model, batches, device=torch.device("cpu"), dtype=torch.float32)
    return loss, n, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def _max_rel(a, b):
    return max(float((a[k] - b[k]).norm() / a[k].norm()) for k in a)


_CASES = [(v, a, d) for v in ("e2b", "31b") for a in ("sdpa", "eager", "slimtune")
          for d in (torch.float64, torch.float32)]


@pytest.mark.parametrize("variant,attn,dtype", _CASES,
                         ids=[f"{v}-{a}-{str(d)[6:]}" for v, a, d in _CASES])
def test_packed_equals_unpacked(tiny_dir, variant, attn, dtype):
    model, examples = _setup(tiny_dir, variant, attn, dtype)
    assert max(len(e.input_ids) for e in examples) > 16 >= min(len(e.input_ids) for e in examples)
    packed, length = _two_sequences(examples)
    stats = packing_stats(packed, length)
    assert (stats.n_documents, stats.n_sequences) == (len(examples), 2)
    assert stats.n_tokens == sum(len(e.input_ids) for e in examples)

    loss_u, n_u, g_u = _loss_and_grads(model, [collate([e], pad_id=0) for e in examples])
    # Both packed sequences in ONE padded batch (exercises pad positions and attention_mask=None with B=2) ...
    batch = collate(packed, pad_id=0)
    assert "attention_mask" not in batch and count_real_tokens(batch) == stats.n_tokens
    loss_p, n_p, g_p = _loss_and_grads(model, [batch])
    # ... and one sequence per micro-batch (B=1, no padding: the usual packed-training shape).
    loss_p1, n_p1, g_p1 = _loss_and_grads(model, [collate([p], pad_id=0) for p in packed])

    # "fp64" is not pure fp64: Gemma 4's RMSNorm and our fused cross-entropy compute in fp32, so even sdpa agrees
    # to ~3e-7, not 1e-15. transformers' eager attention also runs its softmax in fp32 (dtype=torch.float32),
    # which leaves ~1e-6 on the smallest gradients; leaking documents moves them by > 1e-3 (controls below).
    tol = 1e-4 if dtype == torch.float32 else (3e-6 if attn == "eager" else 1e-6)
    assert n_u == n_p == n_p1 == stats.n_target_tokens == sum(e.n_targets for e in examples)
    for loss, grads in ((loss_p, g_p), (loss_p1, g_p1)):
        assert abs(loss - loss_u) <= tol * abs(loss_u), (loss, loss_u)
        assert all(g.abs().sum() > 0 for g in grads.values())
        rel = _max_rel(g_u, grads)
        assert rel <= tol, rel


@pytest.mark.parametrize("variant", ["e2b", "31b"])
@pytest.mark.parametrize("attn", ["sdpa", "slimtune"])
def test_non_restarting_positions_would_leak(tiny_dir, variant, attn):
    """Negative control: with plain arange positions nothing separates the documents. RoPE is relative, so the
    uniform position shift alone changes nothing; the loss moves only because documents attend to each other."""
    model, examples = _setup(tiny_dir, variant, attn, torch.float64)
    packed, _ = _two_sequences(examples)
    loss_u, _, _ = _loss_and_grads(model, [collate([e], pad_id=0) for e in examples])
    leaky = [Example(p.input_ids, p.labels, {"position_ids": list(range(len(p.input_ids)))}) for p in packed]
    loss_leak, n_leak, _ = _loss_and_grads(model, [collate([p], pad_id=0) for p in leaky])
    assert n_leak == sum(e.n_targets for e in examples)  # same targets: only attention differs
    # fp64 packed == unpacked agree to ~1e-7 (above), so a 1e-5 difference is unmistakably attention leaking
    assert abs(loss_leak - loss_u) > 1e-5 * abs(loss_u), (loss_leak, loss_u)


def test_sdpa_needs_attention_mask_none(tiny_dir):
    """Why packed batches carry no attention_mask: with one present, transformers skips packed-sequence detection
    and sdpa lets documents attend to each other even though the position ids restart."""
    model, examples = _setup(tiny_dir, "e2b", "sdpa", torch.float64)
    packed, _ = _two_sequences(examples)
    loss_u, _, _ = _loss_and_grads(model, [collate([e], pad_id=0) for e in examples])
    batches = [collate([p], pad_id=0) for p in packed]
    for b in batches:
        b["attention_mask"] = b["token_mask"]
    loss_masked, _, _ = _loss_and_grads(model, batches)
    assert abs(loss_masked - loss_u) > 1e-5 * abs(loss_u)


def _ex(n, first_label=7):
    ids = list(range(first_label, first_label + n))
    return Example(ids, [IGNORE_INDEX] + ids[1:])


def test_pack_examples_layout_and_stats():
    examples = [_ex(n) for n in (5, 9, 3, 7, 2, 6)]  # 32 tokens
    packed = pack_examples(examples, 10, seed=0)
    assert all(len(p.input_ids) <= 10 for p in packed)
    assert len(packed) == 4  # best-fit decreasing: 9 | 7+3 | 6+2 | 5 (lower bound is ceil(32/10) = 4)
    assert sorted(sorted(e for e in p.input_ids) for p in packed) == sorted(
        sorted(x for i in members for x in examples[i].input_ids) for members in ([1], [3, 2], [5, 4], [0]))
    for p in packed:
        pos = p.extras["position_ids"]
        starts = [t for t, x in enumerate(pos) if x == 0]
        assert starts[0] == 0
        ends = starts[1:] + [len(pos)]
        for s, e in zip(starts, ends):
            assert pos[s:e] == list(range(e - s))
            assert p.labels[s] == IGNORE_INDEX
    stats = packing_stats(packed, 10)
    assert (stats.n_documents, stats.n_sequences, stats.n_tokens) == (6, 4, 32)
    assert stats.efficiency == pytest.approx(32 / 40)
    assert stats.n_target_tokens == sum(e.n_targets for e in examples)
    assert "efficiency 80.0%" in stats.summary()
    # the seed only reorders sequences
    other = pack_examples(examples, 10, seed=1)
    assert sorted(p.input_ids for p in other) == sorted(p.input_ids for p in packed)


def test_collate_packed_boundaries_and_padding():
    a = Example([2, 10, 11], [2, 10, 11])  # labels NOT masked at the start: collate must still cut the boundary
    b = Example([2, 20], [2, 20])
    hand = Example(a.input_ids + b.input_ids, a.labels + b.labels, {"position_ids": [0, 1, 2, 0, 1]})
    short = pack_examples([Example([2, 30, 31], [IGNORE_INDEX, 30, 31])], 8)[0]
    batch = collate([hand, short], pad_id=0)
    assert set(batch) == {"input_ids", "position_ids", "token_mask", "targets"}
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]  # pads continue the last doc
    assert batch["targets"].tolist() == [[10, 11, IGNORE_INDEX, 20, IGNORE_INDEX],
                                         [30, 31, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert count_targets(batch) == 5 and count_real_tokens(batch) == 8
    plain = collate([a, b], pad_id=0)  # unpacked batches are unchanged
    assert set(plain) == {"input_ids", "attention_mask", "targets"}
    assert count_real_tokens(plain) == 5


def test_pack_examples_rejects():
    with pytest.raises(DataError, match="never splits"):
        pack_examples([_ex(11)], 10)
    with pytest.raises(DataError, match="text-only"):
        pack_examples([Example([1, 2], [1, 2], {"pixel_values": torch.zeros(1)})], 10)
    with pytest.raises(DataError, match="positive"):
        pack_examples([_ex(3)], 0)
