// The CPU kernel (rotary_cpu.h) for fp16 q/k, with fp16 or fp32 cos/sin: a file of its own so
// that the build compiles the dtypes in parallel.
#include "rotary_cpu.h"

template RK_CPU_TYPED(c10::Half, c10::Half);
template RK_CPU_TYPED(c10::Half, float);
