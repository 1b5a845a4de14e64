// libslimengine_ops.so: the "ai.slimengine" custom-op domain for ONNX Runtime's CPU provider.
// Load it with SessionOptions.register_custom_ops_library (Python) or RegisterCustomOpsLibrary_V2.
// Built with SLIM_OPS_CUDA (libslimengine_ops_cuda.so, wherever nvcc exists) the same domain also
// holds CUDA kernels of TokenChangeScore, GatherTokens and ScatterTokens for the CUDA execution
// provider, launched on the provider's compute stream; L1Change and SelectTokens stay CPU-only there
// (they need device scratch; no exported graph uses them).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "slim_kernels.h"
#ifdef SLIM_OPS_CUDA
#include "slim_kernels_cuda.h"
#endif

namespace {

using Ort::Custom::Tensor;
namespace cpu = slim::kernels::cpu;

constexpr const char* kDomain = "ai.slimengine";

[[noreturn]] void fail(std::string message) { throw Ort::Exception(std::move(message), ORT_INVALID_ARGUMENT); }

int64_t rows_after_batch(const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (size_t i = 1; i < shape.size(); ++i) n *= shape[i];
    return n;
}

void L1Change(const Tensor<float>& a, const Tensor<float>& b, Tensor<float>& change, Tensor<float>& scale) {
    const auto shape = a.Shape();
    if (shape.empty() || shape != b.Shape()) fail("L1Change: inputs must have the same shape with a leading batch dimension");
    const int64_t batch = shape[0];
    cpu::l1_change(a.Data(), b.Data(), batch, rows_after_batch(shape), change.Allocate({batch}), scale.Allocate({batch}));
}

// [B, N, C] of TokenChangeScore's inputs.
std::vector<int64_t> score_shape(const Tensor<float>& r_last, const Tensor<float>& r_prev) {
    const auto shape = r_last.Shape();
    if (shape.size() != 3 || shape != r_prev.Shape()) fail("TokenChangeScore: inputs must both be [B, N, C]");
    return shape;
}

void TokenChangeScore(const Tensor<float>& r_last, const Tensor<float>& r_prev, Tensor<float>& score) {
    const auto shape = score_shape(r_last, r_prev);
    cpu::token_change_score(r_last.Data(), r_prev.Data(), shape[0], shape[1], shape[2], score.Allocate({shape[0], shape[1]}));
}

void SelectTokens(const Tensor<float>& score, const Tensor<float>& ratio, Tensor<int64_t>& idx) {
    const auto shape = score.Shape();
    if (shape.size() != 2 || shape[1] < 1 || ratio.NumberOfElement() != 1)
        fail("SelectTokens: score must be [B, N] with N >= 1 and ratio a scalar");
    const float rho = ratio.Data()[0];
    if (!(rho > 0.0f && rho <= 1.0f)) fail("SelectTokens: ratio must be in (0, 1]");
    const int64_t keep = cpu::tokens_for_ratio(rho, shape[1]);
    cpu::select_tokens(score.Data(), shape[0], shape[1], keep, idx.Allocate({shape[0], keep}));
}

// Sizes of a gather or scatter: x or cache [B, N, C], idx [B, K], values [B, K, C].
struct MoveShape {
    int64_t batch, tokens, count, channels;
};

MoveShape gather_shape(const Tensor<float>& x, const Tensor<int64_t>& idx) {
    const auto xs = x.Shape(), is = idx.Shape();
    if (xs.size() != 3 || is.size() != 2 || is[0] != xs[0]) fail("GatherTokens: x must be [B, N, C] and idx [B, K]");
    return {xs[0], xs[1], is[1], xs[2]};
}

MoveShape scatter_shape(const Tensor<float>& cache, const Tensor<int64_t>& idx, const Tensor<float>& values) {
    const auto cs = cache.Shape(), is = idx.Shape(), vs = values.Shape();
    if (cs.size() != 3 || is.size() != 2 || vs.size() != 3 || is[0] != cs[0] || vs[0] != cs[0] || vs[1] != is[1] || vs[2] != cs[2])
        fail("ScatterTokens: cache must be [B, N, C], idx [B, K] and values [B, K, C]");
    return {cs[0], cs[1], is[1], cs[2]};
}

void GatherTokens(const Tensor<float>& x, const Tensor<int64_t>& idx, Tensor<float>& out) {
    const MoveShape s = gather_shape(x, idx);
    if (!cpu::gather_tokens(x.Data(), idx.Data(), s.batch, s.tokens, s.count, s.channels, out.Allocate({s.batch, s.count, s.channels})))
        fail("GatherTokens: an index is outside [0, N)");
}

void ScatterTokens(const Tensor<float>& cache, const Tensor<int64_t>& idx, const Tensor<float>& values, Tensor<float>& out) {
    const MoveShape s = scatter_shape(cache, idx, values);
    float* o = out.Allocate(cache.Shape());
    std::copy(cache.Data(), cache.Data() + cache.NumberOfElement(), o);
    if (!cpu::scatter_tokens(o, idx.Data(), values.Data(), s.batch, s.tokens, s.count, s.channels))
        fail("ScatterTokens: an index is outside [0, N)");
}

#ifdef SLIM_OPS_CUDA
// The CUDA execution provider's versions: device tensors, launched on the provider's compute stream.
// Indices are not range-checked on the host (that would need a copy back): an index outside [0, N)
// gives a NaN row in GatherTokens and is skipped by ScatterTokens (slim_kernels_cuda.h).
namespace gpu = slim::kernels::cuda;

cudaStream_t stream_of(OrtKernelContext& context) { return static_cast<cudaStream_t>(Ort::KernelContext(&context).GetGPUComputeStream()); }

void check_cuda(cudaError_t status, const char* op) {
    if (status != cudaSuccess) throw Ort::Exception(std::string(op) + ": CUDA error: " + cudaGetErrorString(status), ORT_RUNTIME_EXCEPTION);
}

void TokenChangeScoreCuda(OrtKernelContext& context, const Tensor<float>& r_last, const Tensor<float>& r_prev, Tensor<float>& score) {
    const auto shape = score_shape(r_last, r_prev);
    float* out = score.Allocate({shape[0], shape[1]});
    check_cuda(gpu::token_change_score(r_last.Data(), r_prev.Data(), shape[0], shape[1], shape[2], out, stream_of(context)),
               "TokenChangeScore");
}

void GatherTokensCuda(OrtKernelContext& context, const Tensor<float>& x, const Tensor<int64_t>& idx, Tensor<float>& out) {
    const MoveShape s = gather_shape(x, idx);
    float* o = out.Allocate({s.batch, s.count, s.channels});
    check_cuda(gpu::gather_tokens(x.Data(), idx.Data(), s.batch, s.tokens, s.count, s.channels, o, stream_of(context)), "GatherTokens");
}

void ScatterTokensCuda(OrtKernelContext& context, const Tensor<float>& cache, const Tensor<int64_t>& idx, const Tensor<float>& values,
                       Tensor<float>& out) {
    const MoveShape s = scatter_shape(cache, idx, values);
    const cudaStream_t stream = stream_of(context);
    float* o = out.Allocate(cache.Shape());
    check_cuda(cudaMemcpyAsync(o, cache.Data(), cache.NumberOfElement() * sizeof(float), cudaMemcpyDeviceToDevice, stream),
               "ScatterTokens");
    check_cuda(gpu::scatter_tokens(o, idx.Data(), values.Data(), s.batch, s.tokens, s.count, s.channels, stream), "ScatterTokens");
}
#endif

struct Registry {
    Ort::CustomOpDomain domain{kDomain};
    std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> ops;  // released as the lite type (its header says: never as OrtCustomOp)
};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                            const OrtApiBase* api_base) {
    Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
    // The domain and its ops must outlive every session that uses them: one registry per process.
    static std::unique_ptr<Registry> registry;
    static std::once_flag once;
    Ort::Status status{nullptr};
    try {
        std::call_once(once, [] {
            auto r = std::make_unique<Registry>();
            const char* ep = "CPUExecutionProvider";
            r->ops.emplace_back(Ort::Custom::CreateLiteCustomOp("L1Change", ep, L1Change));
            r->ops.emplace_back(Ort::Custom::CreateLiteCustomOp("TokenChangeScore", ep, TokenChangeScore));
            r->ops.emplace_back(Ort::Custom::CreateLiteCustomOp("SelectTokens", ep, SelectTokens));
            r->ops.emplace_back(Ort::Custom::CreateLiteCustomOp("GatherTokens", ep, GatherTokens));
            r->ops.emplace_back(Ort::Custom::CreateLiteCustomOp("ScatterTokens", ep, ScatterTokens));
#ifdef SLIM_OPS_CUDA
            const char* cuda = "CUDAExecutionProvider";
            r->ops.emplace_back(Ort::Custom::CreateLiteCustomOp("TokenChangeScore", cuda, TokenChangeScoreCuda));
            r->ops.emplace_back(Ort::Custom::CreateLiteCustomOp("GatherTokens", cuda, GatherTokensCuda));
            r->ops.emplace_back(Ort::Custom::CreateLiteCustomOp("ScatterTokens", cuda, ScatterTokensCuda));
#endif
            for (auto& op : r->ops) r->domain.Add(op.get());
            registry = std::move(r);
        });
        Ort::UnownedSessionOptions(options).Add(registry->domain);
    } catch (const Ort::Exception& e) { status = Ort::Status(e); } catch (const std::exception& e) {
        status = Ort::Status(e.what(), ORT_FAIL);
    }
    return status.release();
}
