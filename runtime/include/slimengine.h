/* slimengine.h: the C ABI of the slimengine runtime.
 *
 * An engine (slim_engine) is a loaded bundle: manifest, compiled ONNX Runtime sessions, weights.
 * A session (slim_session) holds the buffers and caches of one generation at a time.
 * A memory bank (slim_bank) is a durable file of document embeddings for the LEMUR programs.
 *
 * Thread safety: an engine is read-only after slim_engine_open and may be shared by any number of
 * threads; a session runs one call at a time (create one session per thread): a call made while
 * another thread's call runs on the same session returns SLIM_ERR_BUSY and changes nothing; a bank
 * may be used by any number of threads (lookups run concurrently with one write at a time).
 * Closing: slim_session_destroy, slim_engine_close and slim_bank_close wait for calls already
 * running on that handle to return, then free it (a call that starts after the close began fails
 * cleanly until then; using a handle after its close returned, or closing it twice, is undefined).
 * An engine closed while its sessions exist stays loaded until the last of them is destroyed.
 * fork(): in the child, a handle another thread was in a call on at the fork refuses every call
 * (SLIM_ERR_INVALID_ARGUMENT) and its close frees nothing; other handles work as before. A child of a
 * process that loaded ONNX Runtime must end with _exit(): ONNX Runtime's exit handlers hang there.
 *
 * Errors: every call that can fail returns a slim_status; the detail is in slim_last_error(), a
 * thread-local string valid until the next slimengine call on the same thread. No C++ exception
 * crosses this boundary. Ownership: the caller owns every tensor it passes (inputs and outputs);
 * the library owns and frees what it allocates (engines, sessions, strings it returns).
 */
#ifndef SLIMENGINE_H
#define SLIMENGINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SLIM_API __declspec(dllexport)
#else
#define SLIM_API __attribute__((visibility("default")))
#endif

/* ABI version of this header; slim_abi_version() gives the library's at run time. ABI 1.0 is a promise: a library of
 * major version 1 serves every caller built against a 1.x header up to its own minor version. Structs grow only at
 * their end, each begins with struct_size, and the library reads and writes only the caller's struct_size bytes:
 * - params structs (slim_*_params): fill one with slim_*_params_init(&p, sizeof p) (the library writes its defaults
 *   into exactly those bytes), then set fields and pass it;
 * - result structs (stats, info, events): set struct_size = sizeof, the library fills that many bytes.
 * A struct_size larger than the library's own struct is refused (SLIM_ERR_INVALID_ARGUMENT: the caller's header is
 * newer than the library), and so is one smaller than the 1.0 struct or no multiple of its alignment.
 * What changed in each version: CHANGELOG.md. */
#define SLIM_ABI_VERSION_MAJOR 1
#define SLIM_ABI_VERSION_MINOR 0

/* Every struct below ends with its last field (no tail padding a later field could fill unseen), and grows only by
 * fields that keep its alignment (slim_bank_params, of 4-byte fields, by 4-byte fields), so an older caller's sizeof
 * stays a valid struct_size and a newer caller's is refused. Test builds only (tests/test_c_program.py): -DSLIM_TEST_FUTURE_FIELDS
 * appends 8 bytes of fields to every struct below, as a later minor version would, so a caller built without it stands
 * for a caller of the older header. */
#ifdef SLIM_TEST_FUTURE_FIELDS
#define SLIM_FUTURE_FIELD int32_t test_future_field[2];
#else
#define SLIM_FUTURE_FIELD
#endif

typedef enum slim_status {
    SLIM_OK = 0,
    SLIM_ERR_INVALID_ARGUMENT = 1, /* a NULL handle, a bad parameter value or params struct size */
    SLIM_ERR_IO = 2,               /* a bundle file cannot be read */
    SLIM_ERR_BUNDLE = 3,           /* manifest invalid, unknown format version, checksum mismatch */
    SLIM_ERR_BACKEND = 4,          /* ONNX Runtime missing, failed to load a stage or to run it */
    SLIM_ERR_SHAPE = 5,            /* a tensor has the wrong rank or shape */
    SLIM_ERR_DTYPE = 6,            /* a tensor has the wrong dtype, device or layout */
    SLIM_ERR_NUMERICS = 7,         /* NaN or Inf in an input or in the result */
    SLIM_ERR_OUT_OF_MEMORY = 8,
    SLIM_ERR_INTERNAL = 9,
    SLIM_ERR_NOT_FOUND = 10, /* a document id is not in the memory bank (or is stale) */
    SLIM_ERR_BUSY = 11,      /* the session is running another thread's call */
    SLIM_ERR_CANCELLED = 12  /* a progress callback returned non-zero: the call stopped, no output written */
} slim_status;

/* Element types (the values of DLPack's (code, bits) pairs are not used: plain enum). */
typedef enum slim_dtype {
    SLIM_DTYPE_FLOAT32 = 0,
    SLIM_DTYPE_FLOAT16 = 1,
    SLIM_DTYPE_BFLOAT16 = 2,
    SLIM_DTYPE_INT64 = 3,
    SLIM_DTYPE_INT32 = 4,
    SLIM_DTYPE_INT8 = 5 /* only as slim_engine_info.precision: an int8 bundle (docs/int8.md) */
} slim_dtype;

/* Device types use DLPack's numbering. */
typedef enum slim_device_type { SLIM_DEVICE_CPU = 1, SLIM_DEVICE_CUDA = 2 } slim_device_type;

/* A DLTensor-like view of caller memory. strides are in elements; NULL means C-contiguous. */
typedef struct slim_tensor {
    void* data;
    int32_t dtype;       /* slim_dtype */
    int32_t device_type; /* slim_device_type */
    int32_t device_id;
    int32_t ndim;
    const int64_t* shape;
    const int64_t* strides;
} slim_tensor;

typedef struct slim_engine slim_engine;
typedef struct slim_session slim_session;

/* ---- version and errors ---- */

/* "MAJOR.MINOR.PATCH" of the library; static storage. */
SLIM_API const char* slim_version(void);
/* ABI major version of the library, to compare with SLIM_ABI_VERSION_MAJOR. */
SLIM_API int32_t slim_abi_version_major(void);
/* ABI major and minor version of the library (either pointer may be NULL). A caller built against this header needs
 * major == SLIM_ABI_VERSION_MAJOR and minor >= the minor version of the newest call or field it uses. */
