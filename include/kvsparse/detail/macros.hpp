#pragma once
// Annotations that let the same inline math run on the host and, when compiled by nvcc, on the device.

#if defined(__CUDACC__)
#define KVSPARSE_HD __host__ __device__
#else
#define KVSPARSE_HD
#endif
