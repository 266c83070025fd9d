// CPU kernels of llmpress's packed formats: the lookup-table GEMV and the dequantizer of
// binary-coded weights (ShiftAdd's BCQ, D²Quant's dual scales), and the uniform dequantizer.
//
// Half-precision weights (the stored fp16/bf16 head, low-rank factors): a decoding GEMV that
// widens each weight to fp32 in registers, and the ELL sparse GEMV of column-sparse coefficients.
//
// Binary-coded weights:
// W[n, k] = Σ_t alpha[t, n / rows_per, k / col_block] · (bit t of row n at column k ? +1 : −1).
// Per token, every group of 8 inputs gets its 256 signed sums LUT[g][p] = Σ_i ±x[8g + i] (+ where
// bit i of p is set); an output then adds, per bit-plane and group, alpha · LUT[g][byte], the byte
// being that row's 8 sign bits (little-endian int32 words read as bytes). On AVX-512 the tables are
// of 4 inputs (16 sums, one register) and 16 rows are looked up at once, a nibble of sign bits each.
// The packed bits are read as stored: nothing is dequantized.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define LLMPRESS_AVX2 1
#endif

namespace {

// One group's table: lut[p] = Σ_i ±x[i] (+ where bit i of p is set) over its 8 inputs (``left`` of
// them inside K, the rest zero), as the outer sum of two 16-entry tables (inputs 0-3 and 4-7):
// 16 vectorisable rows of 16 adds instead of 255 dependent adds.
void build_lut(const float* x, int64_t left, float* lut) {
  float v[8];
  for (int i = 0; i < 8; ++i) v[i] = i < left ? x[i] : 0.f;
  float lo[16], hi[16];
  for (int p = 0; p < 16; ++p) {
    lo[p] = ((p & 1) ? v[0] : -v[0]) + ((p & 2) ? v[1] : -v[1]) + ((p & 4) ? v[2] : -v[2]) + ((p & 8) ? v[3] : -v[3]);
    hi[p] = ((p & 1) ? v[4] : -v[4]) + ((p & 2) ? v[5] : -v[5]) + ((p & 4) ? v[6] : -v[6]) + ((p & 8) ? v[7] : -v[7]);
  }
  for (int h = 0; h < 16; ++h)
    for (int l = 0; l < 16; ++l) lut[h * 16 + l] = hi[h] + lo[l];
}

// Groups of 8 inputs per K tile: 16 KB of LUT, which stays in L1 while every row of the thread's
// range reads it (a whole row's LUT, 196 KB for K = 1536, would be read from L2 at random).
constexpr int64_t kTileGroups = 16;

}  // namespace

namespace {
// Set by the tests through ``use_portable_kernels``: the portable loops, on a CPU that has the
// vector paths, so that both stay tested on one machine.
bool portable_only = false;
}  // namespace

void use_portable_kernels(bool portable) { portable_only = portable; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LLMPRESS_LUT16 1
#define LLMPRESS_AVX512F __attribute__((target("avx512f")))

namespace {

bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has && !portable_only;
}

// The 16 signed sums of each 4 inputs: tables[b][h][p] = Σ_i ±x[b, 4h + i] (+ where bit i of p is
// set), a nibble of sign bits being the index. 16 floats are one register, so that ``vpermps``
// looks up 16 rows' nibbles at once.
LLMPRESS_AVX512F void build_nibble_tables(const float* x, int64_t batch, int64_t k, int64_t halves, float* tables) {
  __m512 sign[4];
  for (int i = 0; i < 4; ++i) {
    alignas(64) float v[16];
    for (int p = 0; p < 16; ++p) v[p] = ((p >> i) & 1) ? 1.f : -1.f;
    sign[i] = _mm512_load_ps(v);
  }
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < halves; ++h) {
      const float* xb = x + b * k + 4 * h;
      const int64_t left = k - 4 * h;
      __m512 t = _mm512_setzero_ps();
      for (int i = 0; i < 4 && i < left; ++i) t = _mm512_fmadd_ps(_mm512_set1_ps(xb[i]), sign[i], t);
      _mm512_storeu_ps(tables + (b * halves + h) * 16, t);
    }
}

constexpr int64_t kLutBatch = 4;   // decoding rows one pass over the sign bits serves

// Rows [row, row + lanes), lanes ≤ 16, one row a lane. Per word of sign bits a gather takes the
// lanes' words; each nibble of a lane is then the index of a ``vpermps`` into the table of its 4
// inputs, two nibbles make a byte's signed sum, and a block of ``per_block`` bytes is scaled once:
// by one broadcast where the lanes share a row group (ShiftAdd: 72-192 rows a scale), by a gather of
// each lane's scale where they do not (D²Quant: a scale per row).
LLMPRESS_AVX512F void lut16_tile(const float* tables, int64_t batch, int64_t halves, const int32_t* bits, int64_t n,
                                 int64_t words, const float* alpha, int64_t row_groups, int64_t col_blocks,
                                 int64_t planes, int64_t groups, int64_t per_block, int64_t rows_per, int64_t row,
                                 int64_t lanes, float* y) {
  const __mmask16 live = static_cast<__mmask16>((1u << lanes) - 1);
  const int64_t r0 = row / rows_per;
  const bool shared = (row + lanes - 1) / rows_per == r0;
  alignas(64) int32_t word_at[16], scale_at[16];
  for (int i = 0; i < 16; ++i) {
    word_at[i] = static_cast<int32_t>(i * words);
    scale_at[i] = static_cast<int32_t>(((row + std::min<int64_t>(i, lanes - 1)) / rows_per - r0) * col_blocks);
  }
  const __m512i word_offsets = _mm512_load_si512(word_at), scale_offsets = _mm512_load_si512(scale_at);
  for (int64_t b0 = 0; b0 < batch; b0 += kLutBatch) {
    const int64_t rows = std::min(kLutBatch, batch - b0);
    __m512 acc[kLutBatch][2], part[kLutBatch];
    for (int64_t b = 0; b < kLutBatch; ++b) acc[b][0] = acc[b][1] = part[b] = _mm512_setzero_ps();
    for (int64_t t = 0; t < planes; ++t) {
      const int32_t* plane = bits + (t * n + row) * words;
      const float* at = alpha + (t * row_groups + r0) * col_blocks;
      for (int64_t w = 0; w < words; ++w) {
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, word_offsets, plane + w, 4);
        for (int64_t q = 0, g = 4 * w; q < 4 && g < groups; ++q, ++g) {
          const __m512i lo = _mm512_srli_epi32(v, static_cast<unsigned>(8 * q));   // vpermps reads bits 0-3
          const __m512i hi = _mm512_srli_epi32(v, static_cast<unsigned>(8 * q + 4));
          const bool block_ends = (g + 1) % per_block == 0 || g + 1 == groups;
          __m512 a = _mm512_setzero_ps();
          if (per_block == 1 || block_ends) {   // (a lambda would not inherit the function's target)
            const float* ac = at + g / per_block;
            a = shared ? _mm512_set1_ps(*ac) : _mm512_mask_i32gather_ps(a, live, scale_offsets, ac, 4);
          }
          for (int64_t b = 0; b < rows; ++b) {
            const float* tb = tables + ((b0 + b) * halves + 2 * g) * 16;
            const __m512 sum = _mm512_add_ps(_mm512_permutexvar_ps(lo, _mm512_loadu_ps(tb)),
                                             _mm512_permutexvar_ps(hi, _mm512_loadu_ps(tb + 16)));
            if (per_block == 1) {   // ShiftAdd's layout: a scale per byte; two chains hide the FMA's latency
              acc[b][g & 1] = _mm512_fmadd_ps(a, sum, acc[b][g & 1]);
            } else {
              part[b] = _mm512_add_ps(part[b], sum);
              if (block_ends) {
                acc[b][0] = _mm512_fmadd_ps(a, part[b], acc[b][0]);
                part[b] = _mm512_setzero_ps();
              }
            }
          }
        }
      }
    }
    for (int64_t b = 0; b < rows; ++b)
      _mm512_mask_storeu_ps(y + (b0 + b) * n + row, live, _mm512_add_ps(acc[b][0], acc[b][1]));
  }
}

}  // namespace
#endif

bool lut_gemv_vector() {
#ifdef LLMPRESS_LUT16
  return cpu_has_avx512f();
#else
  return false;
#endif
}

