/* NF4 kernels for the CPU: dequantize into a buffer, and a matrix-vector product straight from the 4-bit codes.
 *
 * Compiled on first use by lorakit.quant.native (the machine's C compiler, -O3 -march=native, OpenMP where the
 * compiler has it) and called through ctypes; torch ops are the fallback wherever this does not build.
 *
 * Layout (lorakit.quant.nf4, bitsandbytes' own): a row-major weight cut into blocks of `bs` values, two 4-bit
 * level indices per byte (the first value in the high nibble), one fp32 scale (absmax) per block.
 *
 * Dequantization is exact: each value is the fp32 product level * absmax, as torch computes it, and the bfloat16
 * output rounds that product to nearest even, as torch's float32 -> bfloat16 cast does for finite values.
 * With AVX-512 the 16 levels sit in one register and `vpermps` looks 16 indices up at once.
 */
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LK_AVX512 1
#else
#define LK_AVX512 0
#endif
#if LK_AVX512 && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LK_VNNI 1
#else
#define LK_VNNI 0
#endif
#if !LK_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define LK_AVX2 1 /* AVX2 paths where there is no AVX-512 (most CPUs without it) */
#else
#define LK_AVX2 0
#endif
#if !LK_VNNI && defined(__AVX2__) && defined(__FMA__)
#define LK_AVX2_Q8 1 /* the int8 route with AVX2 alone */
#else
#define LK_AVX2_Q8 0
#endif
#if LK_AVX2 || LK_AVX2_Q8
#include <immintrin.h>
#endif
#include <stdlib.h>

static const float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

int lk_nf4_simd(void) { return LK_AVX512 ? 512 : LK_AVX2 ? 256 : 0; }
int lk_nf4_vnni(void) { return LK_VNNI; }
int lk_nf4_q8(void) { return LK_VNNI || LK_AVX2_Q8; }

/* A layer's block scales: absmax[b], or with double quantization (dq != NULL) dynamic[dq[b]] * nested_scale[b /
 * nested] + offset, two separately rounded fp32 operations as in torch (the build turns off FMA contraction). */
typedef struct {
    const float *absmax;
    const uint8_t *dq;
    const float *dynamic, *nested_scale;
    int64_t nested;
    float offset;
} Scales;

/* The scales of blocks [b0, b0 + n) into out: no division per block (an integer division costs more than the
 * 64 multiply-adds of a block); with AVX-512, 16 blocks at a time (a gather from the 256-entry dynamic map). */
static void block_scales(const Scales *sc, int64_t b0, int64_t n, float *out) {
    if (!sc->dq) {
        for (int64_t i = 0; i < n; i++) out[i] = sc->absmax[b0 + i];
        return;
    }
    int64_t i = 0;
#if LK_AVX512
    const __m512 off = _mm512_set1_ps(sc->offset);
    for (; i + 16 <= n; i += 16) {
        const int64_t b = b0 + i, g = b / sc->nested;
        if (g != (b + 15) / sc->nested) break; /* a nested group ends inside these 16: the loop below */
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(sc->dq + b)));
        const __m512 d = _mm512_i32gather_ps(idx, sc->dynamic, 4);
        _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(d, _mm512_set1_ps(sc->nested_scale[g])), off));
    }
#endif
    int64_t g = (b0 + i) / sc->nested, k = (b0 + i) % sc->nested;
    for (; i < n; i++) {
        const float v = sc->dynamic[sc->dq[b0 + i]] * sc->nested_scale[g];
        out[i] = v + sc->offset;
        if (++k == sc->nested) k = 0, g++;
    }
}

static inline uint16_t bf16_rne(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* out[i] = v, as fp32 or (bf16 != 0) as bfloat16 rounded to nearest even (a NaN as torch's quiet NaN). */
static inline void store(void *out, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)out)[i] = v != v ? 0x7fc0 : bf16_rne(v);
    else
        ((float *)out)[i] = v;
}

#if LK_AVX512
static inline __m256i bf16_rne16(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* The 32 levels of 16 code bytes, in weight order: (lo16, hi16) = weights 0..15, 16..31. */
static inline void levels32(const uint8_t *c, __m512 lut, __m512 *w0, __m512 *w1) {
    const __m512i i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), lut);
    *w0 = _mm512_permutex2var_ps(hi, i0, lo);
    *w1 = _mm512_permutex2var_ps(hi, i1, lo);
}
#endif

