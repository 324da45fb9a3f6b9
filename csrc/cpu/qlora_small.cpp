// qpeft._C.qlora_small_forward: the whole fp32 QLoRA forward of a small layer in one call,
//   xa = x @ A^T,  y = (x @ W^T + ((xa * s) * rank_scale) @ B^T + bias) * out_scale,
// with W [n, k] as packed 4-bit codes. On a small layer (64x64 .. 256x256) the cost of the
// composed path is not arithmetic but per-op overhead: six ATen calls, a panel decode and
// their Python glue (docs/design.md, "Per-call overhead"). Here x @ W^T is the 4-bit GEMV
// (gemv.cpp, the ISA-dispatched kernel) run over the rows of x in chunks of kGemvMaxRows,
// which re-reads the packed codes once per chunk: cheap while W is small (the Python side
// takes this path only below a size it measured, qpeft/backends/cpu/qlora.py). The rank-r
// LoRA products are plain loops in the order the composed path rounds them: each product
// summed over its inner dimension first, then added to what is already there.
//
// qpeft._C.qlora_small_backward: the fp32 backward of the same layer in one call (the
// composed one is ten ATen calls and a decode), with W decoded once into a per-thread
// buffer; the products are loops along contiguous rows (they vectorize at the baseline
// ISA), so the Python side takes it only for layers whose M*N*K is small.
#include <qpeft/format.h>
#include <qpeft/host_checks.h>

#include <vector>

#include "api.h"
#include "gemv_kernels.h"
#include "isa_tables.h"
#include "thread_pool.h"

