"""Stream a Gemma 4 checkpoint into a model one tensor at a time: NF4 while loading, never the whole 16-bit model.

``from_pretrained`` followed by quantization holds the whole model in 16 bits in host memory first (62 GB for
31B). Here the model is built on the meta device (parameters empty; buffers such as the RoPE tables real, exactly
as transformers builds them), then the safetensors shards are read key by key with ``safe_open``. Each tensor
becomes its final form as soon as it is read, and is dropped before the next read:

* linears that QLoRA quantizes (``quantizable_linear_names``) become bitsandbytes NF4 ``Linear4bit`` through
  ``make_nf4_linear``, the same function ``quantize_model_nf4`` uses, so codes and absmax are identical;
* MoE expert tensors (26B-A4B's fused (E, out, in) ``gate_up_proj`` / ``down_proj``) under 4-bit loading are read
  one expert (row slice) at a time into an ``NF4Experts`` through ``NF4ExpertStack.quantize_expert``, again what
  ``quantize_model_nf4`` does: the 16-bit stack (1 GB per tensor on 26B-A4B) never exists;
* every other parameter / persistent buffer is cast to the dtype transformers gives it and moved to the device;
* the per-layer-embedding (PLE) table, when offloaded, is read in row slices straight into (pinned) host memory
  for ``HostOffloadedEmbedding``: it never visits the GPU and never exists twice on the host.

So the peak while loading is the final footprint plus one 16-bit tensor (the largest is the embedding table) and,
on the host, the pages of the one shard being read (safetensors maps it; weights kept on the CPU are copied out
of the mapping so that it is released when the next shard is opened).
Gemma 4 checkpoints store tensors under the model's own state-dict names in transformers 5.17 and 5.24 (neither
has a Gemma 4 entry in its key-conversion table; MoE experts are fused 3-D parameters in both), so the key map is
the identity for a full model and ``text_only.checkpoint_key_for`` for the decoder of a multimodal checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from slimtune.errors import ModelLoadError

_PLE = "embed_tokens_per_layer"
_PLE_ROWS_PER_SLICE = 8192  # 8192 x 8960 bf16 = 140 MiB of host memory on E2B while the table is read


def key_to_shard(folder: Path, shards: list[Path]) -> dict[str, Path]:
    """Which shard holds each checkpoint key: the index when there is one (no shard is opened), else the headers."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open  # noqa: PLC0415

    out: dict[str, Path] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), shard))
    return out


def build_empty(cls, config, dtype: torch.dtype, attn_implementation) -> nn.Module:
    """``cls`` with meta parameters and real buffers, built by transformers itself (no modeling code here)."""
    from accelerate import init_empty_weights  # noqa: PLC0415

    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    # from_pretrained recomputes the buffers that are not in the checkpoint with transformers' `_init_weights`
    # after construction (in fp32, then stored in the buffer's dtype); `__init__` alone may compute them in the
    # 16-bit default dtype (the audio tower's inv_timescales differ in bf16). The parameters are still meta here,
    # so this touches buffers only.
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)
    model.tie_weights()  # transformers' own rule (the config's tie_word_embeddings); meta models start untied
    return model


def _targets(model: nn.Module) -> dict[str, tuple[str, str, bool]]:
    """State-dict name → (module name, attribute, is_parameter) for parameters and persistent buffers."""
    out = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in module._parameters.items():
            if p is not None:
                out[prefix + pname] = (mod_name, pname, True)
        for bname, b in module._buffers.items():
            if b is not None and bname not in module._non_persistent_buffers_set:
                out[prefix + bname] = (mod_name, bname, False)
    return out


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None) if target is not None else None


def tied_output_name(model: nn.Module) -> str | None:
    """State-dict name of the output embedding when it is tied to the input embedding (not read from disk).

    Asked of the model built by ``build_empty``, which let transformers tie (or not) its meta parameters by its
    own rule (5.x reads the top-level ``tie_word_embeddings``): we follow it rather than re-deriving it.
    """
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    return f"{_module_name(model, out)}.weight"


def missing_keys(model: nn.Module, where: dict[str, Path], key_for: Callable[[str], str | None]) -> list[str]:
    """Parameters the checkpoint has no tensor for (persistent buffers may be absent: they keep their init)."""
    tied = tied_output_name(model)
    return [name for name, (_, _, is_param) in _targets(model).items()
            if is_param and name != tied and key_for(name) not in where]


