/* prompt-example: prompt to image through the C ABI (slim_generate_prompt; ABI 0.8 for the prompt cache and progress).
 *
 * usage: prompt-example BUNDLE PROMPT [--negative TEXT] [--seed N] [--size PIXELS] [--guidance G] [--steps N]
 *                       [--out FILE.ppm]
 * The bundle must have pipeline stages (export-engine PIPELINE_FOLDER). Writes a binary PPM (P6) of the RGB8
 * image and prints per-stage times, with a line per sampling step on stderr (the progress callback). It then makes
 * the same image again: the session's prompt cache serves both texts (no tokenizer or encoder runs), and the program
 * checks the bits are the same. The tokenizers are the library's own (docs/tokenizers.md): nothing but ONNX Runtime
 * ($SLIMENGINE_ORT_LIBRARY) is needed, and no Python.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "slimengine.h"

/* slim_progress: one line per sampling step; 0 goes on (non-zero would cancel the call: SLIM_ERR_CANCELLED). */
static int32_t report(void* user, int32_t phase, int32_t step, int32_t total) {
    (void)user;
    if (phase == SLIM_PHASE_STEP) fprintf(stderr, "step %d/%d\n", step + 1, total);
    return 0;
}

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr,
                "usage: %s BUNDLE PROMPT [--negative TEXT] [--seed N] [--size PIXELS] [--guidance G] [--steps N] [--out FILE.ppm]\n",
                argv[0]);
        return 2;
    }
    slim_prompt_params params;
    if (slim_prompt_params_init(&params, sizeof params) != SLIM_OK) {
        fprintf(stderr, "%s\n", slim_last_error());
        return 1;
    }
    const char* prompt = argv[2];
    const char* negative = "";
    const char* out_path = NULL;
    params.prompts = &prompt;
    params.prompt_count = 1;
    params.negative_prompts = &negative;
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--negative"))
            negative = argv[i + 1];
        else if (!strcmp(argv[i], "--seed"))
            params.seed = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--size"))
            params.height = params.width = (int32_t)strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--guidance"))
            params.guidance_scale = strtof(argv[i + 1], NULL);
        else if (!strcmp(argv[i], "--steps"))
            params.num_steps = (int32_t)strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--out"))
            out_path = argv[i + 1];
        else {
            fprintf(stderr, "unknown option %s\n", argv[i]);
            return 2;
        }
    }
    int32_t major = 0, minor = 0;
    slim_abi_version(&major, &minor);
    if (major != SLIM_ABI_VERSION_MAJOR || minor < SLIM_ABI_VERSION_MINOR) {
        fprintf(stderr, "libslimengine has ABI %d.%d; this program needs %d.%d or a newer %d.x\n", major, minor, SLIM_ABI_VERSION_MAJOR,
                SLIM_ABI_VERSION_MINOR, SLIM_ABI_VERSION_MAJOR);
        return 1;
    }

    slim_engine* engine = NULL;
    slim_session* session = NULL;
    uint8_t *image = NULL, *again = NULL;
    int rc = 1;
    if (slim_engine_open(argv[1], NULL, &engine) != SLIM_OK || slim_session_create(engine, &session) != SLIM_OK) {
        fprintf(stderr, "cannot open %s: %s\n", argv[1], slim_last_error());
        goto done;
    }
    /* The default size is the bundle's: slim_engine_info gives it in latent pixels; the VAE's factor is 8 for SD3. */
    slim_engine_info info = {.struct_size = sizeof(info)};
    slim_engine_get_info(engine, &info);
    const long height = params.height ? params.height : 8L * info.default_latent_size;
    const long width = params.width ? params.width : 8L * info.default_latent_size;
    const size_t bytes = (size_t)height * (size_t)width * 3;
    image = malloc(bytes);
    again = malloc(bytes);
    if (!image || !again) goto done;
    params.progress = report;
    slim_prompt_stats stats = {.struct_size = sizeof(stats)};
    slim_status status = slim_generate_prompt(session, &params, image, bytes, NULL, 0, &stats);
    if (status != SLIM_OK) {
        fprintf(stderr, "slim_generate_prompt: %s: %s\n", slim_status_name(status), slim_last_error());
        goto done;
    }
    printf(
        "%dx%d, %d steps: tokenize %.1f ms, clip_l %.1f ms, clip_g %.1f ms, t5 %.1f ms, steps %.1f ms, vae_decode %.1f ms, total %.1f ms\n",
        stats.height, stats.width, stats.steps, stats.tokenize_ms, stats.clip_l_ms, stats.clip_g_ms, stats.t5_ms, stats.steps_ms,
        stats.vae_decode_ms, stats.total_ms);
    /* The same call again: the prompt and the negative prompt come from the session's prompt cache. */
    params.progress = NULL;
    slim_prompt_stats hit = {.struct_size = sizeof(hit)};
    status = slim_generate_prompt(session, &params, again, bytes, NULL, 0, &hit);
    if (status != SLIM_OK) {
        fprintf(stderr, "slim_generate_prompt: %s: %s\n", slim_status_name(status), slim_last_error());
        goto done;
    }
    printf("again: prompt cache %d hits, %d misses, %d encoder calls, total %.1f ms (%.1f ms the first time); same image: %s\n",
           hit.prompt_cache_hits, hit.prompt_cache_misses, hit.encoder_calls, hit.total_ms, stats.total_ms,
           memcmp(image, again, bytes) == 0 ? "yes" : "no");
    if (out_path) {
        FILE* f = fopen(out_path, "wb");
        if (!f || fprintf(f, "P6\n%ld %ld\n255\n", width, height) < 0 || fwrite(image, 1, bytes, f) != bytes) {
            fprintf(stderr, "cannot write %s\n", out_path);
            if (f) fclose(f);
            goto done;
        }
        if (fclose(f) != 0) goto done;
    }
    rc = 0;
done:
    free(image);
    free(again);
    slim_session_destroy(session);
    slim_engine_close(engine);
    return rc;
}
