// Kernels of group_norm.h. Passes (forward / backward):
//   coef     (bwd only) per (b, c): A, D with z = x*A + D; P, Q with xhat = x*P + Q
//   partial  per (b, chunk, c): forward (mean, M2) of x (Welford); backward (sum dz, sum dz*xhat)
//   finalize per (b, g): forward mean, rstd, then A, D; backward s1, s2 and K, L, M with dx = K*dz + L*x + M
//   apply    element-wise: y = act(x*A + D); dx = K*dz + L*x + M
#include "group_norm.h"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mdm_fast {
namespace {

constexpr int kThreads = 256;
// Coefficient slots in coef[(b*C + c)*kCoefStride + slot].
enum Slot { kA = 0, kD = 1, kP = 2, kQ = 3, kK = 4, kL = 5, kM = 6 };

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }

// d silu(z) / dz
__device__ __forceinline__ float dsilu(float z) {
  const float s = sigmoid(z);
  return s * (1.f + z * (1.f - s));
}

// z = xhat * k + d for channel c of sample b.
struct Affine { float k, d; };
__device__ __forceinline__ float input_bias(const GroupNormParams& p, int64_t c) {
  return p.input_bias ? p.input_bias[c] : 0.f;
}

__device__ __forceinline__ Affine channel_affine(const GroupNormParams& p, int64_t b, int64_t c, int64_t C) {
  const float w = p.weight ? p.weight[c] : 1.f;
  const float bias = p.bias ? p.bias[c] : 0.f;
  const float gain = p.scale ? 1.f + p.scale[b * C + c] : 1.f;
  const float shift = p.shift ? p.shift[b * C + c] : 0.f;
  return {w * gain, bias * gain + shift};
}

// ---- reductions ------------------------------------------------------------------------------

struct Welford {  // count, mean, sum of squared deviations
  float n = 0.f, mean = 0.f, m2 = 0.f;
  __device__ void push(float v) {
    n += 1.f;
    const float d = v - mean;
    mean += __fdividef(d, n);
    m2 += d * (v - mean);
  }
  __device__ void merge(const Welford& o) {
    const float nn = n + o.n;
    if (nn == 0.f) return;
    const float delta = o.mean - mean, frac = __fdividef(o.n, nn);
    mean += delta * frac;
    m2 += o.m2 + delta * delta * n * frac;
    n = nn;
  }
  __device__ Welford shfl_down(int off) const {
    Welford o;
    o.n = __shfl_down_sync(0xffffffffu, n, off);
    o.mean = __shfl_down_sync(0xffffffffu, mean, off);
    o.m2 = __shfl_down_sync(0xffffffffu, m2, off);
    return o;
  }
};

struct Sum2 {
  float a = 0.f, b = 0.f;
  __device__ void merge(const Sum2& o) { a += o.a; b += o.b; }
  __device__ Sum2 shfl_down(int off) const {
    Sum2 o;
    o.a = __shfl_down_sync(0xffffffffu, a, off);
    o.b = __shfl_down_sync(0xffffffffu, b, off);
    return o;
  }
};

// Reduce over a 1-D block (a multiple of 32 threads); the result is valid in thread 0.
template <class Acc>
__device__ Acc block_reduce(Acc v, Acc* smem /* [32] */) {
  for (int off = 16; off > 0; off >>= 1) v.merge(v.shfl_down(off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : Acc{};
    for (int off = 16; off > 0; off >>= 1) v.merge(v.shfl_down(off));
  }
  return v;
}

// ---- partial statistics ----------------------------------------------------------------------

template <typename T>
struct StatsOp {  // forward: Welford of x
  using Acc = Welford;
  const T* x;
  float *out1, *out2;
  struct Chan {};
  __device__ Chan channel(int64_t, int64_t) const { return {}; }
  __device__ void push(Acc& acc, const Chan&, int64_t off) const { acc.push(to_float(x[off])); }
  __device__ void store(const Acc& acc, int64_t i) const { out1[i] = acc.mean; out2[i] = acc.m2; }
};

template <typename T>
struct GradOp {  // backward: sum dz and sum dz * xhat
  using Acc = Sum2;
  const T* x;
  const T* dy;
  const float* coef;
  int64_t C;
  bool silu;
  float *out1, *out2;
  struct Chan { float a, d, p, q; };
  __device__ Chan channel(int64_t b, int64_t c) const {
    const float* k = coef + (b * C + c) * kCoefStride;
    return {k[kA], k[kD], k[kP], k[kQ]};
  }
  __device__ void push(Acc& acc, const Chan& ch, int64_t off) const {
    const float xv = to_float(x[off]);
    float dz = to_float(dy[off]);
    if (silu) dz *= dsilu(xv * ch.a + ch.d);
    acc.a += dz;
    acc.b += dz * (xv * ch.p + ch.q);
  }
  __device__ void store(const Acc& acc, int64_t i) const { out1[i] = acc.a; out2[i] = acc.b; }
};

// NCHW: block (chunk, c, b) of kThreads threads reduces one contiguous run of rows of one channel.
template <class Op>
__global__ void partial_nchw(Op op, GroupNormShape sh) {
  __shared__ typename Op::Acc smem[32];
  const int64_t k = blockIdx.x, c = blockIdx.y, b = blockIdx.z;
  const int64_t begin = k * sh.rows, end = min(sh.S, begin + sh.rows);
  const int64_t base = (b * sh.C + c) * sh.S;
  const auto ch = op.channel(b, c);
  typename Op::Acc acc;
#pragma unroll 4
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) op.push(acc, ch, base + s);
  acc = block_reduce(acc, smem);
  if (threadIdx.x == 0) op.store(acc, (b * sh.nchunk + k) * sh.C + c);
}

