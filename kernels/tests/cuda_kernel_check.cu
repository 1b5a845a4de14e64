// slim-cuda-kernel-check: every CUDA kernel of slim_kernels_cuda.h against its CPU version, then
// each kernel's achieved memory bandwidth against a device-to-device copy of the same bytes.
//
// Checks: fresh random inputs (the seed is printed; --seed N repeats a run), every output buffer
// poisoned with NaN (0xFF bytes; -1 for indices) before the launch, every CUDA call checked, results
// compared with the CPU entry points (kernels/cpu/token_ops.cpp, kernels/cpu/elementwise.cpp: the
// runtime's between-stage work, Euler step with CFG, residual add, subtract, noise).
// Prints one PASS/FAIL line per check and one BW line per kernel; with --json PATH also writes the
// results as JSON. Exit status: 0 when every check passed, 1 on a mismatch, 2 on a CUDA error.
// Bandwidth below the 80 % goal is reported, not failed: it is a goal, not a correctness property.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "slim_kernels.h"
#include "slim_kernels_cuda.h"

namespace gpu = slim::kernels::cuda;
namespace cpu = slim::kernels::cpu;

namespace {

void check_cuda(cudaError_t status, const char* call, int line) {
    if (status == cudaSuccess) return;
    std::fprintf(stderr, "CUDA ERROR %s at cuda_kernel_check.cu:%d: %s\n", call, line, cudaGetErrorString(status));
    std::exit(2);
}
#define CHECK_CUDA(call) check_cuda((call), #call, __LINE__)

// A device buffer filled with `poison` bytes on creation.
template <typename T>
struct Device {
    T* ptr = nullptr;
    size_t count = 0;
    explicit Device(size_t n, int poison = 0xFF) : count(n) {
        CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)));
        CHECK_CUDA(cudaMemset(ptr, poison, std::max<size_t>(n, 1) * sizeof(T)));
    }
    Device(const std::vector<T>& host) : Device(host.size()) {
        CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
    }
    ~Device() { cudaFree(ptr); }
    Device(const Device&) = delete;
    Device& operator=(const Device&) = delete;
    std::vector<T> host() const {
        std::vector<T> out(count);
        CHECK_CUDA(cudaDeviceSynchronize());
        CHECK_CUDA(cudaMemcpy(out.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
        return out;
    }
};

std::mt19937_64 rng;
std::vector<float> random_floats(size_t n) {
    std::normal_distribution<float> d;
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

int failures = 0;
std::string json_checks, json_bandwidth;

void append_json(std::string& list, const std::string& item) { list += (list.empty() ? "" : ",\n    ") + item; }

// Max |got - want| / (atol + rtol |want|) must be <= 1; NaN (a poisoned value left) fails.
void report(const std::string& name, const std::vector<float>& got, const std::vector<float>& want, double rtol, double atol) {
    double worst = 0, max_abs = 0;
    size_t at = 0;
    bool same_size = got.size() == want.size();
    for (size_t i = 0; same_size && i < want.size(); ++i) {
        double err = std::fabs(static_cast<double>(got[i]) - want[i]);
        double r = std::isnan(err) ? INFINITY : err == 0 ? 0.0 : err / (atol + rtol * std::fabs(want[i]));  // x/0: inf
        if (r > worst || std::isnan(got[i])) worst = r, at = i;
        max_abs = std::max(max_abs, std::isnan(err) ? INFINITY : err);
    }
    bool ok = same_size && worst <= 1.0;
    failures += !ok;
    std::printf("%s %-44s max_abs_err=%.3g (rtol %.0e, atol %.0e)%s\n", ok ? "PASS" : "FAIL", name.c_str(), max_abs, rtol, atol,
                ok ? "" : (" first worst element " + std::to_string(at)).c_str());
    char item[512];
    std::snprintf(item, sizeof(item), "{\"name\": \"%s\", \"pass\": %s, \"max_abs_err\": %.6g}", name.c_str(), ok ? "true" : "false",
                  std::isfinite(max_abs) ? max_abs : -1.0);
    append_json(json_checks, item);
}

void report_exact(const std::string& name, const std::vector<int64_t>& got, const std::vector<int64_t>& want) {
    size_t mismatches = 0;
    for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) mismatches += got[i] != want[i];
    bool ok = got.size() == want.size() && mismatches == 0;
    failures += !ok;
    std::printf("%s %-44s %zu of %zu indices differ\n", ok ? "PASS" : "FAIL", name.c_str(), mismatches, want.size());
    append_json(json_checks, "{\"name\": \"" + name + "\", \"pass\": " + (ok ? "true" : "false") +
                                 ", \"mismatches\": " + std::to_string(mismatches) + "}");
}

std::string shape_name(const char* kernel, std::initializer_list<int64_t> dims) {
    std::string s = std::string(kernel) + " [";
    for (int64_t d : dims) s += (s.back() == '[' ? "" : ",") + std::to_string(d);
    return s + "]";
}

// ---- correctness ----

void check_l1_change(int64_t batch, int64_t per_batch) {
    auto a = random_floats(batch * per_batch), b = random_floats(batch * per_batch);
    std::vector<float> change(batch), scale(batch);
    cpu::l1_change(a.data(), b.data(), batch, per_batch, change.data(), scale.data());
    Device<float> da(a), db(b), dc(batch), ds(batch);
    Device<double> partial(gpu::l1_change_scratch_count(batch));
    CHECK_CUDA(gpu::l1_change(da.ptr, db.ptr, batch, per_batch, dc.ptr, ds.ptr, partial.ptr, nullptr));
    report(shape_name("l1_change.change", {batch, per_batch}), dc.host(), change, 1e-5, 1e-7);
    report(shape_name("l1_change.scale", {batch, per_batch}), ds.host(), scale, 1e-5, 1e-7);
}

void check_token_change_score(int64_t batch, int64_t tokens, int64_t channels) {
    auto a = random_floats(batch * tokens * channels), b = random_floats(batch * tokens * channels);
    std::vector<float> score(batch * tokens);
    cpu::token_change_score(a.data(), b.data(), batch, tokens, channels, score.data());
    Device<float> da(a), db(b), dscore(batch * tokens);
    CHECK_CUDA(gpu::token_change_score(da.ptr, db.ptr, batch, tokens, channels, dscore.ptr, nullptr));
    report(shape_name("token_change_score", {batch, tokens, channels}), dscore.host(), score, 1e-5, 1e-7);
}

// `levels` > 0 draws scores from that many values, so ties are common (they go to the lower index).
void check_select_tokens(int64_t batch, int64_t tokens, int64_t keep, int levels) {
    std::vector<float> score = random_floats(batch * tokens);
    if (levels > 0) {
        std::uniform_int_distribution<int> d(0, levels - 1);
        for (auto& s : score) s = static_cast<float>(d(rng));
    }
    std::vector<int64_t> idx(batch * keep);
    cpu::select_tokens(score.data(), batch, tokens, keep, idx.data());
    Device<float> dscore(score);
    Device<int32_t> flags(batch * tokens);
    Device<int64_t> didx(batch * keep);
    CHECK_CUDA(gpu::select_tokens(dscore.ptr, batch, tokens, keep, flags.ptr, didx.ptr, nullptr));
    report_exact(shape_name(levels > 0 ? "select_tokens(ties)" : "select_tokens", {batch, tokens, keep}), didx.host(), idx);
}

std::vector<int64_t> random_indices(int64_t batch, int64_t tokens, int64_t count) {
    std::vector<int64_t> idx(batch * count), order(tokens);
    for (int64_t b = 0; b < batch; ++b) {  // distinct, ascending, as select_tokens gives them
        for (int64_t i = 0; i < tokens; ++i) order[i] = i;
        std::shuffle(order.begin(), order.end(), rng);
        std::sort(order.begin(), order.begin() + count);
        std::copy(order.begin(), order.begin() + count, idx.begin() + b * count);
    }
    return idx;
}

void check_gather_scatter(int64_t batch, int64_t tokens, int64_t count, int64_t channels) {
    auto x = random_floats(batch * tokens * channels), values = random_floats(batch * count * channels);
    auto idx = random_indices(batch, tokens, count);
    std::vector<float> gathered(batch * count * channels), scattered = x;
    if (!cpu::gather_tokens(x.data(), idx.data(), batch, tokens, count, channels, gathered.data()) ||
        !cpu::scatter_tokens(scattered.data(), idx.data(), values.data(), batch, tokens, count, channels)) {
        std::printf("FAIL gather/scatter: the CPU versions refused in-range indices\n");
        ++failures;
        return;
    }
    Device<float> dx(x), dvalues(values), dout(batch * count * channels), dcache(x);
    Device<int64_t> didx(idx);
    CHECK_CUDA(gpu::gather_tokens(dx.ptr, didx.ptr, batch, tokens, count, channels, dout.ptr, nullptr));
    CHECK_CUDA(gpu::scatter_tokens(dcache.ptr, didx.ptr, dvalues.ptr, batch, tokens, count, channels, nullptr));
    report(shape_name("gather_tokens", {batch, tokens, count, channels}), dout.host(), gathered, 0, 0);
    report(shape_name("scatter_tokens", {batch, tokens, count, channels}), dcache.host(), scattered, 0, 0);
}

// An index outside [0, tokens): gather writes a NaN row, scatter leaves the cache row alone.
void check_out_of_range_indices() {
    const int64_t tokens = 8, channels = 4;
    auto x = random_floats(tokens * channels);
    std::vector<int64_t> idx = {2, tokens};
    Device<float> dx(x), dout(2 * channels, 0), dcache(x), dvalues(random_floats(2 * channels));
    Device<int64_t> didx(idx);
    CHECK_CUDA(gpu::gather_tokens(dx.ptr, didx.ptr, 1, tokens, 2, channels, dout.ptr, nullptr));
    CHECK_CUDA(gpu::scatter_tokens(dcache.ptr, didx.ptr, dvalues.ptr, 1, tokens, 2, channels, nullptr));
    auto out = dout.host(), cache = dcache.host(), values = dvalues.host();
    bool ok = true;
    for (int64_t c = 0; c < channels; ++c) {
        ok = ok && out[c] == x[2 * channels + c] && std::isnan(out[channels + c]);
        ok = ok && cache[2 * channels + c] == values[c];
    }
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t c = 0; t != 2 && c < channels; ++c) ok = ok && cache[t * channels + c] == x[t * channels + c];
    failures += !ok;
    std::printf("%s %-44s gather gives NaN rows, scatter writes nothing\n", ok ? "PASS" : "FAIL", "gather/scatter out-of-range index");
    append_json(json_checks, std::string("{\"name\": \"out_of_range_index\", \"pass\": ") + (ok ? "true" : "false") + "}");
}