SLIM_API void slim_abi_version(int32_t* major, int32_t* minor);
/* Detail of the last error on this thread ("" if none); owned by the library. */
SLIM_API const char* slim_last_error(void);
/* Short name of a status code ("SLIM_ERR_SHAPE"); static storage. */
SLIM_API const char* slim_status_name(slim_status status);

/* ---- engine ---- */

/* How much of a bundle slim_engine_open and slim_bundle_verify check (docs/bundle-format.md, "Integrity"). */
typedef enum slim_verify {
    /* The manifest against its digest (manifest.sha256); every file under the bundle listed in the manifest and every
       listed file present, a regular file (no symlink, FIFO, device) of its listed size; the sha256 of each stage's graph
       file (small: the weights are external data). Reads no weights: seconds for a multi-GB bundle. */
    SLIM_VERIFY_FAST = 0,
    /* All of that and the sha256 of every file, weights included (reads the whole bundle). */
    SLIM_VERIFY_FULL = 1
} slim_verify;

typedef struct slim_engine_params {
    uint32_t struct_size;            /* set by slim_engine_params_init */
    int32_t verify;                  /* slim_verify: SLIM_VERIFY_FAST (default) or SLIM_VERIFY_FULL */
    const char* onnxruntime_library; /* path of libonnxruntime.so; NULL (default): $SLIMENGINE_ORT_LIBRARY, read at open, then the
                                        loader's search */
    int32_t intra_op_threads;        /* ONNX Runtime threads, one pool per process set by the first engine; 0 (default): its choice */
    int32_t device_type;             /* slim_device_type: SLIM_DEVICE_CPU (default), or SLIM_DEVICE_CUDA: every stage on ONNX
                                        Runtime's CUDA execution provider (onnxruntime-gpu's library; BACKEND error naming the missing
                                        provider otherwise) */
    int32_t device_id;               /* CUDA device ordinal (default 0); must be 0 for the CPU */
    int32_t host_buffers;            /* 1: a CUDA engine's sessions keep the buffers between stages in host memory (ONNX Runtime then
                                        copies each stage's inputs and outputs), as a build without CUDA kernels does; 0 (default): on
                                        the device where this build has CUDA kernels. No effect on the CPU. */
    SLIM_FUTURE_FIELD
} slim_engine_params;

/* Writes the defaults for slim_engine_open into the first struct_size bytes of *params (struct_size: sizeof(*params) as
 * the caller compiled it) and sets params->struct_size. Status: INVALID_ARGUMENT (NULL, a struct_size no version has). */
SLIM_API slim_status slim_engine_params_init(slim_engine_params* params, size_t struct_size);

/* Load the bundle directory at `path`, or a plain ONNX model (a path ending in .onnx: a one-stage
 * engine whose stage "model" runs through slim_stage_run). On success *out owns a new engine (free
 * with slim_engine_close). params may be NULL (defaults). The bundle is checked at params'
 * verify level first; every file the engine uses is read into memory here, so the engine
 * never reads the bundle again (changing its files after open changes nothing). Status:
 * INVALID_ARGUMENT, IO, BUNDLE (naming the field or file at fault; a format 1 bundle is refused with
 * how to re-export it), BACKEND, OUT_OF_MEMORY. */
SLIM_API slim_status slim_engine_open(const char* path, const slim_engine_params* params, slim_engine** out);

/* Progress of slim_bundle_verify: the bundle-relative file being hashed, and bytes hashed so far / to hash in all.
   Return 0 to go on; anything else stops the check (slim_bundle_verify then returns SLIM_ERR_INVALID_ARGUMENT). */
typedef int32_t (*slim_verify_progress)(void* user, const char* file, uint64_t bytes_done, uint64_t bytes_total);

/* Check the bundle directory at `path` at `level` (slim_verify) without loading it: what slim_engine_open
 * checks before it builds any stage (`slimengine verify BUNDLE` runs this). progress may be NULL; it is
 * called as files are hashed (after every 4 MiB). Status: OK, INVALID_ARGUMENT, IO, BUNDLE (naming the
 * file or field at fault). */
SLIM_API slim_status slim_bundle_verify(const char* path, int32_t level, slim_verify_progress progress, void* user);
/* Close an engine: waits for its calls in flight; its live sessions keep the loaded model until they
 * are destroyed. NULL is accepted. */
SLIM_API void slim_engine_close(slim_engine* engine);
/* The bundle's manifest.json text (model config, stages, program); owned by the engine. */
SLIM_API const char* slim_engine_manifest(const slim_engine* engine);
/* Number of stages and the name of stage i (owned by the engine), for reading session stats. */
SLIM_API int32_t slim_engine_stage_count(const slim_engine* engine);
SLIM_API const char* slim_engine_stage_name(const slim_engine* engine, int32_t index);

/* ---- engine introspection: what the manifest says, typed, so C callers need not parse its JSON ---- */

typedef enum slim_family {
    SLIM_FAMILY_SD3 = 0,   /* slim_generate */
    SLIM_FAMILY_LEMUR = 1, /* slim_embed, slim_score */
    SLIM_FAMILY_ONNX = 2   /* a plain ONNX model: slim_stage_run only */
} slim_family;

/* What the bundle's 1.x skipping steps add in place of the skipped block range. */
typedef enum slim_compensation {
    SLIM_COMPENSATION_NONE = 0,    /* no skipped range */
    SLIM_COMPENSATION_MLP = 1,     /* the compensate stage's output */
    SLIM_COMPENSATION_IDENTITY = 2 /* the recorded delta as it is */
} slim_compensation;

/* The bundle's default X-Slim policy (program.xslim; docs/xslim.md). */
typedef enum slim_xslim_mode {
    SLIM_XSLIM_NONE = 0,    /* none, or disabled */
    SLIM_XSLIM_ONLINE = 1,  /* decided each step from the accumulated change */
    SLIM_XSLIM_SCHEDULE = 2 /* a fixed level per step */
} slim_xslim_mode;