// x [B, K] float32, sign_bits int32 [q, N, W], alpha float32 [q, R, C]; returns [B, N] float32.
torch::Tensor lut_gemv(torch::Tensor x, torch::Tensor sign_bits, torch::Tensor alpha, int64_t col_block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [B, K] float32");
  TORCH_CHECK(sign_bits.dim() == 3 && sign_bits.scalar_type() == torch::kInt32, "sign_bits must be int32 [q, N, W]");
  TORCH_CHECK(alpha.dim() == 3 && alpha.scalar_type() == torch::kFloat32, "alpha must be float32 [q, R, C]");
  TORCH_CHECK(col_block > 0 && col_block % 8 == 0, "col_block must be a multiple of 8");
  x = x.contiguous();
  sign_bits = sign_bits.contiguous();
  alpha = alpha.contiguous();
  const int64_t batch = x.size(0), k = x.size(1);
  const int64_t planes = sign_bits.size(0), n = sign_bits.size(1), words = sign_bits.size(2);
  const int64_t row_groups = alpha.size(1), col_blocks = alpha.size(2);
  const int64_t groups = (k + 7) / 8, per_block = col_block / 8, rows_per = n / row_groups;
  TORCH_CHECK(alpha.size(0) == planes && n % row_groups == 0, "alpha does not match the sign planes");
  TORCH_CHECK(words * 4 >= groups && col_blocks * per_block >= groups, "the packed bits do not cover K");

#ifdef LLMPRESS_LUT16
  if (cpu_has_avx512f()) {
    // Tiles of up to 16 rows inside one row group where groups have 16 rows or more, so that a
    // tile's scale is one broadcast; 16 rows across groups otherwise.
    std::vector<std::pair<int64_t, int64_t>> tiles;
    const int64_t span = rows_per >= 16 ? rows_per : n;
    for (int64_t r0 = 0; r0 < n; r0 += span)
      for (int64_t row = r0; row < r0 + span; row += 16) tiles.emplace_back(row, std::min<int64_t>(16, r0 + span - row));
    const int64_t halves = 2 * groups;
    auto tables = torch::empty({batch * halves * 16}, x.options());
    const float* tab = tables.data_ptr<float>();
    build_nibble_tables(x.data_ptr<float>(), batch, k, halves, tables.data_ptr<float>());
    auto y = torch::empty({batch, n}, x.options());
    at::parallel_for(0, static_cast<int64_t>(tiles.size()), 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        lut16_tile(tab, batch, halves, sign_bits.data_ptr<int32_t>(), n, words, alpha.data_ptr<float>(), row_groups,
                   col_blocks, planes, groups, per_block, rows_per, tiles[i].first, tiles[i].second,
                   y.data_ptr<float>());
    });
    return y;
  }
#endif
  std::vector<float> luts(batch * groups * 256);
  at::parallel_for(0, batch * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / groups, g = i % groups;
      build_lut(x.data_ptr<float>() + b * k + 8 * g, k - 8 * g, luts.data() + i * 256);
    }
  });

  auto y = torch::zeros({batch, n}, x.options());
  float* out = y.data_ptr<float>();
  const auto* bytes = reinterpret_cast<const uint8_t*>(sign_bits.data_ptr<int32_t>());
  const float* a = alpha.data_ptr<float>();
  const float* lut = luts.data();
  // A tile is whole scale blocks, so that a block's partial sum is scaled once.
  const int64_t tile = per_block >= kTileGroups ? per_block : (kTileGroups / per_block) * per_block;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g0 = 0; g0 < groups; g0 += tile) {
      const int64_t g1 = std::min(groups, g0 + tile);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t r = row / rows_per;
        for (int64_t b = 0; b < batch; ++b) {
          const float* l = lut + b * groups * 256;
          // Four independent accumulators: one chain of dependent adds would wait on each add's latency.
          float acc[4] = {0.f, 0.f, 0.f, 0.f};
          for (int64_t t = 0; t < planes; ++t) {
            const uint8_t* s = bytes + (t * n + row) * words * 4;
            const float* at = a + (t * row_groups + r) * col_blocks;
            if (per_block == 1) {   // ShiftAdd's layout: a scale per group of 8 columns
              int64_t g = g0;
              for (; g + 4 <= g1; g += 4)
                for (int u = 0; u < 4; ++u) acc[u] += at[g + u] * l[(g + u) * 256 + s[g + u]];
              for (; g < g1; ++g) acc[0] += at[g] * l[g * 256 + s[g]];
              continue;
            }
            for (int64_t g = g0; g < g1;) {   // one scale per block of per_block groups
              const int64_t c = g / per_block, stop = std::min(g1, (c + 1) * per_block);
              float part[4] = {0.f, 0.f, 0.f, 0.f};
              for (; g + 4 <= stop; g += 4)
                for (int u = 0; u < 4; ++u) part[u] += l[(g + u) * 256 + s[g + u]];
              for (; g < stop; ++g) part[0] += l[g * 256 + s[g]];
              acc[c & 3] += at[c] * (part[0] + part[1] + part[2] + part[3]);
            }
          }
          out[b * n + row] += (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
      }
    }
  });
  return y;
}

namespace {

// kSigns[p][i] = +1 where bit i of byte p is set, else −1: a byte of sign bits becomes eight
// multipliers, so that dequantizing is eight independent multiply-adds per byte.
struct SignTable {
  float v[256][8];
  SignTable() {
    for (int p = 0; p < 256; ++p)
      for (int i = 0; i < 8; ++i) v[p][i] = ((p >> i) & 1) ? 1.f : -1.f;
  }
};
const SignTable kSigns;

}  // namespace

// The dense [N, K] float32 weight the same tensors stand for (prefill: one GEMM per call).
// W[n, c] = 0 + (±alpha_0) + (±alpha_1) + ..., planes in order (v·(±1) is exactly ±v).
torch::Tensor dequantize(torch::Tensor sign_bits, torch::Tensor alpha, int64_t col_block, int64_t k) {
  TORCH_CHECK(sign_bits.dim() == 3 && sign_bits.scalar_type() == torch::kInt32, "sign_bits must be int32 [q, N, W]");
  TORCH_CHECK(alpha.dim() == 3 && alpha.scalar_type() == torch::kFloat32, "alpha must be float32 [q, R, C]");
  sign_bits = sign_bits.contiguous();
  alpha = alpha.contiguous();
  const int64_t planes = sign_bits.size(0), n = sign_bits.size(1), words = sign_bits.size(2);
  const int64_t row_groups = alpha.size(1), col_blocks = alpha.size(2), rows_per = n / row_groups;
  TORCH_CHECK(words * 32 >= k && col_blocks * col_block >= k, "the packed bits do not cover K");
  auto w = torch::zeros({n, k}, alpha.options());
  float* out = w.data_ptr<float>();
  const int32_t* bits = sign_bits.data_ptr<int32_t>();
  const float* a = alpha.data_ptr<float>();
  // whole bytes of columns that share one scale: the table path; the rest bit by bit
  const int64_t whole = col_block % 8 == 0 ? k / 8 : 0;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* w_row = out + row * k;
      for (int64_t t = 0; t < planes; ++t) {
        const int32_t* s = bits + (t * n + row) * words;
        const auto* bytes = reinterpret_cast<const uint8_t*>(s);
        const float* at = a + (t * row_groups + row / rows_per) * col_blocks;
        for (int64_t gb = 0; gb < whole; ++gb) {
          const float v = at[gb * 8 / col_block];
          const float* sign = kSigns.v[bytes[gb]];
          float* o = w_row + gb * 8;
#pragma omp simd
          for (int i = 0; i < 8; ++i) o[i] += v * sign[i];
        }
        for (int64_t c = whole * 8; c < k; ++c) {
          const float v = at[c / col_block];
          w_row[c] += ((s[c >> 5] >> (c & 31)) & 1) ? v : -v;
        }
      }
    }
  });
  return w;
}

namespace {

inline uint32_t code_at(const uint32_t* words, int64_t i, int64_t bits, uint32_t mask) {
  const int64_t bit = i * bits, word = bit >> 5, shift = bit & 31;
  uint32_t v = words[word] >> shift;
  if (shift + bits > 32) v |= words[word + 1] << (32 - shift);   // a 3-bit code straddling two words
  return v & mask;
}

}  // namespace

namespace {

// Eight codes of BITS bits fill BITS bytes, starting on a byte: the row's bitstream is LSB-first.
template <int BITS>
inline void decode8(const uint8_t* p, float* out) {
  uint64_t v = 0;
  std::memcpy(&v, p, BITS);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<float>((v >> (i * BITS)) & ((1u << BITS) - 1));
}

}  // namespace

