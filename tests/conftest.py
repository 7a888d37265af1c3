from __future__ import annotations

import random
from pathlib import Path

import pytest
from helpers import write_jsonl


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Keep converted/tiny models out of the user's cache: the session shares one folder."""
    cache = tmp_path_factory.getbasetemp() / "model-cache"
    import apactl.models.common as refs

    monkeypatch.setattr(refs, "DEFAULT_CACHE_DIR", cache)
    yield


@pytest.fixture
def memorise_set(tmp_path) -> Path:
    rows = [
        {"prompt": "Say hi.", "response": "Hi there!"},
        {"prompt": "Say bye.", "response": "Goodbye, friend."},
        {"prompt": "Count to three.", "response": "One, two, three."},
        {"prompt": "Name a color.", "response": "Blue."},
    ]
    return write_jsonl(tmp_path / "memorise.jsonl", rows)


@pytest.fixture
def learnable_prefs(tmp_path) -> Path:
    """The chosen reply is always upbeat ('yes ...'), the rejected one 'no ...': learnable."""
    rng = random.Random(0)
    words = ["cat", "rain", "tea", "bus", "park", "book", "song", "map", "lamp", "door"]
    rows = []
    for _ in range(96):
        p = " ".join(rng.sample(words, 3))
        tail = " ".join(rng.sample(words, 2))
        rows.append({"prompt": f"Talk about {p}.", "chosen": f"yes yes {tail}",
                     "rejected": f"no no {tail}"})
    return write_jsonl(tmp_path / "prefs.jsonl", rows)
