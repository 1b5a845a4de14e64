// The C ABI: handles, params structs read and checked, caller tensors checked, exceptions turned into
// status codes. What a call means lives behind it: the programs (sd3_program, lemur_program), X-Slim
// policies (xslim), the generic stage call (ort_backend), bank files (memory_bank).
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "call_gate.hpp"
#include "engine.hpp"
#include "error.hpp"
#include "lemur_program.hpp"
#include "memory_bank.hpp"
#include "program.hpp"
#include "prompt_program.hpp"
#include "sampling_plan.hpp"
#include "sd3_program.hpp"
#include "slimengine.h"
#include "tensor_args.hpp"
#include "tokenizer.hpp"
#include "unicode_text.hpp"

#ifndef SLIMENGINE_VERSION
#define SLIMENGINE_VERSION "0.0.0"
#endif

// Each handle counts its calls in flight (call_gate.hpp): closing it waits for them instead of
// freeing what they use.
struct slim_engine {
    std::shared_ptr<const slim::Engine> engine;  // shared with its sessions: closed while they run, it lives until the last is destroyed
    mutable slim::CallGate gate;
};

struct slim_session {
    std::shared_ptr<const slim::Engine> engine;     // declared first: destroyed after the program that uses it
    std::unique_ptr<slim::ProgramSession> program;  // the family's program (nullptr: a plain ONNX engine)
    slim::PromptCache prompts;                      // slim_generate_prompt's encoded prompt texts
    mutable slim::CallGate gate;                    // one call at a time
};

struct slim_bank {
    std::unique_ptr<slim::MemoryBank> bank;
    mutable slim::CallGate gate;
};

namespace {

thread_local std::string last_error;

// Limits of the exported graphs' dynamic dimensions (export/onnx_export.py).
constexpr int64_t kMaxBatch = 4096, kMaxText = 8192;
// Steps of a plain plan (num_steps); the Python binding checks the same bound (runtime.py MAX_STEPS).
constexpr int32_t kMaxSteps = 10000;

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

slim::Verify verify_level(int32_t level, const char* what) {
    if (level != SLIM_VERIFY_FAST && level != SLIM_VERIFY_FULL)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                          std::string(what) + " must be SLIM_VERIFY_FAST (0) or SLIM_VERIFY_FULL (1), got " + std::to_string(level));
    return level == SLIM_VERIFY_FULL ? slim::Verify::Full : slim::Verify::Fast;
}

// A caller's struct larger than this library's: its header is newer, and fields it sets would be
// ignored (params) or not written (stats), so it is refused rather than truncated.
void check_not_newer(uint32_t given, size_t known, const char* what) {
    if (given > known)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + ".struct_size is " + std::to_string(given) + ", larger than " +
                                                         std::to_string(known) + ", sizeof(" + what + ") in this library (ABI " +
                                                         std::to_string(SLIM_ABI_VERSION_MAJOR) + "." +
                                                         std::to_string(SLIM_ABI_VERSION_MINOR) +
                                                         "): the caller was built against a newer slimengine.h; use a library at "
                                                         "least as new as its header");
}

// Copies a caller's params struct over the defaults: older callers pass smaller structs (at least
// `required_size`: the first version's fields), and only the fields they know are read.
template <typename T>
T read_params(const T* given, T defaults, size_t required_size, const char* what) {
    if (!given) return defaults;
    if (given->struct_size < required_size)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                          std::string(what) + ".struct_size is " + std::to_string(given->struct_size) + "; set it to sizeof(" + what + ")");
    check_not_newer(given->struct_size, sizeof(T), what);
    // Every version's sizeof is a multiple of the struct's alignment (each version has a pointer). Any other size
    // would end inside a field, and a pointer copied in part (a progress callback, a JSON string) would be followed.
    if (given->struct_size % alignof(T) != 0)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + ".struct_size is " + std::to_string(given->struct_size) +
                                                         ", which is no version's sizeof(" + what + ") (those are multiples of " +
                                                         std::to_string(alignof(T)) + "); set it to sizeof(" + what + ")");
    std::memcpy(&defaults, given, given->struct_size);
    defaults.struct_size = sizeof(T);
    return defaults;
}

// A caller's stats or info struct the library fills: at least `required_size` (older callers' structs
// get the fields they know), at most this library's.
void check_out_size(uint32_t given, size_t required_size, size_t known, const char* what) {
    if (given < required_size)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + ".struct_size must be sizeof(" + what + ")");
    check_not_newer(given, known, what);
}

constexpr int64_t kMaxBankBatch = int64_t(1) << 24;  // ids per bank call
using slim::check_finite;
using slim::check_range;
using slim::check_tensor;
using slim::kMaxId;
using slim::shape_text;

// The session's program as the type `call` runs, or INVALID_ARGUMENT naming the engine's family and `runs` (what the call takes).
template <typename P>
P& program_as(slim_session* session, const char* call, const char* runs) {
    P* program = dynamic_cast<P*>(session->program.get());
    if (!program)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                          std::string(call) + ": the engine's family is '" + session->engine->manifest().family + "'; " + runs);
    return *program;
}