/* Plain numbers only, no pointers or strings. Fields of another family than the engine's are 0 (the skipped range -1). */
typedef struct slim_engine_info {
    uint32_t struct_size; /* set by the caller: sizeof(slim_engine_info) */
    int32_t family;       /* slim_family */
    int32_t precision;    /* slim_dtype of the weights: SLIM_DTYPE_FLOAT32, FLOAT16, BFLOAT16 or INT8 (manifest "precision") */
    int32_t stage_count;  /* as slim_engine_stage_count */
    /* SD3 (manifest config and program): */
    int32_t num_blocks;            /* joint transformer blocks (config.num_layers) */
    int32_t hidden_size;           /* config.inner_dim (num_attention_heads * attention_head_dim) */
    int32_t num_attention_heads;   /* config.num_attention_heads */
    int32_t latent_channels;       /* config.in_channels (== out_channels): C of latents [B, C, H, W] */
    int32_t patch_size;            /* latent H and W are multiples of it */
    int32_t joint_attention_dim;   /* last dimension of prompt_embeds */
    int32_t pooled_projection_dim; /* last dimension of pooled_embeds */
    int32_t default_latent_size;   /* latent H and W the bundle was made for; 0: the manifest does not say */
    int32_t max_latent_size;       /* largest latent H and W (the position table's limit) */
    int32_t num_steps;             /* sampling steps of the bundle's program (each: slim_engine_program_step) */
    int32_t skip_first_block;      /* 1.x: the block range the skipping steps skip, inclusive; -1 and -1: none */
    int32_t skip_last_block;
    int32_t compensation;     /* slim_compensation */
    int32_t xslim;            /* slim_xslim_mode of the bundle's default X-Slim policy */
    int32_t has_token_stages; /* 1: block_tokens stages exist (the X-Slim token level can run) */
    float guidance_scale;     /* the program's default CFG scale (> 1: CFG, negative embeddings required) */
    /* LEMUR (manifest config and program): */
    int32_t embed_dim;    /* width of a document embedding (and of a bank for it) */
    int32_t vocab_size;   /* token ids are in [0, vocab_size) */
    int32_t num_segments; /* segment ids are in [0, num_segments) */
    int32_t max_text_len; /* limits of embed's and score's dynamic dimensions */
    int32_t max_query_len;
    int32_t image_size; /* frames are [B, F, 3, image_size, image_size] */
    int32_t max_frames;
    int32_t max_batch;
    int32_t max_history;
    int64_t model_version; /* what slim_embed records in a bank by default */
    SLIM_FUTURE_FIELD
} slim_engine_info;

/* Fills *out (out->struct_size set by the caller). Status: INVALID_ARGUMENT (NULL, struct_size other than
 * sizeof(slim_engine_info)). */
SLIM_API slim_status slim_engine_get_info(const slim_engine* engine, slim_engine_info* out);

/* One step of an SD3 bundle's sampling program (manifest program.steps[i]). */
typedef struct slim_program_step {
    uint32_t struct_size; /* set by the caller: sizeof(slim_program_step) */
    int32_t record_delta; /* 1: this step records the delta over the skipped range (1.x) */
    int32_t skip_range;   /* 1: this step skips the 1.x block range and adds the compensated delta */
    double sigma;         /* noise level at the step's start */
    double sigma_next;    /* and at its end */
    double timestep;      /* the timestep the model is conditioned on */
    SLIM_FUTURE_FIELD
} slim_program_step;

/* Step `index` (0 to slim_engine_info.num_steps - 1) of an SD3 engine's program. Status: INVALID_ARGUMENT (NULL,
 * not an sd3 engine, index out of range, struct_size other than sizeof(slim_program_step)). */
SLIM_API slim_status slim_engine_program_step(const slim_engine* engine, int32_t index, slim_program_step* out);
/* ---- prompt tokenization (docs/tokenizers.md) ----
 * Tokenize `prompt` (NUL-terminated UTF-8, at most 65536 bytes) with the bundle's tokenizer of `role`
 * ("clip_l", "clip_g" or "t5", as export-engine wrote them from the pipeline's tokenizer folders): the
 * ids transformers' tokenizer gives with diffusers' SD3 call, i.e. special tokens, truncation to the
 * tokenizer's max_length (77 for CLIP, max_sequence_length for T5) keeping the end-of-sequence id, and
 * padding with its pad id. Exactly max_length ids are written to `ids_out`; `*count` is set to
 * max_length whenever the role exists, so a caller may ask with capacity 0 to size its buffer.
 * SLIM_ERR_INVALID_ARGUMENT: NULL engine/role/prompt/count, a role the bundle lacks, a prompt that is
 * not UTF-8 or too long, or capacity < max_length (nothing written to ids_out).
 * The tokenizers are native (CLIP's byte-level BPE, T5's Unigram), read and validated when the bundle opens. Thread-safe. */
SLIM_API slim_status slim_tokenize(const slim_engine* engine, const char* role, const char* prompt, int64_t* ids_out, size_t capacity,
                                   size_t* count);
/* Number of tokenizers in the bundle and the role of tokenizer i (owned by the engine; NULL out of range). */
SLIM_API int32_t slim_engine_tokenizer_count(const slim_engine* engine);
SLIM_API const char* slim_engine_tokenizer_role(const slim_engine* engine, int32_t index);

/* ---- session ---- */

/* A new session on `engine` (it keeps the engine's model alive). Status: INVALID_ARGUMENT, OUT_OF_MEMORY. */
SLIM_API slim_status slim_session_create(slim_engine* engine, slim_session** out);
/* Free a session, after waiting for a call running on it in another thread. NULL is accepted. Called from the progress
 * callback of a call on this session: the session is freed when that call returns (waiting would never end). */
SLIM_API void slim_session_destroy(slim_session* session);

/* The session's prompt-embedding cache: slim_generate_prompt keeps each prompt text's assembled conditioning
 * (the three encoders' output, as the sampling program takes it) in a least-recently-used cache of `capacity` texts, so
 * the negative prompt ("" usually) and repeated prompts are tokenized and encoded once across calls. A new session's
 * capacity is SLIM_PROMPT_CACHE_DEFAULT; 0 turns the cache off (each call still encodes a text once however often it
 * appears in that call). Lowering the capacity drops the least recently used entries. An entry holds
 * (77 + max_sequence_length) x joint_attention_dim + pooled_projection_dim floats (5.4 MB for SD3-M).
 * Status: INVALID_ARGUMENT (NULL session, capacity < 0 or > SLIM_PROMPT_CACHE_MAX), BUSY. */
