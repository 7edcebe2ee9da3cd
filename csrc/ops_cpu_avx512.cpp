// The CPU ops again, for CPUs with AVX-512 (F, BW, VL, DQ: 512-bit vectors, 16-bit
// lanes for bf16/fp16); chosen at run time by ops_cpu_dispatch.cpp. Same source, same
// operation order: the same fp32 results.
#define AIM_CPU_NS isa_avx512
#include "ops_cpu.cpp"