void check_elementwise(int64_t count) {
    auto x = random_floats(count), v_neg = random_floats(count), v_pos = random_floats(count);
    const float g = 4.5f, dt = -0.0357f;
    // The CPU kernels the runtime's CPU device calls (kernels/cpu/elementwise.cpp).
    std::vector<float> euler_cfg = x, euler_copy(count), euler_plain = x, added = x, diff(count);
    const bool finite = cpu::euler_cfg(euler_cfg.data(), euler_copy.data(), v_neg.data(), v_pos.data(), g, dt, count) &&
                        cpu::euler_cfg(euler_plain.data(), nullptr, nullptr, v_pos.data(), g, dt, count);
    cpu::add(added.data(), added.data(), v_pos.data(), count);
    cpu::subtract(diff.data(), x.data(), v_neg.data(), count);
    Device<float> dx(x), dneg(v_neg), dpos(v_pos), d1(x), d1copy(count), d2(x), d3(x), d4(count);
    Device<int32_t> nonfinite(2);
    CHECK_CUDA(gpu::euler_cfg(d1.ptr, d1copy.ptr, dneg.ptr, dpos.ptr, g, dt, count, nonfinite.ptr, nullptr));
    CHECK_CUDA(gpu::euler_cfg(d2.ptr, nullptr, nullptr, dpos.ptr, g, dt, count, nonfinite.ptr + 1, nullptr));
    CHECK_CUDA(gpu::add(d3.ptr, d3.ptr, dpos.ptr, count, nullptr));
    CHECK_CUDA(gpu::subtract(d4.ptr, dx.ptr, dneg.ptr, count, nullptr));
    std::vector<float> filled(count);
    cpu::fill(filled.data(), dt, count);
    Device<float> d5(count);
    CHECK_CUDA(gpu::fill(d5.ptr, dt, count, nullptr));
    // Explicitly rounded arithmetic on the device: the CPU's values bit for bit.
    report(shape_name("euler_cfg(cfg)", {count}), d1.host(), euler_cfg, 0, 0);
    report(shape_name("euler_cfg(cfg) copy", {count}), d1copy.host(), euler_cfg, 0, 0);
    report(shape_name("euler_cfg(plain)", {count}), d2.host(), euler_plain, 0, 0);
    report(shape_name("add", {count}), d3.host(), added, 0, 0);
    report(shape_name("subtract", {count}), d4.host(), diff, 0, 0);
    report(shape_name("fill", {count}), d5.host(), filled, 0, 0);
    const std::vector<int32_t> flags = nonfinite.host();
    const bool ok = finite && flags[0] == 0 && flags[1] == 0;
    failures += !ok;
    std::printf("%s %-44s device flags %d %d, host %s\n", ok ? "PASS" : "FAIL", shape_name("euler_cfg finite flag", {count}).c_str(),
                flags[0], flags[1], finite ? "finite" : "not finite");
    append_json(json_checks, std::string("{\"name\": \"euler_cfg_finite_flag\", \"pass\": ") + (ok ? "true" : "false") + "}");
}

