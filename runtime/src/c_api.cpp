// The C ABI: argument validation at the boundary, exceptions turned into status codes.
#include <algorithm>
#include <cfloat>
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
#include "json.hpp"
#include "lemur_program.hpp"
#include "memory_bank.hpp"
#include "sampling_plan.hpp"
#include "sd3_program.hpp"
#include "slimengine.h"

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
    std::shared_ptr<const slim::Engine> engine;  // declared first: destroyed after the programs that use it
    std::unique_ptr<slim::Sd3Session> program;   // family sd3
    std::unique_ptr<slim::LemurSession> lemur;   // family lemur
    mutable slim::CallGate gate;                 // one call at a time
};

struct slim_bank {
    std::unique_ptr<slim::MemoryBank> bank;
    mutable slim::CallGate gate;
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

slim::Verify verify_level(int32_t level, const char* what) {
    if (level != SLIM_VERIFY_FAST && level != SLIM_VERIFY_FULL)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT,
                          std::string(what) + " must be SLIM_VERIFY_FAST (0) or SLIM_VERIFY_FULL (1), got " + std::to_string(level));
    return level == SLIM_VERIFY_FULL ? slim::Verify::Full : slim::Verify::Fast;
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

const char* dtype_text(int32_t dtype) {
    switch (dtype) {
        case SLIM_DTYPE_FLOAT32:
            return "float32 (SLIM_DTYPE_FLOAT32=0)";
        case SLIM_DTYPE_INT64:
            return "int64 (SLIM_DTYPE_INT64=3)";
        case SLIM_DTYPE_INT32:
            return "int32 (SLIM_DTYPE_INT32=4)";
        default:
            return "a type this call does not take";
    }
}

// Checks dtype/device/layout and that the shape matches `expected` (-1: any positive size);
// returns the shape.
std::vector<int64_t> check_tensor(const slim_tensor* t, const char* name, const std::vector<int64_t>& expected,
                                  const std::string& expected_text, int32_t dtype = SLIM_DTYPE_FLOAT32) {
    using slim::Error;
    if (!t) throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(name) + " is required");
    if (!t->data) throw Error(SLIM_ERR_INVALID_ARGUMENT, std::string(name) + ".data is NULL");
    if (t->dtype != dtype)
        throw Error(SLIM_ERR_DTYPE, std::string(name) + ": dtype must be " + dtype_text(dtype) + ", got " + std::to_string(t->dtype));
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
    const size_t n = element_count(shape);
    constexpr size_t kChunk = 4096;
    for (size_t start = 0; start < n; start += kChunk) {
        // No early exit inside a chunk, so the compiler vectorises it; NaN fails the comparison too.
        const size_t end = std::min(n, start + kChunk);
        bool finite = true;
        for (size_t i = start; i < end; ++i) finite &= std::fabs(data[i]) <= FLT_MAX;
        if (finite) continue;
        for (size_t i = start; i < end; ++i)
            if (!std::isfinite(data[i]))
                throw slim::Error(SLIM_ERR_NUMERICS, std::string(name) + " contains NaN or Inf (element " + std::to_string(i) + ")");
    }
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

// Every int64 element in [low, high): token ids, segment ids, document ids.
void check_range(const slim_tensor* t, const std::vector<int64_t>& shape, const char* name, int64_t low, int64_t high) {
    const int64_t* data = static_cast<const int64_t*>(t->data);
    for (size_t i = 0, n = element_count(shape); i < n; ++i)
        if (data[i] < low || data[i] >= high)
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string(name) + ": element " + std::to_string(i) + " is " +
                                                             std::to_string(data[i]) + ", outside [" + std::to_string(low) + ", " +
                                                             std::to_string(high) + ")");
}

constexpr int64_t kMaxBankBatch = int64_t(1) << 24;  // ids per bank call
constexpr int64_t kMaxId = INT64_MAX;

