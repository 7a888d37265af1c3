"""The CUDA decode never crashes: what the static-cache/graph path cannot run falls back to the
plain loop with one warning, decided by a pure function of the model's config; every align
iteration says which path ran (``gen/cuda_graph``)."""

from __future__ import annotations

import warnings

import pytest
import torch

import apactl.sampling.static as ds
from apactl.data import left_pad
from apactl.sampling import SamplingSpec
from apactl.sampling.cuda import cuda_decode, static_decode_support
from apactl.sampling.loop import decode_loop
from apactl.testing import make_tiny_tokenizer

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**SMALL, **kw)


def _configs():
    from transformers import Gemma2Config, MistralConfig

    return {
        "llama": (_llama(), True, ""),
        "mistral_sliding": (MistralConfig(**SMALL, sliding_window=8), False, "sliding_window"),
        "mistral_no_window": (MistralConfig(**SMALL, sliding_window=None), True, ""),
        "gemma2_layer_types": (Gemma2Config(**SMALL, head_dim=8, sliding_window=8), False,
                               "sliding_attention"),
        "layer_types_chunked": (_llama(layer_types=["full_attention", "chunked_attention"]),
                                False, "chunked_attention"),
        "flash": (_llama(attn_implementation="flash_attention_2"), False, "flash_attention_2"),
        "flex": (_llama(attn_implementation="flex_attention"), False, "flex_attention"),
        "rope_dynamic": (_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), False,
                         "dynamic"),
        "rope_longrope": (_llama(rope_scaling={"rope_type": "longrope", "factor": 2.0,
                                               "short_factor": [1.0] * 4,
                                               "long_factor": [1.0] * 4,
                                               "original_max_position_embeddings": 128}),
                          False, "longrope"),
        "rope_llama3": (_llama(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 128}), True, ""),
        "eager": (_llama(attn_implementation="eager"), True, ""),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_static_decode_support_per_config(name):
    config, ok, why = _configs()[name]
    got_ok, got_why = static_decode_support(config)
    assert got_ok is ok, got_why
    assert why in got_why  # the reason names what rules the static path out


@pytest.fixture
def sliding_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = MistralConfig(**{**SMALL, "vocab_size": len(tok)}, sliding_window=8,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = MistralForCausalLM(cfg).eval()
    q, m = left_pad([tok(t)["input_ids"] for t in ("hi", "tell me a story", "x")],
                    tok.pad_token_id)
    return model, tok, q, m


def test_unsupported_model_falls_back_to_the_plain_loop_with_one_warning(sliding_mistral):
    """Before: ``_new_state`` raised ValueError for the sliding-window layers (outside the
    capture's try), so align/eval/label crashed on CUDA for Mistral-like models."""
    model, tok, q, m = sliding_mistral
    spec, eos = SamplingSpec(max_new_tokens=12), [tok.eos_token_id]
    torch.manual_seed(3)
    with torch.no_grad():
        ref = decode_loop(model, q, m, spec, eos, tok.pad_token_id)
    ds.reset_fallback()
    torch.manual_seed(3)
    with pytest.warns(RuntimeWarning, match="sliding_window"):
        out = cuda_decode(model, q, m, spec, eos, tok.pad_token_id)
    assert torch.equal(out, ref) and not ds.LAST_RUN_GRAPH
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process, not one per call
        cuda_decode(model, q, m, spec, eos, tok.pad_token_id)
    ds.reset_fallback()


def test_static_path_error_falls_back_with_the_same_draws(monkeypatch):
    """Any error of the static path (here: building its state) restores the RNG and decodes with
    the plain loop: the tokens are the plain loop's for the same seed."""
    from apactl.testing import make_tiny_llama

    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, seed=0).eval()
    q, m = left_pad([tok(t)["input_ids"] for t in ("hi", "abc")], tok.pad_token_id)
    spec, eos = SamplingSpec(max_new_tokens=8), [tok.eos_token_id]
    torch.manual_seed(5)
    with torch.no_grad():
        ref = decode_loop(model, q, m, spec, eos, tok.pad_token_id)

    def broken_prefill(*args, **kw):
        torch.rand(3)  # it consumed random numbers before failing
        raise RuntimeError("CUDA error: operation not permitted")

    monkeypatch.setattr(ds, "_prefill", broken_prefill)
    ds.reset_fallback()
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="static decode failed: RuntimeError"):
        out = cuda_decode(model, q, m, spec, eos, tok.pad_token_id)
    assert torch.equal(out, ref)
    ds.reset_fallback()


def test_every_align_iteration_records_the_decode_path(tmp_path):
    """``gen/cuda_graph`` in every iteration's metrics: 0 on the CPU (the plain CPU loop)."""
    from helpers import tiny_recipe

    from apactl.metrics import read_metrics
    from apactl.workflows.align import run_align

    run_align(tiny_recipe("align", tmp_path, "train.iterations=2"))
    rows = read_metrics(tmp_path)
    assert [r["gen/cuda_graph"] for r in rows] == [0.0, 0.0]


# ------------------------------------------------------------------------------ real CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sliding_window_model_decodes_and_llama_uses_a_graph(sliding_mistral):
    from apactl.sampling import sample, used_cuda_graph
    from apactl.testing import make_tiny_llama

    model, tok, q, m = sliding_mistral
    spec, eos = SamplingSpec(max_new_tokens=12), [tok.eos_token_id]
    ds.reset_fallback()
    with pytest.warns(RuntimeWarning, match="sliding"):
        resp, _ = sample(model.cuda(), q.cuda(), m.cuda(), spec, eos, tok.pad_token_id)
    assert resp.shape[0] == 3 and not used_cuda_graph()
    llama = make_tiny_llama(tok, seed=0).eval().cuda()
    sample(llama, q.cuda(), m.cuda(), spec, eos, tok.pad_token_id)
    assert used_cuda_graph(), ds.GRAPH_FALLBACK_REASON
    ds.reset_fallback()
