// kvsparse-llama: a tiny Llama inference engine (llama2.c checkpoints) whose every attention layer is a
// kvsparse KVCache, with the policy picked on the command line.
//
//   kvsparse-llama generate   --model M --tokenizer T [--prompt TEXT] [--tokens N] [--policy SPEC]
//                             [--temperature X] [--seed S]
//   kvsparse-llama stream-ppl --model M --tokenizer T --text FILE [--tokens N] [--policy SPEC]...
//                             [--json FILE] [--csv FILE] [--budget B]... [--last M] [--threads N] [--mass K]
//   kvsparse-llama dump-trace --model M --tokenizer T --text FILE [--tokens N] [--gates FILE.tsv] --out DIR
//   kvsparse-llama calibrate-gates --model M --tokenizer T --text FILE [--tokens N] [--sink S] [--local W]
//                             --out FILE.tsv
//
// generate and stream-ppl take --gates FILE.tsv too: LServe's gate values alpha[L][Hkv] (DuoAttention's
// TSV), which lserve specs need; calibrate-gates measures them on a dense run (gate_calibration.hpp).
//
// docs/streaming.md describes the commands and the StreamingLLM experiment built on them. The
// integration itself is engine.hpp; model.hpp and tokenizer.hpp are the model.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/parallel.hpp"
#include "common/policy_spec.hpp"
#include "common/progress.hpp"
#include "eval/trace.hpp"
#include "llama/engine.hpp"
#include "llama/gate_calibration.hpp"
#include "llama/model.hpp"
#include "llama/tokenizer.hpp"
#include "llama/trace_dump.hpp"