slim::LemurSession& lemur_of(slim_session* session, const char* call) {
    if (!session->lemur)
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, std::string(call) + ": the engine's family is '" + session->engine->manifest().family +
                                                         "'; this call runs lemur bundles");
    return *session->lemur;
}

// The event recorder of the session's program (SD3 generate, LEMUR embed/score), or nullptr (a plain ONNX engine).
slim::Profiler* profiler_of(const slim_session* session) {
    if (session->program) return &session->program->profiler();
    if (session->lemur) return &session->lemur->profiler();
    return nullptr;
}

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
    if (stats && stats->struct_size < sizeof(slim_lemur_stats))
        throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_lemur_stats.struct_size must be sizeof(slim_lemur_stats)");
}

int32_t slim_dtype_of(ONNXTensorElementDataType type) {
    switch (type) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
            return SLIM_DTYPE_FLOAT32;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
            return SLIM_DTYPE_INT64;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32:
            return SLIM_DTYPE_INT32;
        default:
            return -1;
    }
}

// A graph tensor's expected shape for check_tensor: fixed dims as they are, dynamic ones any size.
std::string dims_text(const std::vector<int64_t>& dims) {
    std::string s = "[";
    for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + (dims[i] >= 0 ? std::to_string(dims[i]) : std::string("?"));
    return s + "]";
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
    static const std::vector<slim::StepStats> none;
    return session->program ? session->program->step_stats() : none;
}
const std::vector<slim::StageStats>& stage_stats_of(const slim_session* session) {
    static const std::vector<slim::StageStats> none;  // plain ONNX engines: slim_stage_run keeps no stats
    return session->program ? session->program->stage_stats() : session->lemur ? session->lemur->stage_stats() : none;
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
        const slim::Family family = engine->engine->manifest().kind;
        if (family == slim::Family::Sd3) session->program = std::make_unique<slim::Sd3Session>(*engine->engine);
        if (family == slim::Family::Lemur) session->lemur = std::make_unique<slim::LemurSession>(*engine->engine);
        session->engine = engine->engine;
        *out = session.release();
    });
}

