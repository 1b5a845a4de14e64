"""The sampling program a bundle carries: sigmas, guidance, and which blocks each step runs.

Two kinds of plan:
- 1.x-Distill (docs/distill.md): sigmas = shift(linspace(1, 0, steps+1), s) snapped to the teacher's
  1000-step grid; step 0 runs every block and records Δ over the skipped range; every later step
  skips the range and adds MLP(Δ) (compensation "mlp") or Δ itself (compensation "identity", for a
  plain model given --skip-blocks).
- plain SD3: diffusers' FlowMatchEulerDiscreteScheduler sigmas, every block every step, CFG.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from slimengine.xslim_policy import XSlimPolicy, parse_xslim_spec

TEACHER_TRAIN_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    sigmas: tuple[float, ...]  # steps + 1 values, the last one 0
    guidance_scale: float
    skip_blocks: tuple[int, int] | None = None  # inclusive range of joint blocks skipped after step 0
    compensation: str | None = None  # "mlp" | "identity" | None
    xslim: XSlimPolicy | None = None  # X-Slim policy, decided at run time

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def timesteps(self) -> list[float]:
        return [s * TEACHER_TRAIN_STEPS for s in self.sigmas[:-1]]

    def records_delta(self, step: int) -> bool:
        return self.skip_blocks is not None and step == 0

    def skips_block(self, step: int, block: int) -> bool:
        if self.skip_blocks is None or step == 0:
            return False
        first, last = self.skip_blocks
        return first <= block <= last

    def blocks_run(self, step: int, num_layers: int) -> int:
        return sum(not self.skips_block(step, i) for i in range(num_layers))

    def effective_nfe(self, num_layers: int) -> float:
        per_eval = sum(self.blocks_run(s, num_layers) for s in range(self.steps)) / num_layers
        return per_eval * (2 if self.guidance_scale > 1.0 else 1)

    def validate(self, num_layers: int, has_compensation_mlp: bool) -> None:
        if self.steps < 1:
            raise ValueError("a plan needs at least one step")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance scale {self.guidance_scale} is negative")
        if self.skip_blocks is not None:
            first, last = self.skip_blocks
            # The last block ends the text stream, so a skipped range must stop before it.
            if not 0 <= first <= last < num_layers - 1:
                raise ValueError(f"skipped blocks {first}-{last} must lie within 0-{num_layers - 2} for a {num_layers}-block model")
            if self.compensation not in ("mlp", "identity"):
                raise ValueError("a skipped range needs compensation 'mlp' or 'identity'")
            if self.compensation == "mlp" and not has_compensation_mlp:
                raise ValueError("compensation 'mlp' needs delta_pred_* weights in the checkpoint")
        if self.xslim is not None:
            self.xslim.validate(self.steps)

    def to_manifest(self, num_layers: int) -> dict:
        steps = []
        for s in range(self.steps):
            steps.append(
                {
                    "sigma": self.sigmas[s],
                    "sigma_next": self.sigmas[s + 1],
                    "timestep": self.timesteps[s],
                    "record_delta": self.records_delta(s),
                    "skip_range": self.skip_blocks is not None and s > 0,
                    "blocks_run": self.blocks_run(s, num_layers),
                }
            )
        return {
            "sampler": "flow_match_euler",
            "guidance_scale": self.guidance_scale,
            "skip_blocks": list(self.skip_blocks) if self.skip_blocks else None,
            "compensation": self.compensation,
            "effective_nfe": self.effective_nfe(num_layers),  # before any run-time X-Slim reuse
            "xslim": self.xslim.to_manifest() if self.xslim else None,
            "steps": steps,
        }


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def teacher_grid(teacher_shift: float) -> np.ndarray:
    """The teacher's shifted 1000-step sigma grid, plus 0 so the final sigma stays exactly 0."""
    grid = shift_sigmas(np.arange(1, TEACHER_TRAIN_STEPS + 1) / TEACHER_TRAIN_STEPS, teacher_shift)
    return np.concatenate([[0.0], grid])


def distilled_sigmas(steps: int, shift: float, teacher_shift: float) -> tuple[float, ...]:
    sigmas = shift_sigmas(np.linspace(1.0, 0.0, steps + 1), shift)
    grid = teacher_grid(teacher_shift)
    snapped = grid[np.abs(grid[None, :] - sigmas[:, None]).argmin(axis=1)]
    return tuple(float(s) for s in snapped)


def scheduler_sigmas(steps: int, shift: float) -> tuple[float, ...]:
    """diffusers' FlowMatchEulerDiscreteScheduler sigmas (SD3's scheduler) for `steps` steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=TEACHER_TRAIN_STEPS, shift=shift)
    scheduler.set_timesteps(steps)
    return tuple(float(s) for s in scheduler.sigmas)


def parse_block_range(text: str) -> tuple[int, int]:
    """'2-7' -> (2, 7); '5' -> (5, 5)."""
    try:
        parts = [int(p) for p in str(text).split("-")]
    except ValueError:
        raise ValueError(f"block range '{text}' is not of the form A-B") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] > parts[1] or parts[0] < 0:
        raise ValueError(f"block range '{text}' is not of the form A-B with 0 <= A <= B")
    return parts[0], parts[1]


MAX_STEPS = 10000  # the runtime's limit on a program's steps (manifest.cpp)


def _checked_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS} (--steps or the checkpoint's sampling metadata), "
                         f"got {steps!r}")
    return steps


def _checked_real(value, name: str, positive: bool) -> float:
    """A finite number, > 0 (`positive`) or >= 0, from a flag or the checkpoint's sampling metadata."""
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int past float's range
        number = math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} number (from its flag or the checkpoint's "
                         f"sampling metadata), got {value!r}"[:300])
    return number