// The event recorder of the session's program (SD3 generate, LEMUR embed/score), or nullptr (a plain ONNX engine).
slim::Profiler* profiler_of(const slim_session* session) { return session->program ? &session->program->profiler() : nullptr; }

void fill_stats(slim_lemur_stats* out, const slim::LemurStats& s) {
    if (!out) return;
    out->batch = static_cast<int32_t>(s.batch);
    out->history_found = s.history_found;
    out->history_missing = s.history_missing;
    out->total_ms = s.total_ms;
    out->backend_ms = s.backend_ms;
    out->bank_ms = s.bank_ms;
}

void check_stats_size(const slim_lemur_stats* stats) {
    if (stats) check_out_size(stats->struct_size, sizeof(slim_lemur_stats), sizeof(slim_lemur_stats), "slim_lemur_stats");
}

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// The session's results of its last call are read under its gate too: while another thread's call
// runs, a count is 0 and a read gives SLIM_ERR_BUSY.
template <typename F>
int32_t count_when_idle(const slim_session* session, F&& count) {
    if (!session || !session->gate.try_enter_exclusive()) return 0;
    const int32_t n = count();
    session->gate.leave();
    return n;
}
const std::vector<slim::StepStats>& step_stats_of(const slim_session* session) {
    static const std::vector<slim::StepStats> none;  // only SD3 generations have steps
    const auto* sd3 = dynamic_cast<const slim::Sd3Session*>(session->program.get());
    return sd3 ? sd3->step_stats() : none;
}
const std::vector<slim::StageStats>& stage_stats_of(const slim_session* session) {
    static const std::vector<slim::StageStats> none;  // plain ONNX engines: slim_stage_run keeps no stats
    return session->program ? session->program->stage_stats() : none;
}
const std::vector<slim::ProfileEvent>& events_of(const slim_session* session) {
    static const std::vector<slim::ProfileEvent> none;
    const slim::Profiler* profiler = profiler_of(session);
    return profiler ? profiler->events() : none;
}
template <typename T>
const T& item(const std::vector<T>& all, int32_t index, const void* out, const char* call) {
    if (!out || index < 0 || index >= static_cast<int32_t>(all.size()))
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string(call) + ": NULL argument or index out of range");
    return all[index];
}

}  // namespace

extern "C" {

const char* slim_version(void) { return SLIMENGINE_VERSION; }
int32_t slim_abi_version_major(void) { return SLIM_ABI_VERSION_MAJOR; }
void slim_abi_version(int32_t* major, int32_t* minor) {
    if (major) *major = SLIM_ABI_VERSION_MAJOR;
    if (minor) *minor = SLIM_ABI_VERSION_MINOR;
}
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
        case SLIM_ERR_NOT_FOUND:
            return "SLIM_ERR_NOT_FOUND";
        case SLIM_ERR_BUSY:
            return "SLIM_ERR_BUSY";
        case SLIM_ERR_CANCELLED:
            return "SLIM_ERR_CANCELLED";
    }
    return "SLIM_ERR_UNKNOWN";
}

slim_engine_params slim_engine_default_params(void) {
    slim_engine_params p{};
    p.struct_size = sizeof(p);
    p.onnxruntime_library = nullptr;
    p.verify_checksums = SLIM_VERIFY_FAST;
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
        slim::EngineOptions options{p.onnxruntime_library, verify_level(p.verify_checksums, "slim_engine_params.verify_checksums"),
                                    p.intra_op_threads, p.device_type == SLIM_DEVICE_CUDA ? p.device_id : -1};
        auto engine = std::make_unique<slim_engine>();
        engine->engine = std::make_unique<slim::Engine>(path, options);
        *out = engine.release();
    });
}

slim_status slim_bundle_verify(const char* path, int32_t level, slim_verify_progress progress, void* user) {
    return guarded([&] {
        if (!path || !*path) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_bundle_verify: path is empty");
        const slim::Verify verify = verify_level(level, "slim_bundle_verify: level");
        slim::BundleDir dir(path);
        const slim::Manifest manifest = slim::load_manifest(dir);
        slim::VerifyProgress report;
        if (progress)
            report = [&](const std::string& file, uint64_t done, uint64_t total) {
                if (progress(user, file.c_str(), done, total) != 0)
                    throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_bundle_verify: stopped by the progress callback");
            };
        slim::verify_files(dir, manifest, verify, report);
    });
}

void slim_engine_close(slim_engine* engine) {
    if (!engine) return;
    if (engine->gate.close()) delete engine;  // false: a forked child's copy of a handle a parent thread was using
}

const char* slim_engine_manifest(const slim_engine* engine) { return engine ? engine->engine->manifest().text.c_str() : ""; }

int32_t slim_engine_stage_count(const slim_engine* engine) { return engine ? static_cast<int32_t>(engine->engine->stages().size()) : 0; }

const char* slim_engine_stage_name(const slim_engine* engine, int32_t index) {
    if (!engine || index < 0 || index >= slim_engine_stage_count(engine)) return nullptr;
    return engine->engine->stages()[index]->name().c_str();
}

