// The C ABI: handles checked, params structs read (the caller's struct_size bytes over the defaults), results
// written, exceptions turned into status codes. What a call means lives behind it: SD3 requests checked and
// resolved (sd3_request), the runners (sd3_program, prompt_program, lemur_program), the generic stage call
// (stage_call), bank files (memory_bank).
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
#include "lemur_request.hpp"
#include "memory_bank.hpp"
#include "program.hpp"
#include "prompt_program.hpp"
#include "sd3_program.hpp"
#include "sd3_request.hpp"
#include "slimengine.h"
#include "stage_call.hpp"
#include "tensor_args.hpp"
#include "tokenizer.hpp"

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
    std::shared_ptr<const slim::Engine> engine;  // declared first: destroyed after the program that uses it
    std::unique_ptr<slim::Runner> runner;        // the family's programs (nullptr: a plain ONNX engine)
    slim::PromptState prompts;    // slim_generate_prompt's encoded prompt texts and scratch (after runner: their memory is its)
    mutable slim::CallGate gate;  // one call at a time
};

struct slim_bank {
    std::unique_ptr<slim::MemoryBank> bank;
    mutable slim::CallGate gate;
};

namespace {

thread_local std::string last_error;

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
void check_not_newer(size_t given, size_t known, const char* what) {
    if (given > known)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + ".struct_size is " + std::to_string(given) + ", larger than " +
                                                         std::to_string(known) + ", sizeof(" + what + ") in this library (ABI " +
                                                         std::to_string(SLIM_ABI_VERSION_MAJOR) + "." +
                                                         std::to_string(SLIM_ABI_VERSION_MINOR) +
                                                         "): the caller was built against a newer slimengine.h; use a library at "
                                                         "least as new as its header");
}

// The ABI 1.0 struct's fields end here: no caller's struct_size is smaller (a test build has later fields past it).
template <typename T>
constexpr size_t base_size() {
#ifdef SLIM_TEST_FUTURE_FIELDS
    return offsetof(T, test_future_field);
#else
    return sizeof(T);
#endif
}

// A caller's struct_size: at least the 1.0 struct's, at most this library's, and a multiple of the struct's alignment
// (every version's sizeof is one; any other size would end inside a field, and a pointer copied in part would be followed).
template <typename T>
void check_struct_size(size_t given, const char* what) {
    check_not_newer(given, sizeof(T), what);
    if (given < base_size<T>() || given % alignof(T) != 0)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                          std::string(what) + ".struct_size is " + std::to_string(given) + "; set it to sizeof(" + what + ")");
}

// Each params struct's defaults, whole (this library's size).
template <typename T>
T defaults();

template <>
slim_engine_params defaults() {
    slim_engine_params p{};
    p.verify = SLIM_VERIFY_FAST;
    p.device_type = SLIM_DEVICE_CPU;
    return p;
}
template <>
slim_generate_params defaults() {
    slim_generate_params p{};
    p.guidance_scale = -1.0f;
    p.xslim_threshold = -1.0f;
    return p;
}
template <>
slim_prompt_params defaults() {
    slim_prompt_params p{};
    p.guidance_scale = -1.0f;
    p.xslim_threshold = -1.0f;
    return p;
}
template <>
slim_bank_params defaults() {
    slim_bank_params p{};
    p.create = 1;
    return p;
}
template <>
slim_embed_params defaults() {
    slim_embed_params p{};
    p.model_version = -1;
    return p;
}
template <>
slim_score_params defaults() {
    slim_score_params p{};
    p.missing_policy = SLIM_MISSING_ERROR;
    return p;
}

// slim_*_params_init: the defaults, written into exactly the caller's struct_size bytes.
template <typename T>
slim_status init_params(T* params, size_t struct_size, const char* what) {
    return guarded([&] {
        if (!params) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string(what) + "_init: params is NULL");
        check_struct_size<T>(struct_size, what);
        T value = defaults<T>();
        value.struct_size = static_cast<uint32_t>(struct_size);
        std::memcpy(static_cast<void*>(params), &value, struct_size);
    });
}

