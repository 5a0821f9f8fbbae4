// pybind11 bindings of the local response normalization launchers (csrc/lrn.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "lrn.h"

namespace py = pybind11;

void bind_lrn(py::module_& m) {
  m.def("lrn_forward", &fastnets::lrn_forward, py::arg("x"), py::arg("y"), py::arg("dims"), py::arg("sx"),
        py::arg("sy"), py::arg("size"), py::arg("alpha"), py::arg("beta"), py::arg("k"), py::arg("dtype"),
        py::arg("stream"), "LRN forward over [N, C, S0, S1, S2] (pointers, sizes, strides as integers)");
  m.def("lrn_backward", &fastnets::lrn_backward, py::arg("g"), py::arg("x"), py::arg("dx"), py::arg("dims"),
        py::arg("sg"), py::arg("sx"), py::arg("sdx"), py::arg("size"), py::arg("alpha"), py::arg("beta"),
        py::arg("k"), py::arg("dtype"), py::arg("stream"), "LRN backward (grad of the input)");
}