// NHWC: block (chunk, channel block of 32, b) of 32 x 8 threads; a warp reads 32 adjacent channels of a row.
template <class Op>
__global__ void partial_nhwc(Op op, GroupNormShape sh) {
  __shared__ typename Op::Acc smem[8][32];
  const int64_t k = blockIdx.x, b = blockIdx.z;
  const int64_t c = blockIdx.y * 32 + threadIdx.x;
  const int64_t begin = k * sh.rows, end = min(sh.S, begin + sh.rows);
  typename Op::Acc acc;
  if (c < sh.C) {
    const auto ch = op.channel(b, c);
    const int64_t base = b * sh.C * sh.S + c;
#pragma unroll 4
    for (int64_t s = begin + threadIdx.y; s < end; s += blockDim.y) op.push(acc, ch, base + s * sh.C);
  }
  smem[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < sh.C) {
    for (int j = 1; j < 8; ++j) acc.merge(smem[j][threadIdx.x]);
    op.store(acc, (b * sh.nchunk + k) * sh.C + c);
  }
}

template <class Op>
void launch_partial(const Op& op, const GroupNormShape& sh, cudaStream_t stream) {
  if (sh.channels_last) {
    const dim3 grid(sh.nchunk, (sh.C + 31) / 32, sh.B);
    partial_nhwc<<<grid, dim3(32, 8), 0, stream>>>(op, sh);
  } else {
    const dim3 grid(sh.nchunk, sh.C, sh.B);
    partial_nchw<<<grid, kThreads, 0, stream>>>(op, sh);
  }
}

// ---- finalize --------------------------------------------------------------------------------

// Block per (b, g): merge the group's partials of x (chunk k holds min(rows, S - k*rows) rows) into the mean
// and rstd of x + input_bias, then write A, D for the group's channels.
__global__ void fwd_finalize(const float* pmean, const float* pm2, float* mean_out, float* rstd_out, float* coef,
                             GroupNormParams p, GroupNormShape sh, float eps) {
  __shared__ Sum2 smem[32];
  __shared__ float stat[2];
  const int64_t b = blockIdx.x / sh.G, g = blockIdx.x % sh.G;
  const int64_t cg = sh.C / sh.G, nchunk = sh.nchunk, items = nchunk * cg;
  const float n = static_cast<float>(cg * sh.S);
  Sum2 acc;
  for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
    const int64_t k = i / cg, c = g * cg + i % cg;
    acc.a += static_cast<float>(min(sh.rows, sh.S - k * sh.rows)) * (pmean[(b * nchunk + k) * sh.C + c] +
                                                                     input_bias(p, c));
  }
  acc = block_reduce(acc, smem);
  if (threadIdx.x == 0) stat[0] = acc.a / n;
  __syncthreads();
  const float mean = stat[0];
  acc = Sum2{};
  for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
    const int64_t k = i / cg, c = g * cg + i % cg, j = (b * nchunk + k) * sh.C + c;
    const float dm = pmean[j] + input_bias(p, c) - mean;
    acc.a += pm2[j] + static_cast<float>(min(sh.rows, sh.S - k * sh.rows)) * dm * dm;
  }
  acc = block_reduce(acc, smem);
  if (threadIdx.x == 0) {
    stat[1] = rsqrtf(acc.a / n + eps);
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = stat[1];
  }
  __syncthreads();
  const float rstd = stat[1];
  for (int64_t cl = threadIdx.x; cl < cg; cl += blockDim.x) {
    const int64_t c = g * cg + cl;
    const Affine af = channel_affine(p, b, c, sh.C);
    float* k = coef + (b * sh.C + c) * kCoefStride;
    k[kA] = rstd * af.k;
    k[kD] = af.d - (mean - input_bias(p, c)) * rstd * af.k;
  }
}