// A caller's params over the defaults: only its struct_size bytes are read (fields of later versions keep their defaults).
// struct_size is read once: the size checked is the size used, whatever the caller's memory holds later.
template <typename T>
T read_params(const T* given, const char* what) {
    T value = defaults<T>();
    if (!given) return value;
    const uint32_t size = given->struct_size;
    check_struct_size<T>(size, what);
    std::memcpy(static_cast<void*>(&value), given, size);
    value.struct_size = sizeof(T);
    return value;
}

// A caller's result struct: its size checked before the call's work (check_out returns it; 0 for NULL), then filled
// after it with that many bytes of the whole result (an older caller gets the fields it knows). The size checked is the
// size written: a struct_size the caller (its progress callback, another thread) changes meanwhile is not read again.
template <typename T>
uint32_t check_out(const T* out, const char* what) {
    if (!out) return 0;
    const uint32_t size = out->struct_size;
    check_struct_size<T>(size, what);
    return size;
}
template <typename T>
void write_out(T* out, uint32_t size, T value) {
    if (!out) return;
    value.struct_size = size;
    std::memcpy(static_cast<void*>(out), &value, std::min<size_t>(size, sizeof(T)));
}

constexpr int64_t kMaxBankBatch = int64_t(1) << 24;  // ids per bank call
using slim::check_finite;
using slim::check_range;
using slim::check_tensor;
using slim::kMaxId;
using slim::shape_text;

// The session's program as the type `call` runs, or INVALID_ARGUMENT naming the engine's family and `runs` (what the call takes).
template <typename P>
P& runner_as(slim_session* session, const char* call, const char* runs) {
    P* program = dynamic_cast<P*>(session->runner.get());
    if (!program)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                          std::string(call) + ": the engine's family is '" + session->engine->manifest().family + "'; " + runs);
    return *program;
}

// The event recorder of the session's program (SD3 generate, LEMUR embed/score), or nullptr (a plain ONNX engine).
slim::Profiler* profiler_of(const slim_session* session) { return session->runner ? &session->runner->profiler() : nullptr; }