class _Reader:
    """Open shards one at a time; every read failure becomes a ModelLoadError naming the file and key."""

    def __init__(self):
        from safetensors import safe_open  # noqa: PLC0415 - looked up at call time (tests count the reads)

        self._open, self._shard, self._handle = safe_open, None, None

    def handle(self, shard: Path):
        if shard != self._shard:
            self.close()
            if not shard.is_file():
                raise ModelLoadError(f"weight shard {shard.name} is missing from {shard.parent}.")
            try:
                self._handle = self._open(str(shard), framework="pt").__enter__()
            except Exception as exc:
                raise ModelLoadError(f"weight file {shard} is corrupt or truncated ({exc}); download it "
                                     "again.") from exc
            self._shard = shard
        return self._handle

    def read(self, shard: Path, key: str, rows: slice | None = None) -> torch.Tensor:
        try:
            f = self.handle(shard)
            return f.get_tensor(key) if rows is None else f.get_slice(key)[rows]
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"could not read {key} from {shard} ({type(exc).__name__}: {exc}); the file is "
                                 "corrupt or does not match model.safetensors.index.json.") from exc

    def shape(self, shard: Path, key: str) -> tuple[int, ...]:
        try:
            return tuple(self.handle(shard).get_slice(key).get_shape())
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(f"{shard} has no tensor {key} ({exc}); it does not match the index.") from exc

    def close(self):
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._shard, self._handle = None, None


def _host_table(reader: _Reader, shard: Path, key: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """The PLE table in (pinned, when CUDA is there) host memory, filled slice by slice: never two copies."""
    table = torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())
    for start in range(0, shape[0], _PLE_ROWS_PER_SLICE):
        stop = min(shape[0], start + _PLE_ROWS_PER_SLICE)
        table[start:stop].copy_(reader.read(shard, key, slice(start, stop)))
    return table


def _read_experts(reader: _Reader, shard: Path, key: str, stack, dtype: torch.dtype) -> None:
    """One fused (E, out, in) expert tensor into its NF4ExpertStack, one expert (a row slice of the file) at a time,
    each cast to the model's dtype first as a 16-bit weight would be: never more than one expert's matrix in 16 bits."""
    for e in range(stack.num_experts):
        weight = reader.read(shard, key, slice(e, e + 1))[0]
        stack.quantize_expert(e, weight.to(dtype) if weight.is_floating_point() else weight)
        del weight


