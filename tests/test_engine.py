"""The optimised forwards (split trunk, shared bottom, cached trunk, LM head on response positions
only) against the straightforward ones (plain ``model(...)`` on every position), on random
inputs and tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from apactl.accel.engine import TrunkForwards
from apactl.accel.trunk import Split, share_bottom
from apactl.models import freeze_bottom_layers
from apactl.rl.forward import build_sequences, critic_forward, fit_width, policy_forward
from apactl.sampling import SamplingSpec
from apactl.testing import make_tiny_llama, make_tiny_tokenizer

TEMP = SamplingSpec(temperature=0.7)


def _value_model(causal, seed=1):
    """A Llama sequence classifier whose backbone is ``causal``'s (as critic.init=policy)."""
    from transformers import LlamaForSequenceClassification

    cfg = copy.deepcopy(causal.config)
    cfg.num_labels = 1
    torch.manual_seed(seed)
    critic = LlamaForSequenceClassification(cfg)
    critic.model.load_state_dict(causal.model.state_dict())
    return critic


def _batch(vocab, seed=0, b=5, p=7, t=6):
    """Random left-padded prompts and right-padded responses with ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(5, vocab, (b, p), generator=g)
    plen = torch.randint(2, p + 1, (b,), generator=g)
    qm = (torch.arange(p).unsqueeze(0) >= (p - plen).unsqueeze(1)).long()
    r = torch.randint(5, vocab, (b, t), generator=g)
    rlen = torch.randint(1, t + 1, (b,), generator=g)
    rm = (torch.arange(t).unsqueeze(0) < rlen.unsqueeze(1)).float()
    q = torch.where(qm.bool(), q, 0)
    r = torch.where(rm.bool(), r, 0)
    return build_sequences(q, qm, r, rm, pad_id=0), r, rm


@pytest.fixture(scope="module")
def models():
    tok = make_tiny_tokenizer()
    policy = make_tiny_llama(tok, layers=4, seed=0)
    freeze_bottom_layers(policy, 2)
    ref = make_tiny_llama(tok, layers=4, seed=0).requires_grad_(False).eval()
    critic = _value_model(policy)
    freeze_bottom_layers(critic, 2)
    return policy.eval(), ref, critic, len(tok)


def test_split_equals_plain_forward(models):
    policy, _, _, vocab = models
    seq, _, _ = _batch(vocab)
    split = Split(policy, 2)
    two = split.top(split.trunk(seq.input_ids, seq.attention_mask), seq.attention_mask)
    one = policy.model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).last_hidden_state
    keep = seq.attention_mask.bool()
    assert torch.allclose(two[keep], one[keep], atol=1e-5)
    assert len(policy.model.layers) == 4  # the swap is undone


def test_share_bottom_shares_modules_and_keeps_outputs(models):
    policy, ref, critic, vocab = models
    ref, critic = copy.deepcopy(ref), copy.deepcopy(critic)
    seq, resp, _ = _batch(vocab, seed=1)
    before_ref = policy_forward(ref, seq, resp, TEMP)[0]
    before_v = critic_forward(critic, seq)
    assert share_bottom(policy, ref, 2) and share_bottom(policy, critic, 2)
    assert ref.model.layers[1] is policy.model.layers[1]
    assert ref.model.embed_tokens is policy.model.embed_tokens
    assert ref.lm_head.weight is policy.model.embed_tokens.weight  # re-tied
    assert ref.model.layers[2] is not policy.model.layers[2]
    assert torch.equal(policy_forward(ref, seq, resp, TEMP)[0], before_ref)
    assert torch.equal(critic_forward(critic, seq), before_v)


def test_share_bottom_refuses_different_or_trainable_weights(models):
    policy, _, critic, _ = models
    tok = make_tiny_tokenizer()
    other = make_tiny_llama(tok, layers=4, seed=3).requires_grad_(False)
    assert not share_bottom(policy, other, 2)  # different weights
    trainable = make_tiny_llama(tok, layers=4, seed=0)  # equal weights, bottom not frozen
    assert not share_bottom(policy, trainable, 2)


@pytest.mark.parametrize("k", [0, 2])
def test_engine_score_matches_plain(models, k):
    policy, ref, critic, vocab = models
    ref, critic = copy.deepcopy(ref), copy.deepcopy(critic)
    if k:
        share_bottom(policy, ref, k)
        share_bottom(policy, critic, k)
    eng = TrunkForwards(policy, ref, critic, k=k, warn=pytest.fail)
    seq, resp, mask = _batch(vocab, seed=2)
    eng.check(seq, resp, TEMP)
    out = eng.rollout(seq, resp, TEMP)
    old, ent = policy_forward(policy, seq, resp, TEMP, with_entropy=True)
    m = mask.bool()
    assert torch.allclose(out["old_logprobs"][m], old[m], atol=1e-5)
    assert torch.allclose(out["entropy"][m], ent[m], atol=1e-5)
    assert torch.allclose(out["ref_logprobs"][m], policy_forward(ref, seq, resp, TEMP)[0][m],
                          atol=1e-5)
    assert torch.allclose(out["values"][m], critic_forward(critic, seq)[m], atol=1e-5)
    assert ("keep/policy" in out) == (k > 0)
    assert all(r.split is not None for r in (eng.p, eng.r, eng.c))


def test_update_from_cached_trunk_matches_plain_loss_and_grads(models):
    """Same loss and the same gradients on every trainable parameter, cached or not."""
    policy, _, critic, vocab = models
    policy, critic = copy.deepcopy(policy), copy.deepcopy(critic)
    eng = TrunkForwards(policy, copy.deepcopy(policy).requires_grad_(False), critic, k=2,
                        warn=pytest.fail)
    seq, resp, mask = _batch(vocab, seed=4)
    cached = eng.rollout(seq, resp, TEMP)
    # Kept rows wider than the batch (extra pad columns), in another order: found by episode.
    order = torch.tensor([4, 3, 2, 1, 0])
    eng.remember({k: fit_width(v, seq.input_ids.shape[1] + 3)[order]
                  for k, v in cached.items() if k.startswith("keep/")})
    episode = torch.argsort(order)

    def grads(fast: bool):
        policy.zero_grad()
        critic.zero_grad()
        logp = (eng.policy_logprobs(seq, resp, TEMP, episode) if fast
                else policy_forward(policy, seq, resp, TEMP)[0])
        v = eng.values(seq, episode) if fast else critic_forward(critic, seq)
        loss = ((logp * mask).sum() + (v * mask).pow(2).sum()) / mask.sum()
        loss.backward()
        named = list(policy.named_parameters()) + list(critic.named_parameters())
        return loss.detach(), {n: p.grad.clone() for n, p in named if p.requires_grad}

    (l_fast, g_fast), (l_slow, g_slow) = grads(True), grads(False)
    assert torch.allclose(l_fast, l_slow, atol=1e-5)
    assert g_fast.keys() == g_slow.keys() and len(g_fast) > 0
    for name in g_fast:
        assert torch.allclose(g_fast[name], g_slow[name], atol=1e-5, rtol=1e-4), name


def test_engine_falls_back_when_split_disagrees(models, monkeypatch):
    policy, ref, critic, vocab = models
    eng = TrunkForwards(policy, ref, critic, k=2, warn=lambda m: warned.append(m))
    warned: list[str] = []
    monkeypatch.setattr(Split, "top", lambda self, h, m: torch.zeros(*h.shape))  # a wrong split
    seq, resp, mask = _batch(vocab, seed=5)
    eng.check(seq, resp, TEMP)
    out = eng.rollout(seq, resp, TEMP)
    assert len(warned) == 3 and eng.p.split is None and eng.c.split is None
    old = policy_forward(policy, seq, resp, TEMP)[0]
    assert torch.allclose(out["old_logprobs"][mask.bool()], old[mask.bool()], atol=1e-6)
    assert "keep/policy" not in out


def test_verification_ignores_padding_positions(models, monkeypatch):
    """Padding positions hold arbitrary values (the plain forward even numbers them
    differently): a difference there must not make the engine give up the split."""
    import apactl.accel.engine as engine_mod

    policy, ref, critic, vocab = models
    real = engine_mod.policy_forward

    def noisy_at_padding(model, seq, resp, temp, with_entropy=False):
        logp, ent = real(model, seq, resp, temp, with_entropy=with_entropy)
        pad = ~seq.attention_mask.gather(1, seq.positions).bool()
        return logp + 100.0 * pad, ent

    monkeypatch.setattr(engine_mod, "policy_forward", noisy_at_padding)
    eng = TrunkForwards(policy, ref, critic, k=2, warn=pytest.fail)
    seq, resp, mask = _batch(vocab, seed=6)
    assert (mask == 0).any()  # ragged responses: there is padding to ignore
    eng.check(seq, resp, TEMP)
    assert eng.p.split is not None and eng.r.split is not None
