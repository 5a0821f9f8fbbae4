// pybind11 bindings of fastnets._C. Each op family declares its host launchers in
// csrc/<family>.h and binds them in csrc/<family>_bind.cpp (bind_<family>(m), called below).
// Python calls them through fastnets/_ext.py, which checks dtypes, devices and shapes first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "device.h"

namespace py = pybind11;

// One declaration per op family (defined in csrc/<family>_bind.cpp), and one call below.
void bind_attention(py::module_& m);
void bind_conv(py::module_& m);
void bind_bias_act(py::module_& m);
void bind_layer_norm(py::module_& m);
void bind_lrn(py::module_& m);
void bind_norm_act(py::module_& m);
void bind_pool(py::module_& m);

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnets CUDA C++ kernels (raw pointers, sizes, strides and streams as integers)";
  m.def("device_count", []() {
    std::string reason;
    int n = fastnets::device_count_or_error(&reason);
    return py::make_tuple(n, reason);
  }, "(number of CUDA devices, the runtime's error when there are none)");
  m.def("device_name", &fastnets::device_name, py::arg("device"));
  m.def("runtime_version", &fastnets::runtime_version);
  m.def("synchronize", &fastnets::synchronize, py::arg("stream"));
  bind_attention(m);
  bind_bias_act(m);
  bind_layer_norm(m);
  bind_lrn(m);
  bind_norm_act(m);
  bind_pool(m);
  bind_conv(m);
}
