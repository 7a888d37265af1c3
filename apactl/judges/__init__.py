"""Judges score (prompt, response) pairs: a learned reward model or a programmatic rule.

``registry`` is the extension point and imports no torch (recipe validation checks judge names
instantly); ``builtin`` registers the shipped judges; ``reward_model`` is the learned one.
"""

from apactl.judges import builtin  # noqa: F401  (registers the shipped judges)
from apactl.judges.registry import (
    JUDGES,
    Judge,
    JudgeInfo,
    available,
    build_judge,
    check_judge,
    register_judge,
)

__all__ = ["JUDGES", "Judge", "JudgeInfo", "available", "build_judge", "check_judge",
           "register_judge"]
