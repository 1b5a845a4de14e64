"""X-Slim's decisions for the PyTorch reference sampler: the controller (which level each step runs),
the block rule and the token count. The policy they read (fields, spec strings, schedule files) is
slimengine.xslim_policy; the C++ runtime implements the same rules (runtime/src/xslim.cpp);
docs/xslim.md is their full definition.

Levels of a step: "full" (every block; every cache refreshed), "skip" (no block: the stack reuses its
last residual R, h_out = h_in + R), "block" (blocks whose recorded score allows it add their cached
residual instead of running), "token" (each block recomputes only the image tokens with the highest
change score; the others add their cached residual).

Online mode (dual threshold). After a full step, rate = relative L1 change of R against the previous
full step's R, divided by the steps between them. For a later step, with x = accumulated + rate:
    x < early_warning                    -> skip,    accumulated = x
    x < critical (when a critical line)  -> refresh (the policy's block or token level), accumulated = x
    otherwise                            -> full,    accumulated = 0
The first `warmup_steps` steps, the last step and 1.x record steps are always full.
Offline mode: a schedule names the level of every step (and optionally its ratio / block threshold).

Block scores (recorded during full steps): s_i = mean|out_i - in_i| / mean|in_i| of block i's image
stream; walking down the stack, acc += s_i; block i (i >= first_blocks) is skippable while
acc < block_threshold, and acc resets to 0 at every block that is not (a choice: docs/xslim.md).
Token scores: mean over channels of |R_last - R_prev| (the last two full steps); the ratio * N tokens
with the highest score are recomputed. Every decision covers the whole batch (CFG halves included)
except token selection, which is per batch row.
"""

from __future__ import annotations

import math

from slimengine.xslim_policy import LEVELS, SPEC_HELP, XSlimPolicy, load_schedule, parse_xslim_spec

# The policy itself lives in the runtime package (slimengine.xslim_policy), torch-free, so that the binding
# need not import the exporter; it is re-exported here for the exporter's callers.
__all__ = ["LEVELS", "SPEC_HELP", "Controller", "XSlimPolicy", "load_schedule", "parse_xslim_spec", "skippable_blocks", "tokens_for_ratio"]


class Controller:
    """The running decisions of one generation: which level each step runs."""

    def __init__(self, policy: XSlimPolicy, steps: int):
        self.policy, self.steps = policy, steps
        self.rate: float | None = None
        self.accumulated = 0.0
        self.last_full = -1
        self.full_steps = 0

    def level(self, step: int, records_delta: bool) -> str:
        p = self.policy
        if records_delta or self.full_steps == 0:
            return "full"
        if p.schedule is not None:
            return p.schedule[step]["level"]
        if step < p.warmup_steps or step == self.steps - 1 or self.rate is None:
            return "full"
        x = self.accumulated + self.rate
        if x < p.early_warning:
            self.accumulated = x
            return "skip"
        if p.critical is not None and x < p.critical and (p.refresh == "block" or self.full_steps >= 2):
            self.accumulated = x
            return p.refresh
        return "full"

    def full_step_done(self, step: int, change: float | None) -> None:
        """`change`: relative L1 change of the stack residual against the previous full step's."""
        if change is not None:
            self.rate = change / (step - self.last_full)
        self.last_full, self.accumulated = step, 0.0
        self.full_steps += 1

    def ratio(self, step: int) -> float:
        entry = self.policy.schedule[step] if self.policy.schedule is not None else {}
        return entry.get("sample_ratio", self.policy.sample_ratio)

    def block_threshold(self, step: int) -> float:
        entry = self.policy.schedule[step] if self.policy.schedule is not None else {}
        return entry.get("block_threshold", self.policy.block_threshold)


def skippable_blocks(scores: dict[int, float], threshold: float, first_blocks: int) -> set[int]:
    """Blocks a block-level step may skip, from the scores of the last full step (in block order)."""
    skip, acc = set(), 0.0
    for i in sorted(scores):
        acc += scores[i]
        if i >= first_blocks and acc < threshold:
            skip.add(i)
        else:
            acc = 0.0
    return skip


def tokens_for_ratio(ratio: float, tokens: int) -> int:
    """Image tokens recomputed for a sample ratio: round(ratio * tokens), at least 1 (kernels/cpu)."""
    return max(1, min(tokens, int(math.floor(ratio * tokens + 0.5))))
