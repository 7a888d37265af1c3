"""KL-penalty coefficient (beta) controllers for the per-token KL-shaped reward."""

from __future__ import annotations

from typing import Any


class FixedKLController:
    """Constant beta; `update` is a no-op kept for interface parity with the adaptive one."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float, n_episodes: int) -> None:
        del current_kl, n_episodes

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards `target` (Ziegler et al. 2019).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_episodes / horizon).
    The clip bounds the change per update so one noisy KL estimate cannot swing beta far.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target}, {horizon}")
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_episodes: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))
