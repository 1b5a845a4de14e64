"""X-Slim step-level reuse: the policy and its decisions, shared by the reference sampler.

When a step computes the whole block stack, its image-stream residual R = (stack output - stack
input) is kept, and the relative L1 change of R against the previous computed step, divided by
the steps between them, becomes the per-step change rate. A later step reuses the stack as
h_out = h_in + R while the accumulated rate stays under the early-warning line `threshold`:
    skip step s  <=>  s >= warmup_steps, s is not the last step nor a 1.x record step, and acc + rate < threshold
A skipped step adds the rate to acc; a computed step resets acc to 0. One decision covers the whole
batch (CFG halves included); the change is measured in double precision over the batch. The C++
runtime implements the same rule (runtime/src/sd3_program.cpp).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class StepCachePolicy:
    threshold: float  # early-warning line on the accumulated relative change
    warmup_steps: int = 2  # steps always computed first (two are needed to measure a rate)

    def validate(self) -> None:
        if not self.threshold >= 0:
            raise ValueError(f"step-cache threshold must be >= 0, got {self.threshold}")
        if self.warmup_steps < 2:
            raise ValueError(f"step-cache warmup must be at least 2 steps, got {self.warmup_steps}")

    def to_manifest(self) -> dict:
        return {"threshold": self.threshold, "warmup_steps": self.warmup_steps}


def parse_cache_spec(text: str) -> StepCachePolicy | None:
    """'none' -> None; 'xslim:step=0.3[,warmup=2]' -> StepCachePolicy."""
    if text == "none":
        return None
    kind, _, options = text.partition(":")
    if kind != "xslim":
        raise ValueError(f"unknown cache policy '{kind}' (expected none or xslim:step=T[,warmup=K])")
    values = {}
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in ("step", "warmup"):
            raise ValueError(f"cache option '{key}' is not supported (this version offers step=T and warmup=K)")
        try:
            values[key] = float(value) if key == "step" else int(value)
        except ValueError:
            raise ValueError(f"cache option {key}={value!r} is not a number") from None
    if "step" not in values:
        raise ValueError("xslim needs step=THRESHOLD, e.g. --cache xslim:step=0.3")
    policy = StepCachePolicy(values["step"], values.get("warmup", 2))
    policy.validate()
    return policy


class StepCacheState:
    """The running state of one generation's step-level decisions."""

    def __init__(self, policy: StepCachePolicy, steps: int):
        self.policy, self.steps = policy, steps
        self.residual: torch.Tensor | None = None
        self.rate: float | None = None
        self.accumulated = 0.0
        self.last_computed = -1

    def should_skip(self, step: int) -> bool:
        if step < self.policy.warmup_steps or step == self.steps - 1 or self.rate is None:
            return False
        return self.accumulated + self.rate < self.policy.threshold

    def skipped(self) -> None:
        self.accumulated += self.rate

    def computed(self, step: int, residual: torch.Tensor) -> None:
        if self.residual is not None:
            change = (residual.double() - self.residual.double()).abs().mean() / self.residual.double().abs().mean()
            self.rate = float(change) / (step - self.last_computed)
        self.residual, self.last_computed, self.accumulated = residual, step, 0.0