def stream_weights(model: nn.Module, folder: Path, shards: list[Path], *, device: torch.device,
                   quantize: set[str] = frozenset(), offload_ple: bool = False,
                   key_for: Callable[[str], str | None] = lambda name: name) -> nn.Module:
    """Fill a model built by ``build_empty`` from the checkpoint, tensor by tensor (see the module docstring).

    Args:
        quantize: module names of nn.Linear modules and MoE expert blocks to store as NF4 (``nf4_module_names``;
            compute dtype: their meta weights' dtype).
        offload_ple: put the per-layer-embedding table into HostOffloadedEmbedding instead of on ``device``.
        key_for: checkpoint key of a state-dict name (None: the model has no tensor for it on disk).

    Raises:
        ModelLoadError: a parameter has no tensor in the checkpoint, a tensor has the wrong shape, or a shard is
            missing/corrupt (the message names the file).
    """
    from slimtune.adapt.experts_nf4 import NF4Experts, is_plain_experts  # noqa: PLC0415
    from slimtune.adapt.quantize import make_nf4_linear  # noqa: PLC0415
    from slimtune.memory.host_embedding import HostOffloadedEmbedding  # noqa: PLC0415

    device = torch.device(device)
    where = key_to_shard(folder, shards)
    missing = missing_keys(model, where, key_for)
    if missing:
        raise ModelLoadError(f"{folder} lacks {len(missing)} tensors this model needs (first: "
                             f"{[key_for(n) or n for n in missing[:3]]}); the checkpoint does not match its "
                             "config.json.")
    targets, tied = _targets(model), tied_output_name(model)
    text = model.get_decoder() if hasattr(model, "get_decoder") else model
    ple = getattr(text, _PLE, None) if offload_ple else None
    ple_name = _module_name(model, ple)
    modules = dict(model.named_modules(remove_duplicate=False))
    # Shard by shard (each opened once); within a shard, key order. Nothing read is kept past its own step.
    plan = sorted(((where[key_for(n)], key_for(n), n) for n in targets if n != tied and key_for(n) in where),
                  key=lambda t: (str(t[0]), t[1]))
    pending: dict[str, dict[str, torch.Tensor]] = {}  # quantized linears waiting for their bias / weight
    experts: dict[str, NF4Experts] = {}  # NF4 expert blocks waiting for their other tensor
    reader = _Reader()
    try:
        for shard, key, name in plan:
            mod_name, attr, is_param = targets[name]
            module = modules[mod_name]
            want = getattr(module, attr)
            shape = reader.shape(shard, key)
            if shape != tuple(want.shape):
                raise ModelLoadError(f"{shard.name}: {key} has shape {shape}, but this checkpoint's config.json "
                                     f"expects {tuple(want.shape)}; the files do not belong together.")
            if ple_name is not None and mod_name == ple_name and attr == "weight":
                table = _host_table(reader, shard, key, shape, want.dtype)
                setattr(text, _PLE, HostOffloadedEmbedding(table, scale=float(ple.embed_scale),
                                                           padding_idx=ple.padding_idx, pin=False))
                del table
                continue
            if mod_name in quantize and is_plain_experts(module):
                if mod_name not in experts:
                    experts[mod_name] = NF4Experts.empty_like(module, want.dtype, device)
                nf4 = experts[mod_name]
                _read_experts(reader, shard, key, getattr(nf4, attr), want.dtype)
                if nf4.complete:
                    parent, _, child = mod_name.rpartition(".")
                    setattr(modules[parent], child, experts.pop(mod_name))
                continue
            tensor = reader.read(shard, key)
            if tensor.is_floating_point():
                tensor = tensor.to(want.dtype)  # the checkpoint's 16 bits, or the requested dtype: never fp32 first
            if mod_name in quantize:
                got = pending.setdefault(mod_name, {})
                got[attr] = tensor
                if len(got) == sum(p is not None for p in module._parameters.values()):
                    lin = nn.Linear(module.in_features, module.out_features, bias="bias" in got, device="meta")
                    for pname, value in pending.pop(mod_name).items():
                        setattr(lin, pname, nn.Parameter(value, requires_grad=False))
                    parent, _, child = mod_name.rpartition(".")
                    setattr(modules[parent], child, make_nf4_linear(lin, module.weight.dtype, device))
                del tensor, got
                continue
            moved = tensor.to(device)
            # safetensors hands out CPU tensors that view the shard's mmap. Kept as a weight (CPU, same dtype), one
            # small norm would keep the whole shard mapped and its read pages resident, and the model would change
            # if the file were rewritten; a copy lets the mapping go when the shard is closed.
            tensor = moved.clone() if moved.data_ptr() == tensor.data_ptr() else moved
            del moved
            if is_param:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
            del tensor
    finally:
        reader.close()
    if tied is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    for module in model.modules():  # buffers built for real on the CPU (RoPE tables, scales) follow the weights
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[bname] = b.to(device)
    leftovers = [n for n, p in model.named_parameters() if p.is_meta]
    if leftovers:
        raise ModelLoadError(f"loading {folder} left parameters unset: {leftovers[:3]}.")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def finish_like_from_pretrained(model: nn.Module, folder: Path) -> nn.Module:
    """What from_pretrained also sets: the source folder and the saved generation settings (their eos ids include
    Gemma 4's end-of-turn token, without which chat generation would not stop)."""
    import transformers  # noqa: PLC0415

    model.config.name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
    return model.eval()


def streamable(config: dict) -> bool:
    """Whether the streaming reader handles this checkpoint; anything unusual goes through from_pretrained.

    Pre-quantized checkpoints (a ``quantization_config``) need transformers' quantizer integration.
    """
    return "quantization_config" not in config and "quantization_config" not in config.get("text_config", {})


def stream_load(cls, folder: Path, shards: list[Path], *, dtype: torch.dtype, device, attn_implementation,
                quantize_family=None, offload_ple: bool = False) -> nn.Module | None:
    """``cls`` loaded from ``folder`` by streaming; None when the checkpoint's keys are not the model's own names
    (an unusual layout: the caller falls back to from_pretrained, which knows every renaming)."""
    import transformers  # noqa: PLC0415

    from slimtune.adapt.quantize import nf4_module_names  # noqa: PLC0415

    config = transformers.AutoConfig.from_pretrained(str(folder))
    model = build_empty(cls, config, dtype, attn_implementation)
    if missing_keys(model, key_to_shard(folder, shards), lambda n: n):
        return None
    quantize = set(nf4_module_names(model, quantize_family)) if quantize_family is not None else set()
    stream_weights(model, folder, shards, device=device, quantize=quantize, offload_ple=offload_ple)
    return finish_like_from_pretrained(model, folder)