namespace qpeft {
namespace cpu {

namespace {

// sum_i a[i] * b[i] in eight interleaved partial sums (independent chains the compiler
// keeps in vector registers), then the partials pairwise, then the tail.
float dot(const float* a, const float* b, int64_t len) {
  float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < len; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void qlora_small_forward(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                         uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                         int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                         int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                         int64_t nested_blocksize, uintptr_t lora_a, int64_t lora_a_len,
                         uintptr_t lora_b, int64_t lora_b_len, int64_t r, float scaling,
                         uintptr_t rank_scale, int64_t rank_scale_len, uintptr_t bias,
                         int64_t bias_len, uintptr_t out_scale, int64_t out_scale_len,
                         uintptr_t out, int64_t out_len, uintptr_t xa, int64_t xa_len,
                         int num_threads) {
  using namespace host;
  const char* fn = "qlora_small_forward";
  check_positive(fn, "m", m);
  check_positive(fn, "n", n);
  check_positive(fn, "k", k);
  check_nonneg(fn, "r", r);
  if (blocksize < 2 || (blocksize & (blocksize - 1)) != 0)
    fail(fn, "blocksize must be a power of two >= 2, got " + std::to_string(blocksize));
  check_quant_type(fn, quant_type);
  const int64_t numel = checked_mul(fn, "n", n, "k", k);
  const int64_t blocks = ceil_div(numel, blocksize);
  check_len(fn, "x", x_len, checked_mul(fn, "m", m, "k", k));
  check_len(fn, "packed", packed_len, packed4_len(numel));
  check_len(fn, "absmax", absmax_len, blocks);
  check_len(fn, "out", out_len, checked_mul(fn, "m", m, "n", n));
  const bool nested = nested_absmax != 0;
  if (nested) {
    check_positive(fn, "nested_blocksize", nested_blocksize);
    check_len(fn, "nested_absmax", nested_absmax_len, ceil_div(blocks, nested_blocksize));
    check_ptr(fn, "nested_code", nested_code);
    check_ptr(fn, "offset", offset);
  }
  check_ptr(fn, "x", x);
  check_ptr(fn, "packed", packed);
  check_ptr(fn, "absmax", absmax);
  check_ptr(fn, "out", out);
  const bool lora = lora_a != 0;
  if (lora) {
    check_positive(fn, "r", r);
    check_len(fn, "lora_a", lora_a_len, checked_mul(fn, "r", r, "k", k));
    check_ptr(fn, "lora_b", lora_b);
    check_len(fn, "lora_b", lora_b_len, checked_mul(fn, "n", n, "r", r));
    if (rank_scale != 0) check_len(fn, "rank_scale", rank_scale_len, r);
    if (xa != 0) check_len(fn, "xa", xa_len, checked_mul(fn, "m", m, "r", r));
  }
  if (bias != 0) check_len(fn, "bias", bias_len, n);
  if (out_scale != 0) check_len(fn, "out_scale", out_scale_len, n);

  const float* xf = reinterpret_cast<const float*>(x);
  float* y = reinterpret_cast<float*>(out);
  Gemv4Args args{xf,
                 0,
                 n,
                 k,
                 reinterpret_cast<const uint8_t*>(packed),
                 blocksize,
                 quant_type,
                 nested ? nullptr : reinterpret_cast<const float*>(absmax),
                 nested ? reinterpret_cast<const uint8_t*>(absmax) : nullptr,
                 nested ? reinterpret_cast<const float*>(nested_absmax) : nullptr,
                 nested ? reinterpret_cast<const float*>(nested_code) : nullptr,
                 nested ? *reinterpret_cast<const float*>(offset) : 0.0f,
                 nested ? nested_blocksize : 1,
                 y};
  // The kernel choice and thread split of gemv_4bit (gemv.cpp).
  const Gemv4Fn kernel =
      (k % blocksize == 0 && blocksize >= 32) ? isa_kernels().gemv : gemv4_scalar;
  int64_t threads = num_threads < 1 ? 1 : num_threads;
  const int64_t by_work = numel / (int64_t{1} << 16) + 1;
  if (threads > by_work) threads = by_work;
  if (threads > n) threads = n;
  for (int64_t i0 = 0; i0 < m; i0 += kGemvMaxRows) {
    args.m = (m - i0 < kGemvMaxRows) ? m - i0 : kGemvMaxRows;
    args.x = xf + i0 * k;
    args.out = y + i0 * n;
    if (threads > 1) {
      parallel_ranges(n, threads, [&](int64_t n0, int64_t n1) { kernel(args, n0, n1); });
    } else {
      kernel(args, 0, n);
    }
  }

  if (lora) {
    const float* a = reinterpret_cast<const float*>(lora_a);
    const float* b = reinterpret_cast<const float*>(lora_b);
    const float* rs = reinterpret_cast<const float*>(rank_scale);
    // scratch: B^T [r, n] (so the rank-r product runs along contiguous rows of n, which
    // vectorizes, instead of an r-long dot per output), one row's sum [n], t [r], xa [r]
    thread_local std::vector<float> scratch;
    const size_t need = static_cast<size_t>(r * n + n + 2 * r);
    if (scratch.size() < need) scratch.resize(need);
    float* bt = scratch.data();
    float* sum = bt + r * n;
    float* t = sum + n;
    float* xa_tmp = t + r;
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t j = 0; j < r; ++j) bt[j * n + c] = b[c * r + j];
    }
    for (int64_t i = 0; i < m; ++i) {
      float* xa_row = xa != 0 ? reinterpret_cast<float*>(xa) + i * r : xa_tmp;
      const float* x_row = xf + i * k;
      for (int64_t j = 0; j < r; ++j) {
        xa_row[j] = dot(x_row, a + j * k, k);
        t[j] = xa_row[j] * scaling;
        if (rs != nullptr) t[j] = t[j] * rs[j];
      }
      // sum[c] = sum_j t[j] * B[c, j], j in order; then added to x @ W^T
      for (int64_t c = 0; c < n; ++c) sum[c] = t[0] * bt[c];
      for (int64_t j = 1; j < r; ++j) {
        const float tj = t[j];
        const float* row = bt + j * n;
        for (int64_t c = 0; c < n; ++c) sum[c] += tj * row[c];
      }
      float* y_row = y + i * n;
      for (int64_t c = 0; c < n; ++c) y_row[c] += sum[c];
    }
  }
  if (bias != 0) {
    const float* bs = reinterpret_cast<const float*>(bias);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t c = 0; c < n; ++c) y[i * n + c] += bs[c];
    }
  }
  if (out_scale != 0) {
    const float* os = reinterpret_cast<const float*>(out_scale);
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t c = 0; c < n; ++c) y[i * n + c] *= os[c];
    }
  }
}