// A NaN velocity: the device flag and the CPU's return value both say "not finite".
void check_euler_nonfinite() {
    std::vector<float> x = random_floats(1000), v = random_floats(1000);
    v[517] = NAN;
    std::vector<float> host_x = x;
    const bool finite = cpu::euler_cfg(host_x.data(), nullptr, nullptr, v.data(), 1.0f, 0.5f, 1000);
    Device<float> dx(x), dv(v);
    Device<int32_t> nonfinite(1, 0);
    CHECK_CUDA(gpu::euler_cfg(dx.ptr, nullptr, nullptr, dv.ptr, 1.0f, 0.5f, 1000, nonfinite.ptr, nullptr));
    const bool ok = !finite && nonfinite.host()[0] == 1;
    failures += !ok;
    std::printf("%s %-44s\n", ok ? "PASS" : "FAIL", "euler_cfg NaN flagged");
    append_json(json_checks, std::string("{\"name\": \"euler_cfg_nan_flagged\", \"pass\": ") + (ok ? "true" : "false") + "}");
}

void check_noise(int64_t count, uint64_t seed) {
    std::vector<float> want(count);
    cpu::gaussian_noise(want.data(), count, seed);
    Device<float> d(count);
    CHECK_CUDA(gpu::gaussian_noise(d.ptr, count, seed, nullptr));
    // Double-precision log/sin/cos on the device and in libm may differ in the last bits of a double.
    report(shape_name("gaussian_noise", {count}), d.host(), want, 1e-6, 1e-6);
}

