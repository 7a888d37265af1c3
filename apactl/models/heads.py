"""Where things sit inside a transformers model, and the scalar head of classifiers.

``sequence_scores`` / ``token_values`` read the scalar head of a sequence classifier using the
attention mask, never the pad token id: SmolLM2's pad token *is* its eos token, so transformers'
own "last token that is not pad" pooling picks the wrong token for any sequence that ends with
eos (which is every finished response).
"""

from __future__ import annotations

import torch

from apactl.errors import ModelError

LAYER_PATHS = ("layers", "h", "decoder.layers", "encoder.layer", "blocks")


def unwrap(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The decoder stack (``model.model`` for Llama-style models)."""
    inner = unwrap(model)
    found = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if found is None:
        raise ModelError(f"{type(inner).__name__}: cannot find the backbone (base_model_prefix)")
    return found


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of decoder layers (``model.model.layers`` for Llama-style models)."""
    inner = unwrap(model)
    roots = [getattr(inner, getattr(inner, "base_model_prefix", ""), None), inner]
    for root in (r for r in roots if r is not None):
        for dotted in LAYER_PATHS:
            obj = root
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.ModuleList):
                return obj
    raise ModelError(
        f"{type(unwrap(model)).__name__}: cannot find the decoder layer list "
        f"(looked for {', '.join(LAYER_PATHS)})"
    )


def score_head(model) -> torch.nn.Module:
    """The scalar ``score`` head of a sequence classifier (reward model or critic)."""
    head = getattr(unwrap(model), "score", None)
    if head is None:
        raise ModelError(
            f"{type(unwrap(model)).__name__}: no `score` head; load the model with "
            "load_sequence_classifier"
        )
    return head


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] positions counting attended tokens only: left-padded rows get the positions of
    unpadded ones; on right-padded rows this equals the default 0..L-1."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] last hidden states of the backbone."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids(attention_mask), use_cache=False)
    return out.last_hidden_state


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last attended token (0 for an all-padding row)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] float32 score at the last attended token of input_ids [B, L] / attention_mask [B, L].

    The index comes from the attention mask, not from ``config.pad_token_id``, so a sequence
    ending with eos is scored at that eos even when pad == eos (SmolLM2). ``model(...).logits``
    of a plain transformers classifier disagrees exactly in that case; use this function.
    """
    hidden = hidden_states(model, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
    return score_head(model)(last).squeeze(-1).float()


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] float32 score head at every position (critic values V(s_t)); pads are garbage."""
    hidden = hidden_states(model, input_ids, attention_mask)
    return score_head(model)(hidden).squeeze(-1).float()
