// pybind11 bindings of the bias + activation launchers (csrc/bias_act.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bias_act.h"

namespace py = pybind11;

void bind_bias_act(py::module_& m) {
  m.def("bias_act_forward", &fastnets::bias_act_forward, py::arg("x"), py::arg("b"), py::arg("y"), py::arg("M"),
        py::arg("F"), py::arg("sx"), py::arg("has_bias"), py::arg("act"), py::arg("dtype"), py::arg("bdtype"),
        py::arg("stream"), "y = act(x + b) over [M, F]");
  m.def("bias_act_backward", &fastnets::bias_act_backward, py::arg("dy"), py::arg("x"), py::arg("b"), py::arg("dx"),
        py::arg("db"), py::arg("M"), py::arg("F"), py::arg("sdy"), py::arg("sx"), py::arg("has_bias"), py::arg("act"),
        py::arg("dtype"), py::arg("bdtype"), py::arg("stream"), "grad input, and grad bias when db is set");
}
