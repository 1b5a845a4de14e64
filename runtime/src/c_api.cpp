// The C ABI: argument validation at the boundary, exceptions turned into status codes.
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "engine.hpp"
#include "error.hpp"
#include "json.hpp"
#include "sampling_plan.hpp"
#include "sd3_program.hpp"
#include "slimengine.h"

#ifndef SLIMENGINE_VERSION
#define SLIMENGINE_VERSION "0.0.0"
#endif

struct slim_engine {
    std::unique_ptr<slim::Engine> engine;
};

struct slim_session {
    std::unique_ptr<slim::Sd3Session> program;
    const slim_engine* owner;
};

namespace {

thread_local std::string last_error;

// Limits of the exported graphs' dynamic dimensions (export/onnx_export.py) and of one tensor.
constexpr int64_t kMaxBatch = 4096, kMaxText = 8192, kMaxElements = int64_t(1) << 40;

slim_status fail(slim_status status, const std::string& message) {
    last_error = message;
    return status;
}

template <typename F>
slim_status guarded(F&& body) {
    try {
        last_error.clear();
        body();
        return SLIM_OK;
    } catch (const slim::Error& e) { return fail(e.status(), e.what()); } catch (const std::bad_alloc&) {
        return fail(SLIM_ERR_OUT_OF_MEMORY, "out of memory");
    } catch (const std::exception& e) { return fail(SLIM_ERR_INTERNAL, std::string("internal error: ") + e.what()); } catch (...) {
        return fail(SLIM_ERR_INTERNAL, "internal error");
    }
}

// Copies a caller's params struct over the defaults: older callers pass smaller structs, and only
// the fields they know are read.
template <typename T>
T read_params(const T* given, T defaults, size_t required_size, const char* what) {
    if (!given) return defaults;
    if (given->struct_size < required_size || given->struct_size > 4096)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                          std::string(what) + ".struct_size is " + std::to_string(given->struct_size) + "; set it to sizeof(" + what + ")");
    std::memcpy(&defaults, given, std::min<size_t>(given->struct_size, sizeof(T)));
    defaults.struct_size = sizeof(T);
    return defaults;
}

std::string shape_text(const slim_tensor& t) {
    std::string s = "[";
    for (int i = 0; i < t.ndim; ++i) s += (i ? "," : "") + std::to_string(t.shape[i]);
    return s + "]";
}

// Checks dtype/device/layout and that the shape matches `expected` (-1: any positive size);
// returns the shape.
std::vector<int64_t> check_tensor(const slim_tensor* t, const char* name, const std::vector<int64_t>& expected,
                                  const std::string& expected_text) {
    using slim::Error;
    if (!t) throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(name) + " is required");
    if (!t->data) throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(name) + ".data is NULL");
    if (t->dtype != SLIM_DTYPE_FLOAT32)
        throw Error(SLIM_ERR_DTYPE, std::string(name) + ": dtype must be float32 (SLIM_DTYPE_FLOAT32=0), got " + std::to_string(t->dtype));
    if (t->device_type != SLIM_DEVICE_CPU) throw Error(SLIM_ERR_DTYPE, std::string(name) + ": must be in CPU memory for this build");
    if (!t->shape || t->ndim != static_cast<int32_t>(expected.size()))
        throw Error(SLIM_ERR_SHAPE, std::string(name) + ": rank " + std::to_string(t->ndim) + ", expected " + expected_text);
    std::vector<int64_t> shape(t->shape, t->shape + t->ndim);
    for (size_t i = 0; i < expected.size(); ++i)
        if (shape[i] <= 0 || (expected[i] >= 0 && shape[i] != expected[i]))
            throw Error(SLIM_ERR_SHAPE, std::string(name) + ": shape " + shape_text(*t) + ", expected " + expected_text);
    int64_t total = 1;  // the element count must fit comfortably: no overflow in any size computed from it
    for (int64_t d : shape)
        if (__builtin_mul_overflow(total, d, &total) || total > kMaxElements)
            throw Error(SLIM_ERR_SHAPE, std::string(name) + ": shape " + shape_text(*t) + " has too many elements");
    if (t->strides) {
        int64_t stride = 1;
        for (int i = t->ndim - 1; i >= 0; --i) {
            if (shape[i] > 1 && t->strides[i] != stride)
                throw Error(SLIM_ERR_DTYPE, std::string(name) + ": must be C-contiguous (strides do not match the shape)");
            stride *= shape[i];
        }
    }
    return shape;
}

