"""Embedding tables kept in pinned host memory; only the rows a batch uses travel to the GPU.

Gemma 4 E2B's per-layer-embedding (PLE) table is 262,144 × 8,960 (2.35 B parameters, 4.4 GiB in bf16), larger
than all of its decoder weights in NF4. It is frozen and read once per forward (outside the decoder layers, so
gradient checkpointing never re-reads it), which makes it ideal to keep on the host: each step gathers the
batch's rows on the CPU into a pinned staging buffer and copies them to the GPU asynchronously.
"""

from __future__ import annotations

import torch
from torch import nn


class HostOffloadedEmbedding(nn.Module):
    """Drop-in for a frozen (scaled) nn.Embedding whose table stays in (pinned) host memory.

    Output equals `table[ids] * scale` computed in the table dtype, like Gemma4TextScaledWordEmbedding.
    """

    def __init__(self, weight: torch.Tensor, *, scale: float | torch.Tensor = 1.0, padding_idx: int | None = None,
                 pin: bool = True) -> None:
        super().__init__()
        weight = weight.detach().to("cpu")
        if pin and torch.cuda.is_available():
            weight = weight.pin_memory()
        # A plain attribute, not a Parameter/buffer: `model.to("cuda")` must not move it back onto the GPU.
        self.host_weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.scale = torch.as_tensor(scale, dtype=torch.float32).to(weight.dtype)
        self._staging: torch.Tensor | None = None
        self._copy_done = None
        self._prefetched = None
        self._static_rows: torch.Tensor | None = None
        self._scale_on: torch.Tensor | None = None

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, pin: bool = True) -> "HostOffloadedEmbedding":
        scale = getattr(emb, "embed_scale", None)
        scale = float(scale) if scale is not None else 1.0
        return cls(emb.weight.data, scale=scale, padding_idx=emb.padding_idx, pin=pin)

    @property
    def weight(self) -> torch.Tensor:
        """The host table (read-only use: shapes and dtype for code that inspects `.weight`)."""
        return self.host_weight

    def _staging_buffer(self, n: int) -> torch.Tensor:
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous async copy out of the buffer must finish first
        if self._staging is None or self._staging.shape[0] < n:
            buf = torch.empty((n, self.embedding_dim), dtype=self.host_weight.dtype)
            self._staging = buf.pin_memory() if torch.cuda.is_available() else buf
        return self._staging[:n]

    def _gather_to(self, ids_cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
        flat = ids_cpu.reshape(-1)
        if device.type != "cuda":
            return self.host_weight.index_select(0, flat)
        staging = self._staging_buffer(flat.numel())
        torch.index_select(self.host_weight, 0, flat, out=staging)
        rows = staging.to(device, non_blocking=True)
        self._copy_done = torch.cuda.Event()
        self._copy_done.record(torch.cuda.current_stream(device))
        return rows

    @torch.no_grad()
    def prefetch(self, ids_cpu: torch.Tensor, ids_device: torch.Tensor) -> None:
        """Start gathering a batch's rows before its forward; used when `forward` gets exactly `ids_device`.

        Reading ids back from the GPU would block the CPU until all queued GPU work finished; the training
        loop still has the CPU copy of the batch, so it hands both over here.
        """
        self._prefetched = (ids_device, self._gather_to(ids_cpu, ids_device.device))

    def _device_scale(self, device: torch.device) -> torch.Tensor:
        """The scale on `device`, copied once (a per-call host→device copy would also break CUDA-graph capture)."""
        if self._scale_on is None or self._scale_on.device != device:
            self._scale_on = self.scale.to(device)
        return self._scale_on

    def bind_static_rows(self, rows: torch.Tensor | None) -> None:
        """CUDA-graph mode: every forward returns these (tokens, dim) device rows, which the caller refills before
        each replay (a captured graph cannot run the CPU gather). None switches back to gathering per call."""
        self._static_rows = rows

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pre, self._prefetched = self._prefetched, None
        if self._static_rows is not None:
            rows = self._static_rows
            if rows.shape[0] != input_ids.numel():
                raise RuntimeError(f"static embedding rows hold {rows.shape[0]} tokens, the batch has "
                                   f"{input_ids.numel()}: CUDA-graph steps need batches of one fixed shape")
        elif pre is not None and pre[0] is input_ids:
            rows = pre[1]
        else:  # ids we did not see coming (generation, multimodal id substitution): gather synchronously
            rows = self._gather_to(input_ids.to("cpu"), input_ids.device)
        return (rows * self._device_scale(rows.device)).reshape(*input_ids.shape, self.embedding_dim)


def offload_per_layer_embeddings(model: nn.Module) -> bool:
    """Move Gemma 4's PLE table to pinned host memory (E2B/E4B); returns False when the model has none."""
    text = model.get_decoder() if hasattr(model, "get_decoder") else model
    emb = getattr(text, "embed_tokens_per_layer", None)
    if emb is None or isinstance(emb, HostOffloadedEmbedding):
        return False
    text.embed_tokens_per_layer = HostOffloadedEmbedding.from_embedding(emb)
    return True


def host_tables(model: nn.Module) -> list[HostOffloadedEmbedding]:
    """The model's host-offloaded embedding tables (cached on the model)."""
    tables = getattr(model, "_slimtune_host_tables", None)
    if tables is None:
        tables = [m for m in model.modules() if isinstance(m, HostOffloadedEmbedding)]
        model._slimtune_host_tables = tables
    return tables


def prefetch_host_embeddings(model: nn.Module, batch_cpu: dict, batch_device: dict) -> None:
    """Start the host→GPU row copies of every offloaded table for this micro-batch (no-op without any)."""
    tables = host_tables(model)
    if tables and batch_device["input_ids"].device.type == "cuda":
        for table in tables:
            table.prefetch(batch_cpu["input_ids"], batch_device["input_ids"])
