#include "manifest.hpp"

#include <cmath>
#include <unordered_map>
#include <unordered_set>

#include "bundle.hpp"
#include "error.hpp"
#include "json.hpp"
#include "sha256.hpp"
#include "xslim.hpp"

namespace slim {
namespace {

using namespace json;

[[noreturn]] void bad(const std::string& where, const std::string& what) { throw json::FieldError(where, what); }

constexpr int64_t kMaxManifestBytes = int64_t(256) << 20;

// A bundle-relative path that cannot escape the bundle, spelt one way: components joined by single
// slashes, none empty, "." or "..", no backslash or NUL; the manifest and its digest are not bundle files.
const std::string& check_inside_bundle(const std::string& p, const std::string& where) {
    bool ok = !p.empty() && p.size() < 4096 && p.find('\\') == std::string::npos && p.find('\0') == std::string::npos;
    for (size_t start = 0; ok;) {
        const size_t slash = p.find('/', start);
        const std::string part = p.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
        ok = !part.empty() && part != "." && part != "..";
        if (slash == std::string::npos) break;
        start = slash + 1;
    }
    if (!ok) bad(where, "must be a path inside the bundle, got '" + p + "'");
    if (p == kManifestFile || p == kDigestFile) bad(where, "must not name " + p);
    return p;
}

// Stage roles as the manifest spells them; which a family allows is checked by the caller.
Role parse_role(const std::string& role, const std::string& where) {
    static const std::pair<const char*, Role> roles[] = {{"embed", Role::Embed},
                                                         {"block", Role::Block},
                                                         {"block_tokens", Role::BlockTokens},
                                                         {"compensate", Role::Compensate},
                                                         {"final", Role::Final},
                                                         {"clip_l", Role::ClipL},
                                                         {"clip_g", Role::ClipG},
                                                         {"t5", Role::T5},
                                                         {"vae_decode", Role::VaeDecode},
                                                         {"lemur_embed", Role::LemurEmbed},
                                                         {"lemur_score", Role::LemurScore}};
    for (const auto& [name, value] : roles)
        if (role == name) return value;
    bad(where, "'" + role +
                   "' is not a stage role (embed, block, block_tokens, compensate, final, clip_l, clip_g, t5, vae_decode, lemur_embed, "
                   "lemur_score)");
}

std::string relative_path(const Value& obj, const std::string& key, const std::string& where) {
    return check_inside_bundle(string_field(obj, key, where), where + "." + key);
}

Sd3Config parse_config(const Value& root) {
    const Value& c = object_field(root, "config", "");
    const std::string w = "config";
    Sd3Config cfg{};
    cfg.num_layers = int_field(c, "num_layers", w, 1, 1024);
    cfg.num_attention_heads = int_field(c, "num_attention_heads", w, 1, 4096);
    cfg.attention_head_dim = int_field(c, "attention_head_dim", w, 1, 4096);
    cfg.inner_dim = int_field(c, "inner_dim", w, 1, 1 << 20);
    cfg.in_channels = int_field(c, "in_channels", w, 1, 4096);
    cfg.out_channels = int_field(c, "out_channels", w, 1, 4096);
    cfg.patch_size = int_field(c, "patch_size", w, 1, 64);
    cfg.joint_attention_dim = int_field(c, "joint_attention_dim", w, 1, 1 << 20);
    cfg.caption_projection_dim = int_field(c, "caption_projection_dim", w, 1, 1 << 20);
    cfg.pooled_projection_dim = int_field(c, "pooled_projection_dim", w, 1, 1 << 20);
    cfg.max_latent_size = int_field(c, "max_latent_size", w, 1, 1 << 16);
    if (cfg.inner_dim != cfg.num_attention_heads * cfg.attention_head_dim)
        bad("config.inner_dim", "must equal num_attention_heads * attention_head_dim");
    if (cfg.max_latent_size % cfg.patch_size) bad("config.max_latent_size", "must be a multiple of patch_size");
    // Not a limit requests are checked against, but what callers size their output by (slim_engine_info);
    // optional here (0: not stated), checked when present.
    cfg.default_latent_size = 0;
    if (const Value* size = c.find("default_latent_size")) {
        const double d = size->kind == Value::Kind::Number ? size->number : -1;
        if (!(d >= 1 && d <= cfg.max_latent_size && d == std::floor(d)) || static_cast<int>(d) % cfg.patch_size)
            bad("config.default_latent_size", "must be a multiple of patch_size (" + std::to_string(cfg.patch_size) + ") in [1, " +
                                                  std::to_string(cfg.max_latent_size) + "]");
        cfg.default_latent_size = static_cast<int>(d);
    }
    return cfg;
}

// Tensor names and dtypes of a stage's input or output list.
void tensors(const Value& list, const std::string& where, std::vector<std::string>& names, std::vector<std::string>& dtypes) {
    if (list.array.empty() || list.array.size() > 64) bad(where, "must list 1 to 64 tensors");
    for (size_t i = 0; i < list.array.size(); ++i) {
        const Value& t = list.array[i];
        std::string w = where + "[" + std::to_string(i) + "]";
        if (t.kind != Value::Kind::Object) bad(w, "must be an object");
        names.push_back(string_field(t, "name", w));
        dtypes.push_back(string_field(t, "dtype", w));
        if (dtypes.back() != "float32" && dtypes.back() != "int64") bad(w + ".dtype", "must be float32 or int64");
    }
}

LemurConfig parse_lemur_config(const Value& root) {
    const Value& c = object_field(root, "config", "");
    const std::string w = "config";
    LemurConfig cfg{};
    cfg.vocab_size = int_field(c, "vocab_size", w, 1, 1 << 24);
    cfg.num_segments = int_field(c, "num_segments", w, 1, 64);
    cfg.max_text_len = int_field(c, "max_text_len", w, 1, 1 << 16);
    cfg.max_query_len = int_field(c, "max_query_len", w, 1, 1 << 16);
    cfg.image_size = int_field(c, "image_size", w, 1, 4096);
    cfg.max_frames = int_field(c, "max_frames", w, 1, 1024);
    cfg.embed_dim = int_field(c, "embed_dim", w, 1, 65536);
    cfg.max_batch = int_field(c, "max_batch", w, 1, 1 << 16);
    cfg.max_history = int_field(c, "max_history", w, 1, 1 << 16);
    const Value& p = object_field(root, "program", "");
    const Value& programs = array_field(p, "programs", "program");
    bool embed = false, score = false;
    for (const Value& v : programs.array) {
        embed = embed || (v.kind == Value::Kind::String && v.string == "embed");
        score = score || (v.kind == Value::Kind::String && v.string == "score");
    }
    if (!embed || !score) bad("program.programs", "must offer \"embed\" and \"score\"");
    cfg.model_version = int_field(p, "model_version", "program", 0, 2147483647);
    if (int_field(p, "padding_token", "program", 0, 0) != 0) bad("program.padding_token", "must be 0");
    return cfg;
}

// The program keys format 3 renamed, as each format spells them (docs/bundle-format.md, "Legacy spellings"). A
// manifest uses its own format's spelling: the other one is refused, not ignored.
struct ProgramKeys {
    const char* skip_blocks;  // the 1.x skipped range: [first, last] or null
    const char* skip_range;   // per step: it skips that range
    const char* xslim;        // the default X-Slim policy
};
constexpr ProgramKeys kProgramKeys3{"skip_blocks", "skip_range", "xslim"};
constexpr ProgramKeys kProgramKeys2{"cache_blocks", "skip_cached_blocks", "cache"};

void refuse_key(const Value& obj, const char* key, const std::string& where, int version, const char* own) {
    if (obj.find(key))
        bad(where + "." + key, "is the format " + std::to_string(version >= 3 ? 2 : 3) + " spelling; a format " + std::to_string(version) +
                                   " manifest names it " + own);
}

Program parse_program(const Value& root, const Sd3Config& cfg, int version) {
    const Value& p = object_field(root, "program", "");
    const std::string w = "program";
    const ProgramKeys& keys = version >= 3 ? kProgramKeys3 : kProgramKeys2;
    const ProgramKeys& other = version >= 3 ? kProgramKeys2 : kProgramKeys3;
    refuse_key(p, other.skip_blocks, w, version, keys.skip_blocks);
    refuse_key(p, other.xslim, w, version, keys.xslim);
    if (version >= 3) refuse_key(p, "step_cache", w, version, keys.xslim);  // format 2's older policy key
    const std::string range_key = w + "." + keys.skip_blocks;
    if (string_field(p, "sampler", w) != "flow_match_euler") bad("program.sampler", "must be flow_match_euler");
    Program prog;
    prog.guidance_scale = static_cast<float>(number_field(p, "guidance_scale", w));
    if (prog.guidance_scale < 0) bad("program.guidance_scale", "must not be negative");
    const Value& range = field(p, keys.skip_blocks, w);
    if (!range.is_null()) {
        if (range.kind != Value::Kind::Array || range.array.size() != 2) bad(range_key, "must be null or [first, last]");
        prog.skip_first = as_int(range.array[0], range_key + ".first", 0, cfg.num_layers - 2);
        prog.skip_last = as_int(range.array[1], range_key + ".last", prog.skip_first, cfg.num_layers - 2);
        const Value& comp = field(p, "compensation", w);
        if (comp.kind == Value::Kind::String && comp.string == "mlp")
            prog.compensation = Compensation::Mlp;
        else if (comp.kind == Value::Kind::String && comp.string == "identity")
            prog.compensation = Compensation::Identity;
        else
            bad("program.compensation", std::string("must be \"mlp\" or \"identity\" when ") + keys.skip_blocks + " is set");
    }
    const Value& steps = array_field(p, "steps", w);
    if (steps.array.empty() || steps.array.size() > 10000) bad("program.steps", "must hold 1 to 10000 steps");
    bool recorded = false;
    for (size_t i = 0; i < steps.array.size(); ++i) {
        const Value& s = steps.array[i];
        std::string sw = "program.steps[" + std::to_string(i) + "]";
        if (s.kind != Value::Kind::Object) bad(sw, "must be an object");
        refuse_key(s, other.skip_range, sw, version, keys.skip_range);
        StepPlan step{number_field(s, "sigma", sw), number_field(s, "sigma_next", sw), number_field(s, "timestep", sw),
                      bool_field(s, "record_delta", sw), bool_field(s, keys.skip_range, sw)};
        if ((step.record_delta || step.skip_range) && prog.skip_first < 0) bad(sw, "uses the skipped range but " + range_key + " is null");
        if (step.record_delta && step.skip_range) bad(sw, "cannot both record the skipped range and skip it");
        if (step.skip_range && !recorded) bad(sw, "skips the range before any step recorded it");
        recorded = recorded || step.record_delta;
        prog.steps.push_back(step);
    }
    if (const Value* xslim = p.find(keys.xslim)) {
        prog.xslim = parse_policy(*xslim, prog.steps.size(), w + "." + keys.xslim);
    } else if (const Value* legacy = p.find("step_cache"); legacy && !legacy->is_null()) {  // format 2, before block/token levels
        if (legacy->kind != Value::Kind::Object) bad("program.step_cache", "must be null or an object");
        prog.xslim.enabled = true;
        prog.xslim.early_warning = number_field(*legacy, "threshold", "program.step_cache");
        if (prog.xslim.early_warning < 0) bad("program.step_cache.threshold", "must not be negative");
        prog.xslim.warmup_steps = int_field(*legacy, "warmup_steps", "program.step_cache", 2, 1 << 20);
    }
    return prog;
}

// The format and its version, read before anything else (and before the digest, which format 1 lacks).
int check_format(const Value& root) {
    if (root.kind != Value::Kind::Object) bad("", "root must be an object");
    if (string_field(root, "format", "") != "slimengine-bundle") bad(".format", "must be \"slimengine-bundle\"");
    int version = int_field(root, "format_version", "", 0, 1 << 30);
    if (version == 1)
        throw Error(SLIM_ERR_BUNDLE,
                    "this bundle is format 1, which this runtime no longer reads (no stage roles or digest); re-export it: "
                    "export-engine CHECKPOINT -o NAME.engine --force");
    if (version < kOldestBundleFormatVersion || version > kBundleFormatVersion) {
        const std::string readable = std::to_string(kOldestBundleFormatVersion) + " to " + std::to_string(kBundleFormatVersion);
        bad("unsupported bundle format version " + std::to_string(version),
            "(this runtime reads versions " + readable + "); re-export the bundle or update slimengine");
    }
    return version;
}

// The header fields, and the family's own config and program.
void parse_family(const Value& root, Manifest& m) {
    m.family = string_field(root, "family", "");
    m.precision = string_field(root, "precision", "");
    if (m.precision != "fp32" && m.precision != "fp16" && m.precision != "bf16" && m.precision != "int8")
        bad(".precision", "must be fp32, fp16, bf16 or int8");
    const Value& ops = field(root, "custom_op_library", "");
    if (!ops.is_null() && !(ops.kind == Value::Kind::String && ops.string == kCustomOpLibrary))
        bad(".custom_op_library", std::string("must be null or \"") + kCustomOpLibrary + "\" (the runtime's own custom ops)");
    m.uses_custom_ops = !ops.is_null();
    // The family decides what config and program mean; each has its own parser.
    if (m.family == "sd3") {
        m.kind = Family::Sd3;
        m.config = parse_config(root);
        m.program = parse_program(root, m.config, m.format_version);
    } else if (m.family == "lemur") {
        m.kind = Family::Lemur;
        // int8 stages take and give float32 like fp32 ones (docs/int8.md)
        if (m.precision != "fp32" && m.precision != "int8") bad(".precision", "must be fp32 or int8 for a lemur bundle");
        m.lemur = parse_lemur_config(root);
    } else {
        bad(".family", "'" + m.family + "' is not supported by this runtime (expected sd3 or lemur)");
    }
}

// files: every file of the bundle with its size and sha256. Returns path -> index in m.files.
std::unordered_map<std::string, size_t> parse_files(const Value& root, Manifest& m) {
    const Value& files = object_field(root, "files", "");
    std::unordered_map<std::string, size_t> listed;  // path -> index in m.files
    for (const auto& [file, entry] : files.object) {
        const std::string w = "files['" + file + "']";
        check_inside_bundle(file, "files");
        if (entry.kind != Value::Kind::Object) bad(w, "must be an object {sha256, size}");
        FileEntry f{file, string_field(entry, "sha256", w), json::as_int64(field(entry, "size", w), w + ".size", 0, int64_t(1) << 50)};
        if (f.sha256.size() != 64 || f.sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
            bad(w + ".sha256", "must be a lower-case sha256 hex digest");
        listed.emplace(file, m.files.size());
        m.files.push_back(std::move(f));
    }
    return listed;
}

// stages: each stage's role (one of its family's), block, graph file (listed) and tensors.
void parse_stages(const Value& root, Manifest& m, const std::unordered_map<std::string, size_t>& listed) {
    const Value& stages = array_field(root, "stages", "");
    std::unordered_set<std::string> names;
    for (size_t i = 0; i < stages.array.size(); ++i) {
        const Value& s = stages.array[i];
        std::string w = "stages[" + std::to_string(i) + "]";
        if (s.kind != Value::Kind::Object) bad(w, "must be an object");
        StageDecl d{string_field(s, "name", w),
                    parse_role(string_field(s, "role", w), w + ".role"),
                    -1,
                    relative_path(s, "file", w),
                    {},
                    {},
                    {},
                    {}};
        const bool encoder = d.role == Role::ClipL || d.role == Role::ClipG || d.role == Role::T5;
        const bool sd3_role = d.role == Role::Embed || d.role == Role::Block || d.role == Role::BlockTokens || d.role == Role::Compensate ||
                              d.role == Role::Final || encoder || d.role == Role::VaeDecode;
        if (sd3_role != (m.kind == Family::Sd3))
            bad(w + ".role", "'" + string_field(s, "role", w) + "' is not a role of a " + m.family + " stage");
        if (d.role == Role::Block || d.role == Role::BlockTokens)
            d.block = int_field(s, "block", w, 0, m.config.num_layers - 1);
        else if (s.find("block"))
            bad(w + ".block", "is only for the block and block_tokens roles");
        tensors(array_field(s, "inputs", w), w + ".inputs", d.inputs, d.input_dtypes);
        tensors(array_field(s, "outputs", w), w + ".outputs", d.outputs, d.output_dtypes);
        for (size_t k = 0; m.kind == Family::Sd3 && k < d.inputs.size() + d.outputs.size(); ++k) {
            const bool input = k < d.inputs.size();
            const std::string& dtype = input ? d.input_dtypes[k] : d.output_dtypes[k - d.inputs.size()];
            if (dtype != "float32" && !(input && (d.inputs[k] == "token_index" || (encoder && d.inputs[k] == "input_ids"))))
                bad(w, "has a tensor that is not float32 (SD3 stage boundaries are float32 but for token indices and token ids)");
        }
        if (!names.insert(d.name).second) bad(w + ".name", "'" + d.name + "' is not unique");
        if (!listed.count(d.file)) bad(w + ".file", "'" + d.file + "' is not listed in files");
        m.stages.push_back(std::move(d));
    }
}

// tokenizers (optional): the prompt tokenizers (export/tokenizer_export.py).
void parse_tokenizers(const Value& root, Manifest& m, const std::unordered_map<std::string, size_t>& listed) {
    const Value* tokenizers = root.find("tokenizers");
    if (tokenizers && !tokenizers->is_null()) {
        if (tokenizers->kind != Value::Kind::Array || tokenizers->array.size() > 3)
            bad(".tokenizers", "must be a list of at most 3 tokenizers");
        for (size_t i = 0; i < tokenizers->array.size(); ++i) {
            const Value& t = tokenizers->array[i];
            const std::string w = "tokenizers[" + std::to_string(i) + "]";
            if (t.kind != Value::Kind::Object) bad(w, "must be an object {role, kind, file, max_length}");
            const std::string role = string_field(t, "role", w);
            if (role != "clip_l" && role != "clip_g" && role != "t5") bad(w + ".role", "'" + role + "' is not clip_l, clip_g or t5");
            if (!t.find("kind"))  // exporters before the native tokenizers wrote onnxruntime-extensions graphs
                throw Error(SLIM_ERR_BUNDLE, "tokenizer " + role + " is an onnxruntime-extensions graph (" + string_field(t, "file", w) +
                                                 "), which this runtime no longer runs: re-export the bundle with this version's "
                                                 "export-engine (its --tokenizers or pipeline folder) to get native tokenizers");
            const std::string kind = string_field(t, "kind", w);
            const std::string expected = role == "t5" ? "unigram" : "clip_bpe";
            if (kind != expected) bad(w + ".kind", "'" + kind + "' is not " + expected + " (the kind of a " + role + " tokenizer)");
            TokenizerDecl d{role, role == "t5" ? TokenizerKind::Unigram : TokenizerKind::ClipBpe, relative_path(t, "file", w),
                            int_field(t, "max_length", w, 2, 4096)};
            for (const TokenizerDecl& other : m.tokenizers)
                if (other.role == d.role) bad(w + ".role", "'" + d.role + "' is repeated");
            if (!listed.count(d.file)) bad(w + ".file", "'" + d.file + "' is not listed in files");
            // Read whole and parsed at open: bounded (SD3's tokenizer files are 1 to 2 MB).
            if (m.files[listed.at(d.file)].size > kMaxTokenizerFileBytes)
                bad(w + ".file", "'" + d.file + "' is " + std::to_string(m.files[listed.at(d.file)].size) +
                                     " bytes; a tokenizer file of at most " + std::to_string(kMaxTokenizerFileBytes >> 20) +
                                     " MiB is accepted");
            m.tokenizers.push_back(std::move(d));
        }
    }
}

// pipeline (optional, sd3): the text encoders' and the VAE's numbers, which must fit the stages and the transformer.
void parse_pipeline(const Value& root, Manifest& m) {
    const Value* pipeline = root.find("pipeline");
    if (pipeline && !pipeline->is_null()) {
        if (m.kind != Family::Sd3) bad(".pipeline", "is only for sd3 bundles");
        if (pipeline->kind != Value::Kind::Object) bad(".pipeline", "must be an object");
        const std::string w = "pipeline";
        PipelineConfig& p = m.pipeline;
        p.clip_length = int_field(*pipeline, "clip_length", w, 1, 4096);
        p.clip_l_dim = int_field(*pipeline, "clip_l_dim", w, 1, 1 << 20);
        p.clip_g_dim = int_field(*pipeline, "clip_g_dim", w, 1, 1 << 20);
        p.clip_l_pooled_dim = int_field(*pipeline, "clip_l_pooled_dim", w, 1, 1 << 20);
        p.clip_g_pooled_dim = int_field(*pipeline, "clip_g_pooled_dim", w, 1, 1 << 20);
        p.joint_attention_dim = int_field(*pipeline, "joint_attention_dim", w, 1, 1 << 20);
        p.pooled_projection_dim = int_field(*pipeline, "pooled_projection_dim", w, 1, 1 << 20);
        p.t5 = bool_field(*pipeline, "t5", w);
        p.max_sequence_length = int_field(*pipeline, "max_sequence_length", w, 1, 4096);
        const Value& vae = object_field(*pipeline, "vae", w);
        p.latent_channels = int_field(vae, "latent_channels", w + ".vae", 1, 1 << 16);
        p.scale_factor = int_field(vae, "scale_factor", w + ".vae", 1, 64);
        const double scaling = number_field(vae, "scaling_factor", w + ".vae"), shift = number_field(vae, "shift_factor", w + ".vae");
        // The decode computes in float32: a value that is 0 or inf there (1e-50, 1e300) would give NaN latents at the VAE.
        const float scaling32 = static_cast<float>(scaling), shift32 = static_cast<float>(shift);
        if (!std::isnormal(scaling32)) bad(w + ".vae.scaling_factor", "must be a finite nonzero number, as a float32 (not denormal)");
        if (!std::isfinite(shift32)) bad(w + ".vae.shift_factor", "must be a finite float32 number");
        p.scaling_factor = static_cast<float>(scaling);
        p.shift_factor = static_cast<float>(shift);
        const Value* sched = pipeline->find("scheduler_shift");
        if (sched && !sched->is_null()) {
            p.scheduler_shift = number_field(*pipeline, "scheduler_shift", w);
            if (!(std::isfinite(p.scheduler_shift) && p.scheduler_shift > 0 && p.scheduler_shift <= 1e6))
                bad(w + ".scheduler_shift", "must be a positive number up to 1e6, or null");
        }
        const Sd3Config& c = m.config;
        if (p.joint_attention_dim != c.joint_attention_dim || p.pooled_projection_dim != c.pooled_projection_dim)
            bad(w, "joint_attention_dim and pooled_projection_dim must equal config's");
        if (p.clip_l_pooled_dim + p.clip_g_pooled_dim != p.pooled_projection_dim)
            bad(w, "clip_l_pooled_dim + clip_g_pooled_dim must equal pooled_projection_dim");
        if (p.latent_channels != c.in_channels) bad(w + ".vae.latent_channels", "must equal config.in_channels");
        auto has = [&](Role role) {
            for (const StageDecl& d : m.stages)
                if (d.role == role) return true;
            return false;
        };
        if (!has(Role::ClipL) || !has(Role::ClipG) || !has(Role::VaeDecode)) bad(w, "needs stages of roles clip_l, clip_g and vae_decode");
        if (p.t5 != has(Role::T5)) bad(w + ".t5", p.t5 ? "is true but no stage has role t5" : "is false but a stage has role t5");
        m.has_pipeline = true;
    }
}

// Every field, section by section.
void parse_fields(const Value& root, Manifest& m) {
    parse_family(root, m);
    const std::unordered_map<std::string, size_t> listed = parse_files(root, m);
    parse_stages(root, m, listed);
    parse_tokenizers(root, m, listed);
    parse_pipeline(root, m);
}

}  // namespace

Manifest load_manifest(const BundleDir& dir) {
    const std::string path = dir.path() + "/" + kManifestFile;
    Manifest m;
    m.text = dir.read(kManifestFile, kMaxManifestBytes);
    Value root;
    try {
        root = json::parse(m.text);
    } catch (const json::ParseError& e) { throw Error(SLIM_ERR_BUNDLE, path + ": " + e.what()); }
    try {
        m.format_version = check_format(root);
    } catch (const FieldError& e) { throw Error(SLIM_ERR_BUNDLE, std::string("manifest: ") + e.what()); }
    // The digest, before any field is believed: "<64 hex>  manifest.json\n", as sha256sum writes it.
    const std::string digest_path = dir.path() + "/" + kDigestFile;
    std::string line;
    try {
        line = dir.read(kDigestFile, 1024);
    } catch (const Error& e) {
        throw Error(SLIM_ERR_BUNDLE, e.what() + std::string(" (a bundle of format 2 or later has one; re-export the bundle)"));
    }
    const std::string expected_tail = std::string("  ") + kManifestFile + "\n";
    if (line.size() != 64 + expected_tail.size() || line.compare(64, std::string::npos, expected_tail) != 0 ||
        line.find_first_not_of("0123456789abcdef") < 64)
        throw Error(SLIM_ERR_BUNDLE, digest_path + " must be one line '<sha256 hex>  manifest.json' (re-export the bundle)");
    m.digest = sha256_bytes(m.text);
    if (line.compare(0, 64, m.digest) != 0)
        throw Error(SLIM_ERR_BUNDLE, path + " does not match its digest in " + kDigestFile +
                                         ": the manifest was changed after export (re-export the bundle rather than edit it)");
    try {
        parse_fields(root, m);
    } catch (const FieldError& e) { throw Error(SLIM_ERR_BUNDLE, std::string("manifest: ") + e.what()); }
    return m;
}

Manifest plain_onnx_manifest(const std::string& onnx_path) {
    Manifest m;
    m.family = "onnx";
    m.kind = Family::PlainOnnx;
    m.precision = "fp32";
    m.text = "{\"family\": \"onnx\", \"stages\": [{\"name\": \"model\"}]}";
    m.stages.push_back(StageDecl{"model", Role::Model, -1, onnx_path, {}, {}, {}, {}});
    return m;
}

void expect_stage_io(const StageDecl& s, const std::vector<std::string>& inputs, const std::vector<std::string>& outputs,
                     const char* program) {
    if (s.inputs != inputs || s.outputs != outputs)
        throw Error(SLIM_ERR_BUNDLE,
                    "manifest: stage " + s.name + " does not have the inputs/outputs the " + program + " program expects of its role");
}

}  // namespace slim
