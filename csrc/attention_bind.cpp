// pybind11 bindings of the flash attention launchers (csrc/attention.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention.h"

namespace py = pybind11;

void bind_attention(py::module_& m) {
  m.def("attention_fwd", &fastnets::attention_fwd, py::arg("sizes"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("mask"), py::arg("mask_kind"), py::arg("rng"), py::arg("out"), py::arg("lse"), py::arg("sq"),
        py::arg("sk"), py::arg("sv"), py::arg("sm"), py::arg("so"), py::arg("scale"), py::arg("p_drop"),
        py::arg("drop_scale"), py::arg("causal"), py::arg("dtype"), py::arg("stream"),
        "Flash attention forward (sizes [B, H, L, S, E, EV, GROUP]; pointers, strides as integers)");
  m.def("attention_bwd", &fastnets::attention_bwd, py::arg("sizes"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("mask"), py::arg("mask_kind"), py::arg("rng"), py::arg("out"), py::arg("dout"), py::arg("lse"),
        py::arg("delta"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("ds"), py::arg("sq"), py::arg("sk"),
        py::arg("sv"), py::arg("sm"), py::arg("so"), py::arg("sdo"), py::arg("sdq"), py::arg("sdk"), py::arg("sdv"),
        py::arg("scale"), py::arg("p_drop"), py::arg("drop_scale"), py::arg("causal"), py::arg("dtype"),
        py::arg("stream"), "Flash attention backward: dq, dk, dv (and ds when its pointer is nonzero)");
  m.def("attention_dropout_mask", &fastnets::attention_dropout_mask, py::arg("rng"), py::arg("keep"), py::arg("BH"),
        py::arg("L"), py::arg("S"), py::arg("p_drop"), py::arg("stream"),
        "The attention kernels' dropout keep mask for a seed (uint8 [BH, L, S])");
}