slim_status slim_engine_get_info(const slim_engine* engine, slim_engine_info* out) {
    if (!engine) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_get_info: engine is NULL");
    if (!out) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_get_info: out is NULL");
    return guarded([&] {
        slim::GateEntry use(engine->gate, "slim_engine_get_info: the engine", false);  // a close waits for it
        check_out_size(out->struct_size, sizeof(slim_engine_info), sizeof(slim_engine_info), "slim_engine_info");
        const slim::Engine& e = *engine->engine;
        const slim::Manifest& m = e.manifest();
        slim_engine_info info{};
        info.struct_size = sizeof(info);
        info.family = m.kind == slim::Family::Sd3 ? SLIM_FAMILY_SD3 : m.kind == slim::Family::Lemur ? SLIM_FAMILY_LEMUR : SLIM_FAMILY_ONNX;
        info.precision = m.precision == "fp16"   ? SLIM_DTYPE_FLOAT16
                         : m.precision == "bf16" ? SLIM_DTYPE_BFLOAT16
                         : m.precision == "int8" ? SLIM_DTYPE_INT8
                                                 : SLIM_DTYPE_FLOAT32;
        info.stage_count = static_cast<int32_t>(e.stages().size());
        info.cache_first_block = info.cache_last_block = -1;
        if (m.kind == slim::Family::Sd3) {
            const slim::Sd3Config& c = m.config;
            const slim::Program& p = m.program;
            info.num_blocks = c.num_layers;
            info.hidden_size = c.inner_dim;
            info.num_attention_heads = c.num_attention_heads;
            info.latent_channels = c.in_channels;
            info.patch_size = c.patch_size;
            info.joint_attention_dim = c.joint_attention_dim;
            info.pooled_projection_dim = c.pooled_projection_dim;
            info.default_latent_size = c.default_latent_size;
            info.max_latent_size = c.max_latent_size;
            info.num_steps = static_cast<int32_t>(p.steps.size());
            info.cache_first_block = p.cache_first;
            info.cache_last_block = p.cache_last;
            info.compensation = p.compensation == slim::Compensation::Mlp        ? SLIM_COMPENSATION_MLP
                                : p.compensation == slim::Compensation::Identity ? SLIM_COMPENSATION_IDENTITY
                                                                                 : SLIM_COMPENSATION_NONE;
            info.xslim = !p.cache.enabled ? SLIM_XSLIM_NONE : p.cache.schedule.empty() ? SLIM_XSLIM_ONLINE : SLIM_XSLIM_SCHEDULE;
            info.has_token_stages = e.has_token_stages ? 1 : 0;
            info.guidance_scale = p.guidance_scale;
        } else if (m.kind == slim::Family::Lemur) {
            const slim::LemurConfig& c = m.lemur;
            info.embed_dim = c.embed_dim;
            info.vocab_size = c.vocab_size;
            info.num_segments = c.num_segments;
            info.max_text_len = c.max_text_len;
            info.max_query_len = c.max_query_len;
            info.image_size = c.image_size;
            info.max_frames = c.max_frames;
            info.max_batch = c.max_batch;
            info.max_history = c.max_history;
            info.model_version = c.model_version;
        }
        *out = info;
    });
}

slim_status slim_engine_program_step(const slim_engine* engine, int32_t index, slim_program_step* out) {
    if (!engine) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_program_step: engine is NULL");
    return guarded([&] {
        slim::GateEntry use(engine->gate, "slim_engine_program_step: the engine", false);  // a close waits for it
        const slim::Manifest& m = engine->engine->manifest();
        if (m.kind != slim::Family::Sd3)
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                              "slim_engine_program_step: the engine's family is '" + m.family + "'; sampling programs are sd3's");
        const slim::StepPlan& s = item(m.program.steps, index, out, "slim_engine_program_step");
        check_out_size(out->struct_size, sizeof(slim_program_step), sizeof(slim_program_step), "slim_program_step");
        out->record_delta = s.record_delta ? 1 : 0;
        out->skip_cached_blocks = s.skip_cached_blocks ? 1 : 0;
        out->sigma = s.sigma;
        out->sigma_next = s.sigma_next;
        out->timestep = s.timestep;
    });
}

int32_t slim_engine_tokenizer_count(const slim_engine* engine) {
    return engine ? static_cast<int32_t>(engine->engine->tokenizers().decls().size()) : 0;
}

const char* slim_engine_tokenizer_role(const slim_engine* engine, int32_t index) {
    if (!engine || index < 0 || index >= slim_engine_tokenizer_count(engine)) return nullptr;
    return engine->engine->tokenizers().decls()[index].role.c_str();
}

slim_status slim_tokenize(const slim_engine* engine, const char* role, const char* prompt, int64_t* ids_out, size_t capacity,
                          size_t* count) {
    if (count) *count = 0;
    if (!engine || !role || !prompt || !count)
        return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_tokenize: engine, role, prompt and count must not be NULL");
    return guarded([&] {
        slim::GateEntry use(engine->gate, "slim_tokenize: the engine", false);
        const slim::Tokenizers& tokenizers = engine->engine->tokenizers();
        const slim::TokenizerDecl* decl = tokenizers.find(role);
        if (!decl) {
            std::string roles;
            for (const auto& d : tokenizers.decls()) roles += (roles.empty() ? "" : ", ") + d.role;
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string("slim_tokenize: this bundle has no tokenizer '") + role +
                                                             "' (it has: " + (roles.empty() ? "none; export it with --tokenizers" : roles) +
                                                             ")");
        }
        *count = static_cast<size_t>(decl->max_length);
        if (capacity < *count)
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_tokenize: ids_out holds " + std::to_string(capacity) + " ids; tokenizer " +
                                                             decl->role + " writes " + std::to_string(*count));
        if (!ids_out) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_tokenize: ids_out is NULL");
        // Bounded: a prompt past the limit is refused without reading all of it.
        const size_t length = strnlen(prompt, slim::kMaxPromptBytes + 1);
        const std::vector<int64_t> ids = tokenizers.tokenize(*decl, prompt, length);
        std::copy(ids.begin(), ids.end(), ids_out);
    });
}

