#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "slim_kernels.h"

namespace slim::kernels::cpu {

void l1_change(const float* a, const float* b, int64_t batch, int64_t per_batch, float* change, float* scale) {
    for (int64_t i = 0; i < batch; ++i) {
        const float* pa = a + i * per_batch;
        const float* pb = b + i * per_batch;
        double diff = 0, mag = 0;  // double: sums over millions of values
        for (int64_t k = 0; k < per_batch; ++k) {
            diff += std::fabs(pa[k] - pb[k]);
            mag += std::fabs(pb[k]);
        }
        change[i] = static_cast<float>(diff / per_batch);
        scale[i] = static_cast<float>(mag / per_batch);
    }
}

void token_change_score(const float* r_last, const float* r_prev, int64_t batch, int64_t tokens, int64_t channels, float* score) {
    for (int64_t row = 0; row < batch * tokens; ++row) {
        const float* x = r_last + row * channels;
        const float* y = r_prev + row * channels;
        double sum = 0;
        for (int64_t c = 0; c < channels; ++c) sum += std::fabs(x[c] - y[c]);
        score[row] = static_cast<float>(sum / channels);
    }
}

void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* idx, int64_t* order) {
    for (int64_t b = 0; b < batch; ++b) {
        const float* s = score + b * tokens;
        std::iota(order, order + tokens, 0);
        std::partial_sort(order, order + keep, order + tokens,
                          [s](int64_t x, int64_t y) { return s[x] > s[y] || (s[x] == s[y] && x < y); });
        std::sort(order, order + keep);
        std::copy(order, order + keep, idx + b * keep);
    }
}

void select_tokens(const float* score, int64_t batch, int64_t tokens, int64_t keep, int64_t* idx) {
    std::vector<int64_t> order(tokens);
    select_tokens(score, batch, tokens, keep, idx, order.data());
}

bool gather_tokens(const float* x, const int64_t* idx, int64_t batch, int64_t tokens, int64_t count, int64_t channels, float* out) {
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t j = 0; j < count; ++j) {
            int64_t t = idx[b * count + j];
            if (t < 0 || t >= tokens) return false;
            std::memcpy(out + (b * count + j) * channels, x + (b * tokens + t) * channels, channels * sizeof(float));
        }
    return true;
}

bool scatter_tokens(float* cache, const int64_t* idx, const float* values, int64_t batch, int64_t tokens, int64_t count, int64_t channels) {
    for (int64_t i = 0; i < batch * count; ++i)
        if (idx[i] < 0 || idx[i] >= tokens) return false;  // check all first: nothing is written on error
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t j = 0; j < count; ++j)
            std::memcpy(cache + (b * tokens + idx[b * count + j]) * channels, values + (b * count + j) * channels,
                        channels * sizeof(float));
    return true;
}

int64_t tokens_for_ratio(double ratio, int64_t tokens) {
    return std::clamp<int64_t>(static_cast<int64_t>(std::floor(ratio * static_cast<double>(tokens) + 0.5)), 1, tokens);
}

}  // namespace slim::kernels::cpu