// The uniform format's dense [N, K] float32 weight, W[n, c] = scale[n, g] · (q[n, c] − z[n, g]) with
// g = g_idx[c] (or c / group_size, 0 per row): the same float operations as the torch reference,
// so the result is identical to it. Each row's codes are decoded first (eight at a time where K
// is a multiple of 8), then scaled group by group.
// With ``columns`` (a layer held in group order), code column c is written to column columns[c]:
// the weight in the stored column order, without a pass over the input to permute it.
torch::Tensor dequantize_uniform(torch::Tensor qweight, torch::Tensor scales, torch::Tensor qzeros,
                                 c10::optional<torch::Tensor> g_idx, int64_t bits, int64_t k, int64_t group_size,
                                 c10::optional<torch::Tensor> columns) {
  TORCH_CHECK(qweight.scalar_type() == torch::kInt32 && qzeros.scalar_type() == torch::kInt32, "packed int32 expected");
  TORCH_CHECK(scales.is_floating_point(), "floating-point scales expected");
  qweight = qweight.contiguous();
  qzeros = qzeros.contiguous();
  auto s32 = scales.to(torch::kFloat32).contiguous();
  const int64_t n = qweight.size(0), words = qweight.size(1), groups = s32.size(1), zwords = qzeros.size(1);
  TORCH_CHECK(words * 32 >= k * bits && zwords * 32 >= groups * bits, "the packed words do not hold the codes");
  torch::Tensor gi;
  if (g_idx.has_value()) {
    gi = g_idx->to(torch::kInt64).contiguous();
    TORCH_CHECK(gi.numel() == k, "g_idx must have one entry per input");
  }
  const int64_t* gp = gi.defined() ? gi.data_ptr<int64_t>() : nullptr;
  torch::Tensor ci;
  if (columns.has_value()) {
    ci = columns->to(torch::kInt64).contiguous();
    TORCH_CHECK(ci.numel() == k && !gp, "columns: one entry per input, for contiguous groups");
  }
  const int64_t* cp = ci.defined() ? ci.data_ptr<int64_t>() : nullptr;
  const uint32_t mask = (1u << bits) - 1;
  const int64_t group = groups == 1 ? k : group_size;
  auto w = torch::empty({n, k}, s32.options());
  float* out = w.data_ptr<float>();
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const auto* qz = reinterpret_cast<const uint32_t*>(qzeros.data_ptr<int32_t>());
  const float* sp = s32.data_ptr<float>();
  auto decode_row = [&](const uint32_t* wr, float* codes) {
    const auto* bytes = reinterpret_cast<const uint8_t*>(wr);
    if (k % 8 == 0 && (bits == 2 || bits == 3 || bits == 4 || bits == 8)) {
      for (int64_t j = 0; j < k; j += 8) {
        const uint8_t* p = bytes + j / 8 * bits;
        switch (bits) {
          case 2: decode8<2>(p, codes + j); break;
          case 3: decode8<3>(p, codes + j); break;
          case 4: decode8<4>(p, codes + j); break;
          default: decode8<8>(p, codes + j); break;
        }
      }
    } else {
      for (int64_t c = 0; c < k; ++c) codes[c] = static_cast<float>(code_at(wr, c, bits, mask));
    }
  };
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> zero(groups), codes(k), held(cp ? k : 0);
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t g = 0; g < groups; ++g) zero[g] = static_cast<float>(code_at(qz + row * zwords, g, bits, mask));
      decode_row(qw + row * words, codes.data());
      const float* sr = sp + row * groups;
      float* o = cp ? held.data() : out + row * k;
      if (gp) {
        for (int64_t c = 0; c < k; ++c) o[c] = sr[gp[c]] * (codes[c] - zero[gp[c]]);
        continue;
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * group, c1 = std::min(k, c0 + group);
        const float scale = sr[g], z = zero[g];
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) o[c] = scale * (codes[c] - z);
      }
      if (cp) {
        float* stored = out + row * k;
        for (int64_t c = 0; c < k; ++c) stored[cp[c]] = o[c];
      }
    }
  });
  return w;
}

namespace {

template <int BITS>
void uniform_gemv_rows(const float* x, const float* xsum, const uint32_t* qw, const uint32_t* qz, const float* sp,
                       float* y, int64_t batch, int64_t n, int64_t k, int64_t words, int64_t zwords, int64_t groups,
                       int64_t group) {
  const uint32_t mask = (1u << BITS) - 1;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> w(group);
    std::vector<float> acc(batch);
    for (int64_t row = begin; row < end; ++row) {
      const auto* bytes = reinterpret_cast<const uint8_t*>(qw + row * words);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t c0 = g * group, len = std::min(group, k - c0);
        const float scale = sp[row * groups + g];
        const float zero = static_cast<float>(code_at(qz + row * zwords, g, BITS, mask));
        if constexpr (BITS == 8) {   // one code a byte: converted in the dot product's own loop
          const uint8_t* q = bytes + c0;
          for (int64_t b = 0; b < batch; ++b) {
            const float* xb = x + b * k + c0;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < len; ++i) dot += static_cast<float>(q[i]) * xb[i];
            acc[b] += scale * (dot - zero * xsum[b * groups + g]);
          }
          continue;
        }
        for (int64_t j = 0; j < len; j += 8) decode8<BITS>(bytes + (c0 + j) / 8 * BITS, w.data() + j);
        for (int64_t b = 0; b < batch; ++b) {
          const float* xb = x + b * k + c0;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < len; ++i) dot += w[i] * xb[i];
          acc[b] += scale * (dot - zero * xsum[b * groups + g]);
        }
      }
      for (int64_t b = 0; b < batch; ++b) y[b * n + row] = acc[b];
    }
  });
}

}  // namespace

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LLMPRESS_VBMI 1
#define LLMPRESS_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vbmi,avx512bf16")))

namespace {

// 64 codes of BITS (2, 3 or 4) bits, the 8·BITS bytes of the row's bitstream at ``p``, as 64 bytes.
// A byte permutation gives each 64-bit lane the BITS bytes of its 8 codes, a multishift takes
// each code's bits to a byte of its own: three instructions for a group of 64.
template <int BITS>
LLMPRESS_AVX512 inline __m512i decode64(const uint8_t* p, __m512i spread, __m512i shifts) {
  const __m512i bytes = _mm512_maskz_loadu_epi8(static_cast<__mmask64>((1ULL << (8 * BITS)) - 1), p);
  const __m512i lanes = _mm512_permutexvar_epi8(spread, bytes);
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, lanes), _mm512_set1_epi8((1 << BITS) - 1));
}

constexpr int64_t kPackedBatch = 2;   // decoding rows one pass over the weight serves
constexpr float kCodeBias = 128.f;    // bf16 0x4300 | q is 128 + q, exactly, for q < 128

// R weight rows from ``row`` of y[b, n] = Σ_g s[n, g]·(Σ_{c∈g} (128 + q[n, c])·x[b, c] − (128 + z[n, g])·X[b, g]),
// X[b, g] = Σ_{c∈g} x[b, c], which is the uniform format's x·Wᵀ. Groups are contiguous, of a
// multiple of 64 columns. ``x`` is bf16, each chunk of 64 in ``chunk_position`` order; the codes
// of a chunk become 128 + q in bf16 by interleaving their bytes with 0x43 (in-lane unpacks), and
// AVX512-BF16's dot product multiplies pairs exactly into fp32 sums. R rows at once keep R
// independent chains of sums in flight (one row alone waits on latency).
template <int BITS, int R>
LLMPRESS_AVX512 void packed_gemv_tile(const uint16_t* x, const float* xsum, int64_t batch, const uint8_t* qw,
                                      int64_t row_bytes, const uint32_t* qz, int64_t zwords, const at::Half* sc,
                                      float* y, int64_t n, int64_t k, int64_t groups, int64_t group, int64_t row,
                                      float* s, float* z, const int8_t* decode_tables) {
  const __m512i spread = _mm512_load_si512(decode_tables), shifts = _mm512_load_si512(decode_tables + 64);
  const __m512i exponent = _mm512_set1_epi8(0x43);
  const int64_t chunks = k / 64, per_group = group / 64;
  const uint32_t mask = (1u << BITS) - 1;
  for (int i = 0; i < R; ++i)
    for (int64_t g = 0; g < groups; ++g) {   // s and z hold [R, groups]
      s[i * groups + g] = static_cast<float>(sc[(row + i) * groups + g]);
      z[i * groups + g] = static_cast<float>(code_at(qz + (row + i) * zwords, g, BITS, mask)) + kCodeBias;
    }
  for (int64_t b0 = 0; b0 < batch; b0 += kPackedBatch) {
    const int64_t rows = std::min(kPackedBatch, batch - b0);
    __m512 acc[kPackedBatch][R], part[kPackedBatch][R];
    for (int64_t b = 0; b < kPackedBatch; ++b)
      for (int i = 0; i < R; ++i) acc[b][i] = part[b][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < chunks; ++j) {
      __m512i w0[R], w1[R];
      for (int i = 0; i < R; ++i) {
        const __m512i codes = decode64<BITS>(qw + (row + i) * row_bytes + j * 8 * BITS, spread, shifts);
        w0[i] = _mm512_unpacklo_epi8(codes, exponent);   // codes 16L + 0..7 of each 128-bit lane L
        w1[i] = _mm512_unpackhi_epi8(codes, exponent);   // codes 16L + 8..15
      }
      for (int64_t b = 0; b < rows; ++b) {
        const uint16_t* xb = x + (b0 + b) * k + j * 64;
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb), x1 = (__m512bh)_mm512_loadu_si512(xb + 32);
        for (int i = 0; i < R; ++i) {
          part[b][i] = _mm512_dpbf16_ps(part[b][i], (__m512bh)w0[i], x0);
          part[b][i] = _mm512_dpbf16_ps(part[b][i], (__m512bh)w1[i], x1);
        }
      }
      if ((j + 1) % per_group == 0 || j + 1 == chunks) {   // a group's sums are complete: scale them
        const int64_t g = j / per_group;
        for (int i = 0; i < R; ++i) {
          const __m512 sv = _mm512_set1_ps(s[i * groups + g]);
          for (int64_t b = 0; b < rows; ++b) {
            acc[b][i] = _mm512_fmadd_ps(sv, part[b][i], acc[b][i]);
            part[b][i] = _mm512_setzero_ps();
          }
        }
      }
    }
    for (int64_t b = 0; b < rows; ++b) {
      const uint16_t* xb = x + (b0 + b) * k;
      const float* xs = xsum + (b0 + b) * groups;
      for (int i = 0; i < R; ++i) {
        float total = _mm512_reduce_add_ps(acc[b][i]);
        const auto* words = reinterpret_cast<const uint32_t*>(qw + (row + i) * row_bytes);
        for (int64_t c = chunks * 64; c < k; ++c) {   // the columns past the last whole chunk
          const uint32_t bits32 = static_cast<uint32_t>(xb[c]) << 16;
          float xc;
          std::memcpy(&xc, &bits32, 4);
          total += s[i * groups + c / group] * (static_cast<float>(code_at(words, c, BITS, mask)) + kCodeBias) * xc;
        }
        for (int64_t g = 0; g < groups; ++g) total -= s[i * groups + g] * z[i * groups + g] * xs[g];
        y[(b0 + b) * n + row + i] = total;
      }
    }
  }
}