slim_status slim_session_create(slim_engine* engine, slim_session** out) {
    if (!out) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_create: out is NULL");
    *out = nullptr;
    if (!engine) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_create: engine is NULL");
    return guarded([&] {
        slim::GateEntry use(engine->gate, "slim_session_create: the engine", false);
        auto session = std::make_unique<slim_session>();
        session->program = slim::make_program(*engine->engine);
        session->engine = engine->engine;
        *out = session.release();
    });
}

void slim_session_destroy(slim_session* session) {
    if (!session) return;
    // From the progress callback of a call on this session (same thread): freed when that call returns.
    if (session->gate.close_later([session] { delete session; })) return;
    if (session->gate.close()) delete session;  // false: a forked child's copy of a handle a parent thread was using
}

slim_status slim_session_set_prompt_cache(slim_session* session, int32_t capacity) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_set_prompt_cache: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_session_set_prompt_cache: the session", true);
        if (capacity < 0 || capacity > SLIM_PROMPT_CACHE_MAX)
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_session_set_prompt_cache: capacity must be 0 (off) to " +
                                                             std::to_string(SLIM_PROMPT_CACHE_MAX) + " prompt texts, got " +
                                                             std::to_string(capacity));
        session->prompts.set_capacity(capacity);
    });
}

slim_status slim_session_clear_prompt_cache(slim_session* session) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_clear_prompt_cache: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_session_clear_prompt_cache: the session", true);
        session->prompts.clear();
    });
}

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
        slim::GateEntry use(session->gate, "slim_generate: the session", true);
        using slim::Error;
        slim::Sd3Session& sd3 = program_as<slim::Sd3Session>(session, "slim_generate", "slim_generate runs sd3 bundles");
        slim_generate_params p = read_params(params, slim_generate_default_params(),
                                             offsetof(slim_generate_params, guidance_scale) + sizeof(float), "slim_generate_params");
        if (stats)
            check_out_size(stats->struct_size, offsetof(slim_generate_stats, backend_ms) + sizeof(double), sizeof(slim_generate_stats),
                           "slim_generate_stats");
        const slim::Manifest& m = session->engine->manifest();
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
        if (p.num_steps < 0 || p.num_steps > kMaxSteps)
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "num_steps must be 0 (the bundle's program) or 1 to " + std::to_string(kMaxSteps) +
                                                       ", got " + std::to_string(p.num_steps));
        if (p.num_steps > 0 && !(std::isfinite(p.shift) && p.shift > 0))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "shift must be a positive number, got " + std::to_string(p.shift));
        slim::Program plan;
        if (p.num_steps > 0) plan = slim::plain_program(m.program, p.num_steps, p.shift);
        const slim::Program& program = p.num_steps > 0 ? plan : m.program;
        const slim::XSlimPolicy cache = slim::resolve_policy(m.program.cache, p.cache_policy, p.step_cache_threshold, program.steps.size(),
                                                             session->engine->has_token_stages);
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
        request.progress = slim::Progress{p.progress, p.progress_user};  // zeros from an older caller's smaller struct
        slim::GenerateStats s = sd3.generate(request);
        if (stats) {
            stats->steps = s.steps;
            stats->blocks_run = s.blocks_run;
            stats->stage_calls = s.stage_calls;
            stats->effective_nfe = s.effective_nfe;
            stats->total_ms = s.total_ms;
            stats->backend_ms = s.backend_ms;
            if (stats->struct_size >= offsetof(slim_generate_stats, flop_fraction) + sizeof(double)) stats->flop_fraction = s.flop_fraction;
            if (stats->struct_size >= offsetof(slim_generate_stats, transfer_bytes) + sizeof(uint64_t))
                stats->transfer_bytes = s.transfer_bytes;
        }
    });
}

slim_prompt_params slim_prompt_default_params(void) {
    slim_prompt_params p{};
    p.struct_size = sizeof(p);
    p.guidance_scale = -1.0f;
    p.step_cache_threshold = -1.0f;
    return p;
}

