"""Tiny random models and tokenizers for tests, smoke runs and benchmarks (no network).

A character-level tokenizer with a ChatML-style chat template and a 2-layer Llama are enough to
exercise every code path (chat templates, padding, EOS handling, LoRA) in seconds on a CPU.
"""

from __future__ import annotations

import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]


def make_tiny_tokenizer(chat_template: bool = True):
    """Character-level fast tokenizer; pad != eos so padding bugs cannot hide."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def save_tiny_model(path: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random causal LM + tokenizer as a Hugging Face folder."""
    path = Path(path)
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, hidden=hidden, layers=layers, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
