"""Training really learns, and the loss only covers assistant replies."""

from pathlib import Path


import slimtune
from slimtune.data.tokenize import IGNORE_INDEX, text_tokenizer, tokenize_chat
from slimtune.train.config import TrainConfig
from slimtune.train.run import train

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


def test_thirty_steps_on_bundled_data_lower_the_loss(tiny_dir, tmp_path):
    cfg = TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(BUNDLED), output=str(tmp_path / "run"),
                      max_steps=30, lr=1e-2, batch_size=8, max_seq_length=128, lora_r=16, lora_alpha=32,
                      gradient_checkpointing=False, device="cpu", log_every=10, seed=0)
    result = train(cfg, log=lambda *_: None)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # a random tiny base starts near ln(vocab); 30 LoRA steps must take clearly more than noise off it
    assert last < first - 0.5 and max(losses[-3:]) < min(losses[:3]), (first, last)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30 and all(k in lines[0] for k in ("step", "loss", "lr", "grad_norm", "tokens_per_s"))


def test_assistant_only_mask_multi_turn_with_system(tiny_dir):
    _, tok = slimtune.load_model(tiny_dir("e2b", text_only=True), device="cpu")
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Green, of course."}]
    ex = tokenize_chat(tok, msgs)
    t = text_tokenizer(tok)
    trained = [i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    text = t.decode(trained)
    assert "Blue." in text and "Green, of course." in text
    for not_trained in ("Be brief", "Name a color", "Another one", "system", "user"):
        assert not_trained not in text, not_trained
    # labels are exactly two contiguous runs (one per assistant turn), each ending with the end-of-turn token
    runs, prev = [], False
    for i, lab in enumerate(ex.labels):
        on = lab != IGNORE_INDEX
        if on and not prev:
            runs.append([i, i])
        if on:
            runs[-1][1] = i
        prev = on
    assert len(runs) == 2
    end_of_turn = t.convert_tokens_to_ids("<turn|>")
    for start, end in runs:
        assert end_of_turn in ex.input_ids[start : end + 1]
    # the labelled ids are the ids of the whole rendering (one tokenization, not per-turn pieces)
    assert ex.input_ids == t(t.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]


def test_train_on_all_labels_everything(tiny_dir):
    _, tok = slimtune.load_model(tiny_dir("e2b", text_only=True), device="cpu")
    ex = tokenize_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                       train_on="all")
    assert ex.labels == ex.input_ids


def test_packed_training_run(tiny_dir, tmp_path):
    """--packing end to end: fewer, fuller sequences; metrics count only real tokens."""
    cfg = TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(BUNDLED), output=str(tmp_path / "run"),
                      max_steps=3, lr=1e-3, batch_size=1, max_seq_length=128, lora_r=4, packing=True,
                      gradient_checkpointing=False, device="cpu", seed=0)
    result = train(cfg, log=lambda *_: None)
    assert len(result.history) == 3
    assert all(r["tokens"] > 64 for r in result.history)  # several samples per 128-token sequence


def test_thinking_template_option_trains_reasoning(tiny_dir, tmp_path):
    """chat_template="gemma4-thinking" renders reasoning_content, and it is part of the trained reply."""
    import json

    data = tmp_path / "think.jsonl"
    rows = [{"messages": [{"role": "system", "content": "<|think|>"}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "four", "reasoning_content": "two plus two"}]}] * 4
    data.write_text("\n".join(json.dumps(r) for r in rows))
    base = dict(model=str(tiny_dir("e2b", text_only=True)), data=str(data), max_steps=1, lr=1e-3, lora_r=4,
                batch_size=2, max_seq_length=64, gradient_checkpointing=False, device="cpu")
    plain = train(TrainConfig(output=str(tmp_path / "a"), **base), log=lambda *_: None)
    thinking = train(TrainConfig(output=str(tmp_path / "b"), chat_template="gemma4-thinking", **base),
                     log=lambda *_: None)
    # the thinking template keeps the reasoning inside the assistant turn: more target tokens than without
    assert thinking.history[0]["target_tokens"] > plain.history[0]["target_tokens"]
