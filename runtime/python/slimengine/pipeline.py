"""SD3Pipeline: diffusers' StableDiffusion3Pipeline call, run by an engine bundle (docs/pipeline.md, "Python, as diffusers").

    from slimengine import SD3Pipeline          # was: from diffusers import StableDiffusion3Pipeline
    pipe = SD3Pipeline.from_pretrained("sd3.engine")
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]

The arguments keep diffusers' names and meanings; what differs is said where it is taken (the bundle fixes the weights,
their precision and the T5 length; `num_inference_steps=None` runs the bundle's own program, e.g. a 1.x student's).
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import numpy as np

from .runtime import Engine


@dataclasses.dataclass
class SD3PipelineOutput:
    """As diffusers' StableDiffusion3PipelineOutput: `images` is a list of PIL images (output_type "pil"), float32
    [B, H, W, 3] in [0, 1] ("np") or the latents [B, 16, H/8, W/8] before the VAE's scaling ("latent")."""

    images: list | np.ndarray


class SD3Pipeline:
    """Text to image on an engine bundle exported with its pipeline (export-engine PIPELINE_FOLDER). One call is one
    runtime call (slim_generate_prompt): tokenizers, text encoders, the sampling program and the VAE, in C++.
    Calls on one pipeline run one at a time (a session); use one pipeline per thread."""

    def __init__(self, engine: Engine, *, prompt_cache: int = 16):
        pipeline = engine.manifest.get("pipeline")
        if engine.info.family != "sd3" or not pipeline:
            raise ValueError("SD3Pipeline needs an sd3 bundle exported with its pipeline (export-engine PIPELINE_FOLDER, or a "
                             "transformer checkpoint with --pipeline PIPELINE_FOLDER)")
        self.engine = engine
        self.session = engine.session(prompt_cache=prompt_cache)
        self.vae_scale_factor = pipeline["vae"]["scale_factor"]
        self.latent_channels = engine.info.latent_channels
        self.max_sequence_length = pipeline["max_sequence_length"]  # T5's, fixed at export

    @classmethod
    def from_pretrained(cls, bundle: str | Path, *, prompt_cache: int = 16, **engine_options) -> SD3Pipeline:
        """Open `bundle` (an .engine directory); engine_options as Engine's (device="cuda", verify="full", ...)."""
        engine = Engine(bundle, **engine_options)
        try:
            return cls(engine, prompt_cache=prompt_cache)
        except BaseException:
            engine.close()
            raise

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, generator=None, num_images_per_prompt: int = 1, output_type: str = "pil", latents=None,
                 max_sequence_length: int | None = None, return_dict: bool = True):
        """diffusers' call. `prompt`: a str or a list; `negative_prompt` (used when guidance_scale > 1): a str for every
        prompt or one per prompt, default "". `num_inference_steps`: None runs the bundle's program, N a plain N-step plan
        with the scheduler's shift. `guidance_scale`: None takes the bundle's. `height`/`width`: image pixels, default the
        bundle's size. `generator`: a torch.Generator (or one per image) draws the initial latents as diffusers does
        (torch.randn, so the same generator gives diffusers' image); an int is a seed of the runtime's own noise (image b
        draws from seed + b); None a random seed. `latents`: the initial noise [B x num_images_per_prompt, 16, H/8, W/8]
        (torch or numpy). `max_sequence_length`: the bundle's T5 length is fixed at export; another value is refused.
        `output_type`: "pil", "np" (float32 in [0, 1], from the 8-bit image: diffusers' own "pil" rounds the same way) or
        "latent" (numpy). Returns SD3PipelineOutput, or (images,) with return_dict=False."""
        prompts = _texts(prompt, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _texts(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives *= len(prompts)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} texts for {len(prompts)} prompts")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if max_sequence_length is not None and max_sequence_length != self.max_sequence_length:
            raise ValueError(f"max_sequence_length: this bundle's T5 length is {self.max_sequence_length} (fixed at export), "
                             f"got {max_sequence_length}")
        # diffusers repeats each prompt's conditioning num_images_per_prompt times: a prompt's images are consecutive.
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        size = self.vae_scale_factor * self.engine.info.default_latent_size
        height, width = height or size, width or size

        seed = 0
        if latents is None and generator is not None and not isinstance(generator, int):
            f = self.vae_scale_factor
            latents = _diffusers_noise(generator, (len(prompts), self.latent_channels, height // f, width // f))
        elif latents is None:
            seed = secrets.randbits(63) if generator is None else generator
        if latents is not None and hasattr(latents, "detach"):  # a torch tensor
            latents = latents.detach().cpu().float().numpy()
        result = self.session.generate(prompt=prompts, negative_prompt=negatives, seed=seed, latents=latents,
                                       guidance_scale=guidance_scale, height=height, width=width, num_steps=num_inference_steps)
        if output_type == "latent":
            images = result.latents
        elif output_type == "np":
            images = result.image.astype(np.float32) / 255.0
        else:
            images = result.pil_images()
        return SD3PipelineOutput(images) if return_dict else (images,)

    def close(self) -> None:
        self.session.close()
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _texts(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(value).__name__}")


def _diffusers_noise(generator, shape: tuple[int, ...]) -> np.ndarray:
    """The initial latents diffusers' prepare_latents draws (diffusers.utils.torch_utils.randn_tensor, float32): one
    torch.randn of the whole batch from one generator, or one per image from a list of generators."""
    import torch

    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: a list of {len(generator)} generators for {shape[0]} images")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32).cpu() for g in generator]
        return torch.cat(rows).numpy()
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, a list of them, an int seed or None, got {type(generator).__name__}")
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).cpu().numpy()
