"""make-lemur-checkpoint: write a LEMUR recommender checkpoint with seeded random weights.

For tests, demos and benchmarks. The configuration travels inside the checkpoint (metadata key
`slimengine`: {"family": "lemur", "lemur_config": {...}}), so export-engine needs nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from slimengine.export.lemur_model import LemurConfig, LemurModel
from slimengine.staging import OutputPathError, output_file, write_file_atomically

PRESETS = {
    # Tests: seconds to export, still every piece of the structure.
    "tiny": dict(vocab_size=300, max_text_len=48, max_query_len=16, text_dim=32, text_layers=1, image_size=16, patch_size=8,
                 max_frames=4, image_dim=32, image_layers=1, num_heads=2, embed_dim=32, user_dim=32, query_layers=1, ctr_hidden=32),
    # The benchmark's model: 256-dimensional document embeddings, as in the bank figures.
    "small": dict(vocab_size=8000, max_text_len=256, max_query_len=32, text_dim=128, text_layers=2, image_size=32, patch_size=8,
                  max_frames=8, image_dim=128, image_layers=1, num_heads=4, embed_dim=256, user_dim=128, query_layers=1, ctr_hidden=256),
}


def random_state_dict(config: LemurConfig, seed: int) -> dict:
    """Seeded weights: every matrix ~ N(0, 1/fan_in), biases and summary/position tables small, norms 1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in LemurModel(config).state_dict().items():
        shape = tensor.shape
        if name.endswith(".weight") and ("norm" in name.split(".")[-2]) and len(shape) == 1:
            state[name] = torch.ones(shape)
        elif len(shape) <= 1:
            state[name] = torch.randn(shape, generator=generator) * 0.02
        elif "tokens.weight" in name or "segments.weight" in name:  # embedding tables
            state[name] = torch.randn(shape, generator=generator)
        elif name.endswith(("positions", "summary", "empty")):
            state[name] = torch.randn(shape, generator=generator) * 0.1
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            state[name] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


def write_checkpoint(state: dict, config: LemurConfig, path: Path, fmt: str) -> None:
    metadata = {"family": "lemur", "lemur_config": config.to_json()}

    def write(tmp: Path) -> None:
        if fmt == "pt":
            torch.save({"state_dict": state, "slimengine": metadata}, tmp)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"slimengine": json.dumps(metadata)})

    write_file_atomically(path, write, parents=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make-lemur-checkpoint", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True, type=Path, help="checkpoint to write (.pt or .safetensors)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size (default: tiny)")
    parser.add_argument("--embed-dim", type=int, help="override the document embedding width")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:  # before any work: never a device, FIFO, socket, directory or a link to nothing (docs/export.md, "Output files")
        output_file(args.output, parents=True)
    except OutputPathError as e:
        parser.error(str(e))
    suffix = args.output.suffix.lower()
    if suffix not in (".pt", ".pth", ".safetensors"):
        parser.error(f"the output must end in .pt, .pth or .safetensors, got '{args.output.name}'")
    kwargs = dict(PRESETS[args.preset])
    if args.embed_dim:
        kwargs["embed_dim"] = args.embed_dim
    try:
        config = LemurConfig(**kwargs)
    except ValueError as e:
        parser.error(str(e))
    state = random_state_dict(config, args.seed)
    write_checkpoint(state, config, args.output, "safetensors" if suffix == ".safetensors" else "pt")
    params = sum(v.numel() for v in state.values())
    print(f"wrote {args.output} (lemur {args.preset}, {params / 1e6:.2f} M params, "
          f"{dataclasses.asdict(config)['embed_dim']}-d document embeddings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
