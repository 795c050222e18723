"""Analytic peak GPU memory (torch.cuda.max_memory_allocated) of one LoRA/QLoRA training step on Gemma 4.

Every term counts real tensors, sized from the model's own widths (slimtune.memory.model_shape), for N = seq_len ×
batch_size tokens and A = 2 bytes per 16-bit activation:

static      NF4 linears and MoE expert tensors (26B-A4B: 22.8 B of its 25 B parameters; slimtune.adapt.experts_nf4)
            0.516 B/param (4-bit codes + double-quantized absmax, blocksize 64) or A B/param; other
            frozen weights A B/param; the PLE table only when it is not offloaded to the host; LoRA weights fp32
            (4 B), their gradients fp32 (4 B, backward and optimizer step only: zero_grad(set_to_none)), optimizer
            state 8 B/param (AdamW: two fp32 moments) or 2 B/param (8-bit AdamW).
boundary    what lives from the forward until the backward: with gradient checkpointing one residual-stream
            tensor per layer (N·H·A; activation offload keeps only the layers in flight on the GPU), the per-layer
            inputs (N·L·P·A, one tensor the layers slice), and with SDPA the boolean sliding-window mask (B·T²).
            Without checkpointing: every layer's saved activations.
layer       the working set of one layer's recompute + backward, maximised over layers: the tensors its autograd
            graph saves (fp32 copies inside each RMSNorm, projection inputs, q/k/v/output of attention, the four
            N×I MLP intermediates, the PLE gate) plus the gradients in flight at the MLP's backward (3·N·I·A).
            Tiled MLP (mlp_chunk_size) keeps only one chunk of MLP intermediates. SDPA sliding layers add the bf16
            copy of the mask the kernel takes (2·B·T²).
experts     QLoRA MoE layers on CUDA run their experts as grouped GEMMs (slimtune.adapt.experts_grouped), which
            dequantize one whole fused expert tensor at a time, in forward and in backward: the larger one, gate_up
            (E·2I·H·A; 26B-A4B: 0.95 GiB), plus the fp32 absmax of its 64-blocks twice while it is built
            (E·2I·H/8 bytes). Counted once, in the backward phase (layers run one at a time).
loss        the chunked lm_head + cross-entropy: one chunk of fp32 logits and its 16-bit gradient (c·V·(4+A)), the
            final norm's fp32 input, the kept-row copy of the hidden states and their gradient; plus autocast's
            16-bit copies of the LoRA weights.

Peak = static + max(loss phase, backward phase). Two documented calibration constants (below) cover what is not
a model tensor; they were fitted to the H200 measurements in benchmarks/results_gpu*.jsonl, and
tests/memory/test_calibration.py checks every measured configuration stays within 10%.
"""

from __future__ import annotations

from slimtune.adapt.rms_norm import CHUNK_ELEMENTS as NORM_CHUNK_ELEMENTS
from slimtune.kernels.flash_attention_stored_bwd import backward_bytes as stored_backward_bytes
from slimtune.memory.model_shape import LayerShape, ModelShape, read_model_shape

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes + uint8 absmax per 64 + fp32 absmax-of-absmax per 256
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}
ATTENTION_KINDS = ("slimtune", "sdpa", "eager")

# --- calibration constants (refit with benchmarks/gpu/planner_calibration.sh) -----------------------------------
FIXED_OVERHEAD_BYTES = 0.12 * GIB
"""Memory that is no model tensor: cuBLAS/cuBLASLt workspaces, the CE kernel's row buffers, allocator rounding."""
LAYER_WORKING_SET_SCALE = 1.0
"""Multiplier on the counted per-layer working set (autograd's extra temporaries inside fused ops)."""
CUDA_GRAPH_FIXED_BYTES = 0.033 * GIB
CUDA_GRAPH_HIDDEN_COPIES = 15
"""cuda_graphs: a captured step allocates from its own memory pool, where blocks freed during capture are reused
less than in eager mode. Measured on the H200 (E2B, QLoRA and LoRA 16-bit, 2K and 8K, session 3): +0.121 GiB at
2K and +0.385 GiB at 8K over the eager peak in the same call, i.e. 33 MiB plus ~15 hidden-state copies
(n · hidden · 2 bytes). With compiled decoder layers those copies are gone: graphs + compile vs graphs alone at
8K measured E2B 4.93 vs 5.30 GiB (-0.38; 15 copies: 0.35) and E4B 7.47 vs 8.06 GiB (-0.60; 15 copies: 0.59, session
6), and at 2K E2B 3.21 both ways (the copies, 0.09, sit inside the estimate's 10 %). Inductor's fused layers leave
far fewer eager temporaries for the private pool to keep apart. Compiled layers without graphs change nothing here
(session 2: 5.20 GiB at 8K, estimate 5.08)."""
# ------------------------------------------------------------------------------------------------------------------