void fill_stats(slim_lemur_stats* out, uint32_t out_size, const slim::LemurStats& s) {
    slim_lemur_stats value{};
    value.batch = static_cast<int32_t>(s.batch);
    value.history_found = s.history_found;
    value.history_missing = s.history_missing;
    value.total_ms = s.total_ms;
    value.backend_ms = s.backend_ms;
    value.bank_ms = s.bank_ms;
    write_out(out, out_size, value);
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
    const auto* sd3 = dynamic_cast<const slim::Sd3Runner*>(session->runner.get());
    return sd3 ? sd3->step_stats() : none;
}
const std::vector<slim::StageStats>& stage_stats_of(const slim_session* session) {
    static const std::vector<slim::StageStats> none;  // plain ONNX engines: slim_stage_run keeps no stats
    return session->runner ? session->runner->stage_stats() : none;
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

// The settings slim_generate and slim_generate_prompt share (slim::resolve_sd3 applies their rules).
template <typename P>
slim::Sd3Settings sd3_settings(const P& p) {
    return slim::Sd3Settings{p.guidance_scale, p.xslim_policy, p.xslim_threshold, p.num_steps, p.shift, p.seeds, p.seed};
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

slim_status slim_engine_params_init(slim_engine_params* params, size_t struct_size) {
    return init_params(params, struct_size, "slim_engine_params");
}

slim_status slim_engine_open(const char* path, const slim_engine_params* params, slim_engine** out) {
    if (!out) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_open: out is NULL");
    *out = nullptr;
    return guarded([&] {
        if (!path || !*path) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_open: path is empty");
        const slim_engine_params p = read_params(params, "slim_engine_params");
        if (p.intra_op_threads < 0) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_engine_params.intra_op_threads must be >= 0");
        if (p.device_type != SLIM_DEVICE_CPU && p.device_type != SLIM_DEVICE_CUDA)
            throw slim::Error(
                SLIM_ERR_INVALID_ARGUMENT,
                "slim_engine_params.device_type must be SLIM_DEVICE_CPU (1) or SLIM_DEVICE_CUDA (2), got " + std::to_string(p.device_type));
        if (p.device_id < 0 || (p.device_type == SLIM_DEVICE_CPU && p.device_id != 0))
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                              "slim_engine_params.device_id must be >= 0 (and 0 for the CPU), got " + std::to_string(p.device_id));
        if (p.host_buffers != 0 && p.host_buffers != 1)
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                              "slim_engine_params.host_buffers must be 0 or 1, got " + std::to_string(p.host_buffers));
        slim::EngineOptions options{p.onnxruntime_library, verify_level(p.verify, "slim_engine_params.verify"), p.intra_op_threads,
                                    p.device_type == SLIM_DEVICE_CUDA ? p.device_id : -1, p.host_buffers == 1};
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
        const uint32_t out_size = check_out(out, "slim_engine_info");
        const slim::Engine& e = *engine->engine;
        const slim::Manifest& m = e.manifest();
        slim_engine_info info{};
        info.family = m.kind == slim::Family::Sd3 ? SLIM_FAMILY_SD3 : m.kind == slim::Family::Lemur ? SLIM_FAMILY_LEMUR : SLIM_FAMILY_ONNX;
        info.precision = m.precision == "fp16"   ? SLIM_DTYPE_FLOAT16
                         : m.precision == "bf16" ? SLIM_DTYPE_BFLOAT16
                         : m.precision == "int8" ? SLIM_DTYPE_INT8
                                                 : SLIM_DTYPE_FLOAT32;
        info.stage_count = static_cast<int32_t>(e.stages().size());
        info.skip_first_block = info.skip_last_block = -1;
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
            info.skip_first_block = p.skip_first;
            info.skip_last_block = p.skip_last;
            info.compensation = p.compensation == slim::Compensation::Mlp        ? SLIM_COMPENSATION_MLP
                                : p.compensation == slim::Compensation::Identity ? SLIM_COMPENSATION_IDENTITY
                                                                                 : SLIM_COMPENSATION_NONE;
            info.xslim = !p.xslim.enabled ? SLIM_XSLIM_NONE : p.xslim.schedule.empty() ? SLIM_XSLIM_ONLINE : SLIM_XSLIM_SCHEDULE;
            info.has_token_stages = m.has_stage(slim::Role::BlockTokens) ? 1 : 0;  // opening checked them (bind_sd3_stages)
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
        write_out(out, out_size, info);
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
        const uint32_t out_size = check_out(out, "slim_program_step");
        slim_program_step value{};
        value.record_delta = s.record_delta ? 1 : 0;
        value.skip_range = s.skip_range ? 1 : 0;
        value.sigma = s.sigma;
        value.sigma_next = s.sigma_next;
        value.timestep = s.timestep;
        write_out(out, out_size, value);
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
        session->runner = slim::make_runner(*engine->engine);
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
        session->prompts.cache.set_capacity(capacity);
    });
}

slim_status slim_session_clear_prompt_cache(slim_session* session) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_clear_prompt_cache: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_session_clear_prompt_cache: the session", true);
        session->prompts.cache.clear();
    });
}

slim_status slim_generate_params_init(slim_generate_params* params, size_t struct_size) {
    return init_params(params, struct_size, "slim_generate_params");
}

slim_status slim_generate(slim_session* session, const slim_generate_params* params, const slim_tensor* latents_out,
                          slim_generate_stats* stats) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_generate: session is NULL");
    if (!params) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_generate: params is NULL (prompt and pooled embeddings are required)");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_generate: the session", true);
        using slim::Error;
        slim::Sd3Runner& sd3 = runner_as<slim::Sd3Runner>(session, "slim_generate", "slim_generate runs sd3 bundles");
        const slim_generate_params p = read_params(params, "slim_generate_params");
        const uint32_t stats_size = check_out(stats, "slim_generate_stats");
        const slim::GenerateArgs args{
            p.prompt_embeds, p.pooled_embeds, p.negative_prompt_embeds, p.negative_pooled_embeds,
            p.latents,       latents_out,     sd3_settings(p),          slim::Progress{p.progress, p.progress_user}};
        const slim::GenerateCall call(sd3, args);
        const slim::GenerateStats s = sd3.generate(call.request());
        slim_generate_stats value{};
        value.steps = s.steps;
        value.blocks_run = s.blocks_run;
        value.stage_calls = s.stage_calls;
        value.effective_nfe = s.effective_nfe;
        value.total_ms = s.total_ms;
        value.backend_ms = s.backend_ms;
        value.flop_fraction = s.flop_fraction;
        value.transfer_bytes = s.transfer_bytes;
        write_out(stats, stats_size, value);
    });
}