def sampling_key(sampling: dict, key: str, legacy: str) -> tuple[str, object]:
    """(the name it is stored under, the value) of a key of a checkpoint's sampling metadata, also under its legacy
    spelling: checkpoints written before 1.0 (the shipped models/*.safetensors among them) name skip_blocks
    cache_blocks, and xslim cache. (key, None) when neither is there; both is an error."""
    if key in sampling and legacy in sampling:
        raise ValueError(f"the checkpoint's sampling metadata has both '{key}' and its legacy spelling '{legacy}': keep '{key}'")
    return (legacy, sampling[legacy]) if legacy in sampling else (key, sampling.get(key))


def make_plan(
    num_layers: int,
    has_compensation_mlp: bool,
    metadata: dict | None = None,
    steps: int | None = None,
    shift: float | None = None,
    skip_blocks: str | tuple[int, int] | None = None,
    guidance_scale: float | None = None,
    teacher_shift: float | None = None,
    xslim: str | None = None,
) -> SamplingPlan:
    """Plan from the checkpoint's metadata, overridden by explicit arguments (the CLI flags).

    A checkpoint with compensation weights is a 1.x-Distill student: 2 steps, shift 3, no CFG,
    skipped range from metadata (blocks 2-7 by default when the model is deep enough). Without them it
    is a plain SD3 model: 28 steps, shift 3, CFG 7.0, unless --skip-blocks asks for Δ reuse.
    skip_blocks="none" asks for that plain plan whatever the checkpoint. `xslim` ("none" or
    "xslim:...", xslim.SPEC_HELP) sets the default X-Slim policy.
    """
    sampling = (metadata or {}).get("sampling", {})
    if not isinstance(sampling, dict):
        raise ValueError(f"the checkpoint's sampling metadata must be an object, got {type(sampling).__name__}")
    meta = dict(sampling)
    distilled = has_compensation_mlp
    if isinstance(skip_blocks, str) and skip_blocks.lower() == "none":
        # A plain full-step plan, even for a 1.x student (the metadata describes its 1.x plan).
        meta, distilled, skip_blocks = {}, False, None
    # Checked before any sigma is computed: metadata is untrusted (steps=10**9 allocated 7.5 GB, a string or NaN
    # went on to fail deep inside, or became a bundle no runtime opens).
    steps = _checked_steps(steps or meta.get("steps") or (2 if distilled else 28))
    shift = _checked_real(shift or meta.get("shift") or 3.0, "shift", positive=True)
    teacher_shift = _checked_real(teacher_shift or meta.get("teacher_shift") or 3.0, "teacher_shift", positive=True)
    _, meta_skip_blocks = sampling_key(meta, "skip_blocks", "cache_blocks")
    xslim_key, meta_xslim = sampling_key(meta, "xslim", "cache")
    if skip_blocks is None:
        skip_blocks = meta_skip_blocks
        if skip_blocks is None and distilled and num_layers >= 9:
            skip_blocks = (2, 7)
    if isinstance(skip_blocks, str):
        skip_blocks = parse_block_range(skip_blocks)
    if distilled and skip_blocks is None:
        raise ValueError("the checkpoint has compensation weights but no skipped block range; pass --skip-blocks A-B")
    if skip_blocks is not None:
        if not isinstance(skip_blocks, (list, tuple)) or len(skip_blocks) != 2 or not all(
                isinstance(b, int) and not isinstance(b, bool) for b in skip_blocks):
            raise ValueError(f"skip_blocks must be 'A-B' or two block indices, got {skip_blocks!r}")
        skip_blocks = tuple(skip_blocks)
    if not isinstance(xslim or meta_xslim or "none", str):
        raise ValueError(f"the checkpoint's sampling metadata '{xslim_key}' must be a spec string, got {meta_xslim!r}")
    if guidance_scale is None:
        guidance_scale = meta.get("guidance_scale", 1.0 if (distilled or skip_blocks) else 7.0)
    guidance_scale = _checked_real(guidance_scale, "guidance_scale", positive=False)
    if distilled or skip_blocks is not None:
        sigmas = distilled_sigmas(steps, shift, teacher_shift)
    else:
        sigmas = scheduler_sigmas(steps, shift)
    plan = SamplingPlan(
        sigmas=sigmas,
        guidance_scale=float(guidance_scale),
        skip_blocks=skip_blocks,
        compensation=("mlp" if distilled else "identity") if skip_blocks else None,
        xslim=parse_xslim_spec(xslim or meta_xslim or "none", steps),
    )
    plan.validate(num_layers, has_compensation_mlp)
    return plan
