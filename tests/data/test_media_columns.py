"""Top-level image/audio columns become media parts of the first user turn (or fill TRL-style placeholders).

Fixtures are generated: PIL images, numpy arrays, WAV files written with scipy and the stdlib ``wave`` module.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import wavfile

import slimtune
from slimtune.data import load_records
from slimtune.data.collate import collate
from slimtune.data.formats import normalize_record
from slimtune.data.media_columns import MediaColumnError
from slimtune.data.tokenize import tokenize_rows
from slimtune.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore:returning the tokenizer instead of the processor")

_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is it?"},
         {"role": "assistant", "content": "A thing."}]


def _png(seed=0, size=(30, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds=0.5, rate=16_000) -> bytes:
    buf = io.BytesIO()
    wavfile.write(buf, rate, (np.sin(np.linspace(0, 300, int(seconds * rate))) * 12_000).astype("<i2"))
    return buf.getvalue()


def _row(**columns):
    return normalize_record({"messages": json.loads(json.dumps(_CHAT)), **columns}, "messages")


def test_columns_go_to_the_first_user_turn_before_its_text():
    row = _row(images=["a.png", "b.png"], Audio={"array": [0.0, 0.1, 0.2], "sampling_rate": 8000})
    system, user, reply = row["messages"]
    assert system["content"] == "Be brief." and reply["content"] == "A thing."
    assert [p["type"] for p in user["content"]] == ["image", "image", "audio", "text"]
    assert [p.get("path") for p in user["content"][:2]] == ["a.png", "b.png"]
    assert user["content"][2]["audio"]["sampling_rate"] == 8000
    assert user["content"][3] == {"type": "text", "text": "What is it?"}
    assert _row() == _row(image=None, audio=None)  # null columns: a plain text row
    assert normalize_record({"instruction": "Describe.", "output": "Red.", "image": "x.png"}, "alpaca")[
        "messages"][0]["content"][0] == {"type": "image", "path": "x.png"}


def test_columns_fill_placeholders_in_order():
    record = {"messages": [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "And"},
                                                        {"type": "image", "text": None}]},
                           {"role": "assistant", "content": "Two pictures."}], "images": ["1.png", "2.png"]}
    parts = normalize_record(record, "messages")["messages"][0]["content"]
    assert [p.get("path") for p in parts] == ["1.png", None, "2.png"]
    record["images"] = ["1.png"]
    with pytest.raises(MediaColumnError, match="2 image placeholder.*1 image"):
        normalize_record(record, "messages")


@pytest.mark.parametrize("columns, match", [
    ({"images": [42]}, r"'images' item 1 is a number \(42\)"),
    ({"audio": [0.1, 0.2]}, r"no 'sampling_rate' column"),
    ({"audio": {"array": [0.1]}}, r"no 'sampling_rate'"),
    ({"image": ""}, r"'image' is a string"),
])
def test_bad_column_values_are_refused(columns, match):
    with pytest.raises(MediaColumnError, match=match):
        _row(**columns)


def test_messages_with_their_own_media_keep_them_and_text_rows_refuse_media():
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": "in.png"}]},
                           {"role": "assistant", "content": "ok"}], "image": "in.png"}
    assert normalize_record(record, "messages")["messages"][0]["content"] == [{"type": "image", "path": "in.png"}]
    with pytest.raises(MediaColumnError, match="'text' row cannot carry media"):
        normalize_record({"text": "hi", "image": "x.png"}, "text")


def test_a_mismatch_in_a_file_names_the_row_and_is_not_skipped(tmp_path):
    rows = [{"messages": _CHAT, "images": ["a.png"]},
            {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}],
             "images": ["a.png", "b.png"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"d\.jsonl:2: row has 1 image placeholder"):
        load_records(tmp_path / "d.jsonl")


def _check_tokens(model, tok, examples):
    batch = collate(examples, tok.pad_token_id)
    ids, cfg = batch["input_ids"], model.config
    with torch.no_grad():
        img = model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"])
        aud = model.model.get_audio_features(batch["input_features"], batch["input_features_mask"])
    assert int((ids == cfg.image_token_id).sum()) == sum(len(x) for x in img.pooler_output) > 0
    assert int((ids == cfg.audio_token_id).sum()) == int(aud.attention_mask.sum()) > 0
    return batch


def test_in_memory_values_tokenize(tiny_dir):
    path = tiny_dir("e2b", text_only=False)
    model, tok = slimtune.load_model(path, dtype="float32", device="cpu")
    tok = getattr(tok, "tokenizer", tok)
    pil = Image.open(io.BytesIO(_png(1)))
    rows = [
        _row(image=pil, audio=_wav()),                                               # PIL + WAV bytes
        _row(images=[np.random.RandomState(2).rand(24, 36, 3)],                      # float array in [0, 1]
             audios=[np.sin(np.linspace(0, 50, 4410))], sampling_rate=22_050),       # samples + rate column
        _row(image={"bytes": _png(3), "path": "ignored.png"}, audio={"bytes": _wav(0.3), "path": None}),
    ]
    examples, stats = tokenize_rows(rows, tok, max_seq_length=1024)
    assert len(examples) == 3 and stats.n_skipped_no_targets == 0
    batch = _check_tokens(model, tok, examples)
    assert batch["pixel_values"].shape[0] == 3 and batch["input_features"].shape[0] == 3
    # media come before the question: the first image token precedes the first token of the user's text
    ids = examples[0].input_ids
    assert ids.index(model.config.image_token_id) < ids.index(model.config.audio_token_id)


def test_bad_bytes_fail_at_tokenization_naming_the_row(tiny_dir):
    path = tiny_dir("e2b", text_only=False)
    _, tok = slimtune.load_model(path, dtype="float32", device="cpu")
    rows = [_row(image=_png()), _row(image=b"not an image")]
    with pytest.raises(DataError, match=r"row 2, image \(bytes\): corrupt or unsupported image"):
        tokenize_rows(rows, tok, max_seq_length=1024)


def test_jsonl_paths_relative_to_the_dataset(tiny_dir, tmp_path):
    from slimtune.train.run import media_root

    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "p.png").write_bytes(_png(4))
    (tmp_path / "media" / "c.wav").write_bytes(_wav(0.4, 22_050))
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": _CHAT, "image": "media/p.png",
                                                  "audios": ["media/c.wav"]}))
    loaded = load_records(tmp_path / "d.jsonl")
    path = tiny_dir("e2b", text_only=False)
    model, tok = slimtune.load_model(path, dtype="float32", device="cpu")
    tok = getattr(tok, "tokenizer", tok)
    examples, _ = tokenize_rows(loaded.rows, tok, max_seq_length=1024, media_root=media_root(str(tmp_path / "d.jsonl")))
    _check_tokens(model, tok, examples)


def test_saved_hf_dataset_with_image_and_audio_columns(tiny_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    # The Image feature as users build it; audio in the Arrow layout the Audio feature stores ({bytes, path}),
    # written as a plain struct because encoding through datasets.Audio needs torchcodec.
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "image": datasets.Image(),
        "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
    })
    ds = datasets.Dataset.from_dict({
        "messages": [_CHAT, _CHAT],
        "image": [Image.open(io.BytesIO(_png(5))), Image.open(io.BytesIO(_png(6, (50, 20))))],
        "audio": [{"bytes": _wav(0.5), "path": None}, {"bytes": _wav(1.0, 8000), "path": "x.wav"}],
    }, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    loaded = load_records(tmp_path / "ds")
    assert loaded.n_read == 2 and not loaded.n_skipped
    path = tiny_dir("e2b", text_only=False)
    model, tok = slimtune.load_model(path, dtype="float32", device="cpu")
    tok = getattr(tok, "tokenizer", tok)
    examples, _ = tokenize_rows(loaded.rows, tok, max_seq_length=1024, media_root=tmp_path / "ds")
    _check_tokens(model, tok, examples)
