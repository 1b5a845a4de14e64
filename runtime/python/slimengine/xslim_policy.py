"""X-Slim policies (training-free reuse): the policy a bundle or a request carries, its spec strings
("xslim:step=0.1,critical=0.3", SPEC_HELP) and schedule files, and their validation.

Torch-free and exporter-free: the runtime binding (Engine.policy_json) and the exporter
(sampling_plan, reference_sampler via slimengine.export.xslim) both import it. What the policy's
fields make a generation do is docs/xslim.md; the decisions themselves are slimengine.export.xslim's
Controller (PyTorch reference) and runtime/src/xslim.cpp (the runtime).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

LEVELS = ("full", "skip", "block", "token")
EXCERPT_CHARS = 200  # user text echoed in an error message is cut to this (a request may send megabytes)


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` to echo in an error message: whole when short, else its start and its size."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text.encode('utf-8', 'surrogatepass'))} bytes)"
SPEC_HELP = ("none, xslim:step=T[,critical=C][,refresh=block|token][,ratio=R][,block=B][,first=F][,warmup=K], "
             "or xslim:schedule=FILE.json[,mode=NAME][,ratio=R][,block=B][,first=F]")


@dataclasses.dataclass(frozen=True)
class XSlimPolicy:
    early_warning: float = 0.0  # online: step-level reuse below this accumulated change
    critical: float | None = None  # online: refresh below it, full step at or above; None: no refresh level
    refresh: str = "token"  # online: the level run between the two lines
    sample_ratio: float = 0.5  # token level: fraction of image tokens recomputed
    block_threshold: float = 0.1  # block level: line on the accumulated block score
    first_blocks: int = 2  # block level: blocks never skipped
    warmup_steps: int = 2  # online: steps always computed first (two are needed to measure a rate)
    schedule: tuple[dict, ...] | None = None  # offline: per step {"level", optional "sample_ratio", "block_threshold"}

    def validate(self, steps: int | None = None) -> None:
        """Raises ValueError naming the bad field; `steps` (the plan's) is checked against a schedule."""
        if not self.early_warning >= 0:
            raise ValueError(f"X-Slim early-warning line (step=) must be >= 0, got {self.early_warning}")
        if self.critical is not None and not self.critical >= self.early_warning:
            raise ValueError(f"X-Slim critical line {self.critical} must be >= the early-warning line {self.early_warning}")
        if self.refresh not in ("block", "token"):
            raise ValueError(f"X-Slim refresh level must be block or token, got {excerpt(repr(self.refresh))}")
        _check_ratio(self.sample_ratio, "sample_ratio")
        _check_block_threshold(self.block_threshold, "block_threshold")
        if not 0 <= self.first_blocks <= 1 << 16:
            raise ValueError(f"X-Slim first_blocks must be >= 0, got {self.first_blocks}")
        if self.warmup_steps < 2:
            raise ValueError(f"X-Slim warmup must be at least 2 steps, got {self.warmup_steps}")
        if self.schedule is None:
            return
        full_steps = 0
        for i, entry in enumerate(self.schedule):
            level = entry.get("level")
            if level not in LEVELS:
                raise ValueError(f"schedule step {i}: level must be one of {', '.join(LEVELS)}, got {excerpt(repr(level))}")
            if set(entry) - {"level", "sample_ratio", "block_threshold"}:
                raise ValueError(f"schedule step {i}: unknown fields {sorted(set(entry) - {'level', 'sample_ratio', 'block_threshold'})}")
            if "sample_ratio" in entry:
                _check_ratio(entry["sample_ratio"], f"schedule step {i}: sample_ratio")
            if "block_threshold" in entry:
                _check_block_threshold(entry["block_threshold"], f"schedule step {i}: block_threshold")
            if level != "full" and full_steps == 0:
                raise ValueError(f"schedule step {i}: '{level}' before any full step (step 0 must be full)")
            if level == "token" and full_steps < 2:
                raise ValueError(f"schedule step {i}: a token step needs two full steps before it (token scores compare them)")
            full_steps += level == "full"
        if steps is not None and len(self.schedule) != steps:
            raise ValueError(f"the schedule has {len(self.schedule)} steps but the plan has {steps}")

    @property
    def uses(self) -> set[str]:
        """The levels this policy can run besides full."""
        if self.schedule is not None:
            return {e["level"] for e in self.schedule} - {"full"}
        return ({"skip"} if self.early_warning > 0 else set()) | ({self.refresh} if self.critical is not None else set())

    def to_manifest(self) -> dict:
        d = {"kind": "xslim", "mode": "schedule" if self.schedule is not None else "online"}
        d.update(dataclasses.asdict(self))
        d["schedule"] = list(self.schedule) if self.schedule is not None else None
        return d

    @classmethod
    def from_manifest(cls, d: dict) -> XSlimPolicy:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in fields}
        if values.get("schedule") is not None:
            values["schedule"] = tuple(values["schedule"])
        return cls(**values)


