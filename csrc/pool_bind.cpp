// pybind11 bindings of the pooling launchers (csrc/pool.h), called by fastnets/ops/pool.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "pool.h"

namespace py = pybind11;

void bind_pool(py::module_& m) {
  m.def("pool2d_forward", &fastnets::pool2d_forward, py::arg("x"), py::arg("x_shape"), py::arg("x_strides"),
        py::arg("out"), py::arg("out_shape"), py::arg("out_strides"), py::arg("indices"), py::arg("idx_strides"),
        py::arg("dtype"), py::arg("is_max"), py::arg("adaptive"), py::arg("window"), py::arg("count_include_pad"),
        py::arg("divisor"), py::arg("stream"),
        "Max or average pooling over fixed or adaptive windows, [N, C, H, W] -> [N, C, OH, OW]");
  m.def("pool2d_backward", &fastnets::pool2d_backward, py::arg("grad_out"), py::arg("go_shape"),
        py::arg("go_strides"), py::arg("indices"), py::arg("idx_strides"), py::arg("grad_in"), py::arg("gi_shape"),
        py::arg("gi_strides"), py::arg("dtype"), py::arg("is_max"), py::arg("adaptive"), py::arg("window"),
        py::arg("count_include_pad"), py::arg("divisor"), py::arg("stream"),
        "Gradient of the input of pool2d_forward, a deterministic gather");
  m.def("global_pool2d", &fastnets::global_pool2d, py::arg("x"), py::arg("x_shape"), py::arg("x_strides"),
        py::arg("out"), py::arg("out_strides"), py::arg("indices"), py::arg("idx_strides"), py::arg("dtype"),
        py::arg("is_max"), py::arg("stream"), "Global max or average pool, [N, C, H, W] -> [N, C, 1, 1]");
}
