"""Run a decoder in two parts around its frozen bottom: the *trunk* and the *top*.

With ``train.freeze_bottom_layers = k`` the embeddings and the bottom k decoder layers never
change, so their output for a given token sequence is a constant of the rollout. It is computed
once, by whichever model owns those modules, and reused:

* by the reference, whose bottom k layers are the policy's own modules (``share_bottom``: the
  reference is the initial policy and the policy's bottom never trains, so they are equal);
* by the critic too when it was initialised from the policy (the same shared modules);
* by the update: the forward and backward of the policy and the critic then run the top only.

The split is generic over transformers decoders whose backbone is ``embed_tokens -> layers ->
norm`` (Llama, Mistral, Qwen2, Phi-3, ...): the backbone is called with its ``layers`` (and
``norm``) temporarily replaced by a slice, so the library's own masking, rotary embeddings and
attention kernels run unchanged. ``accel.engine`` compares the two-part forward with the plain
one on the first real batch and falls back to the plain forward where they disagree (a model
that rescales ``inputs_embeds``, such as Gemma, does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from apactl.models import backbone, position_ids, unwrap


class Split:
    """A model seen as ``trunk`` (embeddings + layers[:k]) and ``top`` (layers[k:] + norm).

    ``model`` is a causal LM or a sequence classifier (optionally peft-wrapped); ``k`` may be 0,
    in which case the trunk is the embedding lookup and ``top`` is the whole stack.
    """

    def __init__(self, model, k: int):
        self.model = model
        self.backbone = backbone(model)
        for name in ("embed_tokens", "layers", "norm"):
            if not hasattr(self.backbone, name):
                raise ValueError(f"{type(self.backbone).__name__} has no `{name}`")
        self.k = k

    def bottom(self) -> list[torch.nn.Module]:
        """The trunk's modules: the embeddings and the bottom k layers."""
        return [self.backbone.embed_tokens, *self.backbone.layers[: self.k]]

    @property
    def key(self) -> tuple[int, ...]:
        """Identity of the trunk modules: equal keys = the same trunk output for equal input."""
        return tuple(id(m) for m in self.bottom())

    @property
    def frozen(self) -> bool:
        """True when no trunk parameter trains: its output is a constant of the rollout."""
        return not any(p.requires_grad for m in self.bottom() for p in m.parameters())

    @contextlib.contextmanager
    def _swapped(self, layers: list, norm: bool) -> Iterator[None]:
        bb = self.backbone
        full_layers, full_norm = bb.layers, bb.norm
        bb.layers = torch.nn.ModuleList(layers)
        if not norm:
            bb.norm = torch.nn.Identity()
        try:
            yield
        finally:
            bb.layers, bb.norm = full_layers, full_norm

    def trunk(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L] ids -> [B, L, H] hidden state after layer k (no final norm), no grad."""
        with torch.no_grad(), self._swapped(list(self.backbone.layers[: self.k]), norm=False):
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state

    def top(self, trunk: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, L, H] trunk output -> [B, L, H] final (normed) hidden state; grads as usual."""
        with self._swapped(list(self.backbone.layers[self.k:]), norm=True):
            out = self.backbone(inputs_embeds=trunk, attention_mask=attention_mask,
                                position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state


def make_split(model, k: int) -> Split | None:
    """A Split of ``model`` at layer k, or None when the architecture is not a plain decoder."""
    try:
        return Split(model, k)
    except Exception:  # noqa: BLE001 - unsupported layout: the caller uses plain forwards
        return None


def share_bottom(owner, other, k: int) -> bool:
    """Make ``other`` use ``owner``'s embeddings and bottom k layers (True if it did).

    Only when the weights are equal, which holds for a reference or critic loaded from the same
    checkpoint as a policy whose bottom is frozen; the duplicate copies are then freed. A tied
    LM head of ``other`` is re-tied to the shared embedding.
    """
    a, b = make_split(owner, k), make_split(other, k)
    if a is None or b is None or k <= 0:
        return False
    pa, pb = a.bottom(), b.bottom()
    if len(pb) != len(pa) or any(p.requires_grad for m in pa + pb for p in m.parameters()):
        return False  # a trainable bottom would drift apart (or be frozen by sharing)
    for ma, mb in zip(pa, pb):
        sa, sb = ma.state_dict(), mb.state_dict()
        if sa.keys() != sb.keys() or any(sa[n].dtype != sb[n].dtype or not torch.equal(sa[n], sb[n])
                                         for n in sa):
            return False
    old_embed = b.backbone.embed_tokens.weight
    b.backbone.embed_tokens = a.backbone.embed_tokens
    for i in range(k):
        b.backbone.layers[i] = a.backbone.layers[i]
    inner = unwrap(other)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is not None and head.weight is old_embed:
        head.weight = a.backbone.embed_tokens.weight
    _own_memory(other, {id(t) for t in owner.parameters()})
    return True


def _own_memory(model, keep: set[int]) -> None:
    """Copy every tensor of ``model`` not in ``keep`` into its own memory.

    transformers maps safetensors files into memory; a model's tensors are views of that
    mapping, so as long as one of them lives (the top layers) the pages of the dropped bottom
    layers stay resident once touched (the weight comparison touches them). Owning copies let
    the whole mapping go: measured on SmolLM2, reference RSS 1242 -> 888 MB.
    """
    for module in model.modules():
        for prm in module._parameters.values():
            if prm is not None and id(prm) not in keep:
                prm.data = prm.data.clone()
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.clone()