#define SLIM_PROMPT_CACHE_DEFAULT 16
#define SLIM_PROMPT_CACHE_MAX 1024
SLIM_API slim_status slim_session_set_prompt_cache(slim_session* session, int32_t capacity);
/* Drop every cached prompt (the capacity stays). Status: INVALID_ARGUMENT (NULL session), BUSY. */
SLIM_API slim_status slim_session_clear_prompt_cache(slim_session* session);

/* ---- progress ---- */

/* What a progress callback reports. */
typedef enum slim_phase {
    SLIM_PHASE_ENCODE =
        0,               /* slim_generate_prompt: before the prompts are looked up in the cache, tokenized and encoded (step 0, total 1) */
    SLIM_PHASE_STEP = 1, /* after sampling step `step` (0 to total - 1) of `total` finished */
    SLIM_PHASE_DECODE = 2,  /* slim_generate_prompt: before the VAE decode (step 0, total 1) */
    SLIM_PHASE_TOKENIZE = 3 /* slim_generate_prompt: before each tokenizer call of a text it encodes (step 0 clip_l, 1 clip_g, 2 t5; total
                               2, or 3 with T5) */
} slim_phase;

/* Called from the thread that made the call, between phases and after each sampling step (never inside a stage).
 * Return 0 to go on; anything else cancels the call: it returns SLIM_ERR_CANCELLED without writing to its outputs
 * (image, latents, stats), and the session works as before for the next call (its step, stage and event records are
 * those of the part that ran). The callback must not call into the same session (it would get SLIM_ERR_BUSY). */
typedef int32_t (*slim_progress)(void* user, int32_t phase, int32_t step, int32_t total);

/* ---- SD3 generation ---- */

typedef struct slim_generate_params {
    uint32_t struct_size;                      /* set by slim_generate_params_init */
    const slim_tensor* prompt_embeds;          /* float32 [B, L, joint_attention_dim], required */
    const slim_tensor* pooled_embeds;          /* float32 [B, pooled_projection_dim], required */
    const slim_tensor* negative_prompt_embeds; /* float32 [B, L, joint_attention_dim]; required when guidance > 1 */
    const slim_tensor* negative_pooled_embeds; /* float32 [B, pooled_projection_dim]; required when guidance > 1 */
    /* The initial noise: `latents` when given, else row b drawn from seeds[b] when seeds is given, else from seed + b.
     * A row's noise depends only on its own seed (Philox4x32-10, docs/runtime-loop.md "Noise"), so each row of a
     * batch is bit-identical to that row generated alone with that seed, unless an online X-Slim policy reuses work:
     * its decisions look at the whole batch (docs/xslim.md). */
    const slim_tensor* latents; /* float32 [B, C, H, W]; NULL (default): seeded */
    const uint64_t* seeds;      /* B seeds, one per row; NULL (default): seed + row */
    uint64_t seed;              /* default 0 */
    float guidance_scale;       /* < 0 (default): the bundle's default */
    /* X-Slim (docs/xslim.md): the policy for this request as JSON text (the manifest's program.xslim object, or "null" for
     * none); NULL (default): xslim_threshold, then the bundle's policy. */
    const char* xslim_policy;
    float xslim_threshold; /* X-Slim step-level reuse with this threshold: < 0 (default) the bundle's policy, 0 off */
    /* A plain plan instead of the bundle's program, on the same stages (e.g. the 28-step CFG baseline). */
    int32_t num_steps;      /* > 0: that many flow-matching Euler steps with diffusers' FlowMatchEulerDiscreteScheduler sigmas
                               for `shift`, every joint block every step (no skipped range); 0 (default): the bundle's program */
    float shift;            /* sigma shift of that plan, > 0; 0 (default): the bundle's pipeline scheduler shift, else 3.0 (SD3's) */
    slim_progress progress; /* NULL (default), or called after each sampling step (SLIM_PHASE_STEP); non-zero cancels */
    void* progress_user;    /* passed to progress as it is */
    SLIM_FUTURE_FIELD
} slim_generate_params;

/* Writes the defaults for slim_generate (no tensors, seeds NULL, seed 0, guidance, X-Slim policy and program from the
 * bundle) into the first struct_size bytes of *params and sets params->struct_size. Status: INVALID_ARGUMENT. */
SLIM_API slim_status slim_generate_params_init(slim_generate_params* params, size_t struct_size);

typedef struct slim_generate_stats {
    uint32_t struct_size; /* set by the caller: sizeof(slim_generate_stats) */
    int32_t steps;        /* sampling steps run */
    int32_t blocks_run;   /* joint-block evaluations, summed over steps (a CFG batch counts once) */
    int32_t stage_calls;  /* backend calls, all stages */
    double effective_nfe; /* full-model evaluations equivalent (CFG counts 2 per step; token blocks by their FLOP share) */
    double total_ms;      /* wall time of the generate call */
    double backend_ms;    /* time inside ONNX Runtime's Run, all stages */
    double flop_fraction; /* joint-block FLOPs run / those of every block on every token every step */
    /* bytes moved between caller memory and the session's buffers: the request's tensors in, the
     * result out. Stage outputs are written in place into the next stage's buffers (IO binding), so nothing
     * else moves; the X-Slim controller's few scalars a step are not counted. */
    uint64_t transfer_bytes;
    SLIM_FUTURE_FIELD
} slim_generate_stats;

/* Run the bundle's whole sampling program. `latents_out` is caller memory, float32 [B, C, H, W]
 * CPU contiguous: its H and W choose the resolution (multiples of the patch size up to the position
 * table's limit). stats may be NULL. The session's per-step and per-stage stats are replaced.
 * Status: INVALID_ARGUMENT, SHAPE, DTYPE, NUMERICS, BACKEND, OUT_OF_MEMORY, BUSY, CANCELLED (params.progress). */
SLIM_API slim_status slim_generate(slim_session* session, const slim_generate_params* params, const slim_tensor* latents_out,
                                   slim_generate_stats* stats);

/* ---- prompt to image (docs/pipeline.md) ---- */

