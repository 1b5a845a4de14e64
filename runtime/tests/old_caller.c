/* old_caller: a caller built against the ABI 1.0 header, run against a library whose structs each have one more
 * field (built with -DSLIM_TEST_FUTURE_FIELDS, as a later 1.x library would be). Every params_init writes exactly
 * the caller's struct (the bytes after it are checked, and AddressSanitizer watches the heap copies), the library
 * reads only the caller's struct_size bytes of params and writes only that many of stats, and a struct_size past
 * the library's own is refused. tests/test_c_program.py runs it: `slim-old-caller BUNDLE BANK_PATH` prints "ok". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slimengine.h"

#define GUARD 32
static int failures = 0;

static void expect(int ok, const char* what) {
    if (!ok) {
        fprintf(stderr, "FAILED: %s (%s)\n", what, slim_last_error());
        ++failures;
    }
}

/* A heap block of `size` bytes followed by GUARD bytes of 0xAB: what the library writes past `size` shows there. */
static unsigned char* guarded(size_t size) {
    unsigned char* p = malloc(size + GUARD);
    memset(p, 0xAB, size + GUARD);
    return p;
}
static int guard_intact(const unsigned char* p, size_t size) {
    for (size_t i = 0; i < GUARD; ++i)
        if (p[size + i] != 0xAB) return 0;
    return 1;
}

#define CHECK_INIT(T, init)                                                                                       \
    do {                                                                                                          \
        unsigned char* block = guarded(sizeof(T));                                                                \
        expect(init((T*)block, sizeof(T)) == SLIM_OK, #init " with the 1.0 size");                                \
        expect(guard_intact(block, sizeof(T)), #init " wrote past the caller's struct");                          \
        expect(((T*)block)->struct_size == sizeof(T), #init " sets struct_size");                                 \
        free(block);                                                                                              \
        unsigned char* big = guarded(sizeof(T) + 16); /* room for a newer caller's struct */                      \
        expect(init((T*)big, sizeof(T) + 8) == SLIM_OK, #init ": the library's struct is 8 bytes larger");        \
        expect(init((T*)big, sizeof(T) + 16) == SLIM_ERR_INVALID_ARGUMENT, #init " refuses a size past its own"); \
        expect(init((T*)big, sizeof(T) - 8) == SLIM_ERR_INVALID_ARGUMENT, #init " refuses a size below 1.0's");   \
        free(big);                                                                                                \
    } while (0)

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s BUNDLE BANK_PATH\n", argv[0]);
        return 2;
    }
    CHECK_INIT(slim_engine_params, slim_engine_params_init);
    CHECK_INIT(slim_generate_params, slim_generate_params_init);
    CHECK_INIT(slim_prompt_params, slim_prompt_params_init);
    CHECK_INIT(slim_bank_params, slim_bank_params_init);
    CHECK_INIT(slim_embed_params, slim_embed_params_init);
    CHECK_INIT(slim_score_params, slim_score_params_init);

    /* The defaults as the header documents them. */
    slim_engine_params* engine_params = malloc(sizeof *engine_params);
    slim_engine_params_init(engine_params, sizeof *engine_params);
    expect(engine_params->verify == SLIM_VERIFY_FAST && engine_params->device_type == SLIM_DEVICE_CPU &&
               engine_params->onnxruntime_library == NULL && engine_params->host_buffers == 0,
           "engine defaults");
    slim_generate_params* params = malloc(sizeof *params);
    slim_generate_params_init(params, sizeof *params);
    expect(
        params->guidance_scale < 0 && params->xslim_threshold < 0 && params->seeds == NULL && params->num_steps == 0 && params->shift == 0,
        "generate defaults");

    /* Open and generate with the 1.0-sized structs (heap copies of exactly that size: ASan sees any read past them). */
    slim_engine* engine = NULL;
    slim_session* session = NULL;
    expect(slim_engine_open(argv[1], engine_params, &engine) == SLIM_OK, "open with 1.0 engine params");
    slim_engine_info* info = (slim_engine_info*)guarded(sizeof(slim_engine_info));
    info->struct_size = sizeof(slim_engine_info);
    expect(engine && slim_engine_get_info(engine, info) == SLIM_OK && guard_intact((unsigned char*)info, sizeof *info),
           "engine info within the caller's struct");
    expect(engine && slim_session_create(engine, &session) == SLIM_OK, "session");
    if (session) {
        const int64_t B = 1, L = 3, S = 8, J = info->joint_attention_dim, P = info->pooled_projection_dim, C = info->latent_channels;
        float* text = calloc((size_t)(B * L * J), sizeof(float));
        float* pooled = calloc((size_t)(B * P), sizeof(float));
        float* latents = malloc((size_t)(B * C * S * S) * sizeof(float));
        int64_t text_shape[3] = {B, L, J}, pooled_shape[2] = {B, P}, lat_shape[4] = {B, C, S, S};
        slim_tensor t_text = {text, SLIM_DTYPE_FLOAT32, SLIM_DEVICE_CPU, 0, 3, text_shape, NULL};
        slim_tensor t_pooled = {pooled, SLIM_DTYPE_FLOAT32, SLIM_DEVICE_CPU, 0, 2, pooled_shape, NULL};
        slim_tensor t_out = {latents, SLIM_DTYPE_FLOAT32, SLIM_DEVICE_CPU, 0, 4, lat_shape, NULL};
        params->prompt_embeds = &t_text;
        params->pooled_embeds = &t_pooled;
        params->negative_prompt_embeds = &t_text;
        params->negative_pooled_embeds = &t_pooled;
        params->seed = 3;
        slim_generate_stats* stats = (slim_generate_stats*)guarded(sizeof(slim_generate_stats));
        stats->struct_size = sizeof(slim_generate_stats);
        expect(slim_generate(session, params, &t_out, stats) == SLIM_OK, "generate with 1.0 params and stats");
        expect(guard_intact((unsigned char*)stats, sizeof *stats) && stats->steps == info->num_steps, "stats within the caller's struct");
        slim_step_stats* step = (slim_step_stats*)guarded(sizeof(slim_step_stats));
        step->struct_size = sizeof(slim_step_stats);
        expect(slim_session_step_stats(session, 0, step) == SLIM_OK && guard_intact((unsigned char*)step, sizeof *step),
               "step stats within the caller's struct");
        free(step);
        free(stats);
        free(text);
        free(pooled);
        free(latents);
    }
    slim_session_destroy(session);
    slim_engine_close(engine);
    free(info);

    /* A bank with 1.0-sized params and recovery struct. */
    slim_bank_params* bank_params = malloc(sizeof *bank_params);
    slim_bank_params_init(bank_params, sizeof *bank_params);
    expect(bank_params->create == 1 && bank_params->read_only == 0, "bank defaults");
    bank_params->dim = 4;
    slim_bank* bank = NULL;
    expect(slim_bank_open(argv[2], bank_params, &bank) == SLIM_OK, "bank open with 1.0 params");
    slim_bank_recovery* recovery = (slim_bank_recovery*)guarded(sizeof(slim_bank_recovery));
    recovery->struct_size = sizeof(slim_bank_recovery);
    expect(bank && slim_bank_recovery_info(bank, recovery) == SLIM_OK && guard_intact((unsigned char*)recovery, sizeof *recovery) &&
               recovery->first_damaged_offset == -1,
           "bank recovery within the caller's struct");
    slim_bank_close(bank);
    free(recovery);
    free(bank_params);
    free(params);
    free(engine_params);
    if (failures) return 1;
    printf("ok\n");
    return 0;
}
