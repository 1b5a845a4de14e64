// The work a generation does between stages, on the device that holds its buffers: one small
// interface with a CPU implementation (kernels/cpu, device_ops_cpu.cpp) and a CUDA one (kernels/cuda,
// device_ops_cuda.cpp, built as a plugin library where nvcc exists). The generation loop calls only
// these and ONNX Runtime; every pointer here is device memory of DeviceBuffers (the host for the CPU)
// except the host side of upload/download.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace slim {

class DeviceOps {
  public:
    virtual ~DeviceOps() = default;

    // Whether the buffers these ops work on are host memory (the CPU ops).
    virtual bool on_host() const = 0;

    // Scratch for a request whose token scores have `rows` values (batch x image tokens); called by
    // prepare, so that the step loop allocates nothing.
    virtual void reserve(int64_t rows) = 0;

    // Caller memory into a buffer / a buffer into caller memory (the request's tensors and the result
    // only). Counted in transfer_bytes().
    void upload(void* device, const void* host, size_t bytes) {
        transferred_ += bytes;
        copy_in(device, host, bytes);
    }
    void download(void* host, const void* device, size_t bytes) {
        transferred_ += bytes;
        copy_out(host, device, bytes);
    }
    uint64_t transfer_bytes() const { return transferred_; }
    void reset_transfer_bytes() { transferred_ = 0; }

    // dst[i] = value.
    virtual void fill(float* dst, float value, int64_t count) = 0;
    // Seeded standard normal noise (slim_philox.h), element k of `count`.
    virtual void noise(float* out, int64_t count, uint64_t seed) = 0;
    // dst = a + b; dst may be a or b.
    virtual void add(float* dst, const float* a, const float* b, int64_t count) = 0;
    // dst = a - b; dst may be a or b.
    virtual void subtract(float* dst, const float* a, const float* b, int64_t count) = 0;
    // sum |a - b| / sum |b| (infinity when b is all zero): a scalar for the X-Slim controller, on the host.
    virtual double relative_change(const float* a, const float* b, int64_t count) = 0;
    // score[b, n] = mean over channels of |r_last - r_prev|: the X-Slim per-token change score.
    virtual void token_scores(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score) = 0;
    // The `keep` highest-scoring tokens of each batch row, ascending ([batch, keep] int64).
    virtual void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* index) = 0;
    // x += dt * (v_neg + g (v_pos - v_neg)) (dt * v_pos without v_neg), also into x_copy when not null.
    // Returns false when a new value is NaN or Inf (a scalar read on the host).
    virtual bool euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count) = 0;
    // `rows` rows of `width` values from `src` (rows `src_stride` values apart) to `dst` (`dst_stride` apart), on the
    // device: not a transfer.
    virtual void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows, int64_t width) = 0;
    void copy(float* dst, const float* src, int64_t count) { copy_rows(dst, count, src, count, 1, count); }
    // The prompt path's decoding (kernels: unscale_latents, image_to_rgb8). to_rgb8 returns false when the
    // image holds a NaN (a scalar read on the host).
    virtual void unscale_latents(float* dst, const float* src, float scaling, float shift, int64_t count) = 0;
    virtual bool to_rgb8(const float* image, int64_t batch, int64_t height, int64_t width, uint8_t* out) = 0;
    // Work queued so far is complete: called before a stage reads buffers these ops wrote.
    virtual void finish() = 0;

  protected:
    virtual void copy_in(void* device, const void* host, size_t bytes) = 0;
    virtual void copy_out(void* host, const void* device, size_t bytes) = 0;

  private:
    uint64_t transferred_ = 0;
};

// The CPU implementation: kernels/cpu, on host memory.
std::unique_ptr<DeviceOps> make_cpu_ops();

// The CUDA implementation on `device`, from libslimengine_device_cuda.so beside this library, or
// nullptr when this build has none (built only where nvcc exists). Error(SLIM_ERR_BACKEND) when the
// plugin exists but cannot be loaded.
std::unique_ptr<DeviceOps> make_cuda_ops(int device);

// The plugin's entry point (extern "C" so that dlsym finds it): a new CudaOps, or nullptr with
// `error` (a static string) set.
using MakeCudaOps = DeviceOps* (*)(int device, const char** error);
constexpr const char* kCudaOpsLibrary = "libslimengine_device_cuda.so";
constexpr const char* kCudaOpsSymbol = "slim_make_cuda_device_ops";

}  // namespace slim
