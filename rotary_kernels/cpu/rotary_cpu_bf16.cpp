// The CPU kernel (rotary_cpu.h) for bf16 q/k, with bf16 or fp32 cos/sin: a file of its own so
// that the build compiles the dtypes in parallel.
#include "rotary_cpu.h"

template RK_CPU_TYPED(c10::BFloat16, c10::BFloat16);
template RK_CPU_TYPED(c10::BFloat16, float);