void qlora_small_backward(uintptr_t grad_y, int64_t grad_y_len, uintptr_t x, int64_t x_len,
                          int64_t m, int64_t n, int64_t k, uintptr_t packed, int64_t packed_len,
                          uintptr_t absmax, int64_t absmax_len, int64_t blocksize, int quant_type,
                          uintptr_t nested_absmax, int64_t nested_absmax_len, uintptr_t nested_code,
                          uintptr_t offset, int64_t nested_blocksize, uintptr_t lora_a,
                          int64_t lora_a_len, uintptr_t lora_b, int64_t lora_b_len, uintptr_t xa,
                          int64_t xa_len, int64_t r, float scaling, uintptr_t rank_scale,
                          int64_t rank_scale_len, uintptr_t out_scale, int64_t out_scale_len,
                          uintptr_t dx, int64_t dx_len, uintptr_t da, int64_t da_len, uintptr_t db,
                          int64_t db_len) {
  using namespace host;
  const char* fn = "qlora_small_backward";
  check_positive(fn, "m", m);
  check_positive(fn, "n", n);
  check_positive(fn, "k", k);
  check_nonneg(fn, "r", r);
  const int64_t mn = checked_mul(fn, "m", m, "n", n);
  const int64_t mk = checked_mul(fn, "m", m, "k", k);
  const int64_t numel = checked_mul(fn, "n", n, "k", k);
  check_ptr(fn, "grad_y", grad_y);
  check_len(fn, "grad_y", grad_y_len, mn);
  const bool lora = lora_a != 0;
  if (lora) {
    check_positive(fn, "r", r);
    check_len(fn, "lora_a", lora_a_len, checked_mul(fn, "r", r, "k", k));
    check_ptr(fn, "lora_b", lora_b);
    check_len(fn, "lora_b", lora_b_len, checked_mul(fn, "n", n, "r", r));
    if (rank_scale != 0) check_len(fn, "rank_scale", rank_scale_len, r);
  } else if (da != 0 || db != 0) {
    fail(fn, "da and db need lora_a and lora_b");
  }
  if (out_scale != 0) check_len(fn, "out_scale", out_scale_len, n);
  if (dx != 0) {  // W is decoded only for dx: its codes and statistics checked here
    check_len(fn, "dx", dx_len, mk);
    check_positive(fn, "blocksize", blocksize);
    check_ptr(fn, "packed", packed);
    check_ptr(fn, "absmax", absmax);
    check_len(fn, "packed", packed_len, packed4_len(numel));
    check_len(fn, "absmax", absmax_len, ceil_div(numel, blocksize));
    if (nested_absmax != 0) {
      check_positive(fn, "nested_blocksize", nested_blocksize);
      check_len(fn, "nested_absmax", nested_absmax_len,
                ceil_div(ceil_div(numel, blocksize), nested_blocksize));
      check_ptr(fn, "nested_code", nested_code);
      check_ptr(fn, "offset", offset);
    }
  }
  if (da != 0) {
    check_ptr(fn, "x", x);
    check_len(fn, "x", x_len, mk);
    check_len(fn, "da", da_len, checked_mul(fn, "r", r, "k", k));
  }
  if (db != 0) {
    check_ptr(fn, "xa", xa);
    check_len(fn, "xa", xa_len, checked_mul(fn, "m", m, "r", r));
    check_len(fn, "db", db_len, checked_mul(fn, "n", n, "r", r));
  }

  // scratch: dy' = dy * out_scale [m, n] (when scaled), gs [m, r], W [n, k] (when dx)
  thread_local std::vector<float> scratch;
  const int64_t w_elems = dx != 0 ? numel : 0;
  const int64_t need = (out_scale != 0 ? mn : 0) + m * r + w_elems + r;
  if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(static_cast<size_t>(need));
  float* next = scratch.data();
  const float* dy = reinterpret_cast<const float*>(grad_y);
  if (out_scale != 0) {
    const float* os = reinterpret_cast<const float*>(out_scale);
    float* scaled = next;
    next += mn;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t c = 0; c < n; ++c) scaled[i * n + c] = dy[i * n + c] * os[c];
    }
    dy = scaled;
  }
  const float* a = reinterpret_cast<const float*>(lora_a);
  const float* b = reinterpret_cast<const float*>(lora_b);
  const float* rs = reinterpret_cast<const float*>(rank_scale);
  float* gs = next;
  next += m * r;
  float* w = next;
  next += w_elems;
  float* col = next;  // one row's r values

  if (lora && (dx != 0 || da != 0)) {
    // g = dy' @ B [m, r] (sum over n in order), gs = (g * scaling) * rank_scale
    for (int64_t i = 0; i < m; ++i) {
      float* g = gs + i * r;
      for (int64_t j = 0; j < r; ++j) g[j] = 0.0f;
      for (int64_t c = 0; c < n; ++c) {
        const float d = dy[i * n + c];
        const float* brow = b + c * r;
        for (int64_t j = 0; j < r; ++j) g[j] += d * brow[j];
      }
      for (int64_t j = 0; j < r; ++j) {
        g[j] = g[j] * scaling;
        if (rs != nullptr) g[j] = g[j] * rs[j];
      }
    }
  }
  if (dx != 0) {
    dequantize_4bit(packed, packed_len, absmax, absmax_len, numel, blocksize, quant_type,
                    reinterpret_cast<uintptr_t>(w), kF32, nested_absmax, nested_absmax_len,
                    nested_code, offset, nested_blocksize, 1);
    float* out = reinterpret_cast<float*>(dx);
    thread_local std::vector<float> acc_row;
    if (static_cast<int64_t>(acc_row.size()) < k) acc_row.resize(static_cast<size_t>(k));
    float* acc = acc_row.data();
    for (int64_t i = 0; i < m; ++i) {
      float* row = out + i * k;
      // dx = gs @ A (sum over j in order), then + dy' @ W (sum over n in order)
      for (int64_t kk = 0; kk < k; ++kk) row[kk] = 0.0f;
      if (lora) {
        for (int64_t j = 0; j < r; ++j) {
          const float gj = gs[i * r + j];
          const float* arow = a + j * k;
          for (int64_t kk = 0; kk < k; ++kk) row[kk] += gj * arow[kk];
        }
      }
      for (int64_t kk = 0; kk < k; ++kk) acc[kk] = 0.0f;
      for (int64_t c = 0; c < n; ++c) {
        const float d = dy[i * n + c];
        const float* wrow = w + c * k;
        for (int64_t kk = 0; kk < k; ++kk) acc[kk] += d * wrow[kk];
      }
      for (int64_t kk = 0; kk < k; ++kk) row[kk] += acc[kk];
    }
  }
  if (da != 0) {
    // dA = gs^T @ x [r, k] (sum over the rows of x in order)
    const float* xf = reinterpret_cast<const float*>(x);
    float* out = reinterpret_cast<float*>(da);
    for (int64_t j = 0; j < r; ++j) {
      float* row = out + j * k;
      for (int64_t kk = 0; kk < k; ++kk) row[kk] = 0.0f;
      for (int64_t i = 0; i < m; ++i) {
        const float g = gs[i * r + j];
        const float* xrow = xf + i * k;
        for (int64_t kk = 0; kk < k; ++kk) row[kk] += g * xrow[kk];
      }
    }
  }
  if (db != 0) {
    // dB = dy'^T @ xs [n, r], xs = (xa * scaling) * rank_scale (sum over m in order)
    const float* xav = reinterpret_cast<const float*>(xa);
    float* out = reinterpret_cast<float*>(db);
    for (int64_t idx = 0; idx < n * r; ++idx) out[idx] = 0.0f;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < r; ++j) {
        col[j] = xav[i * r + j] * scaling;
        if (rs != nullptr) col[j] = col[j] * rs[j];
      }
      for (int64_t c = 0; c < n; ++c) {
        const float d = dy[i * n + c];
        float* row = out + c * r;
        for (int64_t j = 0; j < r; ++j) row[j] += d * col[j];
      }
    }
  }
}

}  // namespace cpu
}  // namespace qpeft
