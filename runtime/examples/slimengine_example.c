/* slimengine-example: generate latents from an SD3 engine bundle through the C ABI.
 *
 * usage: slimengine-example BUNDLE [--seed N] [--batch B] [--text-len L] [--size S] [--out FILE.f32]
 * Prompt and pooled embeddings are seeded pseudo-random values (a real service passes its text
 * encoders' outputs); with guidance > 1 the negative embeddings are zeros. Prints timing and NFE.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slimengine.h"

static float* filled(size_t n, uint32_t* state, float scale) {
    float* p = malloc(n * sizeof(float));
    for (size_t i = 0; p && i < n; ++i) {
        *state = *state * 1664525u + 1013904223u; /* LCG: the values only need to be repeatable */
        p[i] = scale * ((float)(*state >> 8) / 16777216.0f - 0.5f);
    }
    return p;
}

int main(int argc, char** argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        fprintf(stderr, "usage: %s BUNDLE [--seed N] [--batch B] [--text-len L] [--size S] [--out FILE.f32]\n", argv[0]);
        return argc < 2 ? 2 : 0;
    }
    uint64_t seed = 0;
    long batch = 1, text_len = 77, size = 0;
    const char* out_path = NULL;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--seed"))
            seed = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--batch"))
            batch = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--text-len"))
            text_len = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--size"))
            size = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--out"))
            out_path = argv[i + 1];
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }

    slim_engine* engine = NULL;
    slim_session* session = NULL;
    slim_engine_params engine_params;
    if (slim_engine_params_init(&engine_params, sizeof engine_params) != SLIM_OK ||
        slim_engine_open(argv[1], &engine_params, &engine) != SLIM_OK) {
        fprintf(stderr, "slimengine-example: %s\n", slim_last_error());
        return 1;
    }
    /* The bundle's shapes and defaults, typed (no JSON parsing): slim_engine_get_info. */
    int32_t abi_major = 0, abi_minor = 0;
    slim_abi_version(&abi_major, &abi_minor);
    slim_engine_info info = {sizeof(slim_engine_info)};
    const char* problem = NULL;
    if (abi_major != SLIM_ABI_VERSION_MAJOR || abi_minor < SLIM_ABI_VERSION_MINOR)
        problem = "the library's ABI is older than this program's header, or of another major version";
    else if (slim_engine_get_info(engine, &info) != SLIM_OK)
        problem = slim_last_error();
    else if (info.family != SLIM_FAMILY_SD3)
        problem = "not an sd3 bundle (slim_generate runs sd3 bundles)";
    if (problem) {
        fprintf(stderr, "slimengine-example: %s\n", problem);
        slim_engine_close(engine);
        return 1;
    }
    long joint = info.joint_attention_dim, pooled_dim = info.pooled_projection_dim, channels = info.latent_channels;
    if (size <= 0) size = info.default_latent_size;
    if (size <= 0) {
        fprintf(stderr, "slimengine-example: the bundle states no default latent size: pass --size\n");
        slim_engine_close(engine);
        return 2;
    }
    double guidance = info.guidance_scale;

    size_t text_n = (size_t)(batch * text_len * joint), pooled_n = (size_t)(batch * pooled_dim),
           lat_n = (size_t)(batch * channels * size * size);
    uint32_t state = (uint32_t)seed + 1;
    float* text = filled(text_n, &state, 2.0f);
    float* pooled = filled(pooled_n, &state, 2.0f);
    float* zeros_text = calloc(text_n, sizeof(float));
    float* zeros_pooled = calloc(pooled_n, sizeof(float));
    float* latents = malloc(lat_n * sizeof(float));
    int64_t text_shape[3] = {batch, text_len, joint}, pooled_shape[2] = {batch, pooled_dim}, lat_shape[4] = {batch, channels, size, size};
    slim_tensor t_text = {text, SLIM_DTYPE_FLOAT32, SLIM_DEVICE_CPU, 0, 3, text_shape, NULL};
    slim_tensor t_pooled = {pooled, SLIM_DTYPE_FLOAT32, SLIM_DEVICE_CPU, 0, 2, pooled_shape, NULL};
    slim_tensor t_neg_text = {zeros_text, SLIM_DTYPE_FLOAT32, SLIM_DEVICE_CPU, 0, 3, text_shape, NULL};
    slim_tensor t_neg_pooled = {zeros_pooled, SLIM_DTYPE_FLOAT32, SLIM_DEVICE_CPU, 0, 2, pooled_shape, NULL};
    slim_tensor t_out = {latents, SLIM_DTYPE_FLOAT32, SLIM_DEVICE_CPU, 0, 4, lat_shape, NULL};

    int rc = 1;
    slim_generate_params params;
    slim_generate_params_init(&params, sizeof params);
    params.prompt_embeds = &t_text;
    params.pooled_embeds = &t_pooled;
    params.negative_prompt_embeds = &t_neg_text;
    params.negative_pooled_embeds = &t_neg_pooled;
    params.seed = seed;
    slim_generate_stats stats = {sizeof(slim_generate_stats)};
    if (slim_session_create(engine, &session) != SLIM_OK || slim_generate(session, &params, &t_out, &stats) != SLIM_OK) {
        fprintf(stderr, "slimengine-example: %s\n", slim_last_error());
        goto done;
    }
    double sum = 0, sq = 0;
    for (size_t i = 0; i < lat_n; ++i) {
        sum += latents[i];
        sq += (double)latents[i] * latents[i];
    }
    printf("slimengine %s: generated latents [%ld,%ld,%ld,%ld] (guidance %.1f), mean %.4f, std %.4f\n", slim_version(), batch, channels,
           size, size, guidance, sum / lat_n, sqrt(sq / lat_n - (sum / lat_n) * (sum / lat_n)));
    printf("steps %d, effective NFE %.3f, blocks run %d, stage calls %d, total %.2f ms (ONNX Runtime %.2f ms)\n", stats.steps,
           stats.effective_nfe, stats.blocks_run, stats.stage_calls, stats.total_ms, stats.backend_ms);
    for (int32_t i = 0; i < slim_session_step_count(session); ++i) {
        slim_step_stats s = {sizeof(slim_step_stats)};
        slim_session_step_stats(session, i, &s);
        printf("  step %d: sigma %.4f -> %.4f, %d blocks%s, %.2f ms\n", i, s.sigma, s.sigma_next, s.blocks_run,
               s.level == SLIM_STEP_SKIPPED_RANGE ? " (block range skipped)"
               : s.level == SLIM_STEP_REUSED      ? " (stack reused)"
                                                  : "",
               s.ms);
    }
    if (out_path) {
        FILE* f = fopen(out_path, "wb");
        if (!f || fwrite(latents, sizeof(float), lat_n, f) != lat_n) {
            fprintf(stderr, "slimengine-example: cannot write %s\n", out_path);
            if (f) fclose(f);
            goto done;
        }
        fclose(f);
        printf("wrote %s (float32, [%ld,%ld,%ld,%ld])\n", out_path, batch, channels, size, size);
    }
    rc = 0;
done:
    slim_session_destroy(session);
    slim_engine_close(engine);
    free(text);
    free(pooled);
    free(zeros_text);
    free(zeros_pooled);
    free(latents);
    return rc;
}