size_t element_count(const std::vector<int64_t>& shape) {
    size_t n = 1;
    for (int64_t d : shape) n *= static_cast<size_t>(d);
    return n;
}

void check_finite(const slim_tensor* t, const std::vector<int64_t>& shape, const char* name) {
    const float* data = static_cast<const float*>(t->data);
    for (size_t i = 0, n = element_count(shape); i < n; ++i)
        if (!std::isfinite(data[i]))
            throw slim::Error(SLIM_ERR_NUMERICS, std::string(name) + " contains NaN or Inf (element " + std::to_string(i) + ")");
}

// The X-Slim policy of a request: cache_policy JSON, else a step-only policy from step_cache_threshold
// >= 0, else the bundle's default.
slim::XSlimPolicy request_policy(const slim_generate_params& p, const slim::Engine& engine, size_t steps) {
    using slim::Error;
    const slim::Program& program = engine.manifest().program;
    slim::XSlimPolicy policy = program.cache;
    if (p.cache_policy) {
        constexpr size_t kMaxPolicy = 1 << 20;
        const size_t length = strnlen(p.cache_policy, kMaxPolicy + 1);
        if (length > kMaxPolicy) throw Error(SLIM_ERR_INVALID_ARGUMENT, "cache_policy: longer than 1 MiB");
        try {
            policy = slim::parse_policy(slim::json::parse(std::string(p.cache_policy, length)), steps, "cache_policy");
        } catch (const slim::json::FieldError& e) {
            throw Error(SLIM_ERR_INVALID_ARGUMENT, e.what());
        } catch (const std::runtime_error& e) { throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string("cache_policy: ") + e.what()); }
    } else if (p.step_cache_threshold >= 0) {
        policy = slim::XSlimPolicy{};
        policy.enabled = p.step_cache_threshold > 0;
        policy.early_warning = p.step_cache_threshold;
        policy.warmup_steps = program.cache.enabled ? program.cache.warmup_steps : 2;
    }
    if (!policy.schedule.empty() && policy.schedule.size() != steps)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "the bundle's X-Slim schedule has " + std::to_string(policy.schedule.size()) +
                                                   " steps but this request runs " + std::to_string(steps) + "; pass a cache_policy");
    if (policy.uses(slim::Level::Token) && !engine.has_token_stages)
        throw Error(
            SLIM_ERR_INVALID_ARGUMENT,
            "cache_policy uses the X-Slim token level but this bundle has no block_N_tokens stages; re-export it with --token-stages");
    return policy;
}

}  // namespace

