// pybind11 bindings of the batch-norm + activation launchers (csrc/norm_act.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "norm_act.h"

namespace py = pybind11;

void bind_norm_act(py::module_& m) {
  m.def("norm_act_stats", &fastnets::norm_act_stats, py::arg("x"), py::arg("dims"), py::arg("sx"),
        py::arg("channels_inner"), py::arg("pmean"), py::arg("pm2"), py::arg("P"), py::arg("rows_per"),
        py::arg("bmean"), py::arg("bvar"), py::arg("mean"), py::arg("var"), py::arg("rmean"), py::arg("rvar"),
        py::arg("momentum"), py::arg("unbias"), py::arg("dtype"), py::arg("stream"),
        "batch mean and biased variance over [N, C, S] (two levels, deterministic), running-stat update");
  m.def("norm_act_forward", &fastnets::norm_act_forward, py::arg("x"), py::arg("r"), py::arg("y"), py::arg("dims"),
        py::arg("sx"), py::arg("sr"), py::arg("sy"), py::arg("mean"), py::arg("var"), py::arg("w"), py::arg("b"),
        py::arg("eps"), py::arg("act"), py::arg("channels_inner"), py::arg("dtype"), py::arg("stream"),
        "y = act(batch-norm(x) + r) in one pass");
  m.def("norm_act_backward", &fastnets::norm_act_backward, py::arg("dy"), py::arg("x"), py::arg("r"), py::arg("dx"),
        py::arg("dr"), py::arg("dims"), py::arg("sdy"), py::arg("sx"), py::arg("sr"), py::arg("sdx"), py::arg("sdr"),
        py::arg("mean"), py::arg("var"), py::arg("w"), py::arg("b"), py::arg("psum_dz"), py::arg("psum_dzx"),
        py::arg("P"), py::arg("rows_per"), py::arg("sum_dz"), py::arg("sum_dzx"), py::arg("eps"), py::arg("act"),
        py::arg("train"), py::arg("channels_inner"), py::arg("dtype"), py::arg("stream"),
        "backward of act(batch-norm(x) + r): reduction pass, then dx and the residual's gradient");
}
