#include "sd3_program.hpp"

#include <cstdlib>
#include <string>

#include "error.hpp"

namespace slim {
namespace {

int step_level(Level level, bool skipped_range) {
    switch (level) {
        case Level::Skip:
            return SLIM_STEP_REUSED;
        case Level::Block:
            return SLIM_STEP_BLOCK_REFRESH;
        case Level::Token:
            return SLIM_STEP_TOKEN_REFRESH;
        default:
            return skipped_range ? SLIM_STEP_SKIPPED_RANGE : SLIM_STEP_FULL;
    }
}

const XSlimPolicy kNoPolicy;

// Buffers on the stages' device: the CUDA device ops where this build has them; else the CPU kernels on
// host buffers (on a CUDA engine ONNX Runtime then copies each stage's inputs and outputs), also when the
// engine was opened with host_buffers.
std::unique_ptr<DeviceOps> ops_for(const Engine& engine) {
    const int device = engine.stages().front()->cuda_device();
    std::unique_ptr<DeviceOps> ops = device >= 0 && !engine.host_buffers() ? make_cuda_ops(device) : nullptr;
    return ops ? std::move(ops) : make_cpu_ops();
}

}  // namespace

Sd3Runner::Sd3Runner(const Engine& engine)
    : Runner(engine),
      engine_(engine),
      stage_of_(bind_sd3_stages(engine.manifest())),
      ops_(ops_for(engine)),
      host_(ops_->on_host()),
      allocator_(*engine.stages().front(), host_) {
    for (const auto& stage : engine.stages()) bindings_.emplace_back(*stage);
}

// The denoising loop: plan each step, run its actions, update the caches, take the Euler step.
GenerateStats Sd3Runner::generate(const GenerateRequest& r) {
    const auto start = Clock::now();
    prepare(r, start);  // buffers sized for this request, inputs uploaded, noise drawn
    Controller controller(*policy_, program_->steps.size());
    for (size_t step = 0; step < program_->steps.size(); ++step) {
        const StepPlan& plan = program_->steps[step];
        const auto step_start = Clock::now();
        profiler_.set_step(static_cast<int>(step));
        const Level level = controller.level(step, plan.record_delta);
        const StepActions& actions = planner_.plan(step, level, controller, buffers_.xslim.block_scores);
        const Hidden out = execute(step, actions);         // embed, one action per block, final: the velocity
        record_for_reuse(step, actions, out, controller);  // X-Slim: the stack residual, the controller, token scores
        euler_cfg(step);                                   // x += dt * (guided velocity)
        end_step(step, actions, step_start);               // its stats and profile event
        r.progress.report(SLIM_PHASE_STEP, static_cast<int>(step), static_cast<int>(program_->steps.size()));  // may cancel
    }
    if (r.out) ops_->download(r.out, buffers_.in.latents.data(), dims_.latent_count * sizeof(float));
    GenerateStats stats = totals();
    const auto end = Clock::now();
    profiler_.generation(start, end);
    stats.total_ms = ms_between(start, end);
    return stats;
}

// Sizes every buffer for the request (sd3_buffers.cpp), uploads its inputs in the model batch
// ([negative; positive] under CFG) and draws the noise: all the allocation a generation does.
void Sd3Runner::prepare(const GenerateRequest& r, Clock::time_point start) {
    const Sd3Config& c = engine_.manifest().config;
    program_ = r.program ? r.program : &engine_.manifest().program;
    policy_ = r.xslim ? r.xslim : &kNoPolicy;
    guidance_ = r.guidance_scale;
    RequestDims& d = dims_;
    d.cfg = r.guidance_scale > 1.0f;
    d.batch = r.batch;
    d.model_batch = d.cfg ? 2 * d.batch : d.batch;
    d.text = r.text_len;
    d.height = r.height;
    d.width = r.width;
    d.tokens = (d.height / c.patch_size) * (d.width / c.patch_size);
    d.latent_count = d.batch * c.in_channels * d.height * d.width;
    d.steps = program_->steps.size();
    d.embeddings_in_place = ops_->on_host() && !d.cfg && !r.rows;

    steps_.clear();
    steps_.reserve(d.steps);
    for (auto& s : stages_) s = StageStats{};
    backend_ms_ = 0;
    stage_calls_ = 0;
    flops_ = 0;
    const size_t per_step = 1 + stages_.size() + (profiler_.blocks() ? c.num_layers : 0);
    if (r.continue_call) {
        profiler_.continue_generation(2 + d.steps * per_step);
    } else {
        profiler_.begin_generation(2 + d.steps * per_step);  // each stage at most once a step
        ops_->reset_transfer_bytes();
    }

    const Controller controller(*policy_, d.steps);  // for the token steps' keeps (sizes only)
    if (buffers_.size_for(allocator_, c, d, *program_, *policy_, controller, stage_of_.blocks))
        for (auto& b : bindings_) b.forget();  // OrtValues were remade: an address may have been reused
    planner_.reset(*program_, *policy_, stage_of_.blocks, d.tokens);
    ops_->reserve(d.model_batch * d.tokens);

    InputBuffers& in = buffers_.in;
    const size_t latent_bytes = d.latent_count * sizeof(float);
    float* x = in.latents.f32();
    if (r.latents) {
        ops_->upload(x, r.latents, latent_bytes);
    } else {  // row by row: a row's noise depends on its seed alone
        const int64_t row = d.latent_count / d.batch;
        for (int64_t b = 0; b < d.batch; ++b) ops_->noise(x + b * row, row, r.seeds[b]);
    }
    if (d.cfg) ops_->copy(x + d.latent_count, x, d.latent_count);  // both CFG halves hold x
    if (d.embeddings_in_place) {                                   // host memory already in the model batch: bound as it is, not copied
        in.text_in = caller_view(in.caller_text, r.prompt, {d.batch, d.text, c.joint_attention_dim});
        in.pooled_in = caller_view(in.caller_pooled, r.pooled, {d.batch, c.pooled_projection_dim});
    } else if (r.rows) {  // already on the device: row by row into the model batch
        const int64_t text_row = d.text * c.joint_attention_dim;
        for (int64_t i = 0; i < d.model_batch; ++i) {
            ops_->copy(in.text.f32() + i * text_row, r.rows->text[i], text_row);
            ops_->copy(in.pooled.f32() + i * c.pooled_projection_dim, r.rows->pooled[i], c.pooled_projection_dim);
        }
        in.text_in = in.text.value();
        in.pooled_in = in.pooled.value();
    } else {
        auto stack = [&](DeviceBuffer& dst, const float* negative, const float* positive) {
            const size_t half = dst.bytes() / (d.cfg ? 2 : 1);
            if (d.cfg) ops_->upload(dst.data(), negative, half);
            ops_->upload(static_cast<char*>(dst.data()) + (d.cfg ? half : 0), positive, half);
        };
        stack(in.text, r.negative_prompt, r.prompt);
        stack(in.pooled, r.negative_pooled, r.pooled);
        in.text_in = in.text.value();
        in.pooled_in = in.pooled.value();
    }
    ops_->finish();
    profiler_.prepared(start);
}

// Runs one step's actions: the embed stage, one action per joint block, the final stage. Returns
// where the stack's output is (record_for_reuse reads it).
Sd3Runner::Hidden Sd3Runner::execute(size_t step, const StepActions& a) {
    const int layers = static_cast<int>(a.blocks.size());
    const int64_t img_count = buffers_.stack.img[0].count(), txt_count = buffers_.stack.txt[0].count();
    Hidden h = embed(step, a);
    if (a.reuse_stack)
        ops_->add(h.img->f32(), h.img->f32(), buffers_.xslim.residual_last.f32(), img_count);  // the stack as its last residual
    if (a.level == Level::Token)  // the tokens whose residual changed most between the last two full steps
        ops_->select_tokens(buffers_.xslim.token_scores.f32(), dims_.model_batch, dims_.tokens, a.keep, buffers_.xslim.token_index.i64());

    for (int b = 0; b < layers; ++b) {
        const auto start = profiler_.blocks() ? Clock::now() : Clock::time_point{};
        int stage = -1;
        switch (a.blocks[b]) {
            case BlockAction::Run:
            case BlockAction::RunKeepKV:
                stage = stage_of_.block[b];
                h = run_block(b, a, h);
                break;
            case BlockAction::RunTokens:
                stage = stage_of_.tokens[b];
                h = run_tokens(b, a, h);
                break;
            case BlockAction::Reuse: {  // X-Slim block level: the block's residual from the last full step
                DeviceBuffer* img = writable(h.img);
                ops_->add(img->f32(), h.img->f32(), buffers_.xslim.block_res_img[b].f32(), img_count);
                if (b + 1 < layers) ops_->add(h.txt->f32(), h.txt->f32(), buffers_.xslim.block_res_txt[b].f32(), txt_count);
                h.img = img;
                break;
            }
            case BlockAction::Skip:
                break;
            case BlockAction::AddDelta:
                stage = program_->compensation == Compensation::Mlp ? stage_of_.compensate : -1;
                h = add_delta(h);
                break;
        }
        if (b == a.range_last) {  // 1.x recording step: Δ over the range, in place of its kept input
            RangeDelta& range = buffers_.range;
            ops_->subtract(range.delta_img.f32(), h.img->f32(), range_input_img_->f32(), img_count);
            ops_->subtract(range.delta_txt.f32(), h.txt->f32(), range.delta_txt.f32(), txt_count);
            range.compensated = false;
        }
        if (profiler_.blocks()) profiler_.block(b, stage, static_cast<int>(a.blocks[b]), start, Clock::now());
    }

    // Final: the velocity, from the stack's image stream, the conditioning and the latents.
    StageBinding& s = bindings_[stage_of_.final];
    s.input(0, h.img->value());
    s.input(1, buffers_.in.temb.value());
    s.input(2, buffers_.in.latents.value());
    s.output(0, buffers_.in.velocity.value());
    run(stage_of_.final);
    return h;
}

// X-Slim after a full step: the stack residual (in place of the kept stack input), the controller's
// change rate, and the token scores every token step until the next full step selects from.
void Sd3Runner::record_for_reuse(size_t step, const StepActions& a, Hidden out, Controller& controller) {
    if (!a.record_stack) return;
    XSlimRecords& x = buffers_.xslim;
    const int64_t count = x.stack_in.count();
    ops_->subtract(x.stack_in.f32(), out.img->f32(), x.stack_in.f32(), count);
    std::swap(x.residual_prev, x.residual_last);  // the older residual's memory becomes the next stack input
    std::swap(x.residual_last, x.stack_in);
    const bool two = controller.full_steps() >= 1;
    controller.full_step_done(step, two ? ops_->relative_change(x.residual_last.f32(), x.residual_prev.f32(), count) : -1);
    if (x.token_scores.used() && two)
        ops_->token_scores(x.residual_last.f32(), x.residual_prev.f32(), dims_.model_batch, dims_.tokens,
                           engine_.manifest().config.inner_dim, x.token_scores.f32());
}

// The Euler step with classifier-free guidance v = v_neg + g (v_pos - v_neg), into both CFG halves of x.
void Sd3Runner::euler_cfg(size_t step) {
    const StepPlan& plan = program_->steps[step];
    const int64_t n = dims_.latent_count;
    float* x = buffers_.in.latents.f32();
    const float* v = buffers_.in.velocity.f32();
    const float dt = static_cast<float>(plan.sigma_next - plan.sigma);
    const bool finite =
        dims_.cfg ? ops_->euler_cfg(x, x + n, v, v + n, guidance_, dt, n) : ops_->euler_cfg(x, nullptr, nullptr, v, guidance_, dt, n);
    if (!finite) throw Error(SLIM_ERR_NUMERICS, "step " + std::to_string(step) + " produced NaN or Inf latents");
}

void Sd3Runner::end_step(size_t step, const StepActions& a, Clock::time_point start) {
    const auto end = Clock::now();
    const StepPlan& plan = program_->steps[step];
    StepStats st;
    st.sigma = plan.sigma;
    st.sigma_next = plan.sigma_next;
    st.blocks_run = a.blocks_run;
    st.blocks_reused = a.blocks_reused;
    st.tokens_computed = static_cast<int>(a.keep);
    st.level = step_level(a.level, plan.skip_range);
    const Sd3Config& c = engine_.manifest().config;
    const double full = block_flops(dims_.tokens, dims_.tokens, dims_.text, c.inner_dim);
    const double before = flops_;  // the generation's running sum, block by block (its effective NFE)
    for (BlockAction action : a.blocks)
        if (action == BlockAction::Run || action == BlockAction::RunKeepKV)
            flops_ += full;
        else if (action == BlockAction::RunTokens)
            flops_ += block_flops(dims_.tokens, a.keep, dims_.text, c.inner_dim);
    st.flop_fraction = (flops_ - before) / (full * c.num_layers);
    profiler_.step(st.level, start, end);
    st.ms = ms_between(start, end);
    steps_.push_back(st);  // reserved by prepare
}

GenerateStats Sd3Runner::totals() const {
    const Sd3Config& c = engine_.manifest().config;
    const double full_step = block_flops(dims_.tokens, dims_.tokens, dims_.text, c.inner_dim) * c.num_layers;
    GenerateStats stats;
    stats.steps = static_cast<int>(program_->steps.size());
    for (const StepStats& s : steps_) stats.blocks_run += s.blocks_run;
    stats.stage_calls = stage_calls_;
    stats.effective_nfe = flops_ / full_step * (dims_.cfg ? 2 : 1);
    stats.flop_fraction = flops_ / (full_step * static_cast<double>(program_->steps.size()));
    stats.backend_ms = backend_ms_;
    stats.transfer_bytes = ops_->transfer_bytes();
    return stats;
}

// ---- the executor's pieces ----

// Where a stage writes the hidden states that `next_block` reads: the other ping-pong buffers, except
// for the inputs a step keeps: the stack's input (X-Slim full step) and the skipped range's input (1.x
// recording step) go straight into their caches' buffers, so nothing is copied.
Sd3Runner::Hidden Sd3Runner::output_for(int next_block, const StepActions& a, Hidden h) {
    StackBuffers& stack = buffers_.stack;
    Hidden out{&stack.img[h.img == &stack.img[0] ? 1 : 0], &stack.txt[h.txt == &stack.txt[0] ? 1 : 0]};
    if (next_block == 0 && a.record_stack) out.img = &buffers_.xslim.stack_in;
    if (next_block == a.range_first) {
        out.txt = &buffers_.range.delta_txt;
        if (out.img != &buffers_.xslim.stack_in) out.img = &buffers_.range.delta_img;  // else Δ is taken against stack_in
        range_input_img_ = out.img;
    }
    return out;
}

// Embed (stage inputs latents, timestep, pooled, text; outputs img, txt, temb).
Sd3Runner::Hidden Sd3Runner::embed(size_t step, const StepActions& a) {
    InputBuffers& in = buffers_.in;
    const Hidden out = output_for(0, a, Hidden{});
    ops_->fill(in.timestep.f32(), static_cast<float>(program_->steps[step].timestep), dims_.model_batch);
    StageBinding& s = bindings_[stage_of_.embed];
    s.input(0, in.latents.value());
    s.input(1, in.timestep.value());
    s.input(2, in.pooled_in);
    s.input(3, in.text_in);
    s.output(0, out.img->value());
    s.output(1, out.txt->value());
    s.output(2, in.temb.value());
    run(stage_of_.embed);
    return out;
}

// A block stage on every token (inputs img, txt, temb; outputs img_out, txt_out but for the last
// block, then img_k, img_v where the block has them: into the X-Slim token cache on RunKeepKV, else scratch).
Sd3Runner::Hidden Sd3Runner::run_block(int b, const StepActions& a, Hidden h) {
    const bool last = b + 1 == static_cast<int>(a.blocks.size());
    const Hidden out = output_for(b + 1, a, h);
    StageBinding& s = bindings_[stage_of_.block[b]];
    s.input(0, h.img->value());
    s.input(1, h.txt->value());
    s.input(2, buffers_.in.temb.value());
    size_t o = 0;
    s.output(o++, out.img->value());
    if (!last) s.output(o++, out.txt->value());
    if (stage_of_.blocks.outputs_kv[b]) {
        const bool keep = a.blocks[b] == BlockAction::RunKeepKV;
        s.output(o++, (keep ? buffers_.xslim.block_k[b] : buffers_.stack.k_scratch).value());
        s.output(o++, (keep ? buffers_.xslim.block_v[b] : buffers_.stack.v_scratch).value());
    }
    run(stage_of_.block[b]);
    XSlimRecords& x = buffers_.xslim;
    if (a.record_blocks) {  // X-Slim full step: the block's residual and how much it changed its input
        const int64_t img_count = out.img->count();
        if (x.block_res_img[b].used()) ops_->subtract(x.block_res_img[b].f32(), out.img->f32(), h.img->f32(), img_count);
        if (x.block_res_txt[b].used()) ops_->subtract(x.block_res_txt[b].f32(), out.txt->f32(), h.txt->f32(), out.txt->count());
        x.block_scores[b] = ops_->relative_change(out.img->f32(), h.img->f32(), img_count);
    }
    return last ? Hidden{out.img, h.txt} : out;
}

// A block's token stage (inputs img, txt, temb, token_index, k_cache, v_cache, residual_cache;
// outputs img_out, txt_out but for the last block).
Sd3Runner::Hidden Sd3Runner::run_tokens(int b, const StepActions& a, Hidden h) {
    const bool last = b + 1 == static_cast<int>(a.blocks.size());
    const Hidden out = output_for(b + 1, a, h);
    XSlimRecords& x = buffers_.xslim;
    StageBinding& s = bindings_[stage_of_.tokens[b]];
    s.input(0, h.img->value());
    s.input(1, h.txt->value());
    s.input(2, buffers_.in.temb.value());
    s.input(3, buffers_.token_index(a.keep));
    s.input(4, x.block_k[b].value());
    s.input(5, x.block_v[b].value());
    s.input(6, x.block_res_img[b].value());
    s.output(0, out.img->value());
    if (!last) s.output(1, out.txt->value());
    run(stage_of_.tokens[b]);
    return last ? Hidden{out.img, h.txt} : out;
}

// The end of the 1.x skipped range: its compensated Δ added in place (the compensate stage, inputs
// delta_img, delta_txt, outputs comp_img, comp_txt, runs once per recorded Δ).
Sd3Runner::Hidden Sd3Runner::add_delta(Hidden h) {
    RangeDelta& range = buffers_.range;
    const bool mlp = program_->compensation == Compensation::Mlp;
    if (mlp && !range.compensated) {
        StageBinding& s = bindings_[stage_of_.compensate];
        s.input(0, range.delta_img.value());
        s.input(1, range.delta_txt.value());
        s.output(0, range.comp_img.value());
        s.output(1, range.comp_txt.value());
        run(stage_of_.compensate);
    }
    range.compensated = true;
    DeviceBuffer* img = writable(h.img);
    ops_->add(img->f32(), h.img->f32(), (mlp ? range.comp_img : range.delta_img).f32(), h.img->count());
    ops_->add(h.txt->f32(), h.txt->f32(), (mlp ? range.comp_txt : range.delta_txt).f32(), h.txt->count());
    return Hidden{img, h.txt};
}

// Where an addition to the image stream `img` goes: in place, unless `img` is the kept stack input
// (X-Slim full step whose first blocks add instead of run), which record_for_reuse still needs.
DeviceBuffer* Sd3Runner::writable(DeviceBuffer* img) {
    return img == &buffers_.xslim.stack_in ? &buffers_.stack.img[0] : img;  // both ping-pong buffers are free then
}

// The OrtValue viewing caller memory `data` of `shape` (read-only: ONNX Runtime never writes an input).
const OrtValue* Sd3Runner::caller_view(CallerView& v, const float* data, const std::vector<int64_t>& shape) {
    if (v.view.get() && v.data == data && v.shape == shape) return v.view.get();
    TensorView made(engine_.ort(), const_cast<float*>(data), ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, shape);
    if (const OrtValue* old = v.view.get())  // made while the old one lives: a different address
        for (auto& b : bindings_) b.forget(old);
    v.view = std::move(made);
    v.data = data;
    v.shape = shape;
    return v.view.get();
}

void Sd3Runner::run(int stage) {
    if (!host_) ops_->finish();  // the stage reads what the device ops wrote (host ops finish as they return)
    backend_ms_ += run_stage(bindings_[stage], stage, stages_, profiler_);
    stage_calls_ += 1;
}

}  // namespace slim
