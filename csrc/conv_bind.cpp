// pybind11 bindings of the fused convolution launchers (csrc/conv.h). fastnets/ops/conv.py checks
// every argument (devices, dtypes, shapes, groups) before it calls them.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "conv.h"

namespace py = pybind11;

void bind_conv(py::module_& m) {
  m.def("conv_fwd", &fastnets::conv_fwd, py::arg("x"), py::arg("x_size"), py::arg("x_stride"), py::arg("w"),
        py::arg("w_size"), py::arg("w_stride"), py::arg("bias"), py::arg("res"), py::arg("res_stride"), py::arg("y"),
        py::arg("y_size"), py::arg("y_stride"), py::arg("z"), py::arg("pmean"), py::arg("pm2"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("act"), py::arg("dtype"),
        py::arg("stream"),
        "y = act(conv(x, w) + bias + res) (z: the pre-activation), or with pmean/pm2 the conv output and its "
        "per-tile statistics");
  m.def("conv_stats_tile", &fastnets::conv_stats_tile, py::arg("depthwise"),
        "rows per tile of the statistics conv_fwd writes");
  m.def("conv_stats_finalize", &fastnets::conv_stats_finalize, py::arg("pmean"), py::arg("pm2"), py::arg("mean"),
        py::arg("var"), py::arg("tiles"), py::arg("channels"), py::arg("rows"), py::arg("tile"), py::arg("stream"),
        "per-channel mean and biased variance from the per-tile statistics (Chan's merge)");
  m.def("conv_act_grad", &fastnets::conv_act_grad, py::arg("dy"), py::arg("z"), py::arg("dz"), py::arg("n"),
        py::arg("act"), py::arg("dtype"), py::arg("stream"), "dz = act'(z) * dy over dense tensors");
}