#if LK_AVX2 || LK_AVX2_Q8
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#if LK_AVX2
/* The levels of 8 indices (0..15, one per int32 lane): AVX2 permutes 8 floats at a time, so both halves of the
 * table are looked up and bit 3 of the index (moved to the sign bit) picks between them. */
static inline __m256 lookup8(__m256i idx, __m256 lut_lo, __m256 lut_hi) {
    const __m256 a = _mm256_permutevar8x32_ps(lut_lo, idx), b = _mm256_permutevar8x32_ps(lut_hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* The 16 levels of 8 code bytes, in weight order: w0 = weights 0..7, w1 = 8..15 (high nibble first). */
static inline void levels16(const uint8_t *c, __m256 lut_lo, __m256 lut_hi, __m256 *w0, __m256 *w1) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c));
    const __m256 hi = lookup8(_mm256_srli_epi32(v, 4), lut_lo, lut_hi);
    const __m256 lo = lookup8(_mm256_and_si256(v, _mm256_set1_epi32(15)), lut_lo, lut_hi);
    const __m256 a = _mm256_unpacklo_ps(hi, lo), b = _mm256_unpackhi_ps(hi, lo); /* h0 l0 h1 l1 | h4 l4 h5 l5 */
    *w0 = _mm256_permute2f128_ps(a, b, 0x20);
    *w1 = _mm256_permute2f128_ps(a, b, 0x31);
}

/* 8 floats to bfloat16 bits, rounded to nearest even (as bf16_rne). */
static inline __m128i bf16_rne8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif

/* Blocks [first, first + n) of a layer (codes and scales indexed from the layer's first block) into out, one
 * value per weight: fp32 if bf16 == 0, else bfloat16 bits. Single-threaded; callers split the work. */
static void dequant_blocks(const uint8_t *codes, const Scales *sc, int64_t first, int64_t n, int64_t bs, void *out,
                           int bf16) {
    float scale[256];
    for (int64_t done = 0; done < n; done += 256) {
        const int64_t m = n - done < 256 ? n - done : 256;
        block_scales(sc, first + done, m, scale);
        for (int64_t i = done; i < done + m; i++) {
            const int64_t b = first + i;
            const uint8_t *c = codes + b * (bs / 2);
            const float s = scale[i - done];
            int64_t j = 0;
#if LK_AVX512
            const __m512 lut = _mm512_loadu_ps(NF4);
            const __m512 sv = _mm512_set1_ps(s);
            for (; j + 16 <= bs / 2; j += 16) {
                __m512 w0, w1;
                levels32(c + j, lut, &w0, &w1);
                w0 = _mm512_mul_ps(w0, sv);
                w1 = _mm512_mul_ps(w1, sv);
                if (bf16) {
                    uint16_t *o = (uint16_t *)out + i * bs + 2 * j;
                    _mm256_storeu_si256((__m256i *)o, bf16_rne16(w0));
                    _mm256_storeu_si256((__m256i *)(o + 16), bf16_rne16(w1));
                } else {
                    float *o = (float *)out + i * bs + 2 * j;
                    _mm512_storeu_ps(o, w0);
                    _mm512_storeu_ps(o + 16, w1);
                }
            }
#elif LK_AVX2
            const __m256 lut_lo = _mm256_loadu_ps(NF4), lut_hi = _mm256_loadu_ps(NF4 + 8);
            const __m256 sv = _mm256_set1_ps(s);
            for (; j + 8 <= bs / 2; j += 8) {
                __m256 w0, w1;
                levels16(c + j, lut_lo, lut_hi, &w0, &w1);
                w0 = _mm256_mul_ps(w0, sv);
                w1 = _mm256_mul_ps(w1, sv);
                if (bf16) {
                    uint16_t *o = (uint16_t *)out + i * bs + 2 * j;
                    _mm_storeu_si128((__m128i *)o, bf16_rne8(w0));
                    _mm_storeu_si128((__m128i *)(o + 8), bf16_rne8(w1));
                } else {
                    float *o = (float *)out + i * bs + 2 * j;
                    _mm256_storeu_ps(o, w0);
                    _mm256_storeu_ps(o + 8, w1);
                }
            }
#endif
            for (; j < bs / 2; j++) {
                const float a = NF4[c[j] >> 4] * s, z = NF4[c[j] & 15] * s;
                if (bf16) {
                    uint16_t *o = (uint16_t *)out + i * bs + 2 * j;
                    o[0] = bf16_rne(a);
                    o[1] = bf16_rne(z);
                } else {
                    float *o = (float *)out + i * bs + 2 * j;
                    o[0] = a;
                    o[1] = z;
                }
            }
        }
    }
}

