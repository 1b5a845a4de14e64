// DeviceOps on a CUDA device: the kernels of kernels/cuda on device buffers, on one stream of this
// object's own. Built as libslimengine_device_cuda.so wherever nvcc exists (the CPU-only library does
// not link CUDA); the runtime loads it when an engine runs on CUDA (device_ops_cpu.cpp, make_cuda_ops).
// COMPILED ONLY: no GPU has run it yet (docs/gpu.md).
//
// Ordering with ONNX Runtime: the CUDA execution provider runs each stage on its own stream and, by
// default, synchronizes it before Run returns, so a stage's outputs are complete when these kernels
// start; finish() synchronizes this stream before the next stage reads what they wrote.
#include <cuda_runtime.h>

#include <limits>
#include <stdexcept>
#include <string>

#include "device_ops.hpp"
#include "slim_kernels_cuda.h"

namespace slim {
namespace {

class CudaError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

void ok(cudaError_t status, const char* what) {
    if (status != cudaSuccess) throw CudaError(std::string(what) + ": " + cudaGetErrorString(status));
}

class CudaOps final : public DeviceOps {
  public:
    explicit CudaOps(int device) : device_(device) {
        ok(cudaSetDevice(device), "cudaSetDevice");
        ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
        ok(cudaMalloc(&partial_, kernels::cuda::l1_change_scratch_count(1) * sizeof(double)), "cudaMalloc");
        ok(cudaMalloc(&scalars_, 2 * sizeof(float)), "cudaMalloc");
        ok(cudaMalloc(&nonfinite_, sizeof(int32_t)), "cudaMalloc");
        ok(cudaMallocHost(&host_scalars_, 2 * sizeof(float) + sizeof(int32_t)), "cudaMallocHost");
    }
    ~CudaOps() override {
        cudaStreamSynchronize(stream_);
        cudaFree(partial_);
        cudaFree(scalars_);
        cudaFree(nonfinite_);
        cudaFree(flags_);
        cudaFreeHost(host_scalars_);
        cudaStreamDestroy(stream_);
    }

    void reserve(int64_t rows) override {
        if (rows <= flag_capacity_) return;
        cudaFree(flags_);
        flags_ = nullptr;
        ok(cudaMalloc(&flags_, rows * sizeof(int32_t)), "cudaMalloc (token selection scratch)");
        flag_capacity_ = rows;
    }
    void fill(float* dst, float value, int64_t count) override { ok(kernels::cuda::fill(dst, value, count, stream_), "fill"); }
    void noise(float* out, int64_t count, uint64_t seed) override {
        ok(kernels::cuda::gaussian_noise(out, count, seed, stream_), "gaussian_noise");
    }
    bool on_host() const override { return false; }
    void add(float* dst, const float* a, const float* b, int64_t count) override {
        ok(kernels::cuda::add(dst, a, b, count, stream_), "add");
    }
    void subtract(float* dst, const float* a, const float* b, int64_t count) override {
        ok(kernels::cuda::subtract(dst, a, b, count, stream_), "subtract");
    }
    double relative_change(const float* a, const float* b, int64_t count) override {
        ok(kernels::cuda::l1_change(a, b, 1, count, scalars_, scalars_ + 1, partial_, stream_), "l1_change");
        ok(cudaMemcpyAsync(host_scalars_, scalars_, 2 * sizeof(float), cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
        ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        const float change = host_scalars_[0], scale = host_scalars_[1];  // means: their ratio is the sums'
        return scale > 0 ? static_cast<double>(change) / scale : std::numeric_limits<double>::infinity();
    }
    void token_scores(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score) override {
        ok(kernels::cuda::token_change_score(r_last, r_prev, batch, tokens, channels, score, stream_), "token_change_score");
    }
    void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* index) override {
        ok(kernels::cuda::select_tokens(score, batch, tokens, keep, flags_, index, stream_), "select_tokens");
    }
    bool euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count) override {
        ok(kernels::cuda::euler_cfg(x, x_copy, v_neg, v_pos, guidance, dt, count, nonfinite_, stream_), "euler_cfg");
        return read_flag() == 0;
    }
    void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows, int64_t width) override {
        if (rows == 1) {  // a plain copy (cudaMemcpy2D limits its pitches, to about 2 GiB)
            ok(cudaMemcpyAsync(dst, src, width * sizeof(float), cudaMemcpyDeviceToDevice, stream_), "copy");
            return;
        }
        ok(cudaMemcpy2DAsync(dst, dst_stride * sizeof(float), src, src_stride * sizeof(float), width * sizeof(float), rows,
                             cudaMemcpyDeviceToDevice, stream_),
           "copy_rows");
    }
    void unscale_latents(float* dst, const float* src, float scaling, float shift, int64_t count) override {
        ok(kernels::cuda::unscale_latents(dst, src, scaling, shift, count, stream_), "unscale_latents");
    }
    bool to_rgb8(const float* image, int64_t batch, int64_t height, int64_t width, uint8_t* out) override {
        ok(kernels::cuda::image_to_rgb8(image, batch, height, width, out, nonfinite_, stream_), "image_to_rgb8");
        return read_flag() == 0;
    }
    void finish() override { ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

  protected:
    void copy_in(void* device, const void* host, size_t bytes) override {
        ok(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream_), "upload");
        ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");  // the caller may free `host` next
    }
    void copy_out(void* host, const void* device, size_t bytes) override {
        ok(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream_), "download");
        ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }

  private:
    // The device flag nonfinite_ (set by the kernel just queued), read on the host.
    int32_t read_flag() {
        int32_t* flag = reinterpret_cast<int32_t*>(host_scalars_ + 2);
        ok(cudaMemcpyAsync(flag, nonfinite_, sizeof(int32_t), cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
        ok(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        return *flag;
    }

    int device_;
    cudaStream_t stream_ = nullptr;
    double* partial_ = nullptr;
    float* scalars_ = nullptr;
    int32_t* nonfinite_ = nullptr;
    int32_t* flags_ = nullptr;
    int64_t flag_capacity_ = 0;
    float* host_scalars_ = nullptr;  // pinned: change, scale, then the non-finite flag
};

}  // namespace
}  // namespace slim

extern "C" __attribute__((visibility("default"))) slim::DeviceOps* slim_make_cuda_device_ops(int device, const char** error) {
    static thread_local std::string message;
    try {
        return new slim::CudaOps(device);
    } catch (const std::exception& e) {
        message = e.what();
        if (error) *error = message.c_str();
        return nullptr;
    }
}
