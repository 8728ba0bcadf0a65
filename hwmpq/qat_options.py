"""Options every QAT run accepts (`hwmpq train --qat`, the fine-tune after a search): SAQ's
sharpness-aware minimisation and FrostNet's StatAssist and GradBoost. The training loop
(hwmpq.train.fit) consumes them through ``fit_hooks``."""

from __future__ import annotations

from dataclasses import dataclass

from .records import register_record


@dataclass(frozen=True)
class QATOptions:
    sam: bool = False  # sharpness-aware minimisation (ascent to w + eps, ||eps|| <= rho, descent there)
    rho: float = 0.05
    stat_assist: bool = False  # float warm-up first, then QAT from the float statistics
    stat_assist_epochs: int = 1
    grad_boost: bool = False  # sign-matched Laplace gradient noise, range-scaled, decayed, masked, clipped
    grad_boost_scale: float = 0.01

    _version = 1

    def __post_init__(self) -> None:
        if self.rho <= 0 or self.stat_assist_epochs < 0 or self.grad_boost_scale < 0:
            raise ValueError(f"QATOptions: rho must be > 0, stat_assist_epochs >= 0, grad_boost_scale >= 0: {self}")


register_record(QATOptions)