slim_status slim_generate_prompt(slim_session* session, const slim_prompt_params* params, uint8_t* image_out, size_t image_capacity,
                                 float* latents_out, size_t latents_capacity, slim_prompt_stats* stats) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: session is NULL");
    if (!params) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: params is NULL (prompts are required)");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_generate_prompt: the session", true);
        using slim::Error;
        slim::Sd3Session& sd3 = program_as<slim::Sd3Session>(session, "slim_generate_prompt", "slim_generate_prompt runs sd3 bundles");
        // ABI 0.7 callers' structs end before progress (params) and the prompt cache fields (stats).
        const slim_prompt_params p =
            read_params(params, slim_prompt_default_params(), offsetof(slim_prompt_params, progress), "slim_prompt_params");
        constexpr size_t stats_07 = offsetof(slim_prompt_stats, effective_nfe) + sizeof(double);
        if (stats) check_out_size(stats->struct_size, stats_07, sizeof(slim_prompt_stats), "slim_prompt_stats");
        const slim::Engine& engine = *session->engine;
        const std::string unsupported = slim::prompt_support(engine);
        if (!unsupported.empty()) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: " + unsupported);
        const slim::Manifest& m = engine.manifest();
        const slim::Sd3Config& c = m.config;
        const slim::PipelineConfig& pl = m.pipeline;

        if (!p.prompts || p.prompt_count < 1 || p.prompt_count > kMaxBatch)
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: prompts must not be NULL and prompt_count must be 1 to " +
                                                       std::to_string(kMaxBatch) + ", got " + std::to_string(p.prompt_count));
        slim::PromptRequest request;
        for (int32_t i = 0; i < p.prompt_count; ++i) {
            const std::string which = "[" + std::to_string(i) + "]";
            if (!p.prompts[i]) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: prompts" + which + " is NULL");
            // Bounded reads: a prompt past the limit is refused by the tokenizer without reading all of it.
            request.prompts.emplace_back(p.prompts[i], strnlen(p.prompts[i], slim::kMaxPromptBytes + 1));
            const char* negative = p.negative_prompts && p.negative_prompts[i] ? p.negative_prompts[i] : "";
            request.negatives.emplace_back(negative, strnlen(negative, slim::kMaxPromptBytes + 1));
            for (const std::string* text : {&request.prompts.back(), &request.negatives.back()})
                if (text->size() > slim::kMaxPromptBytes || !slim::unicode::is_utf8(text->data(), text->size()))
                    throw Error(SLIM_ERR_INVALID_ARGUMENT,
                                std::string("slim_generate_prompt: ") + (text == &request.prompts.back() ? "prompts" : "negative_prompts") +
                                    which + " is not UTF-8 or is longer than " + std::to_string(slim::kMaxPromptBytes) + " bytes");
        }
        const int64_t B = p.prompt_count, f = pl.scale_factor, step = f * c.patch_size, limit = f * c.max_latent_size;
        auto side = [&](int32_t given, const char* name) -> int64_t {
            if (given == 0) {
                if (c.default_latent_size <= 0)
                    throw Error(SLIM_ERR_INVALID_ARGUMENT,
                                std::string("slim_generate_prompt: the bundle states no default size; set ") + name);
                return c.default_latent_size * f;
            }
            if (given < 0 || given % step || given > limit)
                throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string("slim_generate_prompt: ") + name + " must be a multiple of " +
                                                           std::to_string(step) + " (the VAE's scale factor " + std::to_string(f) +
                                                           " x the patch size " + std::to_string(c.patch_size) + ") up to " +
                                                           std::to_string(limit) + " image pixels, got " + std::to_string(given));
            return given;
        };
        const int64_t H = side(p.height, "height"), W = side(p.width, "width");
        if (!std::isfinite(p.guidance_scale)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "guidance_scale must be finite");
        if (!std::isfinite(p.step_cache_threshold)) throw Error(SLIM_ERR_INVALID_ARGUMENT, "step_cache_threshold must be finite");
        if (p.num_steps < 0 || p.num_steps > kMaxSteps)
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "num_steps must be 0 (the bundle's program) or 1 to " + std::to_string(kMaxSteps) +
                                                       ", got " + std::to_string(p.num_steps));
        if (!(std::isfinite(p.shift) && p.shift >= 0))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "shift must be 0 (the pipeline's) or a positive number, got " + std::to_string(p.shift));
        // As the Python binding: a plain plan takes the pipeline's scheduler shift unless one is given.
        const float shift = p.shift > 0 ? p.shift : pl.scheduler_shift > 0 ? static_cast<float>(pl.scheduler_shift) : 3.0f;
        slim::Program plan;
        if (p.num_steps > 0) plan = slim::plain_program(m.program, p.num_steps, shift);
        const slim::Program& program = p.num_steps > 0 ? plan : m.program;
        const slim::XSlimPolicy cache =
            slim::resolve_policy(m.program.cache, p.cache_policy, p.step_cache_threshold, program.steps.size(), engine.has_token_stages);
        const int64_t image_bytes = B * H * W * 3, latent_count = B * c.out_channels * (H / f) * (W / f);
        if (!image_out) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: image_out is NULL");
        if (image_capacity < static_cast<size_t>(image_bytes))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: image_out must hold uint8 [" + std::to_string(B) + "," +
                                                       std::to_string(H) + "," + std::to_string(W) +
                                                       ",3] = " + std::to_string(image_bytes) + " bytes, image_capacity is " +
                                                       std::to_string(image_capacity));
        if (latents_out && latents_capacity < static_cast<size_t>(latent_count))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: latents_out must hold " + std::to_string(latent_count) +
                                                       " floats, latents_capacity is " + std::to_string(latents_capacity));
        if (p.latents) {
            const std::vector<int64_t> shape{B, c.out_channels, H / f, W / f};
            auto lat = check_tensor(p.latents, "latents", shape,
                                    "[" + std::to_string(B) + "," + std::to_string(c.out_channels) + "," + std::to_string(H / f) + "," +
                                        std::to_string(W / f) + "] (height and width / " + std::to_string(f) + ")");
            check_finite(p.latents, lat, "latents");
            request.latents = static_cast<const float*>(p.latents->data);
        }
        request.seed = p.seed;
        request.height = static_cast<int>(H);
        request.width = static_cast<int>(W);
        request.guidance_scale = p.guidance_scale < 0 ? m.program.guidance_scale : p.guidance_scale;
        request.cache = &cache;
        request.program = &program;
        request.image = image_out;
        request.latents_out = latents_out;
        request.progress = slim::Progress{p.progress, p.progress_user};
        const slim::PromptStats s = slim::generate_prompt(engine, sd3, session->prompts, request);
        if (stats) {
            stats->batch = static_cast<int32_t>(B);
            stats->height = static_cast<int32_t>(H);
            stats->width = static_cast<int32_t>(W);
            stats->steps = s.generate.steps;
            stats->encoder_calls = s.encoder_calls;
            stats->total_ms = s.total_ms;
            stats->tokenize_ms = s.tokenize_ms;
            stats->clip_l_ms = s.clip_l_ms;
            stats->clip_g_ms = s.clip_g_ms;
            stats->t5_ms = s.t5_ms;
            stats->steps_ms = s.generate.total_ms;
            stats->vae_decode_ms = s.vae_decode_ms;
            stats->effective_nfe = s.generate.effective_nfe;
            if (stats->struct_size >= sizeof(slim_prompt_stats)) {  // ABI 0.8 fields
                stats->prompt_cache_hits = s.cache_hits;
                stats->prompt_cache_misses = s.cache_misses;
                stats->prompt_cache_size = session->prompts.size();
                stats->prompt_cache_capacity = session->prompts.capacity();
                stats->blocks_run = s.generate.blocks_run;
                stats->stage_calls = s.generate.stage_calls;
                stats->flop_fraction = s.generate.flop_fraction;
                stats->backend_ms = s.generate.backend_ms;
                stats->transfer_bytes = s.generate.transfer_bytes;
            }
        }
    });
}

