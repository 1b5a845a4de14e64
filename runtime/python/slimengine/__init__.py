"""slimengine: compiled deployment of few-step, reuse-accelerated SD3 transformers.

    import slimengine as se
    session = se.open_engine("sd3m.engine").session()
    result = session.generate(prompt_embeds, pooled_embeds, seed=0)
    result.latents, result.stats

A bundle exported from an SD3 pipeline folder also goes from a prompt to an image (docs/pipeline.md):
`session.generate(prompt="a red circle", seed=0).image` (uint8 RGB), or `slimengine generate ENGINE "a prompt" -o out.png`.

LEMUR recommender bundles: `session.embed(text_ids, frames, bank=bank, document_ids=ids)` and
`session.score(bank, history_ids, query_ids)` with a durable `MemoryBank(path, dim)`.

The runtime is the C library libslimengine.so (C ABI in slimengine.h); this module wraps it with
numpy in and out (anything with __dlpack__ or __array__ is accepted as input). The exporter lives
in `slimengine.export`, the command-line tools in `slimengine.tools`.
"""

from .pipeline import SD3Pipeline, SD3PipelineOutput
from .runtime import (
                      Engine,
                      EngineInfo,
                      GenerateResult,
                      ImageResult,
                      MemoryBank,
                      ProgramStep,
                      Session,
                      SlimError,
                      abi_version,
                      open_engine,
                      verify_bundle,
                      version,
)

__all__ = ["Engine", "EngineInfo", "GenerateResult", "ImageResult", "MemoryBank", "ProgramStep", "SD3Pipeline", "SD3PipelineOutput", "Session",
           "SlimError", "abi_version", "open_engine",
           "verify_bundle", "version"]
