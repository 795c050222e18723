"""Data: read datasets in common formats, render chats, tokenize with assistant-only labels, batch."""

from slimtune.data.readers import load_records, summarize_dataset

__all__ = ["load_records", "summarize_dataset"]
