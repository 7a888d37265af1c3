"""Models: what a reference names (``refs``), GGUF conversion (``gguf``), loading
(``loading``), where things sit inside a model (``heads``) and saving (``saving``).

The names below are the package's public API; import them from ``apactl.models``.
"""

from apactl.errors import ModelError
from apactl.models.gguf import GGUFConversion, convert_gguf, convert_gguf_with_info
from apactl.models.heads import (
    backbone,
    decoder_layers,
    hidden_states,
    last_token_index,
    position_ids,
    score_head,
    sequence_scores,
    token_values,
    unwrap,
)
from apactl.models.loading import (
    check_trained_head,
    freeze_bottom_layers,
    load_causal_lm,
    load_policy,
    load_reference,
    load_sequence_classifier,
    load_tokenizer,
    reference_logits_context,
)
from apactl.models.refs import (
    ALIASES,
    TINY_RANDOM,
    find_smollm2_gguf,
    resolve_model_ref,
    tiny_random_folder,
)
from apactl.models.saving import count_parameters, save_model, write_model

__all__ = [
    "ALIASES", "TINY_RANDOM", "GGUFConversion", "ModelError", "backbone", "check_trained_head",
    "convert_gguf",
    "convert_gguf_with_info", "count_parameters", "decoder_layers", "find_smollm2_gguf",
    "freeze_bottom_layers", "hidden_states", "last_token_index", "load_causal_lm",
    "load_policy", "load_reference", "load_sequence_classifier", "load_tokenizer",
    "position_ids", "reference_logits_context", "resolve_model_ref", "save_model",
    "score_head", "sequence_scores", "tiny_random_folder", "token_values", "unwrap",
    "write_model",
]
