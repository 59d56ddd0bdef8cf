// GroupNorm + per-sample scale-shift + SiLU (mdm_fast.ops.group_norm_act), plain CUDA C++ (no torch headers).
//
// x is seen as (B, C, S), S = H*W (or T*H*W), in one of two layouts:
//   NCHW:           offset = b*C*S + c*S + s
//   NHWC (channels_last): offset = b*C*S + s*C + c
// The work is split in passes: per-channel partial statistics over chunks of `rows` rows, a per-(sample,
// group) finalize that turns them into per-(sample, channel) coefficients, and an element-wise apply.
// All arithmetic is fp32. Parameters (weight, bias, input_bias: (C,); scale, shift: (B, C)) are fp32 and may
// be null. The norm reads x + input_bias[c] (the bias of the convolution that wrote x without it).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace mdm_fast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct GroupNormShape {
  int64_t B, C, S;
  int64_t G;
  int64_t rows;    // rows per partial-statistics chunk
  int64_t nchunk;  // ceil(S / rows)
  bool channels_last;
};

struct GroupNormParams {
  const float* weight;  // (C,) or null (1)
  const float* bias;    // (C,) or null (0)
  const float* scale;   // (B, C) or null (0)
  const float* shift;   // (B, C) or null (0)
  const float* input_bias;  // (C,) or null (0): added to x before the norm
};

// Floats per (sample, channel) in the coefficient workspace `coef` (B, C, kCoefStride).
constexpr int kCoefStride = 8;

// y = act((x + input_bias - mean) * rstd * w * (1 + scale) + bias * (1 + scale) + shift).
// Workspace: pmean, pm2 (B, nchunk, C); coef (B, C, kCoefStride). Outputs mean, rstd (B, G) of x + input_bias.
cudaError_t group_norm_fwd(DType dtype, const void* x, void* y, GroupNormParams p, float* mean, float* rstd,
                           float* pmean, float* pm2, float* coef, GroupNormShape shape, float eps, bool silu,
                           cudaStream_t stream);

// dx from dy (same layout as x) and the saved mean, rstd (B, G). Outputs s1 = sum_s dz, s2 = sum_s dz * xhat
// (B, C), dz being the gradient before the activation; the parameter gradients follow from them.
// Workspace: ps1, ps2 (B, nchunk, C); coef (B, C, kCoefStride).
cudaError_t group_norm_bwd(DType dtype, const void* dy, const void* x, void* dx, GroupNormParams p,
                           const float* mean, const float* rstd, float* ps1, float* ps2, float* s1, float* s2,
                           float* coef, GroupNormShape shape, bool silu, cudaStream_t stream);

}  // namespace mdm_fast