int32_t slim_session_step_count(const slim_session* session) {
    return count_when_idle(session, [&] { return static_cast<int32_t>(step_stats_of(session).size()); });
}

slim_status slim_session_step_stats(const slim_session* session, int32_t index, slim_step_stats* out) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_step_stats: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_session_step_stats: the session", true);
        const slim::StepStats& s = item(step_stats_of(session), index, out, "slim_session_step_stats");
        check_out_size(out->struct_size, offsetof(slim_step_stats, ms) + sizeof(double), sizeof(slim_step_stats), "slim_step_stats");
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
    });
}

slim_status slim_session_stage_stats(const slim_session* session, int32_t index, slim_stage_stats* out) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_stage_stats: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_session_stage_stats: the session", true);
        const slim::StageStats& s = item(stage_stats_of(session), index, out, "slim_session_stage_stats");
        check_out_size(out->struct_size, sizeof(slim_stage_stats), sizeof(slim_stage_stats), "slim_stage_stats");
        out->calls = s.calls;
        out->total_ms = s.ms;
    });
}

slim_status slim_session_set_profiling(slim_session* session, int32_t enabled) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_set_profiling: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_session_set_profiling: the session", true);
        slim::Profiler* profiler = profiler_of(session);
        if (!profiler)
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                              "slim_session_set_profiling: profiling records sd3 generations and lemur embed/score calls; this engine's "
                              "family is '" +
                                  session->engine->manifest().family + "'");
        profiler->set_enabled(enabled != 0);
        profiler->set_blocks((enabled & SLIM_PROFILE_BLOCKS) != 0);
    });
}

int32_t slim_session_event_count(const slim_session* session) {
    return count_when_idle(session, [&] { return static_cast<int32_t>(events_of(session).size()); });
}

slim_status slim_session_event(const slim_session* session, int32_t index, slim_event* out) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_event: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_session_event: the session", true);
        const slim::ProfileEvent& e = item(events_of(session), index, out, "slim_session_event");
        check_out_size(out->struct_size, sizeof(slim_event), sizeof(slim_event), "slim_event");
        out->kind = e.kind;
        out->step = e.step;
        out->block = e.block;
        out->stage = e.stage;
        out->level = e.level;
        out->start_ns = e.start_ns;
        out->end_ns = e.end_ns;
        out->device_ns = e.device_ns;
    });
}

// ---- generic stage call ----

slim_status slim_stage_run(slim_session* session, const char* stage, const slim_named_tensor* inputs, int32_t input_count,
                           const slim_named_tensor* outputs, int32_t output_count) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_stage_run: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_stage_run: the session", true);
        using slim::Error;
        const slim::Engine& engine = *session->engine;
        const int index = stage ? engine.stage_index(stage) : -1;
        if (index < 0)
            throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string("slim_stage_run: no stage named '") + (stage ? stage : "(null)") + "'");
        slim::run_named(engine.ort(), *engine.stages()[index], inputs, input_count, outputs, output_count);
    });
}