def _check_ratio(value, what: str) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"X-Slim {what} must be in (0, 1], got {value}")


def _check_block_threshold(value, what: str) -> None:
    if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
        raise ValueError(f"X-Slim {what} must be a finite number >= 0, got {value}")


def load_schedule(path: str | Path, mode: str | None = None, steps: int | None = None) -> list[dict]:
    """A schedule file: ours ({"steps": [{"level": ...}, ...]}) or X-Slim's strategy fields
    ({"fully_infer_step": [...], "block_refresh_step": [...], "token_refresh_step": [...], "sample_ratio": r},
    possibly one such object per mode name). In X-Slim's form every step not listed is a skip step and
    the length is `steps` (or one past the highest step listed)."""
    shown = excerpt(path)  # in messages
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read schedule {shown}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"schedule {shown} is not valid JSON: {e}") from None
    if isinstance(data, dict) and mode is not None:
        if mode not in data:
            raise ValueError(f"schedule {shown} has no mode '{excerpt(mode)}' (modes: {excerpt(', '.join(data))})")
        data = data[mode]
    if not isinstance(data, dict):
        raise ValueError(f"schedule {shown} must hold a JSON object")
    if "steps" in data:
        if not isinstance(data["steps"], list) or not all(isinstance(e, dict) for e in data["steps"]):
            raise ValueError(f"schedule {shown}: 'steps' must be a list of objects")
        return [dict(e) for e in data["steps"]]
    keys = ("fully_infer_step", "block_refresh_step", "token_refresh_step")
    if not any(k in data for k in keys):
        modes = [k for k, v in data.items() if isinstance(v, dict)]
        hint = f" (it looks like one entry per mode: pass mode=, one of {', '.join(modes)})" if modes else ""
        raise ValueError(f"schedule {shown} has neither 'steps' nor X-Slim's {', '.join(keys)}{hint}")
    listed = {}
    for key, level in zip(keys, ("full", "block", "token")):
        for s in data.get(key, []):
            if not isinstance(s, int) or s < 0:
                raise ValueError(f"schedule {shown}: {key} holds {s!r}, not a step index >= 0")
            if steps is not None and s >= steps:
                raise ValueError(f"schedule {shown}: {key} names step {s}, out of range for a {steps}-step plan")
            if s in listed:
                raise ValueError(f"schedule {shown}: step {s} is in both {listed[s][1]} and {key}")
            listed[s] = (level, key)
    count = steps if steps is not None else max(listed, default=-1) + 1
    ratio = data.get("sample_ratio")
    schedule = []
    for s in range(count):
        level = listed.get(s, ("skip", None))[0]
        entry = {"level": level}
        if level == "token" and ratio is not None:
            entry["sample_ratio"] = ratio
        schedule.append(entry)
    return schedule


def parse_xslim_spec(text: str, steps: int | None = None) -> XSlimPolicy | None:
    """'none' -> None; 'xslim:...' (see SPEC_HELP) -> a validated XSlimPolicy."""
    if text == "none":
        return None
    kind, _, options = text.partition(":")
    if kind != "xslim":
        raise ValueError(f"unknown X-Slim policy '{excerpt(kind)}' (expected {SPEC_HELP})")
    numbers = {"step": ("early_warning", float), "critical": ("critical", float), "ratio": ("sample_ratio", float),
               "block": ("block_threshold", float), "first": ("first_blocks", int), "warmup": ("warmup_steps", int)}
    values, schedule_file, mode = {}, None, None
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key == "schedule":
            schedule_file = value
        elif key == "mode":
            mode = value
        elif key == "refresh":
            values["refresh"] = value
        elif key in numbers:
            name, convert = numbers[key]
            try:
                values[name] = convert(value)
            except ValueError:
                raise ValueError(f"X-Slim option {excerpt(key)}='{excerpt(value)}' is not a number") from None
        else:
            raise ValueError(f"X-Slim option '{excerpt(key)}' is not supported (expected {SPEC_HELP})")
    if schedule_file is not None:
        online = {"early_warning", "critical", "refresh", "warmup_steps"} & set(values)
        if online:
            raise ValueError(f"a schedule replaces the online lines: drop {', '.join(sorted(online))}")
        values["schedule"] = tuple(load_schedule(schedule_file, mode, steps))
    elif mode is not None:
        raise ValueError("mode= selects an entry of a schedule file: pass schedule=FILE too")
    elif "early_warning" not in values and "critical" not in values:
        raise ValueError("xslim needs step=T (the early-warning line) or schedule=FILE, e.g. --xslim xslim:step=0.1,critical=0.3")
    policy = XSlimPolicy(**values)
    policy.validate(steps if schedule_file is not None else None)
    return policy