typedef struct slim_prompt_params {
    uint32_t struct_size;                /* set by slim_prompt_params_init */
    const char* const* prompts;          /* prompt_count NUL-terminated UTF-8 prompts (at most 65536 bytes each); required */
    int32_t prompt_count;                /* the batch B, >= 1 */
    const char* const* negative_prompts; /* NULL: "" for each prompt; else prompt_count entries (a NULL entry: ""); used under CFG */
    int32_t height;                      /* image pixels, a multiple of the VAE's scale factor x the patch size; 0 (default): the
                                            bundle's default latent size x the scale factor */
    int32_t width;                       /* likewise */
    const slim_tensor* latents; /* float32 [B, C, height/f, width/f] (f: the VAE's scale factor, 8 for SD3) initial noise; NULL: seeded */
    const uint64_t* seeds;      /* as slim_generate_params: B seeds, one per image; NULL (default): seed + row */
    uint64_t seed;              /* default 0 */
    float guidance_scale;       /* < 0 (default): the bundle's default; > 1: CFG with the negative prompts */
    const char* xslim_policy;   /* as slim_generate_params (X-Slim policy JSON, "null" for none); NULL: the bundle's */
    float xslim_threshold;      /* as slim_generate_params */
    int32_t num_steps;          /* as slim_generate_params: > 0 a plain plan of that many steps; 0 (default): the program */
    float shift;                /* as slim_generate_params */
    slim_progress progress;     /* NULL (default), or called at each phase: SLIM_PHASE_ENCODE, SLIM_PHASE_TOKENIZE before each
                                   tokenizer call, SLIM_PHASE_STEP after each sampling step, SLIM_PHASE_DECODE; non-zero cancels
                                   (SLIM_ERR_CANCELLED, nothing written) */
    void* progress_user;        /* passed to progress as it is */
    SLIM_FUTURE_FIELD
} slim_prompt_params;

/* Writes the defaults for slim_generate_prompt (no prompts, seed 0, default size, guidance, X-Slim policy and program
 * from the bundle) into the first struct_size bytes of *params and sets params->struct_size. Status: INVALID_ARGUMENT. */
SLIM_API slim_status slim_prompt_params_init(slim_prompt_params* params, size_t struct_size);

typedef struct slim_prompt_stats {
    uint32_t struct_size; /* set by the caller: sizeof(slim_prompt_stats) */
    int32_t batch;        /* images made */
    int32_t height;       /* image pixels */
    int32_t width;
    int32_t steps;         /* sampling steps run */
    int32_t encoder_calls; /* text-encoder stage calls (each distinct prompt text of the call is encoded once per encoder) */
    double total_ms;       /* wall time of the call */
    double tokenize_ms;    /* the tokenizer stages */
    double clip_l_ms;      /* the text encoders' stage calls (t5: 0 for a bundle without T5) */
    double clip_g_ms;
    double t5_ms;
    double steps_ms;      /* the sampling program (slim_generate's total_ms) */
    double vae_decode_ms; /* scaling, the vae_decode stage and the conversion to RGB8 */
    double effective_nfe; /* as slim_generate_stats */
    /* the session's prompt cache (slim_session_set_prompt_cache) in this call. Each prompt text of the call (the
     * negative ones under CFG) is a hit (found in the cache, or earlier in this call) or a miss (tokenized and encoded:
     * encoder_calls is misses x the encoders, 3, or 2 without T5). */
    int32_t prompt_cache_hits;
    int32_t prompt_cache_misses;
    int32_t prompt_cache_size;     /* entries after the call */
    int32_t prompt_cache_capacity; /* as set */
    /* the sampling call's, as slim_generate_stats */
    int32_t blocks_run;
    int32_t stage_calls;
    double flop_fraction;
    double backend_ms;
    /* bytes moved between caller memory and the session's buffers in the whole call: the token ids of each text
     * encoded and given latents in, the image and latents_out out. The conditioning and the latents stay in the
     * session's buffers from the encoders to the VAE. */
    uint64_t transfer_bytes;
    SLIM_FUTURE_FIELD
} slim_prompt_stats;

/* Prompt to image: tokenize each prompt (and, when guidance > 1, each negative prompt) with the bundle's
 * tokenizers, run clip_l, clip_g and t5 (zeros in T5's place for a bundle exported with --no-t5), assemble
 * the conditioning, sample as slim_generate does, decode with vae_decode (latents / scaling_factor +
 * shift_factor) and convert to RGB8 as diffusers does: round(clamp(x * 0.5 + 0.5, 0, 1) * 255), in float32
 * (docs/pipeline.md). The same pixels as the Python binding's Session.generate(prompt=...).
 * image_out: caller memory, uint8 [B, height, width, 3] (HWC, RGB), image_capacity its size in bytes.
 * latents_out: NULL, or float32 [B, C, height/f, width/f] (the sampled latents before the VAE's scaling),
 * latents_capacity its size in floats. stats may be NULL. The session's step and stage stats are those of the
 * sampling (encoder and VAE times are in *stats). Each prompt text's conditioning comes from the session's prompt cache
 * when it is there (slim_session_set_prompt_cache: no tokenizer or encoder runs for it; the image is the same bits), and
 * is kept there after it is encoded. With profiling on, the session's events are, in order: one SLIM_EVENT_TOKENIZE
 * per tokenizer call and one SLIM_EVENT_STAGE (step -1) per encoder call, for each text encoded; the sampling's events
 * (as slim_generate's, its SLIM_EVENT_GENERATION included); SLIM_EVENT_DECODE holding the vae_decode stage's event;
 * SLIM_EVENT_IMAGE for the whole call, last.
 * Status: INVALID_ARGUMENT (NULL session/params/prompts/image_out, a prompt not UTF-8 or too long, a size not a multiple of
 * the VAE's scale factor x the patch size, a capacity too small, a bundle without pipeline stages: the message says
 * to re-export with export-engine PIPELINE_FOLDER), SHAPE, DTYPE, NUMERICS, BACKEND, OUT_OF_MEMORY, BUSY, CANCELLED
 * (params.progress; nothing written to image_out, latents_out or stats; the texts encoded before stay cached). */
SLIM_API slim_status slim_generate_prompt(slim_session* session, const slim_prompt_params* params, uint8_t* image_out,
                                          size_t image_capacity, float* latents_out, size_t latents_capacity, slim_prompt_stats* stats);

/* How a step ran. */
typedef enum slim_step_level {
    SLIM_STEP_FULL = 0,          /* every joint block */
    SLIM_STEP_SKIPPED_RANGE = 1, /* 1.x: the block range skipped, its compensated delta added */
    SLIM_STEP_REUSED = 2,        /* X-Slim step level: no block run, the last stack residual reused */
    SLIM_STEP_BLOCK_REFRESH = 3, /* X-Slim block level: low-score blocks add their cached residual */
    SLIM_STEP_TOKEN_REFRESH = 4  /* X-Slim token level: blocks recompute only the most-changed image tokens */
} slim_step_level;