/* The level * absmax values of blocks [b_first, b_first + n_blocks) of a layer into out (contiguous). */
void lk_nf4_dequant(const uint8_t *codes, const Scales *sc, int64_t b_first, int64_t n_blocks, int64_t bs,
                    void *out, int bf16, int threads) {
    const int64_t chunks = (n_blocks + 255) / 256, size = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        const int64_t n = n_blocks - ch * 256 < 256 ? n_blocks - ch * 256 : 256;
        dequant_blocks(codes, sc, b_first + ch * 256, n, bs, (char *)out + ch * 256 * bs * size, bf16);
    }
}

/* Quantize w (n_blocks * bs fp32 values) as quantize_4bit does in torch: per block absmax = max |w|,
 * v = clamp(w * (1 / max(absmax, 1e-38)), -1, 1), index = the number of level midpoints strictly below v
 * (a value on a midpoint goes to the lower level); two indices a byte, the first in the high nibble. */
void lk_nf4_quant(const float *w, int64_t n_blocks, int64_t bs, uint8_t *codes, float *absmax, int threads) {
    float mid[15];
    for (int i = 0; i < 15; i++) mid[i] = (NF4[i] + NF4[i + 1]) / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *x = w + b * bs;
        float m = 0.0f;
        for (int64_t j = 0; j < bs; j++) {
            const float a = x[j] < 0 ? -x[j] : x[j];
            m = a > m ? a : m;
        }
        absmax[b] = m;
        const float inv = 1.0f / (m > 1e-38f ? m : 1e-38f);
        int64_t j = 0;
#if LK_AVX512
        const __m512 iv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
        for (; j + 16 <= bs; j += 16) {
            __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), iv), lo), hi);
            __m512i idx = _mm512_setzero_si512();
            for (int i = 0; i < 15; i++) {
                __mmask16 below = _mm512_cmp_ps_mask(_mm512_set1_ps(mid[i]), v, _CMP_LT_OQ);
                idx = _mm512_mask_add_epi32(idx, below, idx, _mm512_set1_epi32(1));
            }
            int32_t lane[16];
            _mm512_storeu_si512((void *)lane, idx);
            for (int k = 0; k < 8; k++) codes[(b * bs + j) / 2 + k] = (uint8_t)((lane[2 * k] << 4) | lane[2 * k + 1]);
        }
#endif
        for (; j < bs; j += 2) {
            uint8_t pair = 0;
            for (int k = 0; k < 2; k++) {
                float v = x[j + k] * inv;
                v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
                int idx = 0;
                for (int i = 0; i < 15; i++) idx += mid[i] < v;
                pair = (uint8_t)((pair << 4) | idx);
            }
            codes[(b * bs + j) / 2] = pair;
        }
    }
}

/* absmax (n fp32) = dynamic[code] * scale[i / nested] + offset: the per-block constants of a double-quantized
 * weight, as two separately rounded fp32 operations (the build turns off FMA contraction). */
void lk_dq8(const uint8_t *codes, int64_t n, const float *dynamic, const float *scale, int64_t nested,
            float offset, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const float v = dynamic[codes[i]] * scale[i / nested];
        out[i] = v + offset;
    }
}

/* Runs CALL with T_ a compile-time constant equal to T (1..8), so that the row functions, inlined, unroll their
 * loops over the inputs and keep the accumulators in registers. */
