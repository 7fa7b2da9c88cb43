#pragma once
// kvsparse: sparse-attention KV-cache policies for LLM inference engines. Include this for everything
// that needs no CUDA; the CUDA backend is <kvsparse/backends/cuda_backend.cuh>.

#include "kvsparse/backends/cpu_backend.hpp"
#include "kvsparse/concepts.hpp"
#include "kvsparse/dtype.hpp"
#include "kvsparse/error.hpp"
#include "kvsparse/key_bounds.hpp"
#include "kvsparse/kv_cache.hpp"
#include "kvsparse/policies/attention_sink.hpp"
#include "kvsparse/policies/dense.hpp"
#include "kvsparse/policies/h2o.hpp"
#include "kvsparse/policies/lserve.hpp"
#include "kvsparse/policies/quest.hpp"
#include "kvsparse/rope.hpp"
#include "kvsparse/shape.hpp"
#include "kvsparse/stream.hpp"
#include "kvsparse/version.hpp"
#include "kvsparse/views.hpp"