typedef struct slim_step_stats {
    uint32_t struct_size; /* set by the caller */
    double sigma;
    double sigma_next;
    int32_t blocks_run; /* blocks evaluated (on all or on a subset of the image tokens) */
    int32_t level;      /* slim_step_level */
    double ms;
    int32_t blocks_reused;   /* X-Slim block level: blocks that added their cached residual instead */
    int32_t tokens_computed; /* image tokens each evaluated block computed (all of them except in token steps) */
    double flop_fraction;    /* this step's joint-block FLOPs / those of a step running every block on every token */
    SLIM_FUTURE_FIELD
} slim_step_stats;

/* Stats of step `index` of the session's last generate (the count is 0 while a call runs on the session).
 * Status: INVALID_ARGUMENT, BUSY. */
SLIM_API int32_t slim_session_step_count(const slim_session* session);
SLIM_API slim_status slim_session_step_stats(const slim_session* session, int32_t index, slim_step_stats* out);

typedef struct slim_stage_stats {
    uint32_t struct_size; /* set by the caller */
    int32_t calls;
    double total_ms; /* time inside ONNX Runtime's Run for this stage */
    SLIM_FUTURE_FIELD
} slim_stage_stats;

/* Calls and time of stage `index` (see slim_engine_stage_name) in the session's last generate. */
SLIM_API slim_status slim_session_stage_stats(const slim_session* session, int32_t index, slim_stage_stats* out);

/* ---- profiling ----
 * With profiling on, each generate records a timed event per stage call, per step, for its prepare
 * phase and for the whole generation; each LEMUR embed or score records one for the call, its stage
 * call and its memory-bank work. Host times are the library's own clock reads around each backend call (steady clock,
 * CLOCK_MONOTONIC on Linux, in ns). Off (the default) nothing is recorded and nothing is allocated. */

typedef enum slim_event_kind {
    SLIM_EVENT_GENERATION = 0, /* one slim_generate, slim_embed or slim_score call, after argument checks: all of it */
    SLIM_EVENT_PREPARE = 1,    /* generate: its first part: inputs laid out in the model batch, seeded noise drawn, buffers sized */
    SLIM_EVENT_STEP = 2,       /* generate: one sampling step; `level` says how it ran */
    SLIM_EVENT_STAGE = 3,      /* one backend call of stage `stage` (a CFG batch is one call) */
    SLIM_EVENT_BANK = 4,       /* embed, score: the memory-bank work (score: history assembly; embed with a bank: the upsert) */
    SLIM_EVENT_BLOCK = 5,      /* generate, with SLIM_PROFILE_BLOCKS: one joint block's action in a step */
    SLIM_EVENT_TOKENIZE = 6,   /* generate_prompt: one tokenizer call (one text, one of clip_l, clip_g, t5) */
    SLIM_EVENT_DECODE = 7,     /* generate_prompt: the decode: latent scaling, the vae_decode stage, RGB8 conversion */
    SLIM_EVENT_IMAGE = 8       /* generate_prompt: the whole call, after argument checks */
} slim_event_kind;             /* later versions may add kinds: skip the ones you do not know */

/* What a step did with a joint block (SLIM_EVENT_BLOCK events carry it in `level`; docs/runtime-loop.md). */
typedef enum slim_block_action {
    SLIM_BLOCK_RUN = 0,         /* the block's stage on every token */
    SLIM_BLOCK_RUN_KEEP_KV = 1, /* the same, keeping its image keys/values and residual for later token steps */
    SLIM_BLOCK_RUN_TOKENS = 2,  /* X-Slim token level: the block_N_tokens stage on the selected tokens */
    SLIM_BLOCK_REUSE = 3,       /* X-Slim block level: its residual from the last full step added */
    SLIM_BLOCK_SKIP = 4,        /* nothing: inside the 1.x skipped range, or a step reusing the whole stack */
    SLIM_BLOCK_ADD_DELTA = 5    /* the last block of the 1.x skipped range: the compensated delta added */
} slim_block_action;

/* slim_session_set_profiling flags. */
#define SLIM_PROFILE_ON 1     /* generation, prepare, step and stage events */
#define SLIM_PROFILE_BLOCKS 2 /* also one SLIM_EVENT_BLOCK event per joint block per step */

typedef struct slim_event {
    uint32_t struct_size; /* set by the caller: sizeof(slim_event) */
    int32_t kind;         /* slim_event_kind */
    int32_t step;         /* the step the event belongs to; -1 for events outside the steps (and every LEMUR event) */
    int32_t block;        /* stage and block events: the joint block (stage events: the stage computes it, block_i, block_i_*), else -1 */
    int32_t stage;     /* stage events: stage index (slim_engine_stage_name); block events: the stage the action called, or -1; else -1 */
    int32_t level;     /* step events: slim_step_level; block events: slim_block_action; else -1 */
    int64_t start_ns;  /* host time the event began */
    int64_t end_ns;    /* host time it ended */
    int64_t device_ns; /* device time from CUDA events; -1 when not measured (always, in this CPU-only build) */
    SLIM_FUTURE_FIELD
} slim_event;

/* Turn event recording on (nonzero: SLIM_PROFILE_ON, with SLIM_PROFILE_BLOCKS also block events) or off (0) for
 * the session's following generate, embed and score calls. Status: INVALID_ARGUMENT (NULL session, a plain ONNX
 * engine's session). */
SLIM_API slim_status slim_session_set_profiling(slim_session* session, int32_t enabled);
/* Number of events of the session's last generate, embed or score (0 when profiling was off; partial if it failed). */
SLIM_API int32_t slim_session_event_count(const slim_session* session);
/* Event `index`, in the order the events ended: generate: prepare; the stage calls (and block events) of a step,
 * then that step; the generation last. generate_prompt: see slim_generate_prompt. embed: the stage, the bank upsert;
 * score: the bank history assembly, the stage; the call (SLIM_EVENT_GENERATION) last. Status: INVALID_ARGUMENT (NULL argument, index out of
 * range, struct_size). */
SLIM_API slim_status slim_session_event(const slim_session* session, int32_t index, slim_event* out);