// Where column c of a whole chunk of 64 goes in the kernel's input order, the order in which the
// in-lane unpacks of ``packed_gemv_tile`` take its codes: columns 16L + 0..7 of the lanes L = 0..3
// first, then 16L + 8..15.
inline int64_t chunk_position(int64_t c) {
  const int64_t i = c % 64;
  return c - i + 32 * (i % 16 / 8) + 8 * (i / 16) + i % 8;
}

template <int BITS>
void packed_gemv_rows_avx512(const uint16_t* x, const float* xsum, int64_t batch, const uint8_t* qw,
                             int64_t row_bytes, const uint32_t* qz, int64_t zwords, const at::Half* sc, float* y,
                             int64_t n, int64_t k, int64_t groups, int64_t group, int64_t begin, int64_t end) {
  constexpr int R = 4;
  // decode64's operands: the byte each lane takes (lane i: the BITS bytes from BITS·i), the shift of each code
  alignas(64) int8_t tables[128];
  for (int i = 0; i < 64; ++i) {
    tables[i] = static_cast<int8_t>(BITS * (i / 8) + i % 8);
    tables[64 + i] = static_cast<int8_t>(BITS * (i % 8));
  }
  std::vector<float> s(R * groups), z(R * groups);
  int64_t row = begin;
  for (; row + R <= end; row += R)
    packed_gemv_tile<BITS, R>(x, xsum, batch, qw, row_bytes, qz, zwords, sc, y, n, k, groups, group, row, s.data(),
                              z.data(), tables);
  for (; row < end; ++row)
    packed_gemv_tile<BITS, 1>(x, xsum, batch, qw, row_bytes, qz, zwords, sc, y, n, k, groups, group, row, s.data(),
                              z.data(), tables);
}

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vbmi") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

}  // namespace
#endif

// Whether ``uniform_gemv`` runs a layer on its AVX-512 path (codes decoded in registers, bf16
// inputs, 1.0-1.4x the time of torch's int4 GEMM on a copy, with nothing held beside the codes):
// 2-4 bits, contiguous groups of a multiple of 64 columns (or one group a row).
bool uniform_gemv_fast(int64_t bits, int64_t k, int64_t group_size) {
#ifdef LLMPRESS_VBMI
  const int64_t group = group_size > 0 ? group_size : k;
  return cpu_has_avx512_bf16() && !portable_only && bits >= 2 && bits <= 4 && k % 8 == 0 && group % 64 == 0;
#else
  (void)bits, (void)k, (void)group_size;
  return false;
#endif
}

namespace {

// Checks a uniform layer's packed operands against K inputs in groups of ``group``; its group count.
int64_t uniform_groups(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& qzeros,
                       int64_t bits, int64_t k, int64_t group) {
  TORCH_CHECK(qweight.scalar_type() == torch::kInt32 && qzeros.scalar_type() == torch::kInt32, "packed int32 expected");
  TORCH_CHECK(qweight.dim() == 2 && scales.dim() == 2 && qzeros.dim() == 2 && scales.size(0) == qweight.size(0) &&
              qzeros.size(0) == qweight.size(0), "qweight, scales and qzeros must have one row per output");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(k % 8 == 0 && group % 8 == 0, "K and the group size must be multiples of 8");
  TORCH_CHECK((k + group - 1) / group == groups, "the scales do not match the groups");
  TORCH_CHECK(qweight.size(1) * 32 >= k * bits && qzeros.size(1) * 32 >= groups * bits,
              "the packed words do not hold the codes");
  return groups;
}

// x [B, K] float32 in the layers' column order: x[:, perm] for an act-order layer held in group order.
torch::Tensor rows_in_column_order(torch::Tensor x, const c10::optional<torch::Tensor>& perm) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [B, K] float32");
  if (perm.has_value()) {
    TORCH_CHECK(perm->numel() == x.size(1), "the input permutation must have one entry per input");
    x = x.index_select(1, perm->to(torch::kInt64));
  }
  return x.contiguous();
}

#ifdef LLMPRESS_VBMI
// One layer's operands on the AVX-512 path: its codes as stored, its scales in fp16 (as stored), its output.
struct PackedLayer {
  torch::Tensor qweight, qzeros, scales, y;
  int64_t bits;
};

// The AVX-512 path for layers that read one input x [B, K] float32 (groups of ``group``, columns
// taken in ``perm``'s order where there is one): one pass rounds the input to bf16, puts it in
// ``chunk_position`` order and sums each group; then one parallel loop runs every layer's rows
// (q/k/v as one call: one preparation, one fork and join, no temporary tensors but the input's).
void packed_gemv_layers(torch::Tensor x, const c10::optional<torch::Tensor>& perm, std::vector<PackedLayer>& layers,
                        int64_t groups, int64_t group) {
  x = x.contiguous();   // [B, K] float32, checked by the callers
  const int64_t batch = x.size(0), k = x.size(1), whole = k / 64 * 64;
  torch::Tensor order;
  const int64_t* op = nullptr;
  if (perm.has_value()) {
    order = perm->to(torch::kInt64).contiguous();
    TORCH_CHECK(order.numel() == k, "the input permutation must have one entry per input");
    op = order.data_ptr<int64_t>();
    for (int64_t c = 0; c < k; ++c) TORCH_CHECK(op[c] >= 0 && op[c] < k, "the input permutation points outside the input");
  }
  auto xr = torch::empty({batch, k}, x.options().dtype(torch::kBFloat16));
  auto* xrp = reinterpret_cast<uint16_t*>(xr.data_ptr<at::BFloat16>());
  std::vector<float> xsum(batch * groups, 0.f);   // sums of the rounded inputs: they cancel the code bias
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x.data_ptr<float>() + b * k;
    for (int64_t c = 0; c < k; ++c) {
      const c10::BFloat16 v(xb[op ? op[c] : c]);   // rounded to nearest even, as torch's conversion
      xrp[b * k + (c < whole ? chunk_position(c) : c)] = v.x;
      xsum[b * groups + c / group] += static_cast<float>(v);
    }
  }
  std::vector<int64_t> first_row;   // each layer's first row in the loop over all of them
  int64_t rows = 0;
  for (auto& layer : layers) {
    first_row.push_back(rows);
    rows += layer.qweight.size(0);
  }
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < layers.size(); ++i) {
      const PackedLayer& layer = layers[i];
      const int64_t n = layer.qweight.size(0);
      const int64_t lo = std::max(begin, first_row[i]) - first_row[i], hi = std::min(end, first_row[i] + n) - first_row[i];
      if (lo >= hi) continue;
      auto kernel = layer.bits == 2 ? packed_gemv_rows_avx512<2>
                    : layer.bits == 3 ? packed_gemv_rows_avx512<3> : packed_gemv_rows_avx512<4>;
      kernel(xrp, xsum.data(), batch, reinterpret_cast<const uint8_t*>(layer.qweight.data_ptr<int32_t>()),
             layer.qweight.size(1) * 4, reinterpret_cast<const uint32_t*>(layer.qzeros.data_ptr<int32_t>()),
             layer.qzeros.size(1), layer.scales.data_ptr<at::Half>(), layer.y.data_ptr<float>(), n, k, groups, group,
             lo, hi);
    }
  });
}

PackedLayer packed_layer(const torch::Tensor& qweight, const torch::Tensor& scales, const torch::Tensor& qzeros,
                         int64_t bits, int64_t batch) {
  return {qweight.contiguous(), qzeros.contiguous(), scales.to(torch::kFloat16).contiguous(),
          torch::empty({batch, qweight.size(0)}, qweight.options().dtype(torch::kFloat32)), bits};
}
#endif

}  // namespace

std::vector<torch::Tensor> uniform_gemv_group(torch::Tensor x, std::vector<torch::Tensor> qweights,
                                              std::vector<torch::Tensor> scales, std::vector<torch::Tensor> qzeros,
                                              c10::optional<torch::Tensor> perm, std::vector<int64_t> bits,
                                              int64_t group_size);