#define WITH_CONSTANT_T(T, CALL)                                                                                  \
    switch (T) {                                                                                                   \
    case 1: { enum { T_ = 1 }; CALL; } break;                                                                      \
    case 2: { enum { T_ = 2 }; CALL; } break;                                                                      \
    case 3: { enum { T_ = 3 }; CALL; } break;                                                                      \
    case 4: { enum { T_ = 4 }; CALL; } break;                                                                      \
    case 5: { enum { T_ = 5 }; CALL; } break;                                                                      \
    case 6: { enum { T_ = 6 }; CALL; } break;                                                                      \
    case 7: { enum { T_ = 7 }; CALL; } break;                                                                      \
    default: { enum { T_ = 8 }; CALL; } break;                                                                     \
    }

/* How far ahead of the product (in code bytes) the codes are prefetched. A 7B model's 3.3 GB of codes stream
 * from memory once per decoded token, and the hardware prefetcher alone kept two cores at about 11 GB/s; 4 kB
 * ahead (one to three rows, measured against 1, 2, 6 and 8 kB with a C harness that cycles through more codes
 * than the L3 holds, on AVX-512) took them to 14 (fp32 route) and 16-22 GB/s (int8 route). Prefetches past the
 * end are harmless: prefetching never faults. */
#define PREFETCH 4096

#if LK_AVX512

/* One row of the product for T inputs (T a constant after inlining, so the accumulators live in registers):
 * a block of 64 weights is two loads of 16 code bytes; the levels times the inputs are summed over the block
 * first and scaled once, and two accumulators per input alternate between blocks to hide the FMA latency. */
static inline __attribute__((always_inline)) void row_dot(const uint8_t *c, const float *srow, int64_t per_row,
                                                          int64_t half, const float *xe, const float *xo,
                                                          const int T, float *total) {
    const __m512 lut = _mm512_loadu_ps(NF4);
    const __m512i m15 = _mm512_set1_epi32(15);
    __m512 acc0[8], acc1[8];
    for (int t = 0; t < T; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < per_row; b++) {
        const int64_t k = b * 32;
        _mm_prefetch((const char *)(c + k + PREFETCH), _MM_HINT_T0);
        __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + k)));
        __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + k + 16)));
        __m512 h0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), lut);
        __m512 l0 = _mm512_permutexvar_ps(_mm512_and_si512(v0, m15), lut);
        __m512 h1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), lut);
        __m512 l1 = _mm512_permutexvar_ps(_mm512_and_si512(v1, m15), lut);
        const __m512 sv = _mm512_set1_ps(srow[b]);
        for (int t = 0; t < T; t++) {
            const float *e = xe + t * half + k, *o = xo + t * half + k;
            __m512 p = _mm512_mul_ps(h0, _mm512_loadu_ps(e));
            p = _mm512_fmadd_ps(l0, _mm512_loadu_ps(o), p);
            p = _mm512_fmadd_ps(h1, _mm512_loadu_ps(e + 16), p);
            p = _mm512_fmadd_ps(l1, _mm512_loadu_ps(o + 16), p);
            if (b & 1)
                acc1[t] = _mm512_fmadd_ps(p, sv, acc1[t]);
            else
                acc0[t] = _mm512_fmadd_ps(p, sv, acc0[t]);
        }
    }
    for (int t = 0; t < T; t++) total[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
}
#endif

#if LK_AVX2
/* row_dot with AVX2: a block of 64 weights is four loads of 8 code bytes; per input, the levels times the even
 * and odd columns are summed over the block first and scaled once, as with AVX-512. */
static inline __attribute__((always_inline)) void row_dot_avx2_fp32(const uint8_t *c, const float *srow,
                                                                    int64_t per_row, int64_t half, const float *xe,
                                                                    const float *xo, const int T, float *total) {
    const __m256 lut_lo = _mm256_loadu_ps(NF4), lut_hi = _mm256_loadu_ps(NF4 + 8);
    const __m256i m15 = _mm256_set1_epi32(15);
    __m256 acc0[8], acc1[8];
    for (int t = 0; t < T; t++) acc0[t] = acc1[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < per_row; b++) {
        const int64_t k = b * 32;
        _mm_prefetch((const char *)(c + k + PREFETCH), _MM_HINT_T0);
        __m256 p[8];
        for (int t = 0; t < T; t++) p[t] = _mm256_setzero_ps();
        for (int j = 0; j < 32; j += 8) {
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + k + j)));
            const __m256 h = lookup8(_mm256_srli_epi32(v, 4), lut_lo, lut_hi);
            const __m256 l = lookup8(_mm256_and_si256(v, m15), lut_lo, lut_hi);
            for (int t = 0; t < T; t++) {
                p[t] = _mm256_fmadd_ps(h, _mm256_loadu_ps(xe + t * half + k + j), p[t]);
                p[t] = _mm256_fmadd_ps(l, _mm256_loadu_ps(xo + t * half + k + j), p[t]);
            }
        }
        const __m256 sv = _mm256_set1_ps(srow[b]);
        for (int t = 0; t < T; t++) {
            if (b & 1)
                acc1[t] = _mm256_fmadd_ps(p[t], sv, acc1[t]);
            else
                acc0[t] = _mm256_fmadd_ps(p[t], sv, acc0[t]);
        }
    }
    for (int t = 0; t < T; t++) total[t] = hsum256(_mm256_add_ps(acc0[t], acc1[t]));
}
#endif