__global__ void bwd_coef(const float* mean, const float* rstd, float* coef, GroupNormParams p, GroupNormShape sh) {
  const int64_t cg = sh.C / sh.G;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < sh.B * sh.C;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = i / sh.C, c = i % sh.C, bg = b * sh.G + c / cg;
    const float m = mean[bg] - input_bias(p, c), r = rstd[bg];  // x + input_bias - mean = x - m
    const Affine af = channel_affine(p, b, c, sh.C);
    float* k = coef + i * kCoefStride;
    k[kA] = r * af.k;
    k[kD] = af.d - m * r * af.k;
    k[kP] = r;
    k[kQ] = -m * r;
  }
}

// Block per (b, g): s1, s2 per channel, then the group means c1 = mean(k*dz), c2 = mean(k*dz*xhat) and
// dx = rstd * (k*dz - c1 - xhat*c2) = K*dz + L*x + M.
__global__ void bwd_finalize(const float* ps1, const float* ps2, const float* rstd_in, float* s1, float* s2,
                             float* coef, GroupNormParams p, GroupNormShape sh) {
  __shared__ Sum2 smem[32];
  __shared__ float stat[2];
  const int64_t b = blockIdx.x / sh.G, g = blockIdx.x % sh.G;
  const int64_t cg = sh.C / sh.G, nchunk = sh.nchunk;
  Sum2 acc;
  for (int64_t cl = threadIdx.x; cl < cg; cl += blockDim.x) {
    const int64_t c = g * cg + cl;
    float t1 = 0.f, t2 = 0.f;
    for (int64_t k = 0; k < nchunk; ++k) {
      t1 += ps1[(b * nchunk + k) * sh.C + c];
      t2 += ps2[(b * nchunk + k) * sh.C + c];
    }
    s1[b * sh.C + c] = t1;
    s2[b * sh.C + c] = t2;
    const float kc = channel_affine(p, b, c, sh.C).k;
    acc.a += kc * t1;
    acc.b += kc * t2;
  }
  acc = block_reduce(acc, smem);
  if (threadIdx.x == 0) {
    const float n = static_cast<float>(cg * sh.S);
    stat[0] = acc.a / n;
    stat[1] = acc.b / n;
  }
  __syncthreads();
  const float c1 = stat[0], c2 = stat[1], r = rstd_in[blockIdx.x];
  for (int64_t cl = threadIdx.x; cl < cg; cl += blockDim.x) {
    const int64_t c = g * cg + cl;
    float* k = coef + (b * sh.C + c) * kCoefStride;
    k[kK] = r * channel_affine(p, b, c, sh.C).k;
    k[kL] = -r * r * c2;
    k[kM] = -r * (c1 + c2 * k[kQ]);
  }
}

// ---- element-wise apply ----------------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

// VEC consecutive elements share (b, c) in NCHW (S % VEC == 0) or are channels c..c+VEC-1 in NHWC (C % VEC == 0).
template <typename T, int VEC, bool BWD>
__global__ void apply(const T* x, const T* dy, T* out, const float* coef, GroupNormShape sh, bool silu) {
  const int64_t cs = sh.C * sh.S, nvec = sh.B * cs / VEC;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < nvec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v * VEC, b = i / cs, r = i - b * cs;
    const int64_t c0 = sh.channels_last ? r % sh.C : r / sh.S;
    const Vec<T, VEC> xv = reinterpret_cast<const Vec<T, VEC>*>(x)[v];
    Vec<T, VEC> dyv;
    if (BWD) dyv = reinterpret_cast<const Vec<T, VEC>*>(dy)[v];
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float* k = coef + (b * sh.C + c0 + (sh.channels_last ? j : 0)) * kCoefStride;
      const float xf = to_float(xv.v[j]);
      const float z = xf * k[kA] + k[kD];
      float res;
      if (BWD) {
        float dz = to_float(dyv.v[j]);
        if (silu) dz *= dsilu(z);
        res = k[kK] * dz + k[kL] * xf + k[kM];
      } else {
        res = silu ? z * sigmoid(z) : z;
      }
      o.v[j] = from_float<T>(res);
    }
    reinterpret_cast<Vec<T, VEC>*>(out)[v] = o;
  }
}