// x [B, K] float32 · Wᵀ for the uniform format with contiguous groups, reading the packed codes as
// stored: y[b, n] = Σ_g s[n, g] · (Σ_{c∈g} q[n, c]·x'[b, c] − z[n, g]·Σ_{c∈g} x'[b, c]), where
// x'[b, c] = x[b, perm[c]] (an act-order layer held in group order, ``QuantLinear.sort_groups``) or x.
// For decoding batches; K must be a multiple of 8. Where ``uniform_gemv_fast`` says so, the AVX-512
// kernel (bf16 inputs, fp32 sums); otherwise a portable fp32 loop.
torch::Tensor uniform_gemv(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor qzeros,
                           c10::optional<torch::Tensor> perm, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [B, K] float32");
  const int64_t batch = x.size(0), k = x.size(1), n = qweight.size(0), group = group_size > 0 ? group_size : k;
  const int64_t groups = uniform_groups(qweight, scales, qzeros, bits, k, group);
  if (uniform_gemv_fast(bits, k, group_size))   // the AVX-512 path: a group of one
    return uniform_gemv_group(x, {qweight}, {scales}, {qzeros}, perm, {bits}, group_size)[0];
  x = rows_in_column_order(x, perm);
  qweight = qweight.contiguous();
  qzeros = qzeros.contiguous();
  const int64_t words = qweight.size(1), zwords = qzeros.size(1);
  const auto* qw = reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>());
  const auto* qz = reinterpret_cast<const uint32_t*>(qzeros.data_ptr<int32_t>());
  auto y = torch::empty({batch, n}, x.options());
  auto xsum = torch::zeros({batch, groups}, x.options());
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xb = x.data_ptr<float>() + b * k;
      float sum = 0.f;
      for (int64_t c = g * group; c < std::min(k, (g + 1) * group); ++c) sum += xb[c];
      xsum.data_ptr<float>()[b * groups + g] = sum;
    }
  auto s32 = scales.to(torch::kFloat32).contiguous();
  auto run = [&](auto kernel) {
    kernel(x.data_ptr<float>(), xsum.data_ptr<float>(), qw, qz, s32.data_ptr<float>(), y.data_ptr<float>(), batch, n,
           k, words, zwords, groups, group);
  };
  switch (bits) {
    case 2: run(uniform_gemv_rows<2>); break;
    case 3: run(uniform_gemv_rows<3>); break;
    case 4: run(uniform_gemv_rows<4>); break;
    case 8: run(uniform_gemv_rows<8>); break;
    default: TORCH_CHECK(false, "bits must be 2, 3, 4 or 8");
  }
  return y;
}

// ``uniform_gemv`` of several layers that read one input (q/k/v, gate/up): the same width, group
// size and column order, bit widths of their own. On the AVX-512 path the input is prepared once
// and one parallel loop covers all of them; otherwise each runs on its own.
std::vector<torch::Tensor> uniform_gemv_group(torch::Tensor x, std::vector<torch::Tensor> qweights,
                                              std::vector<torch::Tensor> scales, std::vector<torch::Tensor> qzeros,
                                              c10::optional<torch::Tensor> perm, std::vector<int64_t> bits,
                                              int64_t group_size) {
  TORCH_CHECK(!qweights.empty() && scales.size() == qweights.size() && qzeros.size() == qweights.size() &&
              bits.size() == qweights.size(), "one set of operands per layer");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [B, K] float32");
  const int64_t batch = x.size(0), k = x.size(1), group = group_size > 0 ? group_size : k;
  std::vector<torch::Tensor> out;
  out.reserve(qweights.size());
#ifdef LLMPRESS_VBMI
  bool fast = true;
  for (int64_t b : bits) fast = fast && uniform_gemv_fast(b, k, group_size);
  if (fast) {
    std::vector<PackedLayer> layers;
    int64_t groups = 0;
    for (size_t i = 0; i < qweights.size(); ++i) {
      groups = uniform_groups(qweights[i], scales[i], qzeros[i], bits[i], k, group);
      layers.push_back(packed_layer(qweights[i], scales[i], qzeros[i], bits[i], batch));
    }
    packed_gemv_layers(x, perm, layers, groups, group);
    for (auto& layer : layers) out.push_back(layer.y);
    return out;
  }
#endif
  x = rows_in_column_order(x, perm);
  for (size_t i = 0; i < qweights.size(); ++i)
    out.push_back(uniform_gemv(x, qweights[i], scales[i], qzeros[i], c10::nullopt, bits[i], group_size));
  return out;
}

// x [B, K] float32 · Wᵀ for weights held as byte codes with one step and offset per sub-block of
// `sub` columns (GGML's block formats, decoded once at load): W[n, c] = step[n, s]·q[n, c] − offset[n, s],
// y[b, n] = Σ_s step[n, s]·Σ_{c∈s} q[n, c]·x[b, c] − offset[n, s]·Σ_{c∈s} x[b, c]. For decoding batches.
torch::Tensor affine_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor step, torch::Tensor offset, int64_t sub) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [B, K] float32");
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && step.scalar_type() == torch::kFloat32 &&
              offset.scalar_type() == torch::kFloat32, "uint8 codes and float32 steps and offsets expected");
  x = x.contiguous();
  codes = codes.contiguous();
  step = step.contiguous();
  offset = offset.contiguous();
  const int64_t batch = x.size(0), k = x.size(1), n = codes.size(0), subs = step.size(1);
  TORCH_CHECK(codes.size(1) == k && k == subs * sub && offset.sizes() == step.sizes(), "shapes do not match");
  auto xsum = x.view({batch, subs, sub}).sum(-1).contiguous();
  auto y = torch::empty({batch, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  const uint8_t* qp = codes.data_ptr<uint8_t>();
  const float* sp = step.data_ptr<float>();
  const float* op = offset.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(batch);
    for (int64_t row = begin; row < end; ++row) {
      std::fill(acc.begin(), acc.end(), 0.f);
      const uint8_t* q = qp + row * k;
      for (int64_t s = 0; s < subs; ++s) {
        const float a = sp[row * subs + s], b = op[row * subs + s];
        const uint8_t* qs = q + s * sub;
        for (int64_t bt = 0; bt < batch; ++bt) {
          const float* xb = xp + bt * k + s * sub;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < sub; ++i) dot += static_cast<float>(qs[i]) * xb[i];
          acc[bt] += a * dot - b * xs[bt * subs + s];
        }
      }
      for (int64_t bt = 0; bt < batch; ++bt) yp[bt * n + row] = acc[bt];
    }
  });
  return y;
}

namespace {

// A stored 16-bit float (IEEE half or bfloat16) as fp32: exact either way.
template <bool BF16>
inline float widen(uint16_t h) {
  if constexpr (BF16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return c10::detail::fp16_ieee_to_fp32_value(h);
  }
}

#ifdef LLMPRESS_AVX2
template <bool BF16>
inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_cvtph_ps(h);
}

inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// Σ_c w[c]·x[c] over one stored row, in fp32.
template <bool BF16>
inline float half_dot(const uint16_t* w, const float* x, int64_t k) {
  int64_t c = 0;
  float dot = 0.f;
#ifdef LLMPRESS_AVX2
  // Two accumulators: a single chain would wait on each FMA's latency.
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; c + 16 <= k; c += 16) {
    a0 = _mm256_fmadd_ps(widen8<BF16>(w + c), _mm256_loadu_ps(x + c), a0);
    a1 = _mm256_fmadd_ps(widen8<BF16>(w + c + 8), _mm256_loadu_ps(x + c + 8), a1);
  }
  for (; c + 8 <= k; c += 8) a0 = _mm256_fmadd_ps(widen8<BF16>(w + c), _mm256_loadu_ps(x + c), a0);
  dot = sum8(_mm256_add_ps(a0, a1));
#endif
  for (; c < k; ++c) dot += widen<BF16>(w[c]) * x[c];
  return dot;
}

template <bool BF16>
void half_gemv_rows(const float* x, const uint16_t* w, float* y, int64_t batch, int64_t n, int64_t k) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    if (batch == 1) {
      int64_t row = begin;
#ifdef LLMPRESS_AVX2
      // Four rows at a time: each load of x serves four independent FMA chains.
      for (; row + 4 <= end; row += 4) {
        const uint16_t* w0 = w + row * k;
        __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t c = 0;
        for (; c + 8 <= k; c += 8) {
          const __m256 xc = _mm256_loadu_ps(x + c);
          for (int r = 0; r < 4; ++r) {
            // the next four rows: +30% bandwidth from DRAM; a prefetch past the end never faults
            _mm_prefetch(reinterpret_cast<const char*>(w0 + (r + 4) * k + c), _MM_HINT_T0);
            a[r] = _mm256_fmadd_ps(widen8<BF16>(w0 + r * k + c), xc, a[r]);
          }
        }
        for (int r = 0; r < 4; ++r) {
          float dot = sum8(a[r]);
          for (int64_t t = c; t < k; ++t) dot += widen<BF16>(w0[r * k + t]) * x[t];
          y[row + r] = dot;
        }
      }
#endif
      for (; row < end; ++row) y[row] = half_dot<BF16>(w + row * k, x, k);
      return;
    }
    // Several rows of x: each weight row is widened once into fp32, then dotted with every row.
    std::vector<float> wide(k);
    for (int64_t row = begin; row < end; ++row) {
      const uint16_t* wr = w + row * k;
      int64_t c = 0;
#ifdef LLMPRESS_AVX2
      for (; c + 8 <= k; c += 8) _mm256_storeu_ps(wide.data() + c, widen8<BF16>(wr + c));
#endif
      for (; c < k; ++c) wide[c] = widen<BF16>(wr[c]);
      for (int64_t b = 0; b < batch; ++b) {
        const float* xb = x + b * k;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < k; ++c) dot += wide[c] * xb[c];
        y[b * n + row] = dot;
      }
    }
  });
}

template <typename V>
inline float value_at(const V* v, int64_t i) {
  if constexpr (std::is_same_v<V, float>) return v[i];
  else if constexpr (std::is_same_v<V, at::BFloat16>) return widen<true>(reinterpret_cast<const uint16_t*>(v)[i]);
  else return widen<false>(reinterpret_cast<const uint16_t*>(v)[i]);
}

