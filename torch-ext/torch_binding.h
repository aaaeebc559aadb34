// The op implementations the binding registers (declared beside their sources).
#pragma once

#include "../rotary_kernels/rotary_ops.h"
