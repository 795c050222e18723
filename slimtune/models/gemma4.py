"""Gemma 4 (E2B, E4B, 26B-A4B, 31B): the family description slimtune's loader and LoRA injection use."""

from slimtune.models.registry import ModelFamily, register_family

GEMMA4 = register_family(
    ModelFamily(
        name="gemma4",
        model_types=("gemma4", "gemma4_text"),
        causal_class="Gemma4ForCausalLM",
        multimodal_class="Gemma4ForConditionalGeneration",
        # Gemma4ForConditionalGeneration nests the decoder under model.language_model; Gemma4ForCausalLM under model.
        language_prefixes=("model.language_model.layers.", "model.layers."),
        tower_prefixes={"vision": "model.vision_tower.", "audio": "model.audio_tower."},
        # Text and vision attention use q/k/v/o; the audio conformer's output projection is `post` and its
        # relative-position projection `relative_k_proj` is a plain Linear on a sinusoid table.
        attention_modules=("q_proj", "k_proj", "v_proj", "o_proj", "post", "relative_k_proj"),
        # Text/vision GeGLU MLP; audio feed-forward blocks and the light-conv block's pointwise linears.
        mlp_modules=("gate_proj", "up_proj", "down_proj", "ffw_layer_1", "ffw_layer_2", "linear_start", "linear_end"),
        wrapper_classes=("Gemma4ClippableLinear",),
        # Gemma4MultimodalEmbedder: RMSNorm (no weight) then `embedding_projection`, tower width -> text width.
        embedder_prefixes=("model.embed_vision.", "model.embed_audio."),
    )
)