int num_sms() {
  static int sms = [] {
    int dev = 0, n = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return n > 0 ? n : 132;
  }();
  return sms;
}

template <typename T, bool BWD>
void launch_apply(const T* x, const T* dy, T* out, const float* coef, const GroupNormShape& sh, bool silu,
                  cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(dy) |
                        reinterpret_cast<uintptr_t>(out)) % 16 == 0;
  const bool vec = aligned && (sh.channels_last ? sh.C : sh.S) % kVec == 0;
  const int64_t n = sh.B * sh.C * sh.S / (vec ? kVec : 1);
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, static_cast<int64_t>(num_sms()) * 16);
  if (vec) {
    apply<T, kVec, BWD><<<blocks, kThreads, 0, stream>>>(x, dy, out, coef, sh, silu);
  } else {
    apply<T, 1, BWD><<<blocks, kThreads, 0, stream>>>(x, dy, out, coef, sh, silu);
  }
}

// ---- entry points ----------------------------------------------------------------------------

template <typename T>
cudaError_t fwd(const void* xp, void* yp, GroupNormParams p, float* mean, float* rstd, float* pmean, float* pm2,
                float* coef, GroupNormShape sh, float eps, bool silu, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xp);
  launch_partial(StatsOp<T>{x, pmean, pm2}, sh, stream);
  fwd_finalize<<<sh.B * sh.G, kThreads, 0, stream>>>(pmean, pm2, mean, rstd, coef, p, sh, eps);
  launch_apply<T, false>(x, x, static_cast<T*>(yp), coef, sh, silu, stream);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd(const void* dyp, const void* xp, void* dxp, GroupNormParams p, const float* mean, const float* rstd,
                float* ps1, float* ps2, float* s1, float* s2, float* coef, GroupNormShape sh, bool silu,
                cudaStream_t stream) {
  const T* x = static_cast<const T*>(xp);
  const T* dy = static_cast<const T*>(dyp);
  const int64_t bc = sh.B * sh.C;
  bwd_coef<<<static_cast<unsigned>(std::min<int64_t>((bc + kThreads - 1) / kThreads, 4096)), kThreads, 0, stream>>>(
      mean, rstd, coef, p, sh);
  launch_partial(GradOp<T>{x, dy, coef, sh.C, silu, ps1, ps2}, sh, stream);
  bwd_finalize<<<sh.B * sh.G, kThreads, 0, stream>>>(ps1, ps2, rstd, s1, s2, coef, p, sh);
  launch_apply<T, true>(x, dy, static_cast<T*>(dxp), coef, sh, silu, stream);
  return cudaGetLastError();
}

}  // namespace

cudaError_t group_norm_fwd(DType dtype, const void* x, void* y, GroupNormParams p, float* mean, float* rstd,
                           float* pmean, float* pm2, float* coef, GroupNormShape shape, float eps, bool silu,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return fwd<float>(x, y, p, mean, rstd, pmean, pm2, coef, shape, eps, silu, stream);
    case DType::kFloat16: return fwd<__half>(x, y, p, mean, rstd, pmean, pm2, coef, shape, eps, silu, stream);
    case DType::kBFloat16:
      return fwd<__nv_bfloat16>(x, y, p, mean, rstd, pmean, pm2, coef, shape, eps, silu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t group_norm_bwd(DType dtype, const void* dy, const void* x, void* dx, GroupNormParams p,
                           const float* mean, const float* rstd, float* ps1, float* ps2, float* s1, float* s2,
                           float* coef, GroupNormShape shape, bool silu, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return bwd<float>(dy, x, dx, p, mean, rstd, ps1, ps2, s1, s2, coef, shape, silu, stream);
    case DType::kFloat16:
      return bwd<__half>(dy, x, dx, p, mean, rstd, ps1, ps2, s1, s2, coef, shape, silu, stream);
    case DType::kBFloat16:
      return bwd<__nv_bfloat16>(dy, x, dx, p, mean, rstd, ps1, ps2, s1, s2, coef, shape, silu, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace mdm_fast