// ---- memory bank ----

slim_bank_params slim_bank_default_params(void) {
    slim_bank_params p{};
    p.struct_size = sizeof(p);
    p.dim = 0;
    p.read_only = 0;
    p.create = 1;
    p.sync_writes = 0;
    return p;
}

slim_status slim_bank_open(const char* path, const slim_bank_params* params, slim_bank** out) {
    if (!out) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_open: out is NULL");
    *out = nullptr;
    return guarded([&] {
        if (!path || !*path) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_open: path is empty");
        slim_bank_params p = read_params(params, slim_bank_default_params(), sizeof(slim_bank_params), "slim_bank_params");
        slim::BankOptions options;
        options.dim = p.dim;
        options.read_only = p.read_only != 0;
        options.create = p.create != 0;
        options.sync_writes = p.sync_writes != 0;
        auto bank = std::make_unique<slim_bank>();
        bank->bank = std::make_unique<slim::MemoryBank>(path, options);
        *out = bank.release();
    });
}

void slim_bank_close(slim_bank* bank) {
    if (!bank) return;
    if (bank->gate.close()) delete bank;  // false: a forked child's copy of a handle a parent thread was using
}

int32_t slim_bank_dim(const slim_bank* bank) { return bank ? bank->bank->dim() : 0; }  // fixed at open: no gate needed

int64_t slim_bank_count(const slim_bank* bank) {
    if (!bank) return 0;
    try {
        slim::GateEntry use(bank->gate, "slim_bank_count: the bank", false);
        return bank->bank->count();
    } catch (const slim::Error&) { return 0; }  // the bank is being closed
}

slim_status slim_bank_upsert(slim_bank* bank, const slim_tensor* ids, const slim_tensor* embeddings, uint32_t model_version) {
    if (!bank) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_upsert: bank is NULL");
    return guarded([&] {
        slim::GateEntry use(bank->gate, "slim_bank_upsert: the bank", false);
        const int64_t D = bank->bank->dim();
        auto id_shape = check_tensor(ids, "ids", {-1}, "[N]", SLIM_DTYPE_INT64);
        const int64_t N = id_shape[0];
        if (N > kMaxBankBatch) throw slim::Error(SLIM_ERR_SHAPE, "ids: at most " + std::to_string(kMaxBankBatch) + " per call");
        auto emb_shape =
            check_tensor(embeddings, "embeddings", {N, D}, "[" + std::to_string(N) + "," + std::to_string(D) + "] (ids, bank dim)");
        check_range(ids, id_shape, "ids", 0, kMaxId);
        check_finite(embeddings, emb_shape, "embeddings");
        bank->bank->upsert(static_cast<const int64_t*>(ids->data), static_cast<const float*>(embeddings->data), static_cast<size_t>(N),
                           model_version, now_us());
    });
}

slim_status slim_bank_delete(slim_bank* bank, const slim_tensor* ids, int64_t* deleted) {
    if (!bank) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_delete: bank is NULL");
    return guarded([&] {
        slim::GateEntry use(bank->gate, "slim_bank_delete: the bank", false);
        auto id_shape = check_tensor(ids, "ids", {-1}, "[N]", SLIM_DTYPE_INT64);
        if (id_shape[0] > kMaxBankBatch) throw slim::Error(SLIM_ERR_SHAPE, "ids: at most " + std::to_string(kMaxBankBatch) + " per call");
        size_t n = bank->bank->remove(static_cast<const int64_t*>(ids->data), static_cast<size_t>(id_shape[0]));
        if (deleted) *deleted = static_cast<int64_t>(n);
    });
}

slim_status slim_bank_lookup(const slim_bank* bank, const slim_tensor* ids, const slim_tensor* embeddings_out,
                             const slim_tensor* write_times_out, const slim_tensor* model_versions_out, int64_t* found) {
    if (!bank) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_lookup: bank is NULL");
    return guarded([&] {
        slim::GateEntry use(bank->gate, "slim_bank_lookup: the bank", false);
        const int64_t D = bank->bank->dim();
        const int64_t N = check_tensor(ids, "ids", {-1}, "[N]", SLIM_DTYPE_INT64)[0];
        if (N > kMaxBankBatch) throw slim::Error(SLIM_ERR_SHAPE, "ids: at most " + std::to_string(kMaxBankBatch) + " per call");
        const std::string Ns = std::to_string(N);
        check_tensor(embeddings_out, "embeddings_out", {N, D}, "[" + Ns + "," + std::to_string(D) + "] (ids, bank dim)");
        if (write_times_out) check_tensor(write_times_out, "write_times_out", {N}, "[" + Ns + "]", SLIM_DTYPE_INT64);
        if (model_versions_out) check_tensor(model_versions_out, "model_versions_out", {N}, "[" + Ns + "]", SLIM_DTYPE_INT64);
        size_t n =
            bank->bank->lookup(static_cast<const int64_t*>(ids->data), static_cast<size_t>(N), static_cast<float*>(embeddings_out->data),
                               write_times_out ? static_cast<int64_t*>(write_times_out->data) : nullptr,
                               model_versions_out ? static_cast<int64_t*>(model_versions_out->data) : nullptr);
        if (found) *found = static_cast<int64_t>(n);
    });
}