template <typename V, typename I>
void ell_gemv_rows(const float* h, const V* values, const I* index, float* y, int64_t batch, int64_t n, int64_t nnz,
                   int64_t rank) {
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const V* v = values + row * nnz;
      const I* idx = index + row * nnz;
      for (int64_t b = 0; b < batch; ++b) {
        const float* hb = h + b * rank;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        int64_t j = 0;
#ifdef LLMPRESS_AVX2
        // Eight atoms at a time: indices widened to int32, h gathered, values widened to fp32.
        __m256 a8 = _mm256_setzero_ps();
        for (; j + 8 <= nnz; j += 8) {
          __m256i at;
          if constexpr (sizeof(I) == 2) at = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + j)));
          else at = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + j));
          __m256 vj;
          if constexpr (std::is_same_v<V, float>) vj = _mm256_loadu_ps(v + j);
          else vj = widen8<std::is_same_v<V, at::BFloat16>>(reinterpret_cast<const uint16_t*>(v + j));
          a8 = _mm256_fmadd_ps(vj, _mm256_i32gather_ps(hb, at, 4), a8);
        }
        acc[1] = sum8(a8);
#endif
        for (; j + 4 <= nnz; j += 4)
          for (int u = 0; u < 4; ++u) acc[u] += value_at(v, j + u) * hb[idx[j + u]];
        for (; j < nnz; ++j) acc[0] += value_at(v, j) * hb[idx[j]];
        y[b * n + row] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      }
    }
  });
}

}  // namespace

// x [B, K] float32 · Wᵀ for W [N, K] stored in float16 or bfloat16, accumulated in fp32: the same
// products as an fp32 copy of W, without one (decoding batches; the weight is read once per row).
torch::Tensor half_gemv(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [B, K] float32");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must be [N, K]");
  const bool bf16 = weight.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || weight.scalar_type() == torch::kFloat16, "weight must be float16 or bfloat16");
  x = x.contiguous();
  weight = weight.contiguous();
  const int64_t batch = x.size(0), k = x.size(1), n = weight.size(0);
  auto y = torch::empty({batch, n}, x.options());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  if (bf16) half_gemv_rows<true>(x.data_ptr<float>(), w, y.data_ptr<float>(), batch, n, k);
  else half_gemv_rows<false>(x.data_ptr<float>(), w, y.data_ptr<float>(), batch, n, k);
  return y;
}

#ifdef LLMPRESS_VBMI
namespace {
// Rows [row, end) of one decoding row's int8 GEMV, four at a time, 16 codes an instruction; the
// rows past the last whole four are left to the caller.
LLMPRESS_AVX512 int64_t int8_rows_avx512(const float* x, const int8_t* q, const float* scale, float* y, int64_t k,
                                         int64_t row, int64_t end) {
  for (; row + 4 <= end; row += 4) {
    const int8_t* q0 = q + row * k;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
      const __m512 xc = _mm512_loadu_ps(x + c);
      if (c % 64 == 0)   // the next four rows, a cache line each: as half_gemv, +30% bandwidth from DRAM
        for (int r = 4; r < 8; ++r) _mm_prefetch(reinterpret_cast<const char*>(q0 + r * k + c), _MM_HINT_T0);
      a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q0 + c)))), xc, a0);
      a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q0 + k + c)))), xc, a1);
      a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q0 + 2 * k + c)))), xc, a2);
      a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q0 + 3 * k + c)))), xc, a3);
    }
    float dot[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2), _mm512_reduce_add_ps(a3)};
    for (int r = 0; r < 4; ++r) {
      for (int64_t t = c; t < k; ++t) dot[r] += static_cast<float>(q0[r * k + t]) * x[t];
      y[row + r] = scale[row + r] * dot[r];
    }
  }
  return row;
}
}  // namespace
#endif

// x [B, K] float32 · Wᵀ for W[n, k] = scale[n]·q[n, k], int8 codes with one fp32 scale a row (an
// embedding table stored as ``int8`` rows used as the output head): the products of an fp32 copy of
// W, a quarter of its bytes read. y[b, n] = scale[n]·Σ_k q[n, k]·x[b, k], each code widened to
// fp32 in the dot product's own loop.
torch::Tensor int8_rows_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [B, K] float32");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.size(1) == x.size(1),
              "codes must be [N, K] int8");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.numel() == codes.size(0), "one float32 scale a row");
  x = x.contiguous();
  codes = codes.contiguous();
  scale = scale.contiguous();
  const int64_t batch = x.size(0), k = x.size(1), n = codes.size(0);
  auto y = torch::empty({batch, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = codes.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    int64_t row = begin;
#ifdef LLMPRESS_VBMI
    if (batch == 1 && cpu_has_avx512_bf16() && !portable_only) row = int8_rows_avx512(xp, qp, sp, yp, k, row, end);
#endif
    // Elsewhere (and for several rows of x) each weight row is widened once, then dotted with every
    // row of x; a four-row AVX2 loop as half_gemv's measured no faster here (1.67 against 1.50 ms).
    std::vector<float> wide(k);
    for (; row < end; ++row) {
      const int8_t* q = qp + row * k;
#pragma omp simd
      for (int64_t c = 0; c < k; ++c) wide[c] = static_cast<float>(q[c]);
      for (int64_t b = 0; b < batch; ++b) {
        const float* xb = xp + b * k;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < k; ++c) dot += wide[c] * xb[c];
        yp[b * n + row] = sp[row] * dot;
      }
    }
  });
  return y;
}

// h [B, R] float32 times column-sparse coefficients in ELL layout: values [N, nnz] (float32, float16
// or bfloat16) at atoms index [N, nnz] (int16 or int32); y[b, n] = Σ_j values[n, j]·h[b, index[n, j]].
// The stored arrays are read as they are: no CSR copy, no dense C. The caller has checked once that
// every index lies in [0, R) (FactorLinear.validate, at load): a per-call check would cost a pass.
torch::Tensor ell_gemv(torch::Tensor h, torch::Tensor values, torch::Tensor index) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kFloat32, "h must be [B, R] float32");
  TORCH_CHECK(values.dim() == 2 && values.sizes() == index.sizes(), "values and index must both be [N, nnz]");
  h = h.contiguous();
  values = values.contiguous();
  index = index.contiguous();
  const int64_t batch = h.size(0), rank = h.size(1), n = values.size(0), nnz = values.size(1);
  auto y = torch::empty({batch, n}, h.options());
  auto run = [&](auto* v) {
    using V = std::remove_const_t<std::remove_pointer_t<decltype(v)>>;
    if (index.scalar_type() == torch::kInt16)
      ell_gemv_rows<V, int16_t>(h.data_ptr<float>(), v, index.data_ptr<int16_t>(), y.data_ptr<float>(), batch, n, nnz, rank);
    else
      ell_gemv_rows<V, int32_t>(h.data_ptr<float>(), v, index.data_ptr<int32_t>(), y.data_ptr<float>(), batch, n, nnz, rank);
  };
  TORCH_CHECK(index.scalar_type() == torch::kInt16 || index.scalar_type() == torch::kInt32, "index must be int16 or int32");
  switch (values.scalar_type()) {
    case torch::kFloat32: run(values.data_ptr<float>()); break;
    case torch::kFloat16: run(values.data_ptr<at::Half>()); break;
    case torch::kBFloat16: run(values.data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "values must be float32, float16 or bfloat16");
  }
  return y;
}

// HARP's butterfly processor on decoding rows, every stage in one call: x [B, n] float32 becomes
// x·diag(s)·B_1⋯B_T (or, with transpose, x·(B_1⋯B_T)ᵀ·diag(s)). Stage t has radix b and stride
// strides[t]; a row is viewed as [n/(b·stride), b, stride] and each (outer, offset) slot's b values
// are multiplied by that slot's b×b block. A stage's blocks come in the layout whose innermost loop
// is long and contiguous, so that it vectorises: [b, b] shared by every slot (a fixed mixer; the
// loop runs over the offsets), [outer, b, b, stride] for a wide stride (over the offsets), or
// [outer·stride, b, b] one block per slot for a narrow one (over the block's columns; these come
// already transposed for a transposed call, so that the loop stays over contiguous rows).
// Blocks are float32 or float16 (widened in the loop): a decoding step reads every layer's blocks
// from memory once, so their bytes are most of its cost.
template <typename T>
inline float block_value(const T* p) {
  if constexpr (std::is_same_v<T, float>) return *p;
  else return widen<false>(*p);
}

#ifdef LLMPRESS_AVX2
template <typename T>
inline __m256 block_values8(const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(p);
  else return widen8<false>(p);
}
#endif