IN_FLIGHT_LAYERS = 2
"""Layer inputs activation offload keeps on the GPU: the one being computed and the one being copied."""


def default_loss_chunk(vocab: int) -> int:
    """Rows per loss chunk when none is set: the CUDA default of linear_cross_entropy (512 at V = 262,144)."""
    from slimtune.kernels.linear_cross_entropy import default_chunk_size  # noqa: PLC0415

    return default_chunk_size(vocab, "cuda")


def estimate_training_memory(model: str, *, seq_len: int, batch_size: int = 1, load_in_4bit: bool = True,
                             lora_r: int = 16, gradient_checkpointing: bool = True, offload_ple: bool = True,
                             attention: str = "slimtune", activation_offload: bool = False, mlp_chunk_size: int = 0,
                             loss_chunk_size: int = 0, optimizer: str = "adamw", multimodal: bool = False,
                             activation_bytes: int = 2, cuda_graphs: bool = False,
                             recompute_norms: bool = True, finetune_experts: bool = False,
                             compile_layers: bool = False, checkpoint_layers: int | None = None) -> dict:
    """Estimated peak GPU memory of LoRA/QLoRA training.

    Args:
        model: a local model folder, or a geometry name (e2b, e4b, 26b-a4b, 31b).
        seq_len / batch_size: one micro-batch of batch_size sequences of seq_len tokens.
        attention: slimtune (O(T) kernel; training's default on CUDA) | sdpa (bench default) | eager.
        mlp_chunk_size: tokens per tiled-MLP chunk (0 = off). loss_chunk_size: rows per loss chunk (0 = default).
        optimizer: adamw | adamw8bit. finetune_experts: MoE models: LoRA on the fused expert tensors too.
        compile_layers: decoder layers under torch.compile (with cuda_graphs: a smaller graph pool, see
            CUDA_GRAPH_HIDDEN_COPIES).
        checkpoint_layers: with gradient_checkpointing, how many decoder layers recompute (the first N; None = all);
            the others keep their saved activations.

    Returns:
        {"total_gib": float, "breakdown": {term: GiB}, "phase": "loss" | "backward"}; the breakdown's terms add
        up to the total (the phase that is not the peak contributes nothing).
    """
    check_settings(seq_len=seq_len, batch_size=batch_size, lora_r=lora_r, attention=attention, optimizer=optimizer,
           mlp_chunk_size=mlp_chunk_size, loss_chunk_size=loss_chunk_size)
    shape = read_model_shape(str(model), multimodal, finetune_experts=finetune_experts)
    terms = training_terms(shape, seq_len=seq_len, batch_size=batch_size, load_in_4bit=load_in_4bit, lora_r=lora_r,
                           gradient_checkpointing=gradient_checkpointing, offload_ple=offload_ple,
                           attention=attention, activation_offload=activation_offload,
                           mlp_chunk_size=mlp_chunk_size, loss_chunk_size=loss_chunk_size, optimizer=optimizer,
                           activation_bytes=activation_bytes, cuda_graphs=cuda_graphs,
                           recompute_norms=recompute_norms, compile_layers=compile_layers,
                           checkpoint_layers=checkpoint_layers)
    return {"total_gib": round(sum(terms["breakdown"].values()) / GIB, 3),
            "breakdown": {k: round(v / GIB, 3) for k, v in terms["breakdown"].items()}, "phase": terms["phase"]}