/* ---- generic stage call (any family, and plain ONNX models) ---- */

/* A tensor with the name of the graph input or output it binds to. */
typedef struct slim_named_tensor {
    const char* name;
    slim_tensor tensor;
} slim_named_tensor;

/* Run stage `stage` (see slim_engine_stage_name; "model" for a plain ONNX file) once. `inputs` must
 * bind every graph input exactly once, by name, with the graph's dtype (float32, int64 or int32) and
 * rank, and its fixed dimensions. `outputs` binds any subset of the graph outputs to caller memory
 * whose shape must equal the computed one. Nothing is written to an output unless every check passes.
 * Status: INVALID_ARGUMENT (unknown stage or name, missing input), SHAPE, DTYPE, BACKEND, BUSY. */
SLIM_API slim_status slim_stage_run(slim_session* session, const char* stage, const slim_named_tensor* inputs, int32_t input_count,
                                    const slim_named_tensor* outputs, int32_t output_count);

/* ---- LEMUR: memory bank ---- */

typedef struct slim_bank slim_bank;

typedef struct slim_bank_params {
    uint32_t struct_size; /* set by slim_bank_params_init */
    int32_t dim;          /* embedding width: required to create a bank; checked against an existing one when > 0 */
    int32_t read_only;    /* 1: a reader (no lock, no writes; slim_bank_refresh picks up a writer's appends); 0 (default): the writer */
    int32_t create;       /* 1 (default): a writer creates the file when it does not exist */
    int32_t sync_writes;  /* 1: fdatasync in every upsert/delete (power-loss durable); 0 (default): durable against a process crash
                             (kill -9) as soon as the call returns, against power loss after slim_bank_flush */
    SLIM_FUTURE_FIELD
} slim_bank_params;

/* Writes the defaults for slim_bank_open (dim 0: take the file's; writer, create, no per-call sync) into the first
 * struct_size bytes of *params and sets params->struct_size. Status: INVALID_ARGUMENT. */
SLIM_API slim_status slim_bank_params_init(slim_bank_params* params, size_t struct_size);

/* Open (or create) the bank file at `path` (format: docs/memory-bank.md). A torn tail left by a
 * crash is dropped (a writer truncates it); opening never fails because of one. Damage inside the
 * file (bit rot) never brings a deleted id back: a record or header with one flipped bit is corrected
 * in memory (a delete applied, an upserted id hidden until written again) and slim_bank_recovery_info
 * reports it: check it after opening; a record or header damaged beyond that makes opening fail
 * (SLIM_ERR_IO naming slim_bank_repair). One writer per file at a time, across processes; only the
 * process that opened a handle may write through it (after fork(), open the bank again in the child).
 * On success *out owns the bank (free with slim_bank_close).
 * Status: INVALID_ARGUMENT, IO (missing, not a regular file, locked by another writer, not a bank file, damaged beyond
 * correction), SHAPE (dim mismatch). */
SLIM_API slim_status slim_bank_open(const char* path, const slim_bank_params* params, slim_bank** out);
/* Close a bank (releasing the writer lock; a forked child's inherited handle holds it too until
 * closed), after waiting for calls running on it in other threads (lookups, an embed or score
 * reading it). NULL is accepted. */
SLIM_API void slim_bank_close(slim_bank* bank);
/* Embedding width, and the number of document ids present. */
SLIM_API int32_t slim_bank_dim(const slim_bank* bank);
SLIM_API int64_t slim_bank_count(const slim_bank* bank);

/* Insert or replace the embeddings of `ids` (int64 [N], each >= 0; the last of a repeated id wins),
 * `embeddings` float32 [N, dim] finite, recording `model_version` and the current time. Readers see
 * all N at once when the call returns; on an error none is written, and a crash inside the call loses
 * all N (a version-1 bank file may keep a prefix of them, never a torn one). Status: INVALID_ARGUMENT
 * (read-only bank, a handle opened by another process (fork), negative id), SHAPE, DTYPE, NUMERICS, IO. */
SLIM_API slim_status slim_bank_upsert(slim_bank* bank, const slim_tensor* ids, const slim_tensor* embeddings, uint32_t model_version);
/* Delete `ids` (int64 [N]); absent ids are ignored. *deleted (may be NULL): how many were present.
 * Status: INVALID_ARGUMENT (as upsert), SHAPE, DTYPE, IO. */
SLIM_API slim_status slim_bank_delete(slim_bank* bank, const slim_tensor* ids, int64_t* deleted);
/* Bulk lookup of `ids` (int64 [N]): embeddings_out float32 [N, dim] (a missing id's row is zeros),
 * write_times_out int64 [N] (microseconds since the Unix epoch, -1 when missing) and
 * model_versions_out int64 [N] (-1 when missing); either of the last two may be NULL. *found (may
 * be NULL): how many ids were present. Status: INVALID_ARGUMENT, SHAPE, DTYPE, IO (the file was truncated
 * under this handle, below records it had indexed: refresh a read-only handle, or reopen; outputs undefined). */
SLIM_API slim_status slim_bank_lookup(const slim_bank* bank, const slim_tensor* ids, const slim_tensor* embeddings_out,
                                      const slim_tensor* write_times_out, const slim_tensor* model_versions_out, int64_t* found);
/* fdatasync the file: every earlier write then survives a power loss. Status: IO, INVALID_ARGUMENT (as upsert). */
SLIM_API slim_status slim_bank_flush(slim_bank* bank);
/* Read-only banks: index the write calls a writer completed since open or the last refresh (a call
 * still being written comes whole at a later refresh). *added (may be NULL): how many records; 0 on
 * the writer's own handle, which is always current. Status: INVALID_ARGUMENT, IO. */
SLIM_API slim_status slim_bank_refresh(slim_bank* bank, int64_t* added);

/* What the scans of a bank handle found: at open, and for a read-only handle up to its last refresh
 * (docs/memory-bank.md, "Damage"). */