// The prompt path's decoding: unscaled latents and RGB8 bit for bit the CPU's, a NaN pixel flagged (and written as 0).
void check_decoding(int64_t batch, int64_t height, int64_t width) {
    const int64_t count = batch * 3 * height * width;
    std::vector<float> image = random_floats(count), unscaled(count);
    for (int64_t i = 0; i < count; i += 97) image[i] = 0.5f / 255.0f * static_cast<float>(i % 5) - 1.0f;  // rounding ties
    cpu::unscale_latents(unscaled.data(), image.data(), 1.5305f, 0.0609f, count);
    Device<float> d_image(image), d_unscaled(count);
    CHECK_CUDA(gpu::unscale_latents(d_unscaled.ptr, d_image.ptr, 1.5305f, 0.0609f, count, nullptr));
    report(shape_name("unscale_latents", {count}), d_unscaled.host(), unscaled, 0, 0);
    for (const bool with_nan : {false, true}) {
        if (with_nan) image[count / 2] = NAN;
        std::vector<uint8_t> want(count);
        const bool finite = cpu::image_to_rgb8(image.data(), batch, height, width, want.data());
        Device<float> d(image);
        Device<uint8_t> d_rgb(count);
        Device<int32_t> nan(1, 0x7F);
        CHECK_CUDA(gpu::image_to_rgb8(d.ptr, batch, height, width, d_rgb.ptr, nan.ptr, nullptr));
        const std::vector<uint8_t> got = d_rgb.host();
        size_t mismatches = 0;
        for (int64_t i = 0; i < count; ++i) mismatches += got[i] != want[i];
        const bool ok = mismatches == 0 && finite == !with_nan && nan.host()[0] == (with_nan ? 1 : 0);
        failures += !ok;
        const std::string name = shape_name(with_nan ? "image_to_rgb8 (NaN)" : "image_to_rgb8", {batch, 3, height, width});
        std::printf("%s %-44s %zu of %lld bytes differ\n", ok ? "PASS" : "FAIL", name.c_str(), mismatches, static_cast<long long>(count));
        append_json(json_checks, "{\"name\": \"" + name + "\", \"pass\": " + (ok ? "true" : "false") +
                                     ", \"mismatches\": " + std::to_string(mismatches) + "}");
    }
}

