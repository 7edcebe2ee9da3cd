// The CPU ops again, for CPUs with AVX2 (256-bit vectors); chosen at run time by
// ops_cpu_dispatch.cpp. Same source, same operation order: the same fp32 results.
#define AIM_CPU_NS isa_avx2
#include "ops_cpu.cpp"