#if LK_VNNI
/* The int8 route for decoding (llama.cpp's, for IQ4_NL and Q8 activations): each level as an unsigned byte,
 * u = round(127 * level) + 127 (0..254; the rounding moves a level by at most 0.004 of its block's absmax, an
 * order below NF4's own step), and each input row cut into the weight's blocks of 64 columns and rounded to
 * int8 against the block's absmax. `vpdpbusd` then multiplies 64 byte pairs an instruction, and the +127 offset
 * comes off once per block as 127 * (the block's sum of input bytes). That is a third of the fp32 route's work a
 * weight, and decoding is left bound by memory again. */
static const uint8_t U8LEVELS[16] = {0, 39, 60, 77, 91, 104, 115, 127, 137, 147, 158, 170, 183, 198, 219, 254};

/* One input row's blocks to int8: q = round(x * 127 / absmax) (to nearest even), scale = absmax / 127² (the
 * level's 1/127 folded in), sum = the sum of the block's q times 127. Returns 0 where the row holds a NaN or an
 * infinity, which int8 cannot carry (the caller takes the fp32 route, which passes them on as a matmul would). */
static int q8_row(const float *xe, const float *xo, int64_t per_row, int8_t *qe, int8_t *qo, float *scale,
                  float *sum127) {
    const __m512 sign = _mm512_set1_ps(-0.0f), big = _mm512_set1_ps(3.4028234663852886e38f);
    for (int64_t b = 0; b < per_row; b++) {
        const float *e = xe + b * 32, *o = xo + b * 32;
        __m512 v[4] = {_mm512_loadu_ps(e), _mm512_loadu_ps(e + 16), _mm512_loadu_ps(o), _mm512_loadu_ps(o + 16)};
        __mmask16 bad = 0;
        __m512 m = _mm512_setzero_ps();
        for (int i = 0; i < 4; i++) {
            const __m512 a = _mm512_andnot_ps(sign, v[i]);
            bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ); /* NaN (unordered) or above the largest float */
            m = _mm512_max_ps(m, a);
        }
        if (bad) return 0;
        const float amax = _mm512_reduce_max_ps(m);
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        __m512i total = _mm512_setzero_si512();
        for (int i = 0; i < 4; i++) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv));
            total = _mm512_add_epi32(total, q);
            _mm_storeu_si128((__m128i *)((i < 2 ? qe + b * 32 : qo + b * 32) + 16 * (i & 1)),
                             _mm512_cvtsepi32_epi8(q));
        }
        scale[b] = amax / (127.0f * 127.0f);
        sum127[b] = 127.0f * (float)_mm512_reduce_add_epi32(total);
    }
    return 1;
}

/* One row's product for T inputs: 64 code bytes (two blocks) a step; lanes 0-7 of the int32 sums belong to the
 * first block, 8-15 to the second, and each is scaled by its block's weight scale times input scale (comb). */
