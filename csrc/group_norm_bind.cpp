// pybind11 bindings of csrc/group_norm.h. Tensors arrive as raw device pointers (uintptr_t, 0 for an absent
// parameter); the Python side (mdm_fast/ops/group_norm_act.py) allocates every output and workspace.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "group_norm.h"

namespace py = pybind11;

namespace {

mdm_fast::GroupNormShape make_shape(int64_t B, int64_t C, int64_t S, int64_t G, int64_t rows, bool channels_last) {
  if (B < 1 || C < 1 || S < 1 || G < 1 || C % G != 0) {
    throw std::invalid_argument("group_norm: need B, C, S >= 1 and G dividing C, got B=" + std::to_string(B) +
                                " C=" + std::to_string(C) + " S=" + std::to_string(S) + " G=" + std::to_string(G));
  }
  if (B > 65535 || C > 65535) {
    throw std::invalid_argument("group_norm: B and C must be at most 65535 (CUDA grid limits)");
  }
  if (rows < 1) throw std::invalid_argument("group_norm: rows must be >= 1");
  return {B, C, S, G, rows, (S + rows - 1) / rows, channels_last};
}

mdm_fast::DType make_dtype(int code) {
  if (code < 0 || code > 2) {
    throw std::invalid_argument("group_norm: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(code));
  }
  return static_cast<mdm_fast::DType>(code);
}

template <typename T> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

mdm_fast::GroupNormParams params(uintptr_t w, uintptr_t b, uintptr_t sc, uintptr_t sh, uintptr_t xb) {
  return {ptr<const float>(w), ptr<const float>(b), ptr<const float>(sc), ptr<const float>(sh), ptr<const float>(xb)};
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

void bind_group_norm(py::module_& m) {
  m.def(
      "group_norm_fwd",
      [](uintptr_t x, uintptr_t y, uintptr_t w, uintptr_t b, uintptr_t sc, uintptr_t sh, uintptr_t xb,
         uintptr_t mean, uintptr_t rstd, uintptr_t pmean, uintptr_t pm2, uintptr_t coef, int64_t B, int64_t C,
         int64_t S, int64_t G, int64_t rows, bool channels_last, double eps, bool silu, int dtype,
         uintptr_t stream) {
        check(mdm_fast::group_norm_fwd(make_dtype(dtype), ptr<const void>(x), ptr<void>(y),
                                       params(w, b, sc, sh, xb), ptr<float>(mean), ptr<float>(rstd),
                                       ptr<float>(pmean), ptr<float>(pm2), ptr<float>(coef),
                                       make_shape(B, C, S, G, rows, channels_last), static_cast<float>(eps), silu,
                                       reinterpret_cast<cudaStream_t>(stream)),
              "group_norm_fwd");
      },
      "GroupNorm of x + input_bias, scale-shift, SiLU: forward. Workspace: pmean, pm2 (B, ceil(S/rows), C) "
      "and coef (B, C, 8) fp32; outputs y (x's dtype and layout), mean and rstd (B, G) fp32.");
  m.def(
      "group_norm_bwd",
      [](uintptr_t dy, uintptr_t x, uintptr_t dx, uintptr_t w, uintptr_t b, uintptr_t sc, uintptr_t sh,
         uintptr_t xb, uintptr_t mean, uintptr_t rstd, uintptr_t ps1, uintptr_t ps2, uintptr_t s1, uintptr_t s2,
         uintptr_t coef, int64_t B, int64_t C, int64_t S, int64_t G, int64_t rows, bool channels_last, bool silu,
         int dtype, uintptr_t stream) {
        check(mdm_fast::group_norm_bwd(make_dtype(dtype), ptr<const void>(dy), ptr<const void>(x), ptr<void>(dx),
                                       params(w, b, sc, sh, xb), ptr<const float>(mean), ptr<const float>(rstd),
                                       ptr<float>(ps1), ptr<float>(ps2), ptr<float>(s1), ptr<float>(s2),
                                       ptr<float>(coef), make_shape(B, C, S, G, rows, channels_last), silu,
                                       reinterpret_cast<cudaStream_t>(stream)),
              "group_norm_bwd");
      },
      "GroupNorm + scale-shift + SiLU backward: dx, and s1 = sum dz, s2 = sum dz*xhat per (b, c) in fp32. "
      "Workspace: ps1, ps2 (B, ceil(S/rows), C) and coef (B, C, 8) fp32.");
}
