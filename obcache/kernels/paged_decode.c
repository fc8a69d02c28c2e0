/* Fused CPU kernels of the paged layout (obcache.kernels): one decoding step of attention over a block pool, and
 * the step's append.
 *
 * Attention: for every block n of the pool (any order), its segment s = route[n] and each of the segment's G
 * queries q:
 *   z_p = scale * q . k_np        over the block's slots p holding a token (position >= 0; -1: empty or padding)
 * merged into the segment's running softmax (online, exact in any block order):
 *   M' = max(M, max_p z_p),  L' = L e^(M - M') + sum_p e^(z_p - M'),  A' = A e^(M - M') + sum_p e^(z_p - M') v_np
 * and, once every block set is in, out = A / L. Float32, row-major, contiguous; the state (M, L, A) is the
 * caller's, so several block sets (e.g. one per stored width) accumulate into one softmax.
 *
 * Vectors are GCC/clang vector extensions of 16 floats: the compiler maps them to the machine's registers
 * (one AVX-512, two AVX2, four SSE/NEON), so the source has no intrinsics and builds anywhere.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16
typedef float vec __attribute__((vector_size(4 * LANES)));
typedef float half __attribute__((vector_size(2 * LANES)));
typedef float quarter __attribute__((vector_size(LANES)));
typedef int32_t ivec __attribute__((vector_size(4 * LANES)));
typedef int32_t iquarter __attribute__((vector_size(LANES)));

/* Unaligned loads and stores (memcpy compiles to one move), and the sum of a vector's lanes as a tree. */
static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)  /* __builtin_shufflevector */
static inline float sum_lanes(vec v) {
    half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
           + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* The lane sums of four vectors, [sum a, sum b, sum c, sum d], by a tree of shuffles. */
static inline quarter sum_lanes4(vec a, vec b, vec c, vec d) {
    vec ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
           + __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vec cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
           + __builtin_shufflevector(c, d, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    vec abcd = __builtin_shufflevector(ab, cd, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + __builtin_shufflevector(ab, cd, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    half h = __builtin_shufflevector(abcd, abcd, 0, 1, 4, 5, 8, 9, 12, 13)
           + __builtin_shufflevector(abcd, abcd, 2, 3, 6, 7, 10, 11, 14, 15);
    return __builtin_shufflevector(h, h, 0, 2, 4, 6) + __builtin_shufflevector(h, h, 1, 3, 5, 7);
}
#else  /* older compilers: the same sums lane by lane */
static inline float sum_lanes(vec v) {
    float sum = 0.0f;
    for (int j = 0; j < LANES; j++) sum += v[j];
    return sum;
}
static inline quarter sum_lanes4(vec a, vec b, vec c, vec d) {
    return (quarter){sum_lanes(a), sum_lanes(b), sum_lanes(c), sum_lanes(d)};
}
#endif

/* e^x for x <= 0, on 16 lanes at once (the weights): x = n ln 2 + r, |r| <= ln 2 / 2 (Cody-Waite; n rounded by
 * the 1.5 x 2^23 shift), e^r by Cephes' degree-6 polynomial (relative error ~1e-7, as expf), 2^n from the exponent
 * bits; x below -87 gives 0 (e^-87 ~ 1.6e-38, below what float32 holds at full precision), by lane masks. */
static inline vec exp_negative_lanes(vec x) {
    const vec floor_limit = (vec){0} - 87.0f, shift = (vec){0} + 12582912.0f;
    ivec low = x < floor_limit;  /* -1 where the weight underflows (or x = -inf) */
    vec clamped = (vec)(((ivec)x & ~low) | ((ivec)floor_limit & low));
    vec n = (clamped * 1.44269504088896341f + shift) - shift;
    vec r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vec power = (vec)((__builtin_convertvector(n, ivec) + 127) << 23);
    return (vec)((ivec)(p * power) & ~low);
}

/* The same for one number (a running softmax's rescale factor). */
static inline float exp_negative(float x) { return exp_negative_lanes((vec){0} + x)[0]; }

/* One block of a segment: its slots' scores z [G, block] for the segment's G queries q [G, d], four slots at a
 * time; merged into the G running softmaxes (top, total [G], acc [G, dv]): the weights' exponentials over whole
 * vectors, then acc_g += sum_p w_gp v_p, 64 columns at a time held in registers over the block's value rows. */
static inline __attribute__((always_inline)) void block_step(const float *q, const float *k, const float *v,
        const int32_t *position, int64_t block, int64_t group, int64_t dim, int64_t value_dim, float scale,
        float *top, float *total, float *acc, float *z) {
    int64_t p = 0;
    for (; p + 4 <= block; p += 4) { /* four slots at a time, their four sums reduced together */
        const float *k0 = k + p * dim, *k1 = k0 + dim, *k2 = k1 + dim, *k3 = k2 + dim;
        iquarter empty;
        memcpy(&empty, position + p, sizeof empty);
        empty = empty < 0;
        for (int64_t g = 0; g < group; g++) {
            const float *qg = q + g * dim;
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            int64_t i = 0;
            for (; i + LANES <= dim; i += LANES) {
                vec qv = load(qg + i);
                a0 += qv * load(k0 + i), a1 += qv * load(k1 + i), a2 += qv * load(k2 + i), a3 += qv * load(k3 + i);
            }
            quarter dots = sum_lanes4(a0, a1, a2, a3);
            for (; i < dim; i++)
                dots += (quarter){qg[i] * k0[i], qg[i] * k1[i], qg[i] * k2[i], qg[i] * k3[i]};
            dots *= scale;
            const quarter minus_inf = (quarter){0} - INFINITY;
            dots = (quarter)(((iquarter)dots & ~empty) | ((iquarter)minus_inf & empty));
            memcpy(z + g * block + p, &dots, sizeof dots);
        }
    }
    for (; p < block; p++) /* the rest, one slot at a time */
        for (int64_t g = 0; g < group; g++) {
            const float *qg = q + g * dim, *kp = k + p * dim;
            vec lanes = {0};
            int64_t i = 0;
            for (; i + LANES <= dim; i += LANES) lanes += load(qg + i) * load(kp + i);
            float dot = sum_lanes(lanes);
            for (; i < dim; i++) dot += qg[i] * kp[i];
            z[g * block + p] = position[p] < 0 ? -INFINITY : scale * dot;
        }
    for (int64_t g = 0; g < group; g++) {
        float *zg = z + g * block;
        float best = -INFINITY;
        for (int64_t p = 0; p < block; p++) best = zg[p] > best ? zg[p] : best;
        float old = top[g], now = best > old ? best : old;
        if (old != now) { /* rescale what the segment gathered so far */
            float c = exp_negative(old - now); /* old = -inf: 0 */
            float *a = acc + g * value_dim;
            total[g] *= c;
            for (int64_t i = 0; i < value_dim; i++) a[i] *= c;
            top[g] = now;
        }
        for (int64_t p = 0; p < block; p++) zg[p] -= now;
    }
    for (int64_t j = 0; j < group * block; j += LANES) store(z + j, exp_negative_lanes(load(z + j))); /* empty: 0 */
    for (int64_t g = 0; g < group; g++) {
        float sum = 0.0f;
        for (int64_t p = 0; p < block; p++) sum += z[g * block + p];
        total[g] += sum;
    }
    int64_t i = 0;
    for (; i + 4 * LANES <= value_dim; i += 4 * LANES) { /* 4 lanes-wide columns of every query's sum, in registers */
        vec a[group][4];
        for (int64_t g = 0; g < group; g++)
            for (int c = 0; c < 4; c++) a[g][c] = load(acc + g * value_dim + i + c * LANES);
        for (int64_t p = 0; p < block; p++) {
            const float *vp = v + p * value_dim + i;
            vec v0 = load(vp), v1 = load(vp + LANES), v2 = load(vp + 2 * LANES), v3 = load(vp + 3 * LANES);
            for (int64_t g = 0; g < group; g++) {
                float w = z[g * block + p];
                a[g][0] += w * v0, a[g][1] += w * v1, a[g][2] += w * v2, a[g][3] += w * v3;
            }
        }
        for (int64_t g = 0; g < group; g++)
            for (int c = 0; c < 4; c++) store(acc + g * value_dim + i + c * LANES, a[g][c]);
    }
    for (; i + LANES <= value_dim; i += LANES)
        for (int64_t g = 0; g < group; g++) {
            const float *zg = z + g * block;
            vec a = load(acc + g * value_dim + i);
            for (int64_t p = 0; p < block; p++) a += zg[p] * load(v + p * value_dim + i);
            store(acc + g * value_dim + i, a);
        }
    for (; i < value_dim; i++)
        for (int64_t g = 0; g < group; g++)
            for (int64_t p = 0; p < block; p++) acc[g * value_dim + i] += z[g * block + p] * v[p * value_dim + i];
}

/* queries [S, G, d]; keys [N, block, d]; values [N, block, dv]; positions [N, block]; route [N];
 * state: top [S, G] (start -inf), total [S, G] (start 0), acc [S, G, dv] (start 0). */
void accumulate(const float *queries, const float *keys, const float *values, const int32_t *positions,
                const int64_t *route, int64_t blocks, int64_t block, int64_t group, int64_t dim, int64_t value_dim,
                float scale, float *top, float *total, float *acc) {
    float z[group * block + LANES]; /* exp runs over whole vectors: the tail's lanes are spare */
    memset(z, 0, sizeof z);
    for (int64_t n = 0; n < blocks; n++) {
        const int32_t *b = positions + n * block;
        int64_t real = 0;
        for (int64_t p = 0; p < block; p++) real += b[p] >= 0;
        if (!real) continue; /* a free block, or one taken ahead of appends */
        int64_t s = route[n];
        const float *q = queries + s * group * dim, *k = keys + n * block * dim, *v = values + n * block * value_dim;
        float *t = top + s * group, *l = total + s * group, *a = acc + s * group * value_dim;
        switch (group) { /* a constant group size unrolls the queries' loops */
            case 1: block_step(q, k, v, b, block, 1, dim, value_dim, scale, t, l, a, z); break;
            case 2: block_step(q, k, v, b, block, 2, dim, value_dim, scale, t, l, a, z); break;
            case 3: block_step(q, k, v, b, block, 3, dim, value_dim, scale, t, l, a, z); break;
            case 4: block_step(q, k, v, b, block, 4, dim, value_dim, scale, t, l, a, z); break;
            case 7: block_step(q, k, v, b, block, 7, dim, value_dim, scale, t, l, a, z); break;
            case 8: block_step(q, k, v, b, block, 8, dim, value_dim, scale, t, l, a, z); break;
            default: block_step(q, k, v, b, block, group, dim, value_dim, scale, t, l, a, z);
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

/* A pool of one block set over `segments` segments: start, accumulate and finish in one call; out [S, G, dv]. */
void decode(const float *queries, const float *keys, const float *values, const int32_t *positions,
            const int64_t *route, int64_t segments, int64_t blocks, int64_t block, int64_t group, int64_t dim,
            int64_t value_dim, float scale, float *out) {
    int64_t rows = segments * group;
    float *top = malloc(sizeof(float) * 2 * rows), *total = top + rows;
    start(rows, value_dim, top, total, out);
    accumulate(queries, keys, values, positions, route, blocks, block, group, dim, value_dim, scale, top, total, out);
    finish(rows, value_dim, total, out);
    free(top);
}

/* A decoding step's append: segment s (row s / heads) writes its new key and value rows [S, d] into pool slot
 * slots[s] (of keys [N x block, d], values, positions), at the row's position (row stride `position_stride`:
 * 0 when every row is at the same one), and its length grows by one. */
void append(float *keys, float *values, int32_t *positions, int64_t *lengths, const int64_t *slots,
            const float *new_keys, const float *new_values, const int32_t *new_positions, int64_t position_stride,
            int64_t segments, int64_t heads, int64_t dim, int64_t value_dim) {
    for (int64_t s = 0; s < segments; s++) {
        int64_t slot = slots[s];
        memcpy(keys + slot * dim, new_keys + s * dim, sizeof(float) * dim);
        memcpy(values + slot * value_dim, new_values + s * value_dim, sizeof(float) * value_dim);
        positions[slot] = new_positions[(s / heads) * position_stride];
        lengths[s] += 1;
    }
}

/* Plan a paged pool's next `steps` appends: for every step t and segment s, the pool slot of the segment's slot
 * lengths[s] + t, written to slots [steps, S]; a block the segment lacks (table [S, width], -1 past its last) is
 * popped from the free ids [free_count] (owner and route [N] set to s). Returns the free ids left, or, when they
 * are too few, -(how many it needs) with nothing changed: the caller grows the pool and plans again. */
int64_t plan(int64_t *table, int64_t width, int64_t *owner, int64_t *route, const int64_t *free_ids,
             int64_t free_count, const int64_t *lengths, int64_t segments, int64_t block, int64_t steps,
             int64_t *slots) {
    int64_t needed = 0;
    for (int64_t s = 0; s < segments; s++)
        for (int64_t column = lengths[s] / block; column <= (lengths[s] + steps - 1) / block; column++)
            needed += table[s * width + column] < 0;
    if (needed > free_count) return -needed;
    for (int64_t s = 0; s < segments; s++)
        for (int64_t t = 0; t < steps; t++) {
            int64_t slot = lengths[s] + t, *cell = table + s * width + slot / block;
            if (*cell < 0) {
                int64_t id = free_ids[--free_count];
                *cell = id, owner[id] = s, route[id] = s;
            }
            slots[t * segments + s] = *cell * block + slot % block;
        }
    return free_count;
}