extern "C" {

const char* slim_version(void) { return SLIMENGINE_VERSION; }
int32_t slim_abi_version_major(void) { return SLIM_ABI_VERSION_MAJOR; }
const char* slim_last_error(void) { return last_error.c_str(); }

const char* slim_status_name(slim_status status) {
    switch (status) {
        case SLIM_OK:
            return "SLIM_OK";
        case SLIM_ERR_INVALID_ARGUMENT:
            return "SLIM_ERR_INVALID_ARGUMENT";
        case SLIM_ERR_IO:
            return "SLIM_ERR_IO";
        case SLIM_ERR_BUNDLE:
            return "SLIM_ERR_BUNDLE";
        case SLIM_ERR_BACKEND:
            return "SLIM_ERR_BACKEND";
        case SLIM_ERR_SHAPE:
            return "SLIM_ERR_SHAPE";
        case SLIM_ERR_DTYPE:
            return "SLIM_ERR_DTYPE";
        case SLIM_ERR_NUMERICS:
            return "SLIM_ERR_NUMERICS";
        case SLIM_ERR_OUT_OF_MEMORY:
            return "SLIM_ERR_OUT_OF_MEMORY";
        case SLIM_ERR_INTERNAL:
            return "SLIM_ERR_INTERNAL";
    }
    return "SLIM_ERR_UNKNOWN";
}

slim_engine_params slim_engine_default_params(void) {
    slim_engine_params p{};
    p.struct_size = sizeof(p);
    p.onnxruntime_library = nullptr;
    p.verify_checksums = 1;
    p.intra_op_threads = 0;
    p.device_type = SLIM_DEVICE_CPU;
    p.device_id = 0;
    return p;
}

slim_status slim_engine_open(const char* path, const slim_engine_params* params, slim_engine** out) {
    if (!out) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_open: out is NULL");
    *out = nullptr;
    return guarded([&] {
        if (!path || !*path) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_open: path is empty");
        slim_engine_params p = read_params(params, slim_engine_default_params(),
                                           offsetof(slim_engine_params, intra_op_threads) + sizeof(int32_t), "slim_engine_params");
        if (p.intra_op_threads < 0) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_params.intra_op_threads must be >= 0");
        if (p.device_type != SLIM_DEVICE_CPU && p.device_type != SLIM_DEVICE_CUDA)
            throw slim::Error(
                SLIM_ERR_INVALID_ARGUMENT,
                "slim_engine_params.device_type must be SLIM_DEVICE_CPU (1) or SLIM_DEVICE_CUDA (2), got " + std::to_string(p.device_type));
        if (p.device_id < 0 || (p.device_type == SLIM_DEVICE_CPU && p.device_id != 0))
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                              "slim_engine_params.device_id must be >= 0 (and 0 for the CPU), got " + std::to_string(p.device_id));
        slim::EngineOptions options{p.onnxruntime_library, p.verify_checksums != 0, p.intra_op_threads,
                                    p.device_type == SLIM_DEVICE_CUDA ? p.device_id : -1};
        auto engine = std::make_unique<slim_engine>();
        engine->engine = std::make_unique<slim::Engine>(path, options);
        *out = engine.release();
    });
}

void slim_engine_close(slim_engine* engine) { delete engine; }

const char* slim_engine_manifest(const slim_engine* engine) { return engine ? engine->engine->manifest().text.c_str() : ""; }

int32_t slim_engine_stage_count(const slim_engine* engine) { return engine ? static_cast<int32_t>(engine->engine->stages().size()) : 0; }

const char* slim_engine_stage_name(const slim_engine* engine, int32_t index) {
    if (!engine || index < 0 || index >= slim_engine_stage_count(engine)) return nullptr;
    return engine->engine->stages()[index]->name().c_str();
}

slim_status slim_session_create(slim_engine* engine, slim_session** out) {
    if (!out) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_create: out is NULL");
    *out = nullptr;
    if (!engine) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_create: engine is NULL");
    return guarded([&] {
        auto session = std::make_unique<slim_session>();
        session->program = std::make_unique<slim::Sd3Session>(*engine->engine);
        session->owner = engine;
        *out = session.release();
    });
}

void slim_session_destroy(slim_session* session) { delete session; }

slim_generate_params slim_generate_default_params(void) {
    slim_generate_params p{};
    p.struct_size = sizeof(p);
    p.guidance_scale = -1.0f;
    p.step_cache_threshold = -1.0f;
    p.num_steps = 0;
    p.shift = 3.0f;
    return p;
}

