/* One decoding step of attention over a paged pool, fused: obcache.kernels.paged_decode.
 *
 * For every block n of the pool (any order), its segment s = route[n] and each of the segment's G queries q:
 *   z_p = scale * q . k_np        over the block's slots p holding a token (position >= 0; -1: empty or padding)
 * merged into the segment's running softmax (online, exact in any block order):
 *   M' = max(M, max_p z_p),  L' = L e^(M - M') + sum_p e^(z_p - M'),  A' = A e^(M - M') + sum_p e^(z_p - M') v_np
 * and, once every block set is in, out = A / L. Float32, row-major, contiguous; the state (M, L, A) is the
 * caller's, so several block sets (e.g. one per stored width) accumulate into one softmax.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (the weights), branch-free so that loops of it vectorize: x = n ln 2 + r, |r| <= ln 2 / 2
 * (Cody-Waite), e^r by Cephes' degree-6 polynomial (relative error ~1e-7, as expf), 2^n from the exponent bits;
 * x below -87 gives 0 (e^-87 ~ 1.6e-38, below what float32 holds at full precision). */
static inline float exp_negative(float x) {
    float clamped = x < -87.0f ? -87.0f : x;
    float n = floorf(clamped * 1.44269504088896341f + 0.5f);
    float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float power;
    memcpy(&power, &bits, sizeof power);
    return x < -87.0f ? 0.0f : p * power;
}

/* z[g][p] = scale q_g . k_p for the G queries q [G, d] and a block's keys k [block, d] (-inf where the slot's
 * position is < 0): each key row read once, 16 lanes per query. */
static inline __attribute__((always_inline)) void scores(const float *q, const float *k, const int32_t *position,
                                                         int64_t block, int64_t group, int64_t dim, float scale,
                                                         float *z) {
    float lanes[group][16];
    for (int64_t p = 0; p < block; p++) {
        const float *kp = k + p * dim;
        for (int64_t g = 0; g < group; g++)
            for (int j = 0; j < 16; j++) lanes[g][j] = 0.0f;
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
            for (int64_t g = 0; g < group; g++)
                for (int j = 0; j < 16; j++) lanes[g][j] += q[g * dim + i + j] * kp[i + j];
        for (int64_t g = 0; g < group; g++) {
            float dot = 0.0f;
            for (int j = 0; j < 16; j++) dot += lanes[g][j];
            for (int64_t r = i; r < dim; r++) dot += q[g * dim + r] * kp[r];
            z[g * block + p] = position[p] < 0 ? -INFINITY : scale * dot;
        }
    }
}

/* queries [S, G, d]; keys [N, block, d]; values [N, block, dv]; positions [N, block]; route [N];
 * state: top [S, G] (start -inf), total [S, G] (start 0), acc [S, G, dv] (start 0). Each block's key and value
 * rows are read once for the segment's G queries. */
void accumulate(const float *queries, const float *keys, const float *values, const int32_t *positions,
                const int64_t *route, int64_t blocks, int64_t block, int64_t group, int64_t dim, int64_t value_dim,
                float scale, float *top, float *total, float *acc) {
    float z[group][block];
    for (int64_t n = 0; n < blocks; n++) {
        const int32_t *b = positions + n * block;
        int64_t real = 0;
        for (int64_t p = 0; p < block; p++) real += b[p] >= 0;
        if (!real) continue; /* a free block, or one taken ahead of appends */
        int64_t s = route[n];
        const float *q = queries + s * group * dim, *k = keys + n * block * dim, *v = values + n * block * value_dim;
        switch (group) { /* a constant group size unrolls the queries' loop */
            case 1: scores(q, k, b, block, 1, dim, scale, &z[0][0]); break;
            case 2: scores(q, k, b, block, 2, dim, scale, &z[0][0]); break;
            case 3: scores(q, k, b, block, 3, dim, scale, &z[0][0]); break;
            case 4: scores(q, k, b, block, 4, dim, scale, &z[0][0]); break;
            case 7: scores(q, k, b, block, 7, dim, scale, &z[0][0]); break;
            case 8: scores(q, k, b, block, 8, dim, scale, &z[0][0]); break;
            default: scores(q, k, b, block, group, dim, scale, &z[0][0]);
        }
        for (int64_t g = 0; g < group; g++) { /* the block's weights, each query's running max */
            int64_t row = s * group + g;
            float best = -INFINITY;
            for (int64_t p = 0; p < block; p++) best = z[g][p] > best ? z[g][p] : best;
            float old = top[row], now = best > old ? best : old;
            if (old != now) { /* rescale what the segment gathered so far */
                float c = exp_negative(old - now);  /* old = -inf: 0 */
                float *a = acc + row * value_dim;
                total[row] *= c;
                for (int64_t i = 0; i < value_dim; i++) a[i] *= c;
                top[row] = now;
            }
            float sum = 0.0f;
            for (int64_t p = 0; p < block; p++) {
                z[g][p] = exp_negative(z[g][p] - now);  /* an empty slot: 0 */
                sum += z[g][p];
            }
            total[row] += sum;
        }
        for (int64_t p = 0; p < block; p++) { /* acc_g += w_gp v_p */
            if (b[p] < 0) continue;
            const float *vp = v + p * value_dim;
            for (int64_t g = 0; g < group; g++) {
                float w = z[g][p], *a = acc + (s * group + g) * value_dim;
                for (int64_t i = 0; i < value_dim; i++) a[i] += w * vp[i];
            }
        }
    }
}

/* Start the state of `rows` = S x G queries: top -inf, total and acc 0. */
void start(int64_t rows, int64_t value_dim, float *top, float *total, float *acc) {
    for (int64_t r = 0; r < rows; r++) top[r] = -INFINITY, total[r] = 0.0f;
    memset(acc, 0, sizeof(float) * rows * value_dim);
}

/* out = acc / total, in place. */
void finish(int64_t rows, int64_t value_dim, const float *total, float *acc) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < value_dim; i++) acc[r * value_dim + i] /= total[r];
}
