// The extension module mdm_fast._C: each kernel family adds its functions through its bind_<family>.
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA kernels of mdm_fast (raw device pointers, launched on the caller's stream)";
  bind_group_norm(m);
}
