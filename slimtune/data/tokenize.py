"""Chat rows → token ids and labels, with the loss on assistant turns only.

Assistant spans come from the chat template's own rendering of each turn: for assistant turn i, the text between
`render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])` is that turn's reply (content and
end-of-turn marker). No marker string is searched for, so a template change cannot silently mask every label.
Tokens are taken from ONE tokenization of the whole conversation (offsets map them back to characters), so the
ids trained on are exactly the ids the model sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slimtune.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized training sample. labels[i] is the target for input_ids[i] itself (the loss shifts)."""

    input_ids: list[int]
    labels: list[int]
    extras: dict = field(default_factory=dict)  # multimodal tensors (pixel_values, …) when present

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def text_tokenizer(tokenizer_or_processor):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the [start, end) character spans of assistant replies.

    Raises:
        DataError: the template renders a prefix of the conversation differently from the whole, so turns
            cannot be located reliably.
    """
    if not getattr(tok, "chat_template", None):
        raise DataError("the tokenizer has no chat template; load it with slimtune.load_model (which installs "
                        "Gemma 4's template) or set tokenizer.chat_template.")
    full = _render(tok, messages, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        before = _render(tok, messages[:i], True)
        upto = _render(tok, messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) >= len(before)):
            raise DataError("the chat template does not render conversations prefix-by-prefix (turn "
                            f"{i} of a row renders differently inside the whole conversation), so assistant "
                            "turns cannot be located. Use slimtune's built-in Gemma 4 template.")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_chat(tokenizer_or_processor, messages: list[dict], *, train_on: str = "assistant") -> Example:
    """Tokenize one conversation; labels are the ids inside assistant spans (or all ids with train_on="all")."""
    tok = text_tokenizer(tokenizer_or_processor)
    text, spans = assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if train_on == "all":
        return Example(list(ids), list(ids))
    labels = [IGNORE_INDEX] * len(ids)
    for j, (start, end) in enumerate(offsets):
        # Overlap, not containment: a BPE token may straddle the header/reply boundary (e.g. "\nB" of
        # "<|turn>model\nBlue"); containment would silently drop the reply's first token from the loss.
        if end > start and any(start < e and end > s for s, e in spans):
            labels[j] = ids[j]
    return Example(list(ids), labels)


def tokenize_text(tokenizer_or_processor, text: str) -> Example:
    """Continued pre-training row: bos + text + eos, every token is a target."""
    tok = text_tokenizer(tokenizer_or_processor)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    if tok.eos_token_id is not None:
        ids = ids + [tok.eos_token_id]
    return Example(list(ids), list(ids))


@dataclass
class TokenizeStats:
    """Counts reported to the user after tokenizing a dataset."""

    n_rows: int = 0
    n_truncated: int = 0
    n_skipped_no_targets: int = 0
    n_tokens: int = 0
    n_target_tokens: int = 0


def tokenize_rows(rows: list[dict], tokenizer_or_processor, *, max_seq_length: int,
                  train_on: str = "assistant", media_root=None, media_front_end=None, allow_media: bool = True,
                  ) -> tuple[list[Example], TokenizeStats]:
    """Tokenize normalised rows ({"messages": …} or {"text": …}), truncating to max_seq_length.

    Rows with no target token left after truncation are skipped and counted. Rows whose messages hold image or
    audio parts go through ``slimtune.data.multimodal`` (media paths relative to ``media_root``; the front end is
    ``media_front_end`` or, when None, loaded from the tokenizer's checkpoint folder). ``allow_media=False``
    (a text_only model, which has no towers) refuses such rows with a DataError naming the row.
    """
    from slimtune.data import multimodal

    if train_on not in ("assistant", "all"):
        raise DataError(f"train_on must be 'assistant' or 'all', got {train_on!r}.")
    stats, examples = TokenizeStats(), []
    for n, row in enumerate(rows, 1):
        stats.n_rows += 1
        if "text" not in row and multimodal.has_media(row["messages"]):
            if not allow_media:
                raise DataError(f"row {n} has image/audio parts, but the model was loaded text_only (no vision or "
                                "audio tower). Drop text_only (--text-only) to train on media, or remove the "
                                "media from the data.")
            if media_front_end is None:
                media_front_end = multimodal.load_media_front_end(
                    text_tokenizer(tokenizer_or_processor).name_or_path)
            ex = multimodal.tokenize_multimodal_chat(media_front_end, tokenizer_or_processor, row["messages"],
                                                     media_root=media_root, train_on=train_on, row=n)
            if len(ex.input_ids) > max_seq_length:
                stats.n_truncated += 1
                ex = multimodal.truncate_multimodal(ex, max_seq_length, row=n)
        else:
            ex = (tokenize_text(tokenizer_or_processor, row["text"]) if "text" in row
                  else tokenize_chat(tokenizer_or_processor, row["messages"], train_on=train_on))
        if len(ex.input_ids) > max_seq_length:
            stats.n_truncated += 1
            ex = Example(ex.input_ids[:max_seq_length], ex.labels[:max_seq_length], ex.extras)
        if ex.n_targets == 0:
            stats.n_skipped_no_targets += 1
            continue
        stats.n_tokens += len(ex.input_ids)
        stats.n_target_tokens += ex.n_targets
        examples.append(ex)
    return examples, stats
