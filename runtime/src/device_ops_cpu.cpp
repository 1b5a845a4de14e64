// DeviceOps on the CPU: the kernels of kernels/cpu on host buffers. Results are the runtime's
// earlier in-line loops' bit for bit (the same operations in the same order).
#include <dlfcn.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "device_ops.hpp"
#include "error.hpp"
#include "slim_kernels.h"
#include "xslim.hpp"

namespace slim {
namespace {

class CpuOps final : public DeviceOps {
  public:
    void reserve(int64_t rows) override {
        if (static_cast<int64_t>(order_.size()) < rows) order_.resize(rows);
    }
    void fill(float* dst, float value, int64_t count) override { kernels::cpu::fill(dst, value, count); }
    void noise(float* out, int64_t count, uint64_t seed) override { kernels::cpu::gaussian_noise(out, count, seed); }
    bool on_host() const override { return true; }
    void add(float* dst, const float* a, const float* b, int64_t count) override { kernels::cpu::add(dst, a, b, count); }
    void subtract(float* dst, const float* a, const float* b, int64_t count) override { kernels::cpu::subtract(dst, a, b, count); }
    double relative_change(const float* a, const float* b, int64_t count) override {
        return slim::relative_change(a, b, static_cast<size_t>(count));
    }
    void token_scores(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score) override {
        kernels::cpu::token_change_score(r_last, r_prev, batch, tokens, channels, score);
    }
    void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* index) override {
        // order_ holds at least batch x tokens values (reserve): the overload that allocates is not used here.
        kernels::cpu::select_tokens(score, batch, tokens, keep, index, order_.data());
    }
    bool euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count) override {
        return kernels::cpu::euler_cfg(x, x_copy, v_neg, v_pos, guidance, dt, count);
    }
    void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows, int64_t width) override {
        for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * dst_stride, src + r * src_stride, width * sizeof(float));
    }
    void unscale_latents(float* dst, const float* src, float scaling, float shift, int64_t count) override {
        kernels::cpu::unscale_latents(dst, src, scaling, shift, count);
    }
    bool to_rgb8(const float* image, int64_t batch, int64_t height, int64_t width, uint8_t* out) override {
        return kernels::cpu::image_to_rgb8(image, batch, height, width, out);
    }
    void finish() override {}

  protected:
    void copy_in(void* device, const void* host, size_t bytes) override { std::memcpy(device, host, bytes); }
    void copy_out(void* host, const void* device, size_t bytes) override { std::memcpy(host, device, bytes); }

  private:
    std::vector<int64_t> order_;
};

// The plugin's ops, with its errors (std::exception: its own types do not cross the library boundary)
// turned into Error(SLIM_ERR_BACKEND).
class PluginOps final : public DeviceOps {
  public:
    explicit PluginOps(DeviceOps* inner) : inner_(inner) {}
    void reserve(int64_t rows) override {
        guard([&] { inner_->reserve(rows); });
    }
    void fill(float* dst, float value, int64_t count) override {
        guard([&] { inner_->fill(dst, value, count); });
    }
    void noise(float* out, int64_t count, uint64_t seed) override {
        guard([&] { inner_->noise(out, count, seed); });
    }
    bool on_host() const override { return inner_->on_host(); }
    void add(float* dst, const float* a, const float* b, int64_t count) override {
        guard([&] { inner_->add(dst, a, b, count); });
    }
    void subtract(float* dst, const float* a, const float* b, int64_t count) override {
        guard([&] { inner_->subtract(dst, a, b, count); });
    }
    double relative_change(const float* a, const float* b, int64_t count) override {
        return guard([&] { return inner_->relative_change(a, b, count); });
    }
    void token_scores(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score) override {
        guard([&] { inner_->token_scores(r_last, r_prev, batch, tokens, channels, score); });
    }
    void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* index) override {
        guard([&] { inner_->select_tokens(score, batch, tokens, keep, index); });
    }
    bool euler_cfg(float* x, float* x_copy, const float* v_neg, const float* v_pos, float guidance, float dt, int64_t count) override {
        return guard([&] { return inner_->euler_cfg(x, x_copy, v_neg, v_pos, guidance, dt, count); });
    }
    void copy_rows(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t rows, int64_t width) override {
        guard([&] { inner_->copy_rows(dst, dst_stride, src, src_stride, rows, width); });
    }
    void unscale_latents(float* dst, const float* src, float scaling, float shift, int64_t count) override {
        guard([&] { inner_->unscale_latents(dst, src, scaling, shift, count); });
    }
    bool to_rgb8(const float* image, int64_t batch, int64_t height, int64_t width, uint8_t* out) override {
        return guard([&] { return inner_->to_rgb8(image, batch, height, width, out); });
    }
    void finish() override {
        guard([&] { inner_->finish(); });
    }

  protected:
    void copy_in(void* device, const void* host, size_t bytes) override {
        guard([&] { inner_->upload(device, host, bytes); });
    }
    void copy_out(void* host, const void* device, size_t bytes) override {
        guard([&] { inner_->download(host, device, bytes); });
    }

  private:
    template <typename F>
    static auto guard(F&& f) -> decltype(f()) {
        try {
            return f();
        } catch (const std::exception& e) { throw Error(SLIM_ERR_BACKEND, std::string("CUDA device ops: ") + e.what()); }
    }
    std::unique_ptr<DeviceOps> inner_;
};

// `name` beside this library (libslimengine.so), or "" when it cannot be located.
std::string beside_this_library(const char* name) {
    Dl_info info{};
    if (!dladdr(reinterpret_cast<void*>(&beside_this_library), &info) || !info.dli_fname) return "";
    std::string self = info.dli_fname;
    const size_t slash = self.rfind('/');
    return (slash == std::string::npos ? std::string(".") : self.substr(0, slash)) + "/" + name;
}

}  // namespace

std::unique_ptr<DeviceOps> make_cpu_ops() { return std::make_unique<CpuOps>(); }

std::unique_ptr<DeviceOps> make_cuda_ops(int device) {
    const std::string path = beside_this_library(kCudaOpsLibrary);
    if (path.empty() || access(path.c_str(), R_OK) != 0) return nullptr;  // a build without nvcc has no plugin
    // Loaded once and never unloaded: its objects' code must outlive every session.
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) throw Error(SLIM_ERR_BACKEND, "cannot load " + path + ": " + dlerror());
    auto make = reinterpret_cast<MakeCudaOps>(dlsym(handle, kCudaOpsSymbol));
    if (!make) throw Error(SLIM_ERR_BACKEND, path + " has no " + kCudaOpsSymbol + "; rebuild slimengine");
    const char* error = nullptr;
    DeviceOps* ops = make(device, &error);
    if (!ops) throw Error(SLIM_ERR_BACKEND, "CUDA device ops on device " + std::to_string(device) + ": " + (error ? error : "failed"));
    return std::make_unique<PluginOps>(ops);
}

}  // namespace slim