static inline __attribute__((always_inline)) void row_dot_q8(const uint8_t *c, const float *comb,
                                                             int64_t per_row, int64_t half, const int8_t *qe,
                                                             const int8_t *qo, const int T, float *total) {
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)U8LEVELS));
    const __m512i m15 = _mm512_set1_epi8(15);
    __m512 acc0[8], acc1[8];
    for (int t = 0; t < T; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= per_row; b += 2) {
        _mm_prefetch((const char *)(c + b * 32 + PREFETCH), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512((const void *)(c + b * 32));
        const __m512i uh = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), m15));
        const __m512i ul = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, m15));
        for (int t = 0; t < T; t++) {
            const int64_t at = t * half + b * 32;
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uh, _mm512_loadu_si512((const void *)(qe + at)));
            d = _mm512_dpbusd_epi32(d, ul, _mm512_loadu_si512((const void *)(qo + at)));
            const float *s = comb + t * per_row + b;
            const __m512 sv = _mm512_mask_broadcastss_ps(_mm512_set1_ps(s[0]), 0xff00, _mm_load_ss(s + 1));
            if (b & 2)
                acc1[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc1[t]);
            else
                acc0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc0[t]);
        }
    }
    if (b < per_row) { /* an odd last block: the upper half of every operand masked to zero */
        const __m512i v = _mm512_maskz_loadu_epi8(0xffffffffull, (const void *)(c + b * 32));
        const __m512i uh = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(v, 4), m15));
        const __m512i ul = _mm512_shuffle_epi8(lut, _mm512_and_si512(v, m15));
        for (int t = 0; t < T; t++) {
            const int64_t at = t * half + b * 32;
            __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), uh,
                                            _mm512_maskz_loadu_epi8(0xffffffffull, (const void *)(qe + at)));
            d = _mm512_dpbusd_epi32(d, ul, _mm512_maskz_loadu_epi8(0xffffffffull, (const void *)(qo + at)));
            const __m512 sv = _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(comb[t * per_row + b]));
            acc0[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc0[t]);
        }
    }
    for (int t = 0; t < T; t++) total[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
}

/* The int8 route of lk_nf4_gemv (block size 64); returns 0 where it could not allocate or an input is not finite
 * (the caller then takes the fp32 route). */
static int gemv_q8(const uint8_t *codes, const Scales *sc, int64_t rows, int64_t cols, const float *xe,
                   const float *xo, int64_t T, void *y, int bf16, int threads) {
    const int64_t half = cols / 2, per_row = cols / 64;
    int8_t *q = malloc((size_t)(2 * T * half));
    float *f = malloc(sizeof(float) * (size_t)(2 * T * per_row));
    if (!q || !f) {
        free(q);
        free(f);
        return 0;
    }
    int8_t *qe = q, *qo = q + T * half;
    float *xs = f, *xk = f + T * per_row;
    for (int64_t t = 0; t < T; t++)
        if (!q8_row(xe + t * half, xo + t * half, per_row, qe + t * half, qo + t * half, xs + t * per_row,
                    xk + t * per_row)) {
            free(q);
            free(f);
            return 0;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float srow[per_row], comb[8 * per_row], total[8] = {0}, corr[8] = {0};
        block_scales(sc, r * per_row, per_row, srow);
        for (int64_t t = 0; t < T; t++) { /* comb = weight scale * input scale, corr = sum of comb * 127 sum q */
            __m512 cs = _mm512_setzero_ps();
            for (int64_t b = 0; b < per_row; b += 16) {
                const __mmask16 m = per_row - b >= 16 ? 0xffff : (__mmask16)((1u << (per_row - b)) - 1);
                const __m512 cb = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, srow + b),
                                                _mm512_maskz_loadu_ps(m, xs + t * per_row + b));
                _mm512_mask_storeu_ps(comb + t * per_row + b, m, cb);
                cs = _mm512_fmadd_ps(cb, _mm512_maskz_loadu_ps(m, xk + t * per_row + b), cs);
            }
            corr[t] = _mm512_reduce_add_ps(cs);
        }
        const uint8_t *c = codes + r * half;
        WITH_CONSTANT_T(T, row_dot_q8(c, comb, per_row, half, qe, qo, T_, total));
        for (int64_t t = 0; t < T; t++) store(y, t * rows + r, total[t] - corr[t], bf16);
    }
    free(q);
    free(f);
    return 1;
}
#endif

#if LK_AVX2_Q8
/* The int8 route with AVX2 alone. AVX2 has no `vpdpbusd`, and its `vpmaddubsw` (unsigned byte times signed byte,
 * adjacent pairs summed into int16, saturating) would saturate on the VNNI route's unsigned levels (254 * 127 * 2
 * > 32767). So the levels are signed here, s = round(127 * level) (-127..127, the VNNI route's u - 127), and
 * llama.cpp's trick takes their signs off: |s| times (q with s's sign) is s * q, each pair at most 2 * 127 * 127
 * = 32258, which int16 holds. The integer sum of a block is then exactly the VNNI route's sum minus its offset,
 * and there is no offset to take off. */
