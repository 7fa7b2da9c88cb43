#include <kvsparse/kvsparse.hpp>

#include <cstdio>
#include <vector>

int main() {
    using namespace kvsparse;
    // 2 layers, 8 query heads sharing 4 KV heads, head dim 64, 16 tokens a page, 4096 pages in the pool.
    CacheConfig config{.shape = {.layers = 2, .q_heads = 8, .kv_heads = 4, .head_dim = 64},
                       .page_size = 16,
                       .num_pages = 4096};
    KVCache<AttentionSink> cache(config, AttentionSink({.sinks = 4, .window = 252}));
    const SequenceId seq = cache.add_sequence();

    std::vector<float> q(8 * 64), k(4 * 64), v(4 * 64), out(8 * 64);
    for (int t = 0; t < 10000; ++t) {          // a decode step per token
        for (int layer = 0; layer < 2; ++layer) {
            for (std::size_t i = 0; i < k.size(); ++i) k[i] = v[i] = float((t + i) % 7);
            for (std::size_t i = 0; i < q.size(); ++i) q[i] = float(i % 5) * 0.01f;
            cache.append(seq, layer, k, v);    // store k_t, v_t; evict what the policy drops
            cache.attend(seq, layer, q, out);  // attention over sinks + window
        }
    }
    const MemoryStats memory = cache.memory(seq);
    std::printf("holds %lld tokens in %lld pages (%lld bytes)\n", (long long)memory.tokens,
                (long long)memory.pages, (long long)memory.bytes);
}