// One slot-group of a stage: y[j][q] = Σ_i K(i, j, q)·x[i][q] for b rows of `stride` values, K(i, j, q)
// the shared w[at] or the per-offset w[at·stride + q], at = i·b + j (j·b + i for the transpose). V
// vectors of offsets are held in registers while i runs (V a constant, so they stay there), and y
// is written once.
#ifdef LLMPRESS_AVX2
// Two output rows at once when b allows: 2·V independent FMA chains hide the FMA latency that V
// chains (V = 2 at a stride of 16) would wait on.
template <typename T, int V, int J, bool Shared>
inline void mix_rows_group(const float* x, float* y, const T* blk, int64_t b, int64_t stride, int64_t q0, int64_t j,
                           bool transpose) {
  __m256 acc[J][V];
  for (int r = 0; r < J; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t i = 0; i < b; ++i) {
    __m256 xs[V];
    for (int v = 0; v < V; ++v) xs[v] = _mm256_loadu_ps(x + i * stride + q0 + 8 * v);
    for (int r = 0; r < J; ++r) {
      const int64_t at = transpose ? (j + r) * b + i : i * b + j + r;
      if constexpr (Shared) {
        const __m256 w = _mm256_set1_ps(block_value(blk + at));
        for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(w, xs[v], acc[r][v]);
      } else {
        const T* w = blk + at * stride + q0;
        for (int v = 0; v < V; ++v) acc[r][v] = _mm256_fmadd_ps(block_values8(w + 8 * v), xs[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < J; ++r)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(y + (j + r) * stride + q0 + 8 * v, acc[r][v]);
}

template <typename T, int V, bool Shared>
inline void mix_rows_chunk(const float* x, float* y, const T* blk, int64_t b, int64_t stride, int64_t q0,
                           bool transpose) {
  int64_t j = 0;
  if constexpr (V <= 2)
    for (; j + 2 <= b; j += 2) mix_rows_group<T, V, 2, Shared>(x, y, blk, b, stride, q0, j, transpose);
  for (; j < b; ++j) mix_rows_group<T, V, 1, Shared>(x, y, blk, b, stride, q0, j, transpose);
}

template <typename T, bool Shared>
inline int64_t mix_rows_vectors(const float* x, float* y, const T* blk, int64_t b, int64_t stride, bool transpose) {
  int64_t q0 = 0;
  for (; q0 + 32 <= stride; q0 += 32) mix_rows_chunk<T, 4, Shared>(x, y, blk, b, stride, q0, transpose);
  switch ((stride - q0) / 8) {
    case 3: mix_rows_chunk<T, 3, Shared>(x, y, blk, b, stride, q0, transpose); return q0 + 24;
    case 2: mix_rows_chunk<T, 2, Shared>(x, y, blk, b, stride, q0, transpose); return q0 + 16;
    case 1: mix_rows_chunk<T, 1, Shared>(x, y, blk, b, stride, q0, transpose); return q0 + 8;
    default: return q0;
  }
}
#endif

template <typename T>
inline void mix_rows(const float* x, float* y, const T* blk, int64_t b, int64_t stride, bool shared, bool transpose) {
  int64_t q0 = 0;
#ifdef LLMPRESS_AVX2
  q0 = shared ? mix_rows_vectors<T, true>(x, y, blk, b, stride, transpose)
              : mix_rows_vectors<T, false>(x, y, blk, b, stride, transpose);
#endif
  for (int64_t q = q0; q < stride; ++q)
    for (int64_t j = 0; j < b; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < b; ++i) {
        const int64_t at = transpose ? j * b + i : i * b + j;
        acc += block_value(blk + (shared ? at : at * stride + q)) * x[i * stride + q];
      }
      y[j * stride + q] = acc;
    }
}

#ifdef LLMPRESS_AVX2
// S slots at once (each its own block): S·V independent FMA chains.
template <typename T, int V, int S>
inline void mix_slots_fixed(const float* const* v, float* const* w, const T* const* blk) {
  constexpr int b = 8 * V;
  __m256 acc[S][V];
  for (int s = 0; s < S; ++s)
    for (int u = 0; u < V; ++u) acc[s][u] = _mm256_setzero_ps();
  for (int i = 0; i < b; ++i)
    for (int s = 0; s < S; ++s) {
      const __m256 vi = _mm256_set1_ps(v[s][i]);
      for (int u = 0; u < V; ++u) acc[s][u] = _mm256_fmadd_ps(vi, block_values8(blk[s] + i * b + 8 * u), acc[s][u]);
    }
  for (int s = 0; s < S; ++s)
    for (int u = 0; u < V; ++u) _mm256_storeu_ps(w[s] + 8 * u, acc[s][u]);
}
#endif

// One block per slot, [b, b] in the direction applied: w = v·K for each slot's b values v; with
// a stride of 1 the slots are contiguous runs and go in pairs (the radices 8 and 16 unrolled).
template <typename T>
void mix_slots(const float* in, float* out, const T* k, int64_t b, int64_t stride, int64_t outer) {
  int64_t slot = 0;
  const int64_t slots = outer * stride;
#ifdef LLMPRESS_AVX2
  if (stride == 1 && (b == 8 || b == 16)) {
    for (; slot + 2 <= slots; slot += 2) {
      const float* v[2] = {in + slot * b, in + (slot + 1) * b};
      float* w[2] = {out + slot * b, out + (slot + 1) * b};
      const T* blk[2] = {k + slot * b * b, k + (slot + 1) * b * b};
      if (b == 8) mix_slots_fixed<T, 1, 2>(v, w, blk);
      else mix_slots_fixed<T, 2, 2>(v, w, blk);
    }
  }
#endif
  std::vector<float> v(b), w(b);
  for (; slot < slots; ++slot) {   // slot = o·stride + q
    const int64_t o = slot / stride, q = slot % stride;
    const float* x = in + o * b * stride + q;
    for (int64_t i = 0; i < b; ++i) v[i] = x[i * stride];
    const T* blk = k + slot * b * b;
    for (int64_t j = 0; j < b; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < b; ++i) acc += v[i] * block_value(blk + i * b + j);
      w[j] = acc;
    }
    float* y = out + o * b * stride + q;
    for (int64_t j = 0; j < b; ++j) y[j * stride] = w[j];
  }
}

template <typename T>
void butterfly_stage(const float* in, float* out, const torch::Tensor& blocks, int64_t n, int64_t stride,
                     bool transpose) {
  const T* k = reinterpret_cast<const T*>(blocks.data_ptr());
  const int64_t b = blocks.size(1), outer = n / (b * stride);
  if (blocks.dim() == 3) return mix_slots(in, out, k, b, stride, outer);   // one block per slot
  const bool shared = blocks.dim() == 2;
  for (int64_t o = 0; o < outer; ++o)
    mix_rows(in + o * b * stride, out + o * b * stride, shared ? k : k + o * b * b * stride, b, stride, shared, transpose);
}

torch::Tensor butterfly_rows(torch::Tensor x, torch::Tensor signs, std::vector<torch::Tensor> blocks,
                             std::vector<int64_t> strides, bool transpose) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() >= 1, "x must be float32 [..., n]");
  TORCH_CHECK(blocks.size() == strides.size(), "one stride per stage");
  const int64_t n = x.size(-1), batch = n ? x.numel() / n : 0;
  TORCH_CHECK(signs.scalar_type() == torch::kFloat32 && signs.numel() == n, "signs must be [n] float32");
  for (size_t t = 0; t < blocks.size(); ++t) {
    auto& k = blocks[t];
    TORCH_CHECK((k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kFloat16) && k.is_contiguous(),
                "blocks must be contiguous float32 or float16");
    const int64_t b = k.size(1), stride = strides[t];
    TORCH_CHECK(b >= 1 && stride >= 1 && n % (b * stride) == 0, "a stage does not tile the width");
    TORCH_CHECK((k.dim() == 2 && k.size(0) == b) || (k.dim() == 3 && k.size(0) == n / b && k.size(2) == b) ||
                (k.dim() == 4 && k.size(0) == n / (b * stride) && k.size(2) == b && k.size(3) == stride),
                "blocks must be [b, b], [n/b, b, b] or [n/(b·stride), b, b, stride]");
  }
  x = x.contiguous();
  auto y = torch::empty_like(x);   // the input's shape: any leading dimensions
  std::vector<float> a(n), c(n);
  const float* s = signs.data_ptr<float>();
  const int64_t stages = static_cast<int64_t>(blocks.size());
  for (int64_t r = 0; r < batch; ++r) {
    const float* row = x.data_ptr<float>() + r * n;
    for (int64_t i = 0; i < n; ++i) a[i] = transpose ? row[i] : row[i] * s[i];
    for (int64_t step = 0; step < stages; ++step) {
      const int64_t t = transpose ? stages - 1 - step : step;
      if (blocks[t].scalar_type() == torch::kFloat16)
        butterfly_stage<uint16_t>(a.data(), c.data(), blocks[t], n, strides[t], transpose);
      else
        butterfly_stage<float>(a.data(), c.data(), blocks[t], n, strides[t], transpose);
      std::swap(a, c);
    }
    float* dst = y.data_ptr<float>() + r * n;
    for (int64_t i = 0; i < n; ++i) dst[i] = transpose ? a[i] * s[i] : a[i];
  }
  return y;
}

// torch's CPU int4 GEMM with its input preparation in one call (the same operations the Python
// path makes, without a crossing from Python for each): x [..., K] to the pack's compute dtype,
// act-order's permutation, zero padding to the last group, the GEMM, then x's dtype or + bias.
torch::Tensor int4_rows(torch::Tensor x, torch::Tensor weight, int64_t group_size, torch::Tensor scales_and_zeros,
                        c10::optional<torch::Tensor> perm, int64_t padding, c10::optional<torch::Tensor> bias) {
  auto flat = x.reshape({-1, x.size(-1)}).to(scales_and_zeros.scalar_type());
  if (perm.has_value()) flat = flat.index_select(-1, *perm);
  if (padding > 0) flat = at::constant_pad_nd(flat, {0, padding});
  auto y = at::_weight_int4pack_mm_for_cpu(flat, weight, group_size, scales_and_zeros);
  y = bias.has_value() ? at::add(*bias, y) : y.to(x.scalar_type());
  auto shape = x.sizes().vec();
  shape.back() = y.size(-1);
  return y.view(shape);
}