slim_status slim_prompt_params_init(slim_prompt_params* params, size_t struct_size) {
    return init_params(params, struct_size, "slim_prompt_params");
}

slim_status slim_generate_prompt(slim_session* session, const slim_prompt_params* params, uint8_t* image_out, size_t image_capacity,
                                 float* latents_out, size_t latents_capacity, slim_prompt_stats* stats) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: session is NULL");
    if (!params) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_prompt: params is NULL (prompts are required)");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_generate_prompt: the session", true);
        using slim::Error;
        slim::Sd3Runner& sd3 = runner_as<slim::Sd3Runner>(session, "slim_generate_prompt", "slim_generate_prompt runs sd3 bundles");
        const slim_prompt_params p = read_params(params, "slim_prompt_params");
        const uint32_t stats_size = check_out(stats, "slim_prompt_stats");
        slim::PromptArgs args;
        args.prompts = p.prompts;
        args.prompt_count = p.prompt_count;
        args.negative_prompts = p.negative_prompts;
        args.height = p.height;
        args.width = p.width;
        args.latents = p.latents;
        args.settings = sd3_settings(p);
        args.progress = slim::Progress{p.progress, p.progress_user};
        args.image_out = image_out;
        args.image_capacity = image_capacity;
        args.latents_out = latents_out;
        args.latents_capacity = latents_capacity;
        const slim::PromptCall call(sd3, args);
        const slim::PromptRequest& request = call.request();
        const slim::PromptStats s = slim::generate_prompt(*session->engine, sd3, session->prompts, request);
        slim_prompt_stats value{};
        value.batch = p.prompt_count;
        value.height = request.height;
        value.width = request.width;
        value.steps = s.generate.steps;
        value.encoder_calls = s.encoder_calls;
        value.total_ms = s.total_ms;
        value.tokenize_ms = s.tokenize_ms;
        value.clip_l_ms = s.clip_l_ms;
        value.clip_g_ms = s.clip_g_ms;
        value.t5_ms = s.t5_ms;
        value.steps_ms = s.generate.total_ms;
        value.vae_decode_ms = s.vae_decode_ms;
        value.effective_nfe = s.generate.effective_nfe;
        value.prompt_cache_hits = s.cache_hits;
        value.prompt_cache_misses = s.cache_misses;
        value.prompt_cache_size = session->prompts.cache.size();
        value.prompt_cache_capacity = session->prompts.cache.capacity();
        value.blocks_run = s.generate.blocks_run;
        value.stage_calls = s.generate.stage_calls;
        value.flop_fraction = s.generate.flop_fraction;
        value.backend_ms = s.generate.backend_ms;
        value.transfer_bytes = s.transfer_bytes;
        write_out(stats, stats_size, value);
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
        const uint32_t out_size = check_out(out, "slim_step_stats");
        slim_step_stats value{};
        value.sigma = s.sigma;
        value.sigma_next = s.sigma_next;
        value.blocks_run = s.blocks_run;
        value.level = s.level;
        value.ms = s.ms;
        value.blocks_reused = s.blocks_reused;
        value.tokens_computed = s.tokens_computed;
        value.flop_fraction = s.flop_fraction;
        write_out(out, out_size, value);
    });
}

slim_status slim_session_stage_stats(const slim_session* session, int32_t index, slim_stage_stats* out) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_session_stage_stats: session is NULL");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_session_stage_stats: the session", true);
        const slim::StageStats& s = item(stage_stats_of(session), index, out, "slim_session_stage_stats");
        const uint32_t out_size = check_out(out, "slim_stage_stats");
        slim_stage_stats value{};
        value.calls = s.calls;
        value.total_ms = s.ms;
        write_out(out, out_size, value);
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
        const uint32_t out_size = check_out(out, "slim_event");
        slim_event value{};
        value.kind = e.kind;
        value.step = e.step;
        value.block = e.block;
        value.stage = e.stage;
        value.level = e.level;
        value.start_ns = e.start_ns;
        value.end_ns = e.end_ns;
        value.device_ns = e.device_ns;
        write_out(out, out_size, value);
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