void slim_session_destroy(slim_session* session) {
    if (!session) return;
    if (session->gate.close()) delete session;  // false: a forked child's copy of a handle a parent thread was using
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
        if (!session->program)
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate: the engine's family is '" + session->engine->manifest().family +
                                                       "'; slim_generate runs sd3 bundles");
        slim_generate_params p = read_params(params, slim_generate_default_params(),
                                             offsetof(slim_generate_params, guidance_scale) + sizeof(float), "slim_generate_params");
        if (stats && stats->struct_size < offsetof(slim_generate_stats, backend_ms) + sizeof(double))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_generate_stats.struct_size must be sizeof(slim_generate_stats)");
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
        if (p.num_steps < 0 || p.num_steps > 10000)
            throw Error(SLIM_ERR_INVALID_ARGUMENT,
                        "num_steps must be 0 (the bundle's program) or 1 to 10000, got " + std::to_string(p.num_steps));
        if (p.num_steps > 0 && !(std::isfinite(p.shift) && p.shift > 0))
            throw Error(SLIM_ERR_INVALID_ARGUMENT, "shift must be a positive number, got " + std::to_string(p.shift));
        slim::Program plan;
        if (p.num_steps > 0) plan = slim::plain_program(m.program, p.num_steps, p.shift);
        const slim::Program& program = p.num_steps > 0 ? plan : m.program;
        const slim::XSlimPolicy cache = request_policy(p, *session->engine, program.steps.size());
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
            if (stats->struct_size >= offsetof(slim_generate_stats, transfer_bytes) + sizeof(uint64_t))
                stats->transfer_bytes = s.transfer_bytes;
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
        if (out->struct_size < offsetof(slim_step_stats, ms) + sizeof(double))
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_step_stats.struct_size must be sizeof(slim_step_stats)");
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
        if (out->struct_size < sizeof(slim_stage_stats))
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_stage_stats.struct_size must be sizeof(slim_stage_stats)");
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
        if (out->struct_size < sizeof(slim_event))
            throw slim::Error(SLIM_ERR_INVALID_ARGUMENT, "slim_event.struct_size must be sizeof(slim_event)");
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
        const slim::StageSession& s = *engine.stages()[index];
        const std::string where = std::string("stage ") + stage + ": ";
        if (input_count != static_cast<int32_t>(s.inputs().size()) || (input_count > 0 && !inputs))
            throw Error(SLIM_ERR_INVALID_ARGUMENT,
                        where + "takes " + std::to_string(s.inputs().size()) + " inputs, got " + std::to_string(input_count));
        if (output_count < 1 || output_count > static_cast<int32_t>(s.outputs().size()) || !outputs)
            throw Error(SLIM_ERR_INVALID_ARGUMENT, where + "bind 1 to " + std::to_string(s.outputs().size()) + " outputs");
        // Binds caller tensors to graph tensors by name; each name at most once.
        auto bind = [&](const slim_named_tensor* given, int32_t count, const std::vector<slim::IoSpec>& specs, bool is_input) {
            std::vector<int> order(count, -1);
            std::vector<bool> used(specs.size(), false);
            for (int32_t i = 0; i < count; ++i) {
                const char* name = given[i].name;
                for (size_t k = 0; name && k < specs.size(); ++k)
                    if (specs[k].name == name) order[i] = static_cast<int>(k);
                const std::string tname = where + (is_input ? "input '" : "output '") + (name ? name : "(null)") + "'";
                if (order[i] < 0) throw Error(SLIM_ERR_INVALID_ARGUMENT, tname + " is not a graph " + (is_input ? "input" : "output"));
                if (used[order[i]]) throw Error(SLIM_ERR_INVALID_ARGUMENT, tname + " is bound twice");
                used[order[i]] = true;
                const slim::IoSpec& spec = specs[order[i]];
                const int32_t dtype = slim_dtype_of(spec.type);
                if (dtype < 0) throw Error(SLIM_ERR_DTYPE, tname + " has an element type this runtime does not bind");
                auto shape = check_tensor(&given[i].tensor, tname.c_str(), spec.dims, dims_text(spec.dims), dtype);
                if (is_input && dtype == SLIM_DTYPE_FLOAT32) check_finite(&given[i].tensor, shape, tname.c_str());
            }
            return order;
        };
        bind(inputs, input_count, s.inputs(), true);  // every input bound: the count matched and no name twice
        std::vector<int> out_order = bind(outputs, output_count, s.outputs(), false);

        std::vector<slim::TensorView> views(s.inputs().size());
        for (int32_t i = 0; i < input_count; ++i) {
            size_t k = 0;
            while (s.inputs()[k].name != inputs[i].name) ++k;
            const slim_tensor& t = inputs[i].tensor;
            views[k] = slim::TensorView(engine.ort(), t.data, s.inputs()[k].type, std::vector<int64_t>(t.shape, t.shape + t.ndim));
        }
        std::vector<const OrtValue*> values;
        for (auto& v : views) values.push_back(v.get());
        std::vector<size_t> selected(out_order.begin(), out_order.end());
        std::vector<slim::TensorView> results = s.run_selected(values.data(), selected);

        // Check every output's computed shape before copying any.
        const OrtApi* api = engine.ort().api;
        std::vector<void*> sources(results.size());
        for (size_t i = 0; i < results.size(); ++i) {
            OrtTensorTypeAndShapeInfo* info = nullptr;
            slim::check(api, api->GetTensorTypeAndShape(results[i].get(), &info), where + "output shape");
            size_t rank = 0;
            OrtStatus* st = api->GetDimensionsCount(info, &rank);
            std::vector<int64_t> dims(rank);
            if (!st && rank) st = api->GetDimensions(info, dims.data(), rank);
            api->ReleaseTensorTypeAndShapeInfo(info);
            slim::check(api, st, where + "output shape");
            const slim_tensor& t = outputs[i].tensor;
            if (dims != std::vector<int64_t>(t.shape, t.shape + t.ndim))
                throw Error(SLIM_ERR_SHAPE, where + "output '" + outputs[i].name + "' has shape " + dims_text(dims) +
                                                ", but the caller's tensor is " + shape_text(t));
            slim::check(api, api->GetTensorMutableData(results[i].get(), &sources[i]), where + "output data");
        }
        for (size_t i = 0; i < results.size(); ++i) {
            const slim_tensor& t = outputs[i].tensor;
            std::memcpy(
                t.data, sources[i],
                element_count(std::vector<int64_t>(t.shape, t.shape + t.ndim)) * slim::element_size(s.outputs()[out_order[i]].type));
        }
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
    if (out->struct_size < sizeof(slim_bank_recovery))
        return fail(SLIM_ERR_INVALID_ARGUMENT, "slim_bank_recovery.struct_size must be sizeof(slim_bank_recovery)");
    return guarded([&] {
        slim::GateEntry use(bank->gate, "slim_bank_recovery_info: the bank", false);
        const slim::BankRecovery r = bank->bank->recovery();
        out->damaged_records = static_cast<int64_t>(r.damaged_records);
        out->dropped_records = static_cast<int64_t>(r.dropped_records);
        out->first_damaged_offset = r.first_damaged_offset;
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
        using slim::Error;
        slim::LemurSession& lemur = lemur_of(session, "slim_embed");
        slim_embed_params p = read_params(params, slim_embed_default_params(), sizeof(slim_embed_params), "slim_embed_params");
        check_stats_size(stats);
        const slim::LemurConfig& c = session->engine->manifest().lemur;
        auto text = check_tensor(p.text_ids, "text_ids", {-1, -1}, "[B,L]", SLIM_DTYPE_INT64);
        const int64_t B = text[0], L = text[1];
        if (B > c.max_batch || L > c.max_text_len)
            throw Error(SLIM_ERR_SHAPE, "text_ids: batch must be <= " + std::to_string(c.max_batch) +
                                            " and text length <= " + std::to_string(c.max_text_len) + ", got " + shape_text(*p.text_ids));
        const std::string Bs = std::to_string(B), S = std::to_string(c.image_size);
        check_range(p.text_ids, text, "text_ids", 0, c.vocab_size);
        if (p.segment_ids) {
            auto seg = check_tensor(p.segment_ids, "segment_ids", text, shape_text(*p.text_ids) + " (as text_ids)", SLIM_DTYPE_INT64);
            check_range(p.segment_ids, seg, "segment_ids", 0, c.num_segments);
        }
        auto frames = check_tensor(p.frames, "frames", {B, -1, 3, c.image_size, c.image_size}, "[" + Bs + ",F,3," + S + "," + S + "]");
        if (frames[1] > c.max_frames)
            throw Error(SLIM_ERR_SHAPE, "frames: at most " + std::to_string(c.max_frames) + " frames, got " + shape_text(*p.frames));
        check_finite(p.frames, frames, "frames");
        check_tensor(embeddings_out, "embeddings_out", {B, c.embed_dim}, "[" + Bs + "," + std::to_string(c.embed_dim) + "]");
        slim::EmbedRequest request;
        std::optional<slim::GateEntry> bank_use;
        if (p.bank) {
            bank_use.emplace(p.bank->gate, "slim_embed: the bank", false);
            if (p.bank->bank->read_only()) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_embed: the bank is open read-only");
            if (p.bank->bank->dim() != c.embed_dim)
                throw Error(SLIM_ERR_SHAPE, "slim_embed: the bank holds " + std::to_string(p.bank->bank->dim()) +
                                                "-d embeddings but this model makes " + std::to_string(c.embed_dim) + "-d ones");
            auto ids = check_tensor(p.document_ids, "document_ids", {B}, "[" + Bs + "]", SLIM_DTYPE_INT64);
            check_range(p.document_ids, ids, "document_ids", 0, kMaxId);
            if (p.model_version < -1 || p.model_version > int64_t(UINT32_MAX))
                throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_embed_params.model_version must be -1 (the bundle's) or in [0, 2^32), got " +
                                                           std::to_string(p.model_version));
            request.bank = p.bank->bank.get();
            request.document_ids = static_cast<const int64_t*>(p.document_ids->data);
            request.model_version = static_cast<uint32_t>(p.model_version < 0 ? c.model_version : p.model_version);
        }
        request.batch = B;
        request.text_len = L;
        request.frames = frames[1];
        request.text_ids = static_cast<const int64_t*>(p.text_ids->data);
        request.segment_ids = p.segment_ids ? static_cast<const int64_t*>(p.segment_ids->data) : nullptr;
        request.frames_data = static_cast<const float*>(p.frames->data);
        request.out = static_cast<float*>(embeddings_out->data);
        fill_stats(stats, lemur.embed(request));
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
        slim::LemurSession& lemur = lemur_of(session, "slim_score");
        slim_score_params p = read_params(params, slim_score_default_params(), sizeof(slim_score_params), "slim_score_params");
        check_stats_size(stats);
        const slim::LemurConfig& c = session->engine->manifest().lemur;
        if (!p.bank) throw Error(SLIM_ERR_INVALID_ARGUMENT, "slim_score: bank is required (history embeddings come from it)");
        slim::GateEntry bank_use(p.bank->gate, "slim_score: the bank", false);
        if (p.bank->bank->dim() != c.embed_dim)
            throw Error(SLIM_ERR_SHAPE, "slim_score: the bank holds " + std::to_string(p.bank->bank->dim()) +
                                            "-d embeddings but this model takes " + std::to_string(c.embed_dim) + "-d ones");
        if (p.missing_policy != SLIM_MISSING_ERROR && p.missing_policy != SLIM_MISSING_SKIP)
            throw Error(SLIM_ERR_INVALID_ARGUMENT,
                        "slim_score_params.missing_policy must be SLIM_MISSING_ERROR (0) or SLIM_MISSING_SKIP (1)");
        auto history = check_tensor(p.history_ids, "history_ids", {-1, -1}, "[B,H]", SLIM_DTYPE_INT64);
        const int64_t B = history[0], H = history[1];
        if (B > c.max_batch || H > c.max_history)
            throw Error(SLIM_ERR_SHAPE, "history_ids: batch must be <= " + std::to_string(c.max_batch) + " and history length <= " +
                                            std::to_string(c.max_history) + ", got " + shape_text(*p.history_ids));
        check_range(p.history_ids, history, "history_ids (-1 pads)", -1, kMaxId);
        auto query = check_tensor(p.query_ids, "query_ids", {B, -1}, "[" + std::to_string(B) + ",Lq]", SLIM_DTYPE_INT64);
        if (query[1] > c.max_query_len)
            throw Error(SLIM_ERR_SHAPE,
                        "query_ids: at most " + std::to_string(c.max_query_len) + " tokens, got " + shape_text(*p.query_ids));
        check_range(p.query_ids, query, "query_ids", 0, c.vocab_size);
        check_tensor(scores_out, "scores_out", {B}, "[" + std::to_string(B) + "]");
        slim::ScoreRequest request;
        request.batch = B;
        request.history_len = H;
        request.query_len = query[1];
        request.bank = p.bank->bank.get();
        request.history_ids = static_cast<const int64_t*>(p.history_ids->data);
        request.query_ids = static_cast<const int64_t*>(p.query_ids->data);
        request.skip_missing = p.missing_policy == SLIM_MISSING_SKIP;
        request.min_model_version = p.min_model_version;
        request.out = static_cast<float*>(scores_out->data);
        fill_stats(stats, lemur.score(request));
    });
}

}  // extern "C"