// A HARP group's decoding step in one call: the shared input processor, the members' int4 GEMM
// (one pack for all of them), each member's slice of the output through its output processor.
std::vector<torch::Tensor> harp_int4_rows(torch::Tensor x, torch::Tensor in_signs, std::vector<torch::Tensor> in_blocks,
                                          std::vector<int64_t> in_strides, torch::Tensor weight, int64_t group_size,
                                          torch::Tensor scales_and_zeros, c10::optional<torch::Tensor> perm,
                                          int64_t padding, std::vector<int64_t> out_sizes,
                                          std::vector<torch::Tensor> out_signs,
                                          std::vector<std::vector<torch::Tensor>> out_blocks,
                                          std::vector<std::vector<int64_t>> out_strides) {
  TORCH_CHECK(out_sizes.size() == out_signs.size() && out_sizes.size() == out_blocks.size() &&
              out_sizes.size() == out_strides.size(), "one set of output operands per member");
  auto y = int4_rows(butterfly_rows(x, in_signs, in_blocks, in_strides, false), weight, group_size, scales_and_zeros,
                     perm, padding, c10::nullopt);
  std::vector<torch::Tensor> out;
  out.reserve(out_sizes.size());
  int64_t start = 0;
  for (size_t i = 0; i < out_sizes.size(); ++i) {
    out.push_back(butterfly_rows(y.narrow(-1, start, out_sizes[i]), out_signs[i], out_blocks[i], out_strides[i], true));
    start += out_sizes[i];
  }
  TORCH_CHECK(start == y.size(-1), "the members' widths do not add up to the GEMM's");
  return out;
}

// Several processors on their own rows in one call (a layer's q/k/v or gate/up outputs): one
// crossing from Python for the group.
std::vector<torch::Tensor> butterfly_rows_many(std::vector<torch::Tensor> xs, std::vector<torch::Tensor> signs,
                                               std::vector<std::vector<torch::Tensor>> blocks,
                                               std::vector<std::vector<int64_t>> strides, bool transpose) {
  TORCH_CHECK(xs.size() == signs.size() && xs.size() == blocks.size() && xs.size() == strides.size(),
              "one set of operands per input");
  std::vector<torch::Tensor> out;
  out.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) out.push_back(butterfly_rows(xs[i], signs[i], blocks[i], strides[i], transpose));
  return out;
}

// A randomized Hadamard rotation of decoding rows: y = (x ⊙ s)·(L ⊗ H_p)/√n, L the k x k leading
// (Paley) factor or none, H_p Sylvester's of order p = n / k, applied as a fast Walsh-Hadamard
// transform (p·log2 p adds a segment) instead of a dense p x p matmul: the online rotation before a
// rotated model's down_proj costs its few microseconds, not two small GEMMs' calls.
torch::Tensor hadamard_rows(torch::Tensor x, torch::Tensor signs, c10::optional<torch::Tensor> lead, int64_t inner) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be [B, n] float32");
  x = x.contiguous();
  const int64_t batch = x.size(0), n = x.size(1), p = inner, k = n / std::max<int64_t>(p, 1);
  TORCH_CHECK(p >= 1 && (p & (p - 1)) == 0 && k * p == n, "the inner factor must be a power of two dividing n");
  auto s = signs.to(torch::kFloat32).contiguous();
  TORCH_CHECK(s.numel() == n, "one sign per input");
  torch::Tensor l;
  if (lead.has_value()) {
    l = lead->to(torch::kFloat32).contiguous();
    TORCH_CHECK(l.dim() == 2 && l.size(0) == k && l.size(1) == k, "the leading factor must be k x k, k = n / inner");
  } else {
    TORCH_CHECK(k == 1, "without a leading factor the inner factor is the whole width");
  }
  auto y = torch::empty_like(x);
  const float scale = 1.f / std::sqrt(static_cast<float>(n));
  std::vector<float> t(n);
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x.data_ptr<float>() + b * n;
    const float* sb = s.data_ptr<float>();
    float* yb = y.data_ptr<float>() + b * n;
    float* src = lead.has_value() ? t.data() : yb;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) src[c] = xb[c] * sb[c] * scale;
    if (lead.has_value()) {   // yb[i, :] = Σ_j L[j, i]·t[j, :]
      const float* lf = l.data_ptr<float>();
      for (int64_t i = 0; i < k; ++i) {
        float* out = yb + i * p;
        std::fill(out, out + p, 0.f);
        for (int64_t j = 0; j < k; ++j) {
          const float f = lf[j * k + i];
          const float* in = src + j * p;
#pragma omp simd
          for (int64_t c = 0; c < p; ++c) out[c] += f * in[c];
        }
      }
    }
    for (int64_t i = 0; i < k; ++i) {   // H_p on each segment: butterflies (a + b, a − b), Sylvester's order
      float* v = yb + i * p;
      for (int64_t h = 1; h < p; h *= 2)
        for (int64_t j0 = 0; j0 < p; j0 += 2 * h)
#pragma omp simd
          for (int64_t c = j0; c < j0 + h; ++c) {
            const float a = v[c], d = v[c + h];
            v[c] = a + d;
            v[c + h] = a - d;
          }
    }
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("butterfly_rows", &butterfly_rows, "HARP's butterfly processor on decoding rows");
  m.def("butterfly_rows_many", &butterfly_rows_many, "several butterfly processors, each on its own rows");
  m.def("int4_rows", &int4_rows, "torch's CPU int4 GEMM with its input preparation");
  m.def("harp_int4_rows", &harp_int4_rows, "a HARP group's decoding step: processors around one int4 GEMM");
  m.def("lut_gemv", &lut_gemv, "lookup-table GEMV of binary-coded weights");
  m.def("dequantize", &dequantize, "the dense weight of binary-coded weights");
  m.def("dequantize_uniform", &dequantize_uniform, "the dense weight of the uniform format");
  m.def("uniform_gemv", &uniform_gemv, "decoding GEMV of the uniform format");
  m.def("uniform_gemv_group", &uniform_gemv_group, "uniform_gemv of layers that read one input, in one call");
  m.def("uniform_gemv_fast", &uniform_gemv_fast, "whether uniform_gemv takes its AVX-512 path for a layer");
  m.def("half_gemv", &half_gemv, "decoding GEMV of a float16/bfloat16 weight in fp32");
  m.def("int8_rows_gemv", &int8_rows_gemv, "decoding GEMV of int8 rows with a scale each");
  m.def("ell_gemv", &ell_gemv, "GEMV of column-sparse coefficients in ELL layout");
  m.def("affine_gemv", &affine_gemv, "decoding GEMV of byte codes with a step and offset per sub-block");
  m.def("hadamard_rows", &hadamard_rows, "a randomized Hadamard rotation of decoding rows");
  m.def("lut_gemv_vector", &lut_gemv_vector, "whether lut_gemv takes its AVX-512 path on this CPU");
  m.def("use_portable_kernels", &use_portable_kernels, "tests: the portable loops instead of the vector paths");
}

// The same kernels as torch operators (``torch.ops.llmpress.*``), so that a compiled decoding step
// (torch.compile) calls them from its graph; their shapes for tracing are given in Python
// (``kernels.cpu_ext``). The nested-list calls (a HARP group in one crossing) stay Python-only.
TORCH_LIBRARY(llmpress, m) {
  m.def("butterfly_rows(Tensor x, Tensor signs, Tensor[] blocks, int[] strides, bool transpose) -> Tensor");
  m.def("int4_rows(Tensor x, Tensor weight, int group_size, Tensor scales_and_zeros, Tensor? perm, int padding, "
        "Tensor? bias) -> Tensor");
  m.def("lut_gemv(Tensor x, Tensor sign_bits, Tensor alpha, int col_block) -> Tensor");
  m.def("dequantize(Tensor sign_bits, Tensor alpha, int col_block, int k) -> Tensor");
  m.def("dequantize_uniform(Tensor qweight, Tensor scales, Tensor qzeros, Tensor? g_idx, int bits, int k, "
        "int group_size, Tensor? columns) -> Tensor");
  m.def("uniform_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, Tensor? perm, int bits, "
        "int group_size) -> Tensor");
  m.def("uniform_gemv_group(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor[] qzeros, Tensor? perm, int[] bits, "
        "int group_size) -> Tensor[]");
  m.def("half_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_rows_gemv(Tensor x, Tensor codes, Tensor scale) -> Tensor");
  m.def("ell_gemv(Tensor h, Tensor values, Tensor index) -> Tensor");
  m.def("affine_gemv(Tensor x, Tensor codes, Tensor step, Tensor offset, int sub) -> Tensor");
  m.def("hadamard_rows(Tensor x, Tensor signs, Tensor? lead, int inner) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmpress, CPU, m) {
  m.impl("butterfly_rows", &butterfly_rows);
  m.impl("int4_rows", &int4_rows);
  m.impl("lut_gemv", &lut_gemv);
  m.impl("dequantize", &dequantize);
  m.impl("dequantize_uniform", &dequantize_uniform);
  m.impl("uniform_gemv", &uniform_gemv);
  m.impl("uniform_gemv_group", &uniform_gemv_group);
  m.impl("half_gemv", &half_gemv);
  m.impl("int8_rows_gemv", &int8_rows_gemv);
  m.impl("ell_gemv", &ell_gemv);
  m.impl("affine_gemv", &affine_gemv);
  m.impl("hadamard_rows", &hadamard_rows);
}