static const int8_t S8LEVELS[16] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};

/* One input row's blocks to int8, as the VNNI route's q8_row rounds them (x * (127 / absmax), to nearest even),
 * with scale = absmax / 127² per block; 0 where the row holds a NaN or an infinity. */
static int q8_row_avx2(const float *xe, const float *xo, int64_t per_row, int8_t *qe, int8_t *qo, float *scale) {
    for (int64_t b = 0; b < per_row; b++) {
        const float *e = xe + b * 32, *o = xo + b * 32;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            const float a = e[i] < 0.0f ? -e[i] : e[i], c = o[i] < 0.0f ? -o[i] : o[i];
            if (!(a <= 3.4028234663852886e38f) || !(c <= 3.4028234663852886e38f)) return 0; /* NaN, infinity */
            amax = a > amax ? a : amax;
            amax = c > amax ? c : amax;
        }
        const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int i = 0; i < 32; i++) {
            int qa = _mm_cvtss_si32(_mm_set_ss(e[i] * inv)), qb = _mm_cvtss_si32(_mm_set_ss(o[i] * inv));
            qe[b * 32 + i] = (int8_t)(qa > 127 ? 127 : qa < -127 ? -127 : qa);
            qo[b * 32 + i] = (int8_t)(qb > 127 ? 127 : qb < -127 ? -127 : qb);
        }
        scale[b] = amax / (127.0f * 127.0f);
    }
    return 1;
}

/* One row's product for T inputs: one block (32 code bytes, 64 weights) a step; the even columns' levels sit in
 * the high nibbles, the odd columns' in the low ones. Two accumulators per input alternate between blocks. */
static inline __attribute__((always_inline)) void row_dot_avx2(const uint8_t *c, const float *comb,
                                                               int64_t per_row, int64_t half, const int8_t *qe,
                                                               const int8_t *qo, const int T, float *total) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)S8LEVELS));
    const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 acc0[8], acc1[8];
    for (int t = 0; t < T; t++) acc0[t] = acc1[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < per_row; b++) {
        _mm_prefetch((const char *)(c + b * 32 + PREFETCH), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(c + b * 32));
        const __m256i sh = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), m15));
        const __m256i sl = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, m15));
        const __m256i ah = _mm256_sign_epi8(sh, sh), al = _mm256_sign_epi8(sl, sl);
        for (int t = 0; t < T; t++) {
            const int64_t at = t * half + b * 32;
            const __m256i xh = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(qe + at)), sh);
            const __m256i xl = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(qo + at)), sl);
            const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ah, xh), ones),
                                               _mm256_madd_epi16(_mm256_maddubs_epi16(al, xl), ones));
            const __m256 sv = _mm256_set1_ps(comb[t * per_row + b]);
            if (b & 1)
                acc1[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sv, acc1[t]);
            else
                acc0[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), sv, acc0[t]);
        }
    }
    for (int t = 0; t < T; t++) total[t] = hsum256(_mm256_add_ps(acc0[t], acc1[t]));
}

/* The AVX2 int8 route of lk_nf4_gemv (block size 64); 0 where it could not allocate or an input is not finite. */
static int gemv_q8_avx2(const uint8_t *codes, const Scales *sc, int64_t rows, int64_t cols, const float *xe,
                        const float *xo, int64_t T, void *y, int bf16, int threads) {
    const int64_t half = cols / 2, per_row = cols / 64;
    int8_t *q = malloc((size_t)(2 * T * half));
    float *xs = malloc(sizeof(float) * (size_t)(T * per_row));
    if (!q || !xs) {
        free(q);
        free(xs);
        return 0;
    }
    int8_t *qe = q, *qo = q + T * half;
    for (int64_t t = 0; t < T; t++)
        if (!q8_row_avx2(xe + t * half, xo + t * half, per_row, qe + t * half, qo + t * half, xs + t * per_row)) {
            free(q);
            free(xs);
            return 0;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float srow[per_row], comb[8 * per_row], total[8] = {0};
        block_scales(sc, r * per_row, per_row, srow);
        for (int64_t t = 0; t < T; t++) /* weight scale times input scale, per block */
            for (int64_t b = 0; b < per_row; b++) comb[t * per_row + b] = srow[b] * xs[t * per_row + b];
        WITH_CONSTANT_T(T, row_dot_avx2(codes + r * half, comb, per_row, half, qe, qo, T_, total));
        for (int64_t t = 0; t < T; t++) store(y, t * rows + r, total[t], bf16);
    }
    free(q);
    free(xs);
    return 1;
}
#endif

