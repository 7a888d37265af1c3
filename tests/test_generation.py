"""The fast sampling paths against transformers' own: the apactl decode loop must draw the very
tokens ``model.generate`` draws for the same seed, and weight-major matmuls must give the same
logits as ``F.linear``."""

from __future__ import annotations

import pytest
import torch

from apactl.data import left_pad
from apactl.sampling import SamplingSpec, sample
from apactl.sampling.backends import hf_generate
from apactl.sampling.loop import decode_loop, weight_major_linears
from apactl.testing import make_tiny_llama, make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, layers=2, seed=0).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": text}],
                                       add_generation_prompt=True, tokenize=True)
               for text in ("hi", "tell me a story", "abc", "why is the sky blue?")]
    prompts = [p["input_ids"] if hasattr(p, "keys") else p for p in prompts]
    q, m = left_pad(prompts, tok.pad_token_id)
    return model, tok, q, m


@pytest.mark.parametrize("settings", [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 20},
    {"temperature": 1.3, "top_p": 0.9},
    {"temperature": 1.0, "batch_size": 3},
])
def test_decode_loop_draws_what_generate_draws(tiny, settings, monkeypatch):
    import apactl.sampling.backends as backends

    model, tok, q, m = tiny
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("a")]  # 'a' ends some rows early
    batch = settings.pop("batch_size", None)
    spec = SamplingSpec(max_new_tokens=24, **settings)
    out = {}
    # The CPU default wraps decode_loop in weight-major matmuls (the same logits up to float
    # summation order, covered below); the token-exact comparison is of the loop itself.
    monkeypatch.setattr(backends, "cpu_loop", decode_loop)
    for backend in ("auto", "transformers"):
        torch.manual_seed(123)
        out[backend] = sample(model, q, m, spec, eos, tok.pad_token_id, backend, batch)
    assert torch.equal(out["auto"][0], out["transformers"][0])
    assert torch.equal(out["auto"][1], out["transformers"][1])
    lengths = out["auto"][1].sum(1)
    assert lengths.min() < lengths.max() or lengths.max() == 24  # ragged: EOS handling exercised


def test_weight_major_linears_same_logits_and_restored(tiny):
    model, tok, q, m = tiny
    with torch.no_grad():
        plain = model(input_ids=q, attention_mask=m).logits
        with weight_major_linears(model):
            assert "forward" in model.lm_head.__dict__
            fast = model(input_ids=q, attention_mask=m).logits
    assert "forward" not in model.lm_head.__dict__
    assert torch.allclose(plain, fast, atol=1e-5)
    lin = torch.nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    with weight_major_linears(lin):
        assert torch.allclose(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias),
                              atol=1e-6)


def test_loop_and_generate_functions_agree_directly(tiny):
    model, tok, q, m = tiny
    spec, eos = SamplingSpec(max_new_tokens=12, temperature=0.9), [tok.eos_token_id]
    torch.manual_seed(7)
    a = decode_loop(model, q, m, spec, eos, tok.pad_token_id)
    torch.manual_seed(7)
    b = hf_generate(model, q, m, spec, eos, tok.pad_token_id)
    assert torch.equal(a, b[:, :a.shape[1]]) and (b[:, a.shape[1]:] == tok.pad_token_id).all()
