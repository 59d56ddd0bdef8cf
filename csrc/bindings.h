// One bind_<family>(m) per kernel family, each defined in csrc/<family>_bind.cpp and called from bindings.cpp.
#pragma once

#include <pybind11/pybind11.h>

void bind_group_norm(pybind11::module_& m);