namespace {

using namespace kvsparse;
using namespace kvsparse::llama;

/// Tokens per segment of the per-segment perplexity (the model's trained context).
constexpr std::int32_t segment_tokens = 512;

struct Common {
    std::string model, tokenizer;
    int tokens = 0;
};

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw format_error(path + ": cannot open the text");
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

/// The gate values of --gates (empty without it), checked against the model's shape.
GateValues read_gates(const std::string& path, const ModelConfig& c) {
    if (path.empty()) return {};
    GateValues alpha = load_gate_values(path);
    if (alpha.size() != static_cast<std::size_t>(c.layers) || alpha.front().size() != static_cast<std::size_t>(c.kv_heads)) {
        throw invalid_argument(path + ": gate values are [" + std::to_string(alpha.size()) + "][" +
                               std::to_string(alpha.front().size()) + "], the model has " + std::to_string(c.layers) +
                               " layers of " + std::to_string(c.kv_heads) + " KV heads");
    }
    return alpha;
}

/// The first `n` tokens of the file, as llama2.c encodes it (BOS first); fails if it has fewer.
std::vector<std::int32_t> text_tokens(const Tokenizer& tokenizer, const std::string& path, std::int32_t n) {
    std::vector<std::int32_t> tokens = tokenizer.encode(read_text(path));
    if (static_cast<std::int32_t>(tokens.size()) < n) {
        throw invalid_argument(path + ": " + std::to_string(tokens.size()) + " tokens (BOS included), fewer than --tokens " +
                               std::to_string(n));
    }
    tokens.resize(static_cast<std::size_t>(n));
    return tokens;
}

// ---- generate --------------------------------------------------------------------------------------------

struct GenerateOptions {
    Common common;
    std::string prompt, policy = "dense", gates;
    double temperature = 0;
    std::uint64_t seed = 0;
};

int generate(const GenerateOptions& o) {
    const EngineSpec spec = parse_engine_spec(o.policy);
    const Model model = Model::load(o.common.model);
    const GateValues alpha = read_gates(o.gates, model.config());
    const Tokenizer tokenizer = Tokenizer::load(o.common.tokenizer, model.config().vocab);
    std::vector<std::int32_t> tokens = tokenizer.encode(o.prompt);
    // The sequence ends at --tokens positions, BOS included (llama2.c's -n); a longer prompt is fed whole.
    const std::int32_t total = std::max(o.common.tokens, static_cast<std::int32_t>(tokens.size()));
    const std::unique_ptr<Engine> engine = make_engine(spec, model, total, alpha);
    std::mt19937_64 rng(o.seed);

    // The prompt is printed as its tokens are fed, then each sampled token as it is produced.
    const auto start = std::chrono::steady_clock::now();
    std::int32_t generated = 0;
    std::vector<double> p;  // sampling weights, reused across tokens
    for (std::size_t pos = 0; pos + 1 < static_cast<std::size_t>(total); ++pos) {
        const std::span<const float> logits = engine->step(tokens[pos]);
        if (pos + 1 < tokens.size()) {
            fmt::print("{}", tokenizer.decode(tokens[pos], tokens[pos + 1]));
            continue;
        }
        std::int32_t next = 0;
        if (o.temperature <= 0) {
            next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        } else {
            p.resize(logits.size());
            const float top = *std::max_element(logits.begin(), logits.end());
            for (std::size_t i = 0; i < p.size(); ++i) p[i] = std::exp((logits[i] - top) / o.temperature);
            next = static_cast<std::int32_t>(std::discrete_distribution<std::int32_t>(p.begin(), p.end())(rng));
        }
        if (next == Tokenizer::bos || next == Tokenizer::eos) break;
        fmt::print("{}", tokenizer.decode(tokens[pos], next));
        std::fflush(stdout);
        tokens.push_back(next);
        ++generated;
    }
    fmt::print("\n");
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    fmt::print(stderr, "{} tokens generated with {} ({:.0f} tokens/s including the prompt)\n", generated, spec.text,
               static_cast<double>(tokens.size() - 1) / std::max(seconds, 1e-9));
    return 0;
}

// ---- stream-ppl ------------------------------------------------------------------------------------------

struct StreamOptions {
    Common common;
    std::string text, json, csv, gates;
    std::vector<std::string> policies;
    std::vector<int> budgets;
    int threads = tools::default_threads();
    int mass = 0;
    int last = 0;
};

struct StreamResult {
    std::string spec;
    std::optional<int> budget;  // the --budget whose default comparison brought the spec in
    std::vector<double> loss;   // per scored position t: loss of predicting token t + 1
    double mean_loss = 0;
    std::vector<double> segment_ppl;
    double seconds = 0;
    std::vector<std::vector<double>> mass;  // [layer][segment], when measured
};

int stream_ppl(const StreamOptions& o) {
    // Specs first: a typo fails before the model loads. --budget B adds the shared default comparison at
    // B tokens (every policy in the spec table, so policies added later join without changes here; lserve
    // joins when --gates gives the gate values it needs).
    std::vector<EngineSpec> specs;
    std::vector<StreamResult> results;
    const auto add = [&](const std::string& text, std::optional<int> budget) {
        EngineSpec spec = parse_engine_spec(text);
        for (const EngineSpec& s : specs) {
            if (s.text == spec.text) return;
        }
        specs.push_back(std::move(spec));
        StreamResult result;
        result.spec = specs.back().text;
        result.budget = budget;
        results.push_back(std::move(result));
    };
    for (const int budget : o.budgets) {
        for (const std::string& text : tools::default_policy_specs(budget, true, !o.gates.empty())) add(text, budget);
    }
    for (const std::string& text : o.policies) add(text, std::nullopt);
    if (specs.empty()) add("dense", std::nullopt);

    const Model model = Model::load(o.common.model);
    const GateValues alpha = read_gates(o.gates, model.config());
    // Every policy is built once before the run: a default spec that cannot be built for this model (a
    // policy that needs what the model lacks) is skipped with a note; an explicit --policy is an error.
    for (std::size_t i = 0; i < specs.size();) {
        if (specs[i].policy) {
            try {
                tools::make_policy(*specs[i].policy, policy_context(model.config(), alpha));
            } catch (const invalid_argument& e) {
                if (!results[i].budget) throw;
                fmt::print(stderr, "kvsparse-llama: skipping default spec: {}\n", e.what());
                specs.erase(specs.begin() + static_cast<std::ptrdiff_t>(i));
                results.erase(results.begin() + static_cast<std::ptrdiff_t>(i));
                continue;
            }
        }
        ++i;
    }
    const Tokenizer tokenizer = Tokenizer::load(o.common.tokenizer, model.config().vocab);
    const std::int32_t n = o.common.tokens;
    const std::vector<std::int32_t> tokens = text_tokens(tokenizer, o.text, n);
    const std::int32_t steps = n - 1;
    // Predictions at positions [first, steps) are scored and timed; earlier tokens are only fed.
    const std::int32_t first = o.last > 0 ? std::max(0, steps - o.last) : 0;

    tools::ProgressBar bar("stream-ppl", static_cast<std::int64_t>(specs.size()) * steps);
    tools::parallel_for(static_cast<std::int64_t>(specs.size()), o.threads, [&](std::int64_t i) {
        StreamResult& r = results[static_cast<std::size_t>(i)];
        const std::unique_ptr<Engine> engine = make_engine(specs[static_cast<std::size_t>(i)], model, n, alpha);
        if (o.mass > 0) engine->measure_mass(o.mass, segment_tokens);
        for (std::int32_t t = 0; t < first; ++t) {
            engine->feed(tokens[static_cast<std::size_t>(t)]);
            bar.advance();
        }
        const auto start = std::chrono::steady_clock::now();
        for (std::int32_t t = first; t < steps; ++t) {
            const auto T = static_cast<std::size_t>(t);
            r.loss.push_back(next_token_loss(engine->step(tokens[T]), tokens[T + 1]));
            bar.advance();
        }
        r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (const AttentionMass* mass = engine->mass()) {
            for (std::int32_t l = 0; l < model.config().layers; ++l) r.mass.push_back(mass->per_segment(l));
        }
        // Segments of positions [512 s, 512 (s + 1)), as far as they are scored.
        double total = 0;
        for (std::int32_t begin = first; begin < steps;) {
            const std::int32_t end = std::min(steps, (begin / segment_tokens + 1) * segment_tokens);
            double sum = 0;
            for (std::int32_t t = begin; t < end; ++t) sum += r.loss[static_cast<std::size_t>(t - first)];
            r.segment_ppl.push_back(std::exp(sum / (end - begin)));
            total += sum;
            begin = end;
        }
        r.mean_loss = total / (steps - first);
    });
    bar.finish();
    const std::int32_t scored = steps - first;

    // Table.
    fmt::print("{}: {} tokens, {} predictions scored (positions {}..{}), {} policies on {} threads\n", o.text, n, scored,
               first, steps - 1, specs.size(), std::min<std::size_t>(static_cast<std::size_t>(o.threads), specs.size()));
    std::size_t width = 6;
    for (const StreamResult& r : results) width = std::max(width, r.spec.size());
    fmt::print("{:<{}}  {:>9}  {:>9}  {:>10}   per-{} segment perplexity\n", "policy", width, "mean loss", "ppl",
               "tokens/s", segment_tokens);
    for (const StreamResult& r : results) {
        fmt::print("{:<{}}  {:>9.4f}  {:>9.3f}  {:>10.1f}  ", r.spec, width, r.mean_loss, std::exp(r.mean_loss),
                   scored / r.seconds);
        for (const double p : r.segment_ppl) fmt::print(" {:.3f}", p);
        fmt::print("\n");
    }
    if (o.mass > 0) {
        fmt::print("\nattention mass on positions [0, {}), mean over query heads, per layer and {}-position segment\n",
                   o.mass, segment_tokens);
        for (const StreamResult& r : results) {
            if (r.mass.empty()) continue;
            for (std::size_t l = 0; l < r.mass.size(); ++l) {
                fmt::print("{:<{}}  layer {}:", r.spec, width, l);
                for (const double m : r.mass[l]) fmt::print(" {:.3f}", m);
                fmt::print("\n");
            }
        }
    }

    if (!o.json.empty()) {
        nlohmann::json j;
        j["tokens"] = n;
        j["first_scored"] = first;
        j["text"] = o.text;
        j["segment_tokens"] = segment_tokens;
        j["threads"] = o.threads;
        if (!o.gates.empty()) j["gates"] = o.gates;
        j["policies"] = nlohmann::json::array();
        for (const StreamResult& r : results) {
            nlohmann::json p{{"spec", r.spec},
                             {"mean_loss", r.mean_loss},
                             {"ppl", std::exp(r.mean_loss)},
                             {"segment_ppl", r.segment_ppl},
                             {"seconds", r.seconds},
                             {"tokens_per_s", scored / r.seconds}};
            if (r.budget) p["budget"] = *r.budget;
            if (!r.mass.empty()) p["first_mass"] = {{"first", o.mass}, {"per_layer_segment", r.mass}};
            j["policies"].push_back(std::move(p));
        }
        std::ofstream out(o.json);
        out << j.dump(2) << "\n";
        if (!out) throw format_error(o.json + ": write failed");
    }
    if (!o.csv.empty()) {
        std::ofstream out(o.csv);
        out << "position,target";
        for (const StreamResult& r : results) out << ",\"" << r.spec << '"';  // specs hold commas
        out << "\n";
        for (std::int32_t t = first; t < steps; ++t) {
            out << t << ',' << tokens[static_cast<std::size_t>(t) + 1];
            for (const StreamResult& r : results) out << fmt::format(",{:.6g}", r.loss[static_cast<std::size_t>(t - first)]);
            out << "\n";
        }
        if (!out) throw format_error(o.csv + ": write failed");
    }
    return 0;
}

// ---- dump-trace ------------------------------------------------------------------------------------------

struct DumpOptions {
    Common common;
    std::string text, out, gates;
};

int dump_trace(const DumpOptions& o) {
    const Model model = Model::load(o.common.model);
    const GateValues alpha = read_gates(o.gates, model.config());
    const Tokenizer tokenizer = Tokenizer::load(o.common.tokenizer, model.config().vocab);
    const std::int32_t n = o.common.tokens;
    const std::vector<std::int32_t> tokens = text_tokens(tokenizer, o.text, n);

    tools::ProgressBar bar("dump-trace", n);
    tools::Trace trace = record_trace(model, tokens, [&] { bar.advance(); });
    bar.finish();
    trace.alpha = alpha;  // meta.json "alpha": kvsparse-eval then builds lserve specs
    const ModelConfig& c = model.config();
    tools::save_trace(trace, o.out);
    fmt::print("{}: q [{}, {}, {}, {}], k and v [{}, {}, {}, {}] float32, meta.json prefill 1{}\n", o.out, c.layers, n,
               c.heads, c.head_dim(), c.layers, n, c.kv_heads, c.head_dim(), alpha.empty() ? "" : " and alpha");
    return 0;
}

// ---- calibrate-gates -------------------------------------------------------------------------------------

struct CalibrateOptions {
    Common common;
    std::string text, out;
    int sink = 4, local = 124;
};

int calibrate(const CalibrateOptions& o) {
    const Model model = Model::load(o.common.model);
    const Tokenizer tokenizer = Tokenizer::load(o.common.tokenizer, model.config().vocab);
    const std::int32_t n = o.common.tokens;
    if (n <= o.sink + o.local) {
        throw invalid_argument("--tokens " + std::to_string(n) + " leaves no query past --sink " + std::to_string(o.sink) +
                               " + --local " + std::to_string(o.local));
    }
    const std::vector<std::int32_t> tokens = text_tokens(tokenizer, o.text, n);
    tools::ProgressBar bar("calibrate-gates", n);
    const GateValues alpha = calibrate_gates(model, tokens, o.sink, o.local, [&] { bar.advance(); });
    bar.finish();
    const std::string tsv = gate_values_tsv(alpha);
    std::ofstream out(o.out, std::ios::binary);
    out << tsv;
    if (!out) throw format_error(o.out + ": write failed");
    fmt::print("{}: gate values [{}][{}], attention mass outside positions [0, {}) and the last {}, mean over the\n"
               "group's query heads and queries {}..{} of {}:\n{}",
               o.out, alpha.size(), alpha.front().size(), o.sink, o.local, o.sink + o.local, n - 1, o.text, tsv);
    return 0;
}

void add_common(CLI::App* app, Common& c, int default_tokens) {
    app->add_option("--model", c.model, "llama2.c checkpoint (e.g. stories260K.bin)")->required()->type_name("M");
    app->add_option("--tokenizer", c.tokenizer, "llama2.c tokenizer (e.g. tok512.bin)")->required()->type_name("T");
    c.tokens = default_tokens;
    app->add_option("--tokens", c.tokens, "Sequence length in tokens, BOS included")
        ->type_name("N")
        ->capture_default_str()
        ->check(CLI::Range(2, 1 << 24));
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"A tiny Llama engine (llama2.c checkpoints) whose attention runs through kvsparse KV-cache policies.",
                 "kvsparse-llama"};
    app.require_subcommand(1);
    const std::string policies = tools::policy_help() + std::string(recompute_help);