slim_status slim_bank_params_init(slim_bank_params* params, size_t struct_size) {
    return init_params(params, struct_size, "slim_bank_params");
}

slim_status slim_bank_open(const char* path, const slim_bank_params* params, slim_bank** out) {
    if (!out) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_open: out is NULL");
    *out = nullptr;
    return guarded([&] {
        if (!path || !*path) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_open: path is empty");
        slim_bank_params p = read_params(params, "slim_bank_params");
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
        const uint32_t out_size = check_out(out, "slim_bank_recovery");
        slim::GateEntry use(bank->gate, "slim_bank_recovery_info: the bank", false);
        const slim::BankRecovery r = bank->bank->recovery();
        slim_bank_recovery value{};
        value.damaged_records = static_cast<int64_t>(r.damaged_records);
        value.first_damaged_offset = r.first_damaged_offset;
        value.tail_bytes = static_cast<int64_t>(r.tail_bytes);
        value.header_corrected = r.header_corrected;
        write_out(out, out_size, value);
    });
}

slim_status slim_bank_repair(const char* path, slim_bank_repair_report* out) {
    return guarded([&] {
        if (!path || !*path) throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_repair: path is empty");
        const uint32_t out_size = check_out(out, "slim_bank_repair_report");
        const slim::BankRepair r = slim::MemoryBank::repair(path);
        slim_bank_repair_report value{};
        value.header = r.header;
        value.records = static_cast<int64_t>(r.records);
        value.corrected_records = static_cast<int64_t>(r.corrected_records);
        value.unreadable_records = static_cast<int64_t>(r.unreadable_records);
        value.dropped_records = static_cast<int64_t>(r.dropped_records);
        value.hidden_ids = static_cast<int64_t>(r.hidden_ids);
        value.ids = static_cast<int64_t>(r.ids);
        value.tail_bytes = static_cast<int64_t>(r.tail_bytes);
        write_out(out, out_size, value);
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

slim_status slim_embed_params_init(slim_embed_params* params, size_t struct_size) {
    return init_params(params, struct_size, "slim_embed_params");
}

slim_status slim_embed(slim_session* session, const slim_embed_params* params, const slim_tensor* embeddings_out, slim_lemur_stats* stats) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_embed: session is NULL");
    if (!params) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_embed: params is NULL (text_ids and frames are required)");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_embed: the session", true);
        slim::LemurRunner& lemur = runner_as<slim::LemurRunner>(session, "slim_embed", "this call runs lemur bundles");
        slim_embed_params p = read_params(params, "slim_embed_params");
        const uint32_t stats_size = check_out(stats, "slim_lemur_stats");
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
        fill_stats(stats, stats_size, lemur.embed(slim::check_embed(*session->engine, args)));
    });
}

slim_status slim_score_params_init(slim_score_params* params, size_t struct_size) {
    return init_params(params, struct_size, "slim_score_params");
}

slim_status slim_score(slim_session* session, const slim_score_params* params, const slim_tensor* scores_out, slim_lemur_stats* stats) {
    if (!session) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_score: session is NULL");
    if (!params) return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_score: params is NULL (bank, history_ids and query_ids are required)");
    return guarded([&] {
        slim::GateEntry use(session->gate, "slim_score: the session", true);
        using slim::Error;
        slim::LemurRunner& lemur = runner_as<slim::LemurRunner>(session, "slim_score", "this call runs lemur bundles");
        slim_score_params p = read_params(params, "slim_score_params");
        const uint32_t stats_size = check_out(stats, "slim_lemur_stats");
        if (!p.bank) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_score: bank is required (history embeddings come from it)");
        slim::GateEntry bank_use(p.bank->gate, "slim_score: the bank", false);
        slim::ScoreArgs args;
        args.bank = p.bank->bank.get();
        args.history_ids = p.history_ids;
        args.query_ids = p.query_ids;
        args.missing_policy = p.missing_policy;
        args.min_model_version = p.min_model_version;
        args.out = scores_out;
        fill_stats(stats, stats_size, lemur.score(slim::check_score(*session->engine, args)));
    });
}

}  // extern "C"