/* The fp32 route: y (T x rows) = x · dequant(W)ᵀ from the even and odd columns of x (xe, xo: T x cols/2). */
static void gemv_fp32(const uint8_t *codes, const Scales *sc, int64_t rows, int64_t cols, int64_t bs,
                      const float *xe, const float *xo, int64_t T, void *y, int bf16, int threads) {
    const int64_t half = cols / 2, per_row = cols / bs;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = codes + r * half;
        float srow[per_row];
        block_scales(sc, r * per_row, per_row, srow);
        float total[8] = {0};
        int64_t j = 0;
#if LK_AVX512
        if (bs == 64) {
            WITH_CONSTANT_T(T, row_dot(c, srow, per_row, half, xe, xo, T_, total));
            j = half;
        }
#elif LK_AVX2
        if (bs == 64) {
            WITH_CONSTANT_T(T, row_dot_avx2_fp32(c, srow, per_row, half, xe, xo, T_, total));
            j = half;
        }
#endif
        for (int64_t b = j / (bs / 2); b < per_row; b++) {
            float part[8] = {0};
            for (int64_t k = b * (bs / 2); k < (b + 1) * (bs / 2); k++) {
                const float hi = NF4[c[k] >> 4], lo = NF4[c[k] & 15];
                for (int64_t t = 0; t < T; t++) part[t] += hi * xe[t * half + k] + lo * xo[t * half + k];
            }
            const float sb = srow[b];
            for (int64_t t = 0; t < T; t++) total[t] += part[t] * sb;
        }
        for (int64_t t = 0; t < T; t++) store(y, t * rows + r, total[t], bf16);
    }
}

/* y (T x rows) = x · dequant(W)ᵀ for a weight of `rows` x `cols` (cols a multiple of bs), without ever writing
 * the weight out: each row's codes are read once and multiplied into all T <= 8 inputs. x (T x cols) and y are
 * fp32, or both bfloat16 (bf16 != 0; y rounded to nearest even, as torch casts). x is first split into its even
 * and odd columns, the order the two nibbles of a byte hold. With q8 != 0, block size 64 and VNNI (or AVX2),
 * the int8 route; else fp32 throughout. Returns 0 where it could not allocate (nothing written). */
int lk_nf4_gemv(const uint8_t *codes, const Scales *sc, int64_t rows, int64_t cols, int64_t bs, const void *x,
                int64_t T, void *y, int bf16, int threads, int q8) {
    const int64_t half = cols / 2;
    float *xe = malloc(sizeof(float) * (size_t)(2 * T * half));
    if (!xe) return 0;
    float *xo = xe + T * half;
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < half; k++) {
            const int64_t i = t * cols + 2 * k;
            if (bf16) {
                const uint16_t *h = (const uint16_t *)x;
                union { uint32_t u; float f; } e = {(uint32_t)h[i] << 16}, o = {(uint32_t)h[i + 1] << 16};
                xe[t * half + k] = e.f, xo[t * half + k] = o.f;
            } else {
                xe[t * half + k] = ((const float *)x)[i], xo[t * half + k] = ((const float *)x)[i + 1];
            }
        }
#if LK_VNNI
    if (q8 && bs == 64 && gemv_q8(codes, sc, rows, cols, xe, xo, T, y, bf16, threads)) {
        free(xe);
        return 1;
    }
#elif LK_AVX2_Q8
    if (q8 && bs == 64 && gemv_q8_avx2(codes, sc, rows, cols, xe, xo, T, y, bf16, threads)) {
        free(xe);
        return 1;
    }
#else
    (void)q8;
#endif
    gemv_fp32(codes, sc, rows, cols, bs, xe, xo, T, y, bf16, threads);
    free(xe);
    return 1;
}