slim_status slim_bank_flush(slim_bank* bank) {
    if (!bank) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_flush: bank is NULL");
    return guarded([&] {
        slim::GateEntry use(bank->gate, "slim_bank_flush: the bank", false);
        bank->bank->flush();
    });
}

slim_status slim_bank_recovery_info(const slim_bank* bank, slim_bank_recovery* out) {
    if (!bank) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_recovery_info: bank is NULL");
    if (!out) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_recovery_info: out is NULL");
    return guarded([&] {
        check_out_size(out->struct_size, offsetof(slim_bank_recovery, header_corrected), sizeof(slim_bank_recovery), "slim_bank_recovery");
        slim::GateEntry use(bank->gate, "slim_bank_recovery_info: the bank", false);
        const slim::BankRecovery r = bank->bank->recovery();
        out->damaged_records = static_cast<int64_t>(r.damaged_records);
        out->dropped_records = static_cast<int64_t>(r.dropped_records);
        out->first_damaged_offset = r.first_damaged_offset;
        out->tail_bytes = static_cast<int64_t>(r.tail_bytes);
        if (out->struct_size >= sizeof(slim_bank_recovery)) out->header_corrected = r.header_corrected;  // ABI 0.9
    });
}

slim_status slim_bank_repair(const char* path, slim_bank_repair_report* out) {
    return guarded([&] {
        if (!path || !*path) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_repair: path is empty");
        if (out)
            check_out_size(out->struct_size, sizeof(slim_bank_repair_report), sizeof(slim_bank_repair_report), "slim_bank_repair_report");
        const slim::BankRepair r = slim::MemoryBank::repair(path);
        if (!out) return;
        out->header = r.header;
        out->records = static_cast<int64_t>(r.records);
        out->corrected_records = static_cast<int64_t>(r.corrected_records);
        out->unreadable_records = static_cast<int64_t>(r.unreadable_records);
        out->dropped_records = static_cast<int64_t>(r.dropped_records);
        out->hidden_ids = static_cast<int64_t>(r.hidden_ids);
        out->ids = static_cast<int64_t>(r.ids);
        out->tail_bytes = static_cast<int64_t>(r.tail_bytes);
    });
}

slim_status slim_bank_refresh(slim_bank* bank, int64_t* added) {
    if (!bank) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_refresh: bank is NULL");
    return guarded([&] {
        slim::GateEntry use(bank->gate, "slim_bank_refresh: the bank", false);
        size_t n = bank->bank->refresh();
        if (added) *added = static_cast<int64_t>(n);
    });
}

// ---- LEMUR programs ----

slim_embed_params slim_embed_default_params(void) {
    slim_embed_params p{};
    p.struct_size = sizeof(p);
    p.model_version = -1;
    return p;
}

slim_status slim_embed(slim_session* session, const slim_embed_params* params, const slim_tensor* embeddings_out, slim_lemur_stats* stats) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_embed: session is NULL");
    if (!params) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_embed: params is NULL (text_ids and frames are required)");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_embed: the session", true);
        slim::LemurSession& lemur = program_as<slim::LemurSession>(session, "slim_embed", "this call runs lemur bundles");
        slim_embed_params p = read_params(params, slim_embed_default_params(), sizeof(slim_embed_params), "slim_embed_params");
        check_stats_size(stats);
        std::optional<slim::GateEntry> bank_use;  // the bank stays open until the call returns
        if (p.bank) bank_use.emplace(p.bank->gate, "slim_embed: the bank", false);
        slim::EmbedArgs args;
        args.text_ids = p.text_ids;
        args.segment_ids = p.segment_ids;
        args.frames = p.frames;
        args.bank = p.bank ? p.bank->bank.get() : nullptr;
        args.document_ids = p.document_ids;
        args.model_version = p.model_version;
        args.out = embeddings_out;
        fill_stats(stats, lemur.embed(args));
    });
}

slim_score_params slim_score_default_params(void) {
    slim_score_params p{};
    p.struct_size = sizeof(p);
    p.missing_policy = SLIM_MISSING_ERROR;
    p.min_model_version = 0;
    return p;
}

slim_status slim_score(slim_session* session, const slim_score_params* params, const slim_tensor* scores_out, slim_lemur_stats* stats) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_score: session is NULL");
    if (!params) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_score: params is NULL (bank, history_ids and query_ids are required)");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_score: the session", true);
        using slim::Error;
        slim::LemurSession& lemur = program_as<slim::LemurSession>(session, "slim_score", "this call runs lemur bundles");
        slim_score_params p = read_params(params, slim_score_default_params(), sizeof(slim_score_params), "slim_score_params");
        check_stats_size(stats);
        if (!p.bank) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_score: bank is required (history embeddings come from it)");
        slim::GateEntry bank_use(p.bank->gate, "slim_score: the bank", false);
        slim::ScoreArgs args;
        args.bank = p.bank->bank.get();
        args.history_ids = p.history_ids;
        args.query_ids = p.query_ids;
        args.missing_policy = p.missing_policy;
        args.min_model_version = p.min_model_version;
        args.out = scores_out;
        fill_stats(stats, lemur.score(args));
    });
}

}  // extern "C"