def check_settings(*, seq_len, batch_size, lora_r, attention, optimizer, mlp_chunk_size, loss_chunk_size) -> None:
    problems = []
    for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("lora_r", lora_r, 1),
                             ("mlp_chunk_size", mlp_chunk_size, 0), ("loss_chunk_size", loss_chunk_size, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append(f"{name} must be an integer >= {low} (got {value!r})")
    if attention not in ATTENTION_KINDS:
        problems.append(f"attention must be one of {ATTENTION_KINDS} (got {attention!r})")
    if optimizer not in OPTIMIZER_BYTES:
        problems.append(f"optimizer must be one of {tuple(OPTIMIZER_BYTES)} (got {optimizer!r})")
    if problems:
        raise ValueError("memory estimate: " + "; ".join(problems))


def training_terms(shape: ModelShape, *, seq_len: int, batch_size: int, load_in_4bit: bool, lora_r: int,
                   gradient_checkpointing: bool, offload_ple: bool, attention: str, activation_offload: bool,
                   mlp_chunk_size: int, loss_chunk_size: int, optimizer: str, activation_bytes: int = 2,
                   cuda_graphs: bool = False, recompute_norms: bool = True, compile_layers: bool = False,
                   checkpoint_layers: int | None = None) -> dict:
    """The estimate's terms in bytes: {"breakdown": {term: bytes}, "phase": which phase is the peak}, and the four
    groups the breakdown is made of (static, boundary, loss_phase, backward_phase: slimtune.memory.distributed_plan
    re-splits them per GPU)."""
    a = activation_bytes
    n = seq_len * batch_size
    h, layers = shape.hidden, shape.layers
    lora_params = sum(lora_r * (i + o) for i, o in shape.lora_in_out)
    weights = shape.quantizable * (NF4_BYTES_PER_PARAM if load_in_4bit else a) + shape.other * a
    static = {
        "weights": weights,
        "ple_table": 0 if offload_ple else shape.ple * a,
        "lora_and_optimizer": lora_params * (4 + OPTIMIZER_BYTES[optimizer]),
        "fixed_overhead": FIXED_OVERHEAD_BYTES,
    }
    if cuda_graphs:
        copies = 0 if compile_layers else CUDA_GRAPH_HIDDEN_COPIES
        static["cuda_graph_pool"] = CUDA_GRAPH_FIXED_BYTES + copies * n * h * a
    # Sliding layers under SDPA get a dense boolean (B, 1, T, T) mask, built once per forward and kept as a
    # checkpoint input; only built when the window actually cuts the sequence.
    dense_mask = batch_size * seq_len * seq_len if attention == "sdpa" and _window_cuts(layers, seq_len) else 0
    ple_inputs = n * sum(lay.ple_dim for lay in layers) * a
    # Checkpointed layers (the first k; all by default, none without checkpointing) keep only their input and
    # rebuild the rest in their backward; the others save everything from the forward and add only transients.
    k = 0 if not gradient_checkpointing else len(layers) if checkpoint_layers is None else min(checkpoint_layers,
                                                                                                len(layers))
    ckpt, plain = layers[:k], layers[k:]

    def layer_bytes(lay, saved: bool, transient: bool) -> float:
        return _layer_bytes(lay, h, n, batch_size, seq_len, lora_r, a, attention, mlp_chunk_size, recompute_norms,
                            saved=saved, transient=transient)

    boundary = {}
    if gradient_checkpointing:
        kept_layers = min(len(ckpt), IN_FLIGHT_LAYERS) if activation_offload else len(ckpt)
        boundary["checkpointed_activations"] = n * h * a * kept_layers
    if plain:
        boundary["saved_activations"] = sum(layer_bytes(lay, True, False) for lay in plain)
    boundary.update(per_layer_inputs=ple_inputs, attention_mask=dense_mask)
    working = max([layer_bytes(lay, True, True) for lay in ckpt] + [layer_bytes(lay, False, True) for lay in plain])
    chunk = min(loss_chunk_size or default_loss_chunk(shape.vocab), n)
    loss_phase = {
        "loss_chunk": chunk * shape.vocab * (4 + a),  # fp32 logits + 16-bit dz, reused by every chunk
        "loss_hidden": n * h * (4 + a + a + a),  # final norm's fp32 input, its output, kept rows, grad_hidden
        "autocast_lora_copies": lora_params * a,
    }
    backward_phase = {
        "lora_grads": lora_params * 4,
        "layer_working_set": working * LAYER_WORKING_SET_SCALE + n * h * a * 2,  # + gradient flowing between layers
        "nf4_expert_stack": max(lay.moe_stack for lay in layers) * (a + 8 / 64) if load_in_4bit else 0,
    }
    return assemble_terms(static, boundary, loss_phase, backward_phase)


def assemble_terms(static: dict, boundary: dict, loss_phase: dict, backward_phase: dict) -> dict:
    """training_terms' result from its four groups: the peak is static + boundary + the larger phase."""
    phase = "loss" if sum(loss_phase.values()) >= sum(backward_phase.values()) else "backward"
    breakdown = {**static, **boundary, **(loss_phase if phase == "loss" else backward_phase)}
    return {"breakdown": breakdown, "phase": phase, "static": static, "boundary": boundary, "loss_phase": loss_phase,
            "backward_phase": backward_phase}


def _window_cuts(layers: tuple[LayerShape, ...], seq_len: int) -> bool:
    return any(lay.window is not None and seq_len > lay.window for lay in layers)


def _layer_bytes(lay: LayerShape, h: int, n: int, batch: int, seq: int, lora_r: int, a: int, attention: str,
                 mlp_chunk: int, recompute_norms: bool = False, *, saved: bool, transient: bool) -> float:
    """Bytes one decoder layer's autograd graph saves (saved) and adds at its backward (transient)."""
    total = 0.0
    mlp_tokens = min(mlp_chunk, n) if mlp_chunk else n  # tiled MLP: one chunk of intermediates at a time
    inter = lay.inter + lay.moe_inter
    if saved:
        h_norms = 4 + (1 if lay.ple_dim else 0) + (3 if lay.moe_inter else 0)
        norm_bytes = a if recompute_norms else 4  # recompute_norms: the 16-bit input, not its fp32 upcast
        per_token = (
            h_norms * norm_bytes * h  # each RMSNorm saves its input (transformers: upcast to fp32)
            + norm_bytes * (lay.q_dim + 2 * lay.kv_dim)  # q_norm, k_norm, v_norm
            + 2 * a * h  # normed inputs of the attention and MLP projections
            + a * (lay.q_dim + 2 * lay.kv_dim)  # q, k, v after RoPE (saved by attention)
            + 2 * a * lay.q_dim  # attention output, and its contiguous copy feeding o_proj
            + 4 * lay.heads  # logsumexp (fp32)
            + 7 * lora_r * a  # LoRA A outputs
            + (a * (h + 4 * lay.ple_dim) if lay.ple_dim else 0)  # PLE gate input, gate, gelu, product
        )
        total += n * per_token + mlp_tokens * 4 * a * inter  # gate, gelu(gate), up, product
        if attention == "eager":  # scores and probabilities, (B, heads, T, T)
            total += batch * lay.heads * seq * seq * a * 2
    if transient:
        # The MLP's backward (d(product), d(gelu), d(up)) and the attention's (dO, dQ and the gradient of the
        # output's contiguous copy, q-sized) come one after the other: the larger sets the peak. Untiled, the MLP's
        # always wins; tiled at long context the attention's does (E2B 66,560 tokens in chunks of 1,024: 1.5 GiB,
        # the part of the measured 9.91 GiB the plan had missed, H200 session 4).
        attention_bwd = n * 3 * a * lay.q_dim
        if attention == "slimtune" and lay.window is None:  # the stored backward's chunk buffers (full layers)
            head_dim = lay.q_dim // lay.heads
            attention_bwd += stored_backward_bytes(batch, lay.heads, max(lay.kv_dim // head_dim, 1), seq, head_dim)
        total += max(mlp_tokens * 3 * a * inter, attention_bwd)
        if recompute_norms:  # RMSNormFunction's fp32 temporaries (x, x̂, g, their product), one row chunk at a time
            total += 4 * 4 * min(n * lay.q_dim, NORM_CHUNK_ELEMENTS)
        if attention == "sdpa" and lay.window is not None and seq > lay.window:
            total += batch * seq * seq * a  # the kernel's additive 16-bit copy of the boolean mask
    return total