// ---- bandwidth ----

// Mean milliseconds of `launch` over `iters` runs after warm-up.
double time_ms(const std::function<void()>& launch, int iters = 20) {
    for (int i = 0; i < 3; ++i) launch();
    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    CHECK_CUDA(cudaEventRecord(start));
    for (int i = 0; i < iters; ++i) launch();
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    CHECK_CUDA(cudaGetLastError());
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return ms / iters;
}

// `bytes`: what the kernel must read plus write. The copy baseline moves the same total (it reads
// and writes bytes / 2), measured right before, so a ratio compares like with like.
void bandwidth(const char* name, double bytes, const std::function<void()>& launch, bool memory_bound = true) {
    const size_t half = static_cast<size_t>(bytes / 2);
    Device<char> src(half, 0), dst(half, 0);
    double copy_ms = time_ms([&] { CHECK_CUDA(cudaMemcpyAsync(dst.ptr, src.ptr, half, cudaMemcpyDeviceToDevice)); });
    double ms = time_ms(launch);
    double gbs = bytes / ms / 1e6, copy_gbs = 2.0 * half / copy_ms / 1e6, ratio = gbs / copy_gbs;
    std::printf("BW   %-28s %8.1f us %8.1f GB/s  copy %8.1f GB/s  ratio %.2f%s\n", name, ms * 1e3, gbs, copy_gbs, ratio,
                memory_bound ? (ratio >= 0.8 ? "  (goal >= 0.80 met)" : "  (goal >= 0.80 NOT met)") : "  (compute-bound; no goal)");
    char item[512];
    std::snprintf(item, sizeof(item),
                  "{\"kernel\": \"%s\", \"us\": %.3f, \"bytes\": %.0f, \"gb_s\": %.2f, \"copy_gb_s\": %.2f, \"ratio\": %.4f, "
                  "\"memory_bound\": %s}",
                  name, ms * 1e3, bytes, gbs, copy_gbs, ratio, memory_bound ? "true" : "false");
    append_json(json_bandwidth, item);
}

// An SD3-Medium 1024x1024 step with CFG: B=2, N=4096 image tokens, D=1536, latents [2,16,128,128],
// half the tokens recomputed at the token level.
void bandwidth_sd3_medium() {
    const int64_t B = 2, N = 4096, D = 1536, K = N / 2, latent = B * 16 * 128 * 128, img = B * N * D;
    const double f = sizeof(float);
    Device<float> a(random_floats(img)), b(random_floats(img)), out(img), score(random_floats(B * N)), change(B), scale(B);
    Device<float> lat(random_floats(latent)), v_neg(random_floats(latent)), v_pos(random_floats(latent));
    Device<double> partial(gpu::l1_change_scratch_count(B));
    Device<int32_t> flags(B * N);
    Device<int64_t> idx(random_indices(B, N, K));
    Device<int64_t> sel(B * K);
    bandwidth("l1_change img [2,4096x1536]", 2 * img * f,
              [&] { gpu::l1_change(a.ptr, b.ptr, B, N * D, change.ptr, scale.ptr, partial.ptr, 0); });
    bandwidth("token_change_score", 2 * img * f + B * N * f, [&] { gpu::token_change_score(a.ptr, b.ptr, B, N, D, score.ptr, nullptr); });
    bandwidth(
        "select_tokens [2,4096] keep 2048", B * N * f + B * K * 8.0,
        [&] { gpu::select_tokens(score.ptr, B, N, K, flags.ptr, sel.ptr, nullptr); }, false);
    bandwidth("gather_tokens K=2048", 2 * B * K * D * f + B * K * 8.0,
              [&] { gpu::gather_tokens(a.ptr, idx.ptr, B, N, K, D, out.ptr, nullptr); });
    bandwidth("scatter_tokens K=2048", 2 * B * K * D * f + B * K * 8.0,
              [&] { gpu::scatter_tokens(out.ptr, idx.ptr, b.ptr, B, N, K, D, nullptr); });
    bandwidth("add img", 3 * img * f, [&] { gpu::add(out.ptr, out.ptr, a.ptr, img, nullptr); });
    bandwidth("subtract img", 3 * img * f, [&] { gpu::subtract(out.ptr, a.ptr, b.ptr, img, nullptr); });
    Device<float> lat_copy(latent);
    Device<int32_t> nonfinite(1);
    bandwidth("euler_cfg latents (+copy)", 5 * latent * f,
              [&] { gpu::euler_cfg(lat.ptr, lat_copy.ptr, v_neg.ptr, v_pos.ptr, 4.5f, -0.03f, latent, nonfinite.ptr, nullptr); });
    bandwidth("gaussian_noise latents", latent * f, [&] { gpu::gaussian_noise(lat.ptr, latent, 42, nullptr); });
}

}  // namespace

