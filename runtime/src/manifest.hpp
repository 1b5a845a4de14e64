// manifest.json of an engine bundle, parsed and validated: nothing downstream re-checks these fields.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "xslim.hpp"

namespace slim {

// The format export-engine writes. Format 2 (program keys spelt the old way: docs/bundle-format.md, "Legacy
// spellings") is still read; format 1 is refused with a line saying how to re-export.
constexpr int kBundleFormatVersion = 3;
constexpr int kOldestBundleFormatVersion = 2;
// The custom-op library a bundle may name: the runtime's own, found beside libslimengine.so.
constexpr const char* kCustomOpLibrary = "libslimengine_ops.so";
constexpr const char* kCustomOpLibraryCuda = "libslimengine_ops_cuda.so";  // the runtime's stand-in for it on CUDA

// The model family a bundle holds: it decides which config, program and stages the manifest has.
enum class Family { Sd3, Lemur, PlainOnnx };

// What a stage computes, as the manifest's stage `role` states it (docs/bundle-format.md); the
// runtime binds stages by role (and block index), never by name.
// ClipL, ClipG, T5 and VaeDecode are the SD3 pipeline's text encoders and VAE decoder (docs/pipeline.md): optional,
// at most one each, run by slim_generate_prompt (prompt_program.hpp) and slim_stage_run.
enum class Role { Embed, Block, BlockTokens, Compensate, Final, ClipL, ClipG, T5, VaeDecode, LemurEmbed, LemurScore, Model };

struct StageDecl {
    std::string name;  // for stats, profiles and slim_stage_run; not interpreted
    Role role = Role::Model;
    int block = -1;    // Role::Block and Role::BlockTokens: the joint block, else -1
    std::string file;  // relative to the bundle, inside it (for a plain ONNX model: its path)
    std::vector<std::string> inputs;
    std::vector<std::string> outputs;
    std::vector<std::string> input_dtypes, output_dtypes;  // "float32" or "int64"
};

struct Sd3Config {
    int num_layers, num_attention_heads, attention_head_dim, inner_dim;
    int in_channels, out_channels, patch_size;
    int joint_attention_dim, caption_projection_dim, pooled_projection_dim;
    int max_latent_size;      // latent height/width limit from the position table
    int default_latent_size;  // the latent height/width the bundle was made for (slim_engine_info)
};

enum class Compensation { None, Mlp, Identity };

struct StepPlan {
    double sigma, sigma_next, timestep;
    bool record_delta;  // record Δ over the skipped range (1.x step 1)
    bool skip_range;    // skip the range and add the compensated Δ
};

struct Program {
    float guidance_scale;
    int skip_first = -1, skip_last = -1;  // the skipped range (1.x), inclusive; -1 when the plan skips nothing
    Compensation compensation = Compensation::None;
    XSlimPolicy xslim;  // the default X-Slim policy; disabled when the bundle sets none
    std::vector<StepPlan> steps;
};

// LEMUR: the limits the runtime checks requests against (export/lemur_model.py, lemur_export.py).
struct LemurConfig {
    int vocab_size, num_segments, max_text_len, max_query_len, image_size, max_frames, embed_dim;
    int max_batch, max_history;
    int64_t model_version;  // recorded with every embedding the embed program writes to a bank
};

// A prompt tokenizer (manifest `tokenizers`, docs/tokenizers.md): a prompt string -> input_ids int64 [max_length].
enum class TokenizerKind { ClipBpe, Unigram };
constexpr int64_t kMaxTokenizerFileBytes = int64_t{64} << 20;
struct TokenizerDecl {
    std::string role;  // clip_l, clip_g or t5
    TokenizerKind kind;
    std::string file;  // relative to the bundle, inside it
    int max_length;
};

// The manifest's `pipeline` block (docs/pipeline.md): how the text encoders' outputs are assembled into the
// transformer's conditioning and how the VAE decodes. Checked against the stages and config at load.
struct PipelineConfig {
    int clip_length = 0, clip_l_dim = 0, clip_g_dim = 0, clip_l_pooled_dim = 0, clip_g_pooled_dim = 0;
    int joint_attention_dim = 0, pooled_projection_dim = 0, max_sequence_length = 0;
    bool t5 = false;
    int latent_channels = 0, scale_factor = 0;  // vae
    float scaling_factor = 1, shift_factor = 0;
    double scheduler_shift = 0;  // 0: the folder had no scheduler config (null)
};

// A file of the bundle as the manifest lists it.
struct FileEntry {
    std::string path;  // relative to the bundle
    std::string sha256;
    int64_t size;
};

struct Manifest {
    std::string text;        // the file as read, for slim_engine_manifest
    std::string digest;      // sha256 of `text`, as manifest.sha256 states it
    int format_version = 0;  // kOldestBundleFormatVersion to kBundleFormatVersion (0: a plain ONNX model)
    std::string family, precision;
    Family kind = Family::Sd3;
    Sd3Config config{};   // family sd3
    LemurConfig lemur{};  // family lemur
    std::vector<StageDecl> stages;
    bool uses_custom_ops = false;  // some stage needs kCustomOpLibrary
    Program program;               // family sd3
    std::vector<FileEntry> files;  // every file of the bundle but the manifest and its digest
    std::vector<TokenizerDecl> tokenizers;
    bool has_pipeline = false;  // family sd3 with a `pipeline` block
    PipelineConfig pipeline;

    bool has_stage(Role role) const {
        for (const StageDecl& s : stages)
            if (s.role == role) return true;
        return false;
    }
};

class BundleDir;

// Reads and validates the bundle's manifest.json against manifest.sha256 (the format and its version
// first, so an old bundle is told to re-export). Throws Error(SLIM_ERR_IO) if unreadable and
// Error(SLIM_ERR_BUNDLE) naming the field for anything invalid, unsupported or changed since export.
Manifest load_manifest(const BundleDir& dir);

// A plain ONNX model as a one-stage engine (family PlainOnnx, stage "model"); its inputs and
// outputs are taken from the graph when the stage is loaded.
Manifest plain_onnx_manifest(const std::string& onnx_path);

// The inputs and outputs a program expects of a stage of its role: Error(SLIM_ERR_BUNDLE) naming the stage otherwise.
void expect_stage_io(const StageDecl& s, const std::vector<std::string>& inputs, const std::vector<std::string>& outputs,
                     const char* program = "SD3");

}  // namespace slim