    GenerateOptions gen;
    CLI::App* g = app.add_subcommand("generate", "Print the prompt and its continuation (greedy at temperature 0)");
    add_common(g, gen.common, 256);
    g->add_option("--prompt", gen.prompt, "Text to continue (default: none, from BOS alone)")->type_name("TEXT");
    g->add_option("--policy", gen.policy, "Policy spec")->type_name("SPEC")->capture_default_str();
    g->add_option("--temperature", gen.temperature, "Sampling temperature; 0 is greedy")
        ->type_name("X")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 100.0));
    g->add_option("--seed", gen.seed, "Random seed for sampling")->type_name("S")->capture_default_str();
    g->add_option("--gates", gen.gates, "LServe gate values alpha[L][Hkv] (TSV, from calibrate-gates): lserve specs need them")
        ->type_name("FILE.tsv");
    g->footer(policies);

    StreamOptions st;
    CLI::App* s = app.add_subcommand("stream-ppl", "Next-token perplexity of a text fed one token at a time, per policy");
    add_common(s, st.common, 4096);
    s->add_option("--text", st.text, "Text file")->required()->type_name("FILE");
    s->add_option("--policy", st.policies, "Policy spec (repeatable; default dense)")->type_name("SPEC");
    s->add_option("--budget", st.budgets, "Add every policy's default specs at B tokens (repeatable)")
        ->type_name("B")
        ->check(CLI::Range(1, 1 << 24));
    s->add_option("--last", st.last, "Score (and time) only the last M predictions; earlier tokens are only fed")
        ->type_name("M")
        ->check(CLI::Range(1, 1 << 24));
    s->add_option("--json", st.json, "Also write the figures as JSON")->type_name("FILE");
    s->add_option("--csv", st.csv, "Also write the per-token losses as CSV")->type_name("FILE");
    s->add_option("--threads", st.threads, "Policies run in parallel on N threads (tokens/s is per policy)")
        ->type_name("N")
        ->capture_default_str()
        ->check(CLI::Range(1, 1024));
    s->add_option("--gates", st.gates, "LServe gate values alpha[L][Hkv] (TSV, from calibrate-gates): lserve specs need them")
        ->type_name("FILE.tsv");
    s->add_option("--mass", st.mass, "Also measure the attention mass on positions [0, K) per layer")
        ->type_name("K")
        ->check(CLI::Range(1, 1 << 24));
    s->footer(policies);

    DumpOptions du;
    CLI::App* d = app.add_subcommand("dump-trace", "Write a dense run's post-RoPE q, k, v as a kvsparse-eval trace");
    add_common(d, du.common, 2048);
    d->add_option("--text", du.text, "Text file")->required()->type_name("FILE");
    d->add_option("--out", du.out, "Trace directory (created)")->required()->type_name("DIR");
    d->add_option("--gates", du.gates, "Gate values (TSV) to write into meta.json as \"alpha\"")->type_name("FILE.tsv");

    CalibrateOptions ca;
    CLI::App* c = app.add_subcommand("calibrate-gates",
                                     "Measure LServe gate values alpha[L][Hkv] on a dense run and write them as TSV");
    add_common(c, ca.common, 512);
    c->add_option("--text", ca.text, "Text file (calibrate on text disjoint from what is evaluated)")
        ->required()
        ->type_name("FILE");
    c->add_option("--sink", ca.sink, "First positions a streaming head keeps")
        ->type_name("S")
        ->capture_default_str()
        ->check(CLI::Range(0, 1 << 24));
    c->add_option("--local", ca.local, "Last positions a streaming head keeps")
        ->type_name("W")
        ->capture_default_str()
        ->check(CLI::Range(1, 1 << 24));
    c->add_option("--out", ca.out, "Gate-value TSV to write (one row per layer)")->required()->type_name("FILE.tsv");

    CLI11_PARSE(app, argc, argv);
    try {
        if (g->parsed()) return generate(gen);
        if (s->parsed()) return stream_ppl(st);
        if (c->parsed()) return calibrate(ca);
        return dump_trace(du);
    } catch (const std::exception& e) {
        std::fflush(stdout);
        fmt::print(stderr, "kvsparse-llama: error: {}\n", e.what());
        return 1;
    }
}