typedef struct slim_bank_recovery {
    uint32_t struct_size;         /* set by the caller: sizeof(slim_bank_recovery) */
    int64_t damaged_records;      /* records inside the log with one flipped bit, corrected in memory: a delete applied, an upserted
                                     id hidden (not found) until written again or slim_bank_repair */
    int64_t first_damaged_offset; /* byte offset of the first damaged record; -1: none */
    int64_t tail_bytes;           /* at open: bytes after the last whole write call (a call a crash cut short); a writer truncated them */
    int64_t header_corrected;     /* 1 when the header had one flipped bit, corrected in memory */
    SLIM_FUTURE_FIELD
} slim_bank_recovery;
/* Fills *out (out->struct_size set by the caller). Status: INVALID_ARGUMENT (NULL, struct_size). */
SLIM_API slim_status slim_bank_recovery_info(const slim_bank* bank, slim_bank_recovery* out);

/* What slim_bank_repair found and kept. */
typedef struct slim_bank_repair_report {
    uint32_t struct_size;       /* set by the caller: sizeof(slim_bank_repair_report) */
    int32_t header;             /* 0: intact; 1: one flipped bit, corrected; 2: damaged beyond that, rebuilt from the records */
    int64_t records;            /* records in the old file, up to the end of its last whole write call */
    int64_t corrected_records;  /* records with one flipped bit: restored */
    int64_t unreadable_records; /* records damaged beyond correction: which id each wrote or deleted is unknown */
    int64_t dropped_records;    /* intact records of the write calls that held an unreadable record */
    int64_t hidden_ids;         /* ids live before an unreadable record, left out: any of them may be the one it deleted */
    int64_t ids;                /* ids in the repaired bank */
    int64_t tail_bytes;         /* bytes after the last whole write call (a call a crash cut short), left out */
    SLIM_FUTURE_FIELD
} slim_bank_repair_report;
/* Rewrite the bank file at `path` with one record per id it can prove live (docs/memory-bank.md, "Repair"): every
 * corrected record restored, no deleted id, none of the ids written before a record damaged beyond correction; a
 * header damaged beyond correction is rebuilt from the records. Takes the writer lock (no writer may have it open);
 * the new file replaces the old one whole. Readers open on it must open it again. out may be NULL.
 * Status: INVALID_ARGUMENT, IO (missing, locked by a writer, not a bank file, nothing to recover, a write failed:
 * then the old file is left as it was). */
SLIM_API slim_status slim_bank_repair(const char* path, slim_bank_repair_report* out);

/* ---- LEMUR: embed and score ---- */

typedef struct slim_lemur_stats {
    uint32_t struct_size;    /* set by the caller: sizeof(slim_lemur_stats) */
    int32_t batch;           /* documents embedded, or histories scored */
    int64_t history_found;   /* score: history slots filled from the bank */
    int64_t history_missing; /* score: ids missing or stale (skipped under SLIM_MISSING_SKIP) */
    double total_ms;         /* wall time of the call */
    double backend_ms;       /* time inside ONNX Runtime's Run */
    double bank_ms;          /* time in the bank: history assembly, or the upsert of embed */
    SLIM_FUTURE_FIELD
} slim_lemur_stats;

typedef struct slim_embed_params {
    uint32_t struct_size;            /* set by slim_embed_params_init */
    const slim_tensor* text_ids;     /* int64 [B, L] token ids in [0, vocab_size), 0 pads; title, OCR and ASR concatenated; required */
    const slim_tensor* segment_ids;  /* int64 [B, L] in [0, num_segments) (0 title, 1 OCR, 2 ASR); NULL: all 0 */
    const slim_tensor* frames;       /* float32 [B, F, 3, image_size, image_size], 1 <= F <= max_frames; required */
    slim_bank* bank;                 /* optional: upsert the embeddings into this (writer) bank */
    const slim_tensor* document_ids; /* int64 [B], ids >= 0; required with bank */
    int64_t model_version;           /* recorded in the bank, in [0, 2^32); -1 (default): the bundle's program.model_version */
    SLIM_FUTURE_FIELD
} slim_embed_params;

/* Writes the defaults for slim_embed (all tensors NULL, no bank, the bundle's model version) into the first struct_size bytes of *params
 * and sets params->struct_size. Status: INVALID_ARGUMENT. */
SLIM_API slim_status slim_embed_params_init(slim_embed_params* params, size_t struct_size);

/* Document embeddings (L2-normalised) of a batch into `embeddings_out` (float32 [B, embed_dim], CPU
 * contiguous, caller memory); with a bank, also upserted under document_ids. stats may be NULL.
 * Status: INVALID_ARGUMENT (not a lemur engine, id out of range), SHAPE, DTYPE, NUMERICS, BACKEND, IO, BUSY. */
SLIM_API slim_status slim_embed(slim_session* session, const slim_embed_params* params, const slim_tensor* embeddings_out,
                                slim_lemur_stats* stats);

/* What slim_score does with a history id that is not in the bank (or is older than min_model_version). */
typedef enum slim_missing_policy {
    SLIM_MISSING_ERROR = 0, /* default: fail with SLIM_ERR_NOT_FOUND naming the first such id */
    SLIM_MISSING_SKIP = 1   /* leave it out of the history, as padding is */
} slim_missing_policy;

typedef struct slim_score_params {
    uint32_t struct_size;           /* set by slim_score_params_init */
    const slim_bank* bank;          /* the history embeddings' source; required, dim must be embed_dim */
    const slim_tensor* history_ids; /* int64 [B, H] document ids, most recent last; -1 pads; required */
    const slim_tensor* query_ids;   /* int64 [B, Lq] query token ids in [0, vocab_size), 0 pads; required */
    int32_t missing_policy;         /* slim_missing_policy */
    int64_t min_model_version;      /* bank entries written by an older model version count as missing; 0 (default): all */
    SLIM_FUTURE_FIELD
} slim_score_params;

/* Writes the defaults for slim_score (all NULL, SLIM_MISSING_ERROR, min_model_version 0) into the first struct_size bytes of *params and
 * sets params->struct_size. Status: INVALID_ARGUMENT. */
SLIM_API slim_status slim_score_params_init(slim_score_params* params, size_t struct_size);

/* Click probabilities of each (history, query) row into `scores_out` (float32 [B], caller memory).
 * stats may be NULL. Status: INVALID_ARGUMENT, SHAPE, DTYPE, NOT_FOUND, NUMERICS, BACKEND, BUSY. */
SLIM_API slim_status slim_score(slim_session* session, const slim_score_params* params, const slim_tensor* scores_out,
                                slim_lemur_stats* stats);

#ifdef __cplusplus
}
#endif

#endif /* SLIMENGINE_H */
