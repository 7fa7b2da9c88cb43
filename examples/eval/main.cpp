// kvsparse-eval: replay attention traces through KV-cache policies and measure how much attention each
// keeps, how far its output drifts from dense attention, the memory it holds and what selection costs.
//
//   kvsparse-eval [--trace DIR] [--policy SPEC]... [--json FILE] [--masks DIR] [--threads N]
//                 [--synthetic key=value,...] [--budget B] [--save-trace DIR]
//
// Without --trace it generates the embedded synthetic trace; without --policy it compares every policy
// at --budget tokens (512). docs/eval.md has the details.

#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "common/parallel.hpp"
#include "common/policy_spec.hpp"
#include "eval/replay.hpp"
#include "eval/report.hpp"
#include "eval/synthetic.hpp"
#include "eval/trace.hpp"

namespace {

using namespace kvsparse::tools;

struct Options {
    std::string trace_dir;
    std::vector<std::string> policies;
    std::string json_file;
    std::string masks_dir;
    int threads = default_threads();
    std::string synthetic;
    int budget = 512;
    std::string save_trace_dir;
};

int run(const Options& options) {
    const auto start = std::chrono::steady_clock::now();

    // Specs first: a typo fails before a large trace is read.
    std::vector<PolicySpec> specs;
    for (const std::string& text : options.policies) specs.push_back(parse_policy_spec(text));

    const Trace trace =
        options.trace_dir.empty() ? make_synthetic(parse_synthetic(options.synthetic)) : load_trace(options.trace_dir);
    if (!options.save_trace_dir.empty()) save_trace(trace, options.save_trace_dir);
    if (specs.empty()) {
        for (const std::string& text : default_policy_specs(options.budget, trace.rope.has_value(), !trace.alpha.empty()))
            specs.push_back(parse_policy_spec(text));
    }

    const PolicyContext context{trace.shape.layers, trace.shape.kv_heads, trace.alpha};
    std::vector<std::string> names;
    std::vector<AnyPolicy> policies;
    for (const PolicySpec& spec : specs) {
        names.push_back(spec.text);
        policies.push_back(make_policy(spec, context));
    }

    ReplayOptions replay_options;
    replay_options.threads = options.threads;
    if (!options.masks_dir.empty()) replay_options.masks_dir = options.masks_dir;
    const std::vector<PolicyResult> results = replay(trace, names, policies, replay_options);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    fmt::print("{}\n\n{}\n", describe_trace(trace), format_table(results));
    fmt::print("{} policies, {} threads, {:.1f} s (dense reference in double precision)\n", results.size(),
               std::min(options.threads, trace.shape.layers), seconds);

    if (!options.json_file.empty()) {
        std::ofstream out(options.json_file);
        out << to_json(trace, results).dump(2) << "\n";
        if (!out) throw kvsparse::format_error(options.json_file + ": write failed");
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    Options options;
    CLI::App app{
        "Replay attention traces through sparse-attention KV-cache policies and measure attention recall, "
        "output error, memory held and selection time against dense attention.",
        "kvsparse-eval"};
    app.add_option(
           "--trace", options.trace_dir,
           "Trace directory: q.npy [L,T,Hq,D], k.npy and v.npy [L,T,Hkv,D] (float32 or float16), optional meta.json")
        ->type_name("DIR")
        ->check(CLI::ExistingDirectory);
    auto* policy =
        app.add_option("--policy", options.policies, "Policy spec name:key=value,... (repeatable)")->type_name("SPEC");
    app.add_option("--json", options.json_file, "Also write the figures as JSON to FILE")->type_name("FILE");
    app.add_option("--masks", options.masks_dir, "Write DIR/i.npy, uint8 [L,T,Hq,T]: what the i-th policy attended")
        ->type_name("DIR");
    app.add_option("--threads", options.threads, "Threads (layers are replayed in parallel)")
        ->type_name("N")
        ->capture_default_str()
        ->check(CLI::Range(1, 1024));
    app.add_option("--synthetic", options.synthetic,
                   "Shape of the synthetic trace: tokens=,layers=,q_heads=,kv_heads=,dim=,prefill=,seed= (defaults "
                   "4096, 2, 8, 4, 64, tokens/4, 20240607)")
        ->type_name("KEY=VALUE,...")
        ->excludes("--trace");
    app.add_option("--budget", options.budget, "Tokens per (layer, KV head) for the default policies")
        ->type_name("B")
        ->capture_default_str()
        ->check(CLI::Range(1, std::numeric_limits<int>::max()))
        ->excludes(policy);
    app.add_option("--save-trace", options.save_trace_dir, "Also write the trace (e.g. the synthetic one) to DIR")
        ->type_name("DIR");
    app.footer(policy_help());
    CLI11_PARSE(app, argc, argv);

    try {
        return run(options);
    } catch (const std::exception& e) {
        std::fflush(stdout);
        fmt::print(stderr, "kvsparse-eval: error: {}\n", e.what());
        return 1;
    }
}