slim_status slim_generate(slim_session* session, const slim_generate_params* params, const slim_tensor* latents_out,
                          slim_generate_stats* stats) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_generate: session is NULL");
    if (!params) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_generate: params is NULL (prompt and pooled embeddings are required)");
    return guarded([&] {
        using slim::Error;
        slim_generate_params p = read_params(params, slim_generate_default_params(),
                                             offsetof(slim_generate_params, guidance_scale) + sizeof(float), "slim_generate_params");
        if (stats && stats->struct_size < offsetof(slim_generate_stats, backend_ms) + sizeof(double))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_stats.struct_size must be sizeof(slim_generate_stats)");
        const slim::Manifest& m = session->owner->engine->manifest();
        const slim::Sd3Config& c = m.config;
        const std::string J = std::to_string(c.joint_attention_dim), P = std::to_string(c.pooled_projection_dim);

        auto prompt = check_tensor(p.prompt_embeds, "prompt_embeds", {-1, -1, c.joint_attention_dim}, "[B,L," + J + "]");
        const int64_t B = prompt[0], L = prompt[1];
        if (B > kMaxBatch || L > kMaxText)
            throw Error(SLIM_ERR_SHAPE, "prompt_embeds: batch must be <= " + std::to_string(kMaxBatch) +
                                            " and text length <= " + std::to_string(kMaxText) + ", got " + shape_text(*p.prompt_embeds));
        auto pooled = check_tensor(p.pooled_embeds, "pooled_embeds", {B, c.pooled_projection_dim}, "[" + std::to_string(B) + "," + P + "]");
        if (!std::isfinite(p.guidance_scale)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "guidance_scale must be finite");
        if (!std::isfinite(p.step_cache_threshold)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "step_cache_threshold must be finite");
        if (p.num_steps < 0 || p.num_steps > 10000)
            throw Error(SLIM_ERR_INVALID_ARGUMENT,
                        "num_steps must be 0 (the bundle's program) or 1 to 10000, got " + std::to_string(p.num_steps));
        if (p.num_steps > 0 && !(std::isfinite(p.shift) && p.shift > 0))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "shift must be a positive number, got " + std::to_string(p.shift));
        slim::Program plan;
        if (p.num_steps > 0) plan = slim::plain_program(m.program, p.num_steps, p.shift);
        const slim::Program& program = p.num_steps > 0 ? plan : m.program;
        const slim::XSlimPolicy cache = request_policy(p, *session->owner->engine, program.steps.size());
        const float guidance = p.guidance_scale < 0 ? m.program.guidance_scale : p.guidance_scale;
        const bool cfg = guidance > 1.0f;
        if (cfg && (!p.negative_prompt_embeds || !p.negative_pooled_embeds))
            throw Error(SLIM_ERR_INVALID_ARGUMENT,
                        "guidance scale " + std::to_string(guidance) + " > 1 needs negative_prompt_embeds and negative_pooled_embeds");
        const std::string C = std::to_string(c.out_channels), Bs = std::to_string(B);
        auto out = check_tensor(latents_out, "latents_out", {B, c.out_channels, -1, -1}, "[" + Bs + "," + C + ",H,W]");
        const int64_t H = out[2], W = out[3];
        if (H % c.patch_size || W % c.patch_size || H > c.max_latent_size || W > c.max_latent_size)
            throw Error(SLIM_ERR_SHAPE, "latents: height and width must be multiples of " + std::to_string(c.patch_size) + " up to " +
                                            std::to_string(c.max_latent_size) + ", got " + std::to_string(H) + "x" + std::to_string(W));
        if (c.in_channels != c.out_channels) throw Error(SLIM_ERR_BUNDLE, "in_channels != out_channels: not a sampling model");
        check_finite(p.prompt_embeds, prompt, "prompt_embeds");
        check_finite(p.pooled_embeds, pooled, "pooled_embeds");
        if (cfg) {
            auto neg = check_tensor(p.negative_prompt_embeds, "negative_prompt_embeds", prompt,
                                    shape_text(*p.prompt_embeds) + " (as prompt_embeds)");
            auto neg_pooled = check_tensor(p.negative_pooled_embeds, "negative_pooled_embeds", pooled,
                                           shape_text(*p.pooled_embeds) + " (as pooled_embeds)");
            check_finite(p.negative_prompt_embeds, neg, "negative_prompt_embeds");
            check_finite(p.negative_pooled_embeds, neg_pooled, "negative_pooled_embeds");
        }
        if (p.latents) {
            auto lat = check_tensor(p.latents, "latents", out, shape_text(*latents_out) + " (as latents_out)");
            check_finite(p.latents, lat, "latents");
        }

        slim::GenerateRequest request;
        request.batch = static_cast<int>(B);
        request.text_len = static_cast<int>(L);
        request.height = static_cast<int>(H);
        request.width = static_cast<int>(W);
        request.prompt = static_cast<const float*>(p.prompt_embeds->data);
        request.pooled = static_cast<const float*>(p.pooled_embeds->data);
        if (cfg) {
            request.negative_prompt = static_cast<const float*>(p.negative_prompt_embeds->data);
            request.negative_pooled = static_cast<const float*>(p.negative_pooled_embeds->data);
        }
        request.latents = p.latents ? static_cast<const float*>(p.latents->data) : nullptr;
        request.seed = p.seed;
        request.guidance_scale = guidance;
        request.cache = &cache;
        request.program = &program;
        request.out = static_cast<float*>(latents_out->data);
        slim::GenerateStats s = session->program->generate(request);
        if (stats) {
            stats->steps = s.steps;
            stats->blocks_run = s.blocks_run;
            stats->stage_calls = s.stage_calls;
            stats->effective_nfe = s.effective_nfe;
            stats->total_ms = s.total_ms;
            stats->backend_ms = s.backend_ms;
            if (stats->struct_size >= offsetof(slim_generate_stats, flop_fraction) + sizeof(double)) stats->flop_fraction = s.flop_fraction;
        }
    });
}