int main(int argc, char** argv) {
    uint64_t seed = std::chrono::steady_clock::now().time_since_epoch().count();
    const char* json_path = nullptr;
    bool skip_bandwidth = false;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = std::strtoull(argv[++i], nullptr, 10);
        else if (!std::strcmp(argv[i], "--json") && i + 1 < argc)
            json_path = argv[++i];
        else if (!std::strcmp(argv[i], "--no-bandwidth"))
            skip_bandwidth = true;
        else {
            std::fprintf(stderr, "usage: %s [--seed N] [--json PATH] [--no-bandwidth]\n", argv[0]);
            return 2;
        }
    }
    int device = 0;
    cudaDeviceProp prop{};
    CHECK_CUDA(cudaGetDevice(&device));
    CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
    std::printf("device %d: %s (sm_%d%d), seed %llu\n", device, prop.name, prop.major, prop.minor, static_cast<unsigned long long>(seed));
    rng.seed(seed);

    for (auto [b, p] : {std::pair<int64_t, int64_t>{1, 1}, {3, 1000}, {2, 4096 * 1536}}) check_l1_change(b, p);
    for (auto [b, n, c] : {std::tuple<int64_t, int64_t, int64_t>{1, 5, 3}, {2, 77, 64}, {2, 4096, 1536}}) check_token_change_score(b, n, c);
    for (auto [b, n, k, ties] : {std::tuple<int64_t, int64_t, int64_t, int>{1, 1, 1, 0},
                                 {2, 50, 15, 0},
                                 {2, 50, 15, 4},
                                 {3, 1000, 1000, 0},
                                 {2, 4096, 2048, 0},
                                 {2, 4096, 1229, 8},
                                 {1, 9000, 2700, 0},
                                 {1, 9000, 4500, 3}})
        check_select_tokens(b, n, k, ties);
    for (auto [b, n, k, c] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{1, 10, 3, 5}, {2, 333, 100, 64}, {2, 4096, 2048, 1536}})
        check_gather_scatter(b, n, k, c);
    check_out_of_range_indices();
    for (int64_t n : {int64_t{1}, int64_t{1001}, int64_t{2 * 16 * 128 * 128}}) check_elementwise(n);
    check_euler_nonfinite();
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{2 * 16 * 128 * 128 + 3}}) check_noise(n, seed);
    check_decoding(1, 1, 1);
    check_decoding(2, 1024, 1024);

    if (!skip_bandwidth) {
        std::printf("bandwidth, SD3-Medium 1024x1024 with CFG (B=2, N=4096, D=1536), vs cudaMemcpy device-to-device:\n");
        bandwidth_sd3_medium();
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    std::printf("%s: %d check(s) failed\n", failures ? "FAIL" : "PASS", failures);
    if (json_path) {
        FILE* f = std::fopen(json_path, "w");
        if (!f) {
            std::fprintf(stderr, "cannot write %s\n", json_path);
            return 2;
        }
        std::fprintf(f,
                     "{\n  \"device\": \"%s\",\n  \"sm\": %d%d,\n  \"seed\": %llu,\n  \"failures\": %d,\n  \"checks\": [\n    %s\n  ],\n",
                     prop.name, prop.major, prop.minor, static_cast<unsigned long long>(seed), failures, json_checks.c_str());
        std::fprintf(f, "  \"bandwidth\": [\n    %s\n  ]\n}\n", json_bandwidth.c_str());
        std::fclose(f);
    }
    return failures ? 1 : 0;
}
