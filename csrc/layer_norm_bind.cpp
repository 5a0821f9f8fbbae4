// pybind11 bindings of the layer normalization launchers (csrc/layer_norm.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "layer_norm.h"

namespace py = pybind11;

void bind_layer_norm(py::module_& m) {
  m.def("layer_norm_forward", &fastnets::layer_norm_forward, py::arg("x"), py::arg("r"), py::arg("w"), py::arg("b"),
        py::arg("y"), py::arg("s_out"), py::arg("mean"), py::arg("rstd"), py::arg("M"), py::arg("N"), py::arg("sx"),
        py::arg("sr"), py::arg("eps"), py::arg("has_res"), py::arg("has_w"), py::arg("has_b"), py::arg("store_sum"),
        py::arg("dtype"), py::arg("wdtype"), py::arg("stream"),
        "layer norm of the rows of [M, N] (+ residual), saving mean and rstd");
  m.def("layer_norm_backward", &fastnets::layer_norm_backward, py::arg("dy"), py::arg("ds"), py::arg("x"),
        py::arg("r"), py::arg("w"), py::arg("mean"), py::arg("rstd"), py::arg("dx"), py::arg("dw"), py::arg("db"),
        py::arg("M"), py::arg("N"), py::arg("sdy"), py::arg("sds"), py::arg("sx"), py::arg("sr"), py::arg("has_ds"),
        py::arg("has_res"), py::arg("has_w"), py::arg("dtype"), py::arg("wdtype"), py::arg("stream"),
        "layer norm backward: grad input, and grad weight / bias when their pointers are set");
}