int32_t slim_session_step_count(const slim_session* session) {
    return session ? static_cast<int32_t>(session->program->step_stats().size()) : 0;
}

slim_status slim_session_step_stats(const slim_session* session, int32_t index, slim_step_stats* out) {
    if (!session || !out || index < 0 || index >= slim_session_step_count(session))
        return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_step_stats: NULL argument or step index out of range");
    if (out->struct_size < offsetof(slim_step_stats, ms) + sizeof(double))
        return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_step_stats.struct_size must be sizeof(slim_step_stats)");
    const slim::StepStats& s = session->program->step_stats()[index];
    out->sigma = s.sigma;
    out->sigma_next = s.sigma_next;
    out->blocks_run = s.blocks_run;
    out->level = s.level;
    out->ms = s.ms;
    if (out->struct_size >= sizeof(slim_step_stats)) {  // ABI 0.2 fields
        out->blocks_reused = s.blocks_reused;
        out->tokens_computed = s.tokens_computed;
        out->flop_fraction = s.flop_fraction;
    }
    return SLIM_OK;
}

slim_status slim_session_stage_stats(const slim_session* session, int32_t index, slim_stage_stats* out) {
    if (!session || !out || index < 0 || index >= static_cast<int32_t>(session->program->stage_stats().size()))
        return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_stage_stats: NULL argument or stage index out of range");
    if (out->struct_size < sizeof(slim_stage_stats))
        return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_stage_stats.struct_size must be sizeof(slim_stage_stats)");
    const slim::StageStats& s = session->program->stage_stats()[index];
    out->calls = s.calls;
    out->total_ms = s.ms;
    return SLIM_OK;
}

slim_status slim_session_set_profiling(slim_session* session, int32_t enabled) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_set_profiling: session is NULL");
    session->program->profiler().set_enabled(enabled != 0);
    return SLIM_OK;
}

int32_t slim_session_event_count(const slim_session* session) {
    return session ? static_cast<int32_t>(session->program->profiler().events().size()) : 0;
}

slim_status slim_session_event(const slim_session* session, int32_t index, slim_event* out) {
    if (!session || !out || index < 0 || index >= slim_session_event_count(session))
        return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_event: NULL argument or event index out of range");
    if (out->struct_size < sizeof(slim_event)) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_event.struct_size must be sizeof(slim_event)");
    const slim::ProfileEvent& e = session->program->profiler().events()[index];
    out->kind = e.kind;
    out->step = e.step;
    out->block = e.block;
    out->stage = e.stage;
    out->level = e.level;
    out->start_ns = e.start_ns;
    out->end_ns = e.end_ns;
    out->device_ns = e.device_ns;
    return SLIM_OK;
}

}  // extern "C"
