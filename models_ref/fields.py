"""Every config field the project meets, and what it does with it: one table.

A field that changes a model's maths is either implemented (read into ModelConfig) or
refused with one line naming it, unless it holds the value that turns its feature off;
it is never read and then ignored. Fields that cannot change inference maths (token
ids, generation defaults, training-only settings, bookkeeping) are listed as neutral.
A field the table does not know is refused: an unknown field may be new maths.

    IMPLEMENTED  read by models_ref/config.py
    NEUTRAL      cannot change the logits (why, in the note)
    OFF_ONLY     accepted only at the listed "off" values; anything else is refused
"""
from __future__ import annotations

from dataclasses import dataclass

IMPLEMENTED, NEUTRAL, OFF_ONLY = "implemented", "neutral", "off_only"


@dataclass(frozen=True)
class Field:
    status: str
    note: str = ""
    off: tuple = ()  # OFF_ONLY: values that mean the feature is not used


def _same(status: str, names: str, note: str = "") -> dict[str, Field]:
    return {name: Field(status, note) for name in names.split()}


# Hugging Face config.json (and Llama 3.2 Vision's text_config).
HF_FIELDS: dict[str, Field] = {
    **_same(IMPLEMENTED, "hidden_size num_attention_heads num_key_value_heads head_dim intermediate_size "
            "vocab_size num_hidden_layers rms_norm_eps rope_theta rope_scaling rope_parameters "
            "max_position_embeddings tie_word_embeddings sliding_window use_sliding_window "
            "max_window_layers layer_types cross_attention_layers text_config architectures model_type "
            "hidden_act"),
    "attention_bias": Field(OFF_ONLY, "bias on q, k, v and o projections (Qwen2 has q/k/v biases by "
                                      "architecture, not by this field)", (False, None)),
    "mlp_bias": Field(OFF_ONLY, "bias on the MLP projections", (False, None)),
    "attn_logit_softcapping": Field(OFF_ONLY, "tanh soft-capping of attention scores", (None,)),
    "final_logit_softcapping": Field(OFF_ONLY, "tanh soft-capping of the logits", (None,)),
    "partial_rotary_factor": Field(OFF_ONLY, "RoPE on part of each head", (None, 1, 1.0)),
    "use_mrope": Field(OFF_ONLY, "multimodal RoPE sections", (False, None)),
    "quantization_config": Field(OFF_ONLY, "a quantised checkpoint (dequantise it first)", (None,)),
    "residual_dropout": Field(NEUTRAL, "training only"),
    **_same(NEUTRAL, "attention_dropout dropout embedding_dropout hidden_dropout", "training only"),
    "pretraining_tp": Field(NEUTRAL, "splits matmuls into slices that sum to the same product"),
    **_same(NEUTRAL, "bos_token_id eos_token_id pad_token_id unk_token_id sep_token_id "
            "decoder_start_token_id forced_bos_token_id forced_eos_token_id image_token_index",
            "token ids: the tokenizer and generation config say how they are used"),
    **_same(NEUTRAL, "temperature top_k top_p typical_p do_sample num_beams num_beam_groups "
            "num_return_sequences max_length min_length length_penalty repetition_penalty "
            "no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids diversity_penalty "
            "early_stopping exponential_decay_length_penalty suppress_tokens begin_suppress_tokens "
            "remove_invalid_values output_scores return_dict_in_generate",
            "generation defaults: the runtime's sampling options decide"),
    **_same(NEUTRAL, "_name_or_path transformers_version torch_dtype dtype use_cache initializer_range "
            "output_attentions output_hidden_states return_dict torchscript use_bfloat16 "
            "tf_legacy_loss chunk_size_feed_forward is_decoder is_encoder_decoder add_cross_attention "
            "cross_attention_hidden_size tie_encoder_decoder pruned_heads problem_type id2label "
            "label2id finetuning_task task_specific_params prefix tokenizer_class "
            "_attn_implementation_autoset",
            "bookkeeping, storage dtype or training/framework settings"),
}

# Meta params.json.
META_FIELDS: dict[str, Field] = {
    **_same(IMPLEMENTED, "dim n_layers n_heads n_kv_heads head_dim vocab_size multiple_of "
            "ffn_dim_multiplier norm_eps rope_theta use_scaled_rope max_seq_len rope_scaling_factor "
            "tie_word_embeddings vision_num_cross_attention_layers"),
    **_same(NEUTRAL, "max_batch_size", "a limit of Meta's reference code, not of the model"),
    **_same(NEUTRAL, "vision_chunk_size vision_max_num_chunks",
            "the vision encoder's input geometry (text program: unused)"),
}


class FieldRefused(ValueError):
    pass


def check_fields(data: dict, table: dict[str, Field], where: str) -> None:
    """Raise FieldRefused (one line) for the first field `data` holds that the table does
    not know, or that is OFF_ONLY and set to something other than off."""
    for key, value in data.items():
        field = table.get(key)
        if field is None:
            raise FieldRefused(f"{where}: field '{key}' is not known to ttcompile and may change the "
                               "model's maths, so the model is refused (known fields: models_ref/fields.py)")
        if field.status == OFF_ONLY and value not in field.off:
            raise FieldRefused(f"{where}: field '{key}' = {value!r} is not supported ({field.note})")
