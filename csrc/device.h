#pragma once
#include <string>

#include "common.h"

namespace fastnets {
// Number of CUDA devices, or 0 with *reason set to the runtime's error (no driver, no device).
int device_count_or_error(std::string* reason);
std::string device_name(int device);
int runtime_version();
void synchronize(std::uintptr_t stream);
}  // namespace fastnets
