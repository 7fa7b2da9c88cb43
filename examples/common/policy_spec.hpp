#pragma once
// Policy specs for command lines: `name:key=value,...`, e.g. `sink:sinks=4,window=508,positions=in_cache`.
//
//   PolicySpec spec = parse_policy_spec("window:window=512");   // checks name, keys and values
//   AnyPolicy policy = make_policy(spec, context);               // the configured policy
//   std::visit([](auto& p) { KVCache<std::decay_t<decltype(p)>> cache(config, p); ... }, policy);
//
// Adding a policy is one edit in the block marked "the policy table" below: add its type to AnyPolicy
// and one entry to policy_table() (name, keys with their types and defaults, how to build it, and the
// specs it contributes to the default comparison at a token budget).
//
// Errors throw kvsparse::invalid_argument with the spec and the unknown name, unknown or repeated key,
// missing key or bad value named.

#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <kvsparse/error.hpp>
#include <kvsparse/policies/attention_sink.hpp>
#include <kvsparse/policies/dense.hpp>
#include <kvsparse/policies/h2o.hpp>
#include <kvsparse/policies/lserve.hpp>
#include <kvsparse/policies/quest.hpp>

namespace kvsparse::tools {

/// What some policies need beyond their keys: the model's shape, and for LServe the DuoAttention gate
/// values `alpha[layer][kv_head]` (empty when the trace has none).
struct PolicyContext {
    std::int32_t layers = 0;
    std::int32_t kv_heads = 0;
    std::vector<std::vector<float>> alpha;
};

/// The type of a key's value.
enum class ValueKind : std::uint8_t {
    integer,  ///< decimal integer in [min, max]
    real,     ///< decimal number in [min, max]
    word,     ///< one of `words`
};

/// One key a policy accepts. An empty `fallback` makes the key required.
struct KeySpec {
    std::string_view name;
    ValueKind kind = ValueKind::integer;
    std::string_view fallback = {};
    double min = 0;
    double max = std::numeric_limits<std::int32_t>::max();
    std::vector<std::string_view> words = {};
    std::string_view help = {};
};

/// The checked values of a spec's keys, defaults filled in.
class SpecValues {
public:
    using Value = std::variant<std::int64_t, double, std::string>;

    std::int32_t integer(std::string_view key) const {
        return static_cast<std::int32_t>(std::get<std::int64_t>(at(key)));
    }
    double real(std::string_view key) const { return std::get<double>(at(key)); }
    const std::string& word(std::string_view key) const { return std::get<std::string>(at(key)); }
    bool contains(std::string_view key) const { return values_.find(key) != values_.end(); }

    void set(std::string_view key, Value value) { values_.insert_or_assign(std::string(key), std::move(value)); }

private:
    const Value& at(std::string_view key) const {
        const auto it = values_.find(key);
        if (it == values_.end()) throw invalid_argument("policy spec: no value for key '" + std::string(key) + "'");
        return it->second;
    }
    std::map<std::string, Value, std::less<>> values_;
};

// ======== the policy table: every policy the tools know, in one place ========================================

/// Every policy a spec can name.
using AnyPolicy = std::variant<Dense, SlidingWindow, AttentionSink, H2OHeavyHitter, QuestPageSelector, LServeHybrid>;

struct PolicyEntry {
    std::string_view name;
    std::string_view summary;
    std::vector<KeySpec> keys;
    /// Builds the policy from checked values (library constructors may still reject a combination).
    AnyPolicy (*make)(const SpecValues&, const PolicyContext&);
    /// Specs of this policy in the default comparison at `budget` tokens held or read per (layer, KV
    /// head); `rope` says whether the trace declares its RoPE (needed for in-cache positions), `gates`
    /// whether it carries LServe's gate values (alpha).
    std::vector<std::string> (*defaults)(std::int32_t budget, bool rope, bool gates);
};

namespace detail {

/// The `gqa` key of the page-selecting policies (quest, lserve).
inline KeySpec gqa_key() {
    return {.name = "gqa",
            .kind = ValueKind::word,
            .fallback = "max",
            .words = {"max", "sum", "per_query_head"},
            .help = "query heads of a KV head: the max or sum of their page scores, or a selection each"};
}

/// The aggregation the checked `gqa` key names.
inline GqaAggregation gqa_of(const SpecValues& v) {
    const std::string& gqa = v.word("gqa");
    return gqa == "sum"              ? GqaAggregation::sum
           : gqa == "per_query_head" ? GqaAggregation::per_query_head
                                     : GqaAggregation::max;
}

/// Sink positions in the default specs at `budget` tokens: 4, fewer when the budget is at most 4.
inline std::int32_t default_sinks(std::int32_t budget) { return budget > 4 ? 4 : budget - 1; }

}  // namespace detail

inline const std::vector<PolicyEntry>& policy_table() {
    static const std::vector<PolicyEntry> table = {
        {"dense",
         "every position (the reference)",
         {},
         [](const SpecValues&, const PolicyContext&) -> AnyPolicy { return Dense{}; },
         [](std::int32_t, bool, bool) { return std::vector<std::string>{"dense"}; }},
        {"window",
         "the last `window` positions",
         {{.name = "window", .min = 1, .help = "positions kept"}},
         [](const SpecValues& v, const PolicyContext&) -> AnyPolicy { return SlidingWindow(v.integer("window")); },
         [](std::int32_t budget, bool, bool) { return std::vector<std::string>{"window:window=" + std::to_string(budget)}; }},
        {"sink",
         "StreamingLLM: the first `sinks` positions and the last `window`",
         {{.name = "sinks", .fallback = "4", .help = "sink positions kept forever"},
          {.name = "window", .min = 1, .help = "recent positions kept"},
          {.name = "positions",
           .kind = ValueKind::word,
           .fallback = "absolute",
           .words = {"absolute", "in_cache"},
           .help = "key rotation: original positions, or ranks in the cache (needs RoPE)"}},
         [](const SpecValues& v, const PolicyContext&) -> AnyPolicy {
             return AttentionSink(
                 {.sinks = v.integer("sinks"),
                  .window = v.integer("window"),
                  .positions = v.word("positions") == "in_cache" ? PositionMode::in_cache : PositionMode::absolute});
         },
         [](std::int32_t budget, bool rope, bool) {
             const std::int32_t sinks = detail::default_sinks(budget);
             const std::string base =
                 "sink:sinks=" + std::to_string(sinks) + ",window=" + std::to_string(budget - sinks);
             std::vector<std::string> specs{base};
             if (rope) specs.push_back(base + ",positions=in_cache");
             return specs;
         }},
        {"h2o",
         "H2O: the `heavy` tokens with the most accumulated attention and the last `recent`",
         {{.name = "heavy", .help = "tokens kept for their accumulated attention"},
          {.name = "recent", .min = 1, .help = "newest positions kept (the current one included)"}},
         [](const SpecValues& v, const PolicyContext&) -> AnyPolicy {
             return H2OHeavyHitter({.heavy = v.integer("heavy"), .recent = v.integer("recent")});
         },
         [](std::int32_t budget, bool, bool) {
             const std::int32_t heavy = budget / 2;
             return std::vector<std::string>{"h2o:heavy=" + std::to_string(heavy) +
                                             ",recent=" + std::to_string(budget - heavy)};
         }},
        {"quest",
         "Quest: every position kept; each query reads the pages whose min/max key bounds score highest",
         {{.name = "page", .fallback = "16", .min = 1, .max = 1 << 30, .help = "positions per page (a power of two)"},
          {.name = "budget", .min = 1, .help = "tokens a query reads: max(1, budget / page) pages, the last one included"},
          {.name = "dense_layers", .fallback = "2", .help = "layers [0, N) attend densely"},
          detail::gqa_key()},
         [](const SpecValues& v, const PolicyContext&) -> AnyPolicy {
             return QuestPageSelector({.page_size = v.integer("page"),
                                       .token_budget = v.integer("budget"),
                                       .dense_layers = v.integer("dense_layers"),
                                       .gqa = detail::gqa_of(v)});
         },
         [](std::int32_t budget, bool, bool) {
             // Pages of 16, or the largest power of two within a smaller budget, so that a query reads at
             // most `budget` tokens; no dense layers, so that every layer runs at the budget.
             std::int32_t page = 16;
             while (page > budget) page /= 2;
             return std::vector<std::string>{"quest:page=" + std::to_string(page) + ",budget=" + std::to_string(budget) +
                                             ",dense_layers=0"};
         }},
        {"lserve",
         "LServe: streaming heads keep sinks + a local window (block-sparse prefill); retrieval heads keep everything "
         "and read the best physical pages, reused for `reuse` steps; head kinds from the trace's gate values (alpha)",
         {{.name = "sink", .fallback = "64", .help = "streaming heads: first positions kept"},
          {.name = "local", .fallback = "512", .min = 1, .help = "streaming heads: last positions kept"},
          {.name = "logical_page", .fallback = "16", .min = 1, .max = 1 << 30, .help = "positions per logical page (key bounds; a power of two)"},
          {.name = "physical_page", .fallback = "64", .min = 1, .max = 1 << 30, .help = "positions per physical page (a multiple of logical_page)"},
          {.name = "budget", .min = 1, .help = "retrieval heads read max(3, budget / physical_page) physical pages"},
          {.name = "reuse", .fallback = "4", .min = 1, .help = "a selection is made every `reuse` steps and reused between"},
          {.name = "sparsity", .kind = ValueKind::real, .fallback = "0.5", .max = 1, .help = "fraction of heads that stream (lowest alpha first)"},
          {.name = "prefill_sink", .fallback = "-1", .min = -1, .help = "streaming-head prefill: sink columns (-1: sink)"},
          {.name = "prefill_local", .fallback = "-1", .min = -1, .help = "streaming-head prefill: local band (-1: local)"},
          detail::gqa_key()},
         [](const SpecValues& v, const PolicyContext& context) -> AnyPolicy {
             if (context.alpha.empty()) {
                 throw invalid_argument("lserve takes its head kinds from gate values alpha[L][Hkv] (meta.json \"alpha\"), "
                                        "and this trace has none");
             }
             if (context.layers > 0 && (context.alpha.size() != static_cast<std::size_t>(context.layers) ||
                                        context.alpha.front().size() != static_cast<std::size_t>(context.kv_heads))) {
                 throw invalid_argument("lserve: alpha is [" + std::to_string(context.alpha.size()) + "][" +
                                        std::to_string(context.alpha.front().size()) + "], the trace has " +
                                        std::to_string(context.layers) + " layers of " + std::to_string(context.kv_heads) +
                                        " KV heads");
             }
             return LServeHybrid(HeadKinds::from_gates(context.alpha, v.real("sparsity")),
                                 {.sink = v.integer("sink"),
                                  .local = v.integer("local"),
                                  .logical_page = v.integer("logical_page"),
                                  .physical_page = v.integer("physical_page"),
                                  .token_budget = v.integer("budget"),
                                  .reuse_interval = v.integer("reuse"),
                                  .prefill_sink = v.integer("prefill_sink"),
                                  .prefill_local = v.integer("prefill_local"),
                                  .gqa = detail::gqa_of(v)});
         },
         [](std::int32_t budget, bool, bool gates) {
             // Only for traces with gate values. Streaming heads hold `budget` (4 sinks, as the sink policy);
             // retrieval heads read `budget` tokens: physical pages of 64 (smaller for budgets below 192, so
             // that the 3 pages LServe always reads fit), logical pages of 16 (or the physical page).
             if (!gates) return std::vector<std::string>{};
             const std::int32_t sink = detail::default_sinks(budget);
             std::int32_t physical = 64;
             while (physical > 1 && 3 * physical > budget) physical /= 2;
             const std::int32_t logical = physical < 16 ? physical : 16;
             return std::vector<std::string>{"lserve:sink=" + std::to_string(sink) + ",local=" +
                                             std::to_string(budget - sink) + ",logical_page=" + std::to_string(logical) +
                                             ",physical_page=" + std::to_string(physical) +
                                             ",budget=" + std::to_string(budget) + ",reuse=4,sparsity=0.5"};
         }},
    };
    return table;
}

// ======== end of the policy table ============================================================================

/// A parsed spec: the text as given, its table entry, and the checked values.
struct PolicySpec {
    std::string text;
    const PolicyEntry* entry = nullptr;
    SpecValues values;

    std::string_view name() const { return entry->name; }
};

namespace detail {

inline std::string_view trim(std::string_view s) {
    const auto space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
    while (!s.empty() && space(s.front())) s.remove_prefix(1);
    while (!s.empty() && space(s.back())) s.remove_suffix(1);
    return s;
}

inline std::string join_names(const std::vector<std::string_view>& names) {
    std::string out;
    for (std::size_t i = 0; i < names.size(); ++i) {
        if (i) out += ", ";
        out += names[i];
    }
    return out;
}

inline std::string number_text(double x) {
    if (x == std::floor(x) && std::fabs(x) < 1e15) return std::to_string(static_cast<std::int64_t>(x));
    return std::to_string(x);
}

/// Checks one value against its key; throws a message naming key and value.
inline SpecValues::Value check_value(const KeySpec& key, std::string_view text, const std::string& context) {
    const auto bad = [&](const std::string& expected) {
        return invalid_argument(context + ": key '" + std::string(key.name) + "' = '" + std::string(text) +
                                "': expected " + expected);
    };
    const std::string range = "[" + number_text(key.min) + ", " + number_text(key.max) + "]";
    switch (key.kind) {
        case ValueKind::integer: {
            std::int64_t value = 0;
            const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
            if (text.empty() || ec != std::errc{} || end != text.data() + text.size() ||
                static_cast<double>(value) < key.min || static_cast<double>(value) > key.max) {
                throw bad("an integer in " + range);
            }
            return value;
        }
        case ValueKind::real: {
            double value = 0;
            const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
            if (text.empty() || ec != std::errc{} || end != text.data() + text.size() ||
                !(value >= key.min && value <= key.max)) {
                throw bad("a number in " + range);
            }
            return value;
        }
        case ValueKind::word:
            for (const std::string_view w : key.words) {
                if (w == text) return std::string(text);
            }
            throw bad("one of " + join_names(key.words));
    }
    throw bad("a value");
}

}  // namespace detail

inline const PolicyEntry* find_policy(std::string_view name) {
    for (const PolicyEntry& entry : policy_table()) {
        if (entry.name == name) return &entry;
    }
    return nullptr;
}

/// Parses and checks `name:key=value,...` (spaces around names, keys and values are ignored).
inline PolicySpec parse_policy_spec(std::string_view text) {
    PolicySpec spec;
    spec.text = std::string(detail::trim(text));
    const std::string context = "policy spec '" + spec.text + "'";
    if (spec.text.empty()) throw invalid_argument("policy spec '': empty; expected name:key=value,...");

    const std::string_view whole = spec.text;
    const std::size_t colon = whole.find(':');
    const std::string_view name = detail::trim(whole.substr(0, colon));
    const std::string_view rest = colon == std::string_view::npos ? std::string_view{} : whole.substr(colon + 1);
    spec.entry = find_policy(name);
    if (spec.entry == nullptr) {
        std::vector<std::string_view> names;
        for (const PolicyEntry& entry : policy_table()) names.push_back(entry.name);
        throw invalid_argument(context + ": unknown policy '" + std::string(name) +
                               "' (known: " + detail::join_names(names) + ")");
    }
    std::vector<std::string_view> key_names;
    for (const KeySpec& key : spec.entry->keys) key_names.push_back(key.name);
    const std::string known_keys = key_names.empty() ? "it takes no keys" : "keys: " + detail::join_names(key_names);

    // key=value items
    if (!detail::trim(rest).empty()) {
        std::size_t start = 0;
        while (start <= rest.size()) {
            const std::size_t comma = rest.find(',', start);
            const std::string_view item = detail::trim(
                rest.substr(start, comma == std::string_view::npos ? std::string_view::npos : comma - start));
            start = comma == std::string_view::npos ? rest.size() + 1 : comma + 1;
            const std::size_t equals = item.find('=');
            if (equals == std::string_view::npos || detail::trim(item.substr(0, equals)).empty()) {
                throw invalid_argument(context + ": expected key=value, got '" + std::string(item) + "'");
            }
            const std::string_view key_name = detail::trim(item.substr(0, equals));
            const std::string_view value = detail::trim(item.substr(equals + 1));
            const KeySpec* key = nullptr;
            for (const KeySpec& k : spec.entry->keys) {
                if (k.name == key_name) key = &k;
            }
            if (key == nullptr) {
                throw invalid_argument(context + ": unknown key '" + std::string(key_name) + "' for policy '" +
                                       std::string(spec.entry->name) + "' (" + known_keys + ")");
            }
            if (spec.values.contains(key_name)) {
                throw invalid_argument(context + ": key '" + std::string(key_name) + "' given twice");
            }
            spec.values.set(key->name, detail::check_value(*key, value, context));
        }
    }
    for (const KeySpec& key : spec.entry->keys) {
        if (spec.values.contains(key.name)) continue;
        if (key.fallback.empty()) {
            throw invalid_argument(context + ": missing required key '" + std::string(key.name) + "' for policy '" +
                                   std::string(spec.entry->name) + "'");
        }
        spec.values.set(key.name, detail::check_value(key, key.fallback, context));
    }
    return spec;
}

/// The configured policy; a combination the policy rejects throws with the spec named.
inline AnyPolicy make_policy(const PolicySpec& spec, const PolicyContext& context = {}) {
    try {
        return spec.entry->make(spec.values, context);
    } catch (const error& e) {
        throw invalid_argument("policy spec '" + spec.text + "': " + e.what());
    }
}

/// The default comparison: every policy's default specs at `budget` tokens.
/// `gates`: the trace carries LServe's gate values, so lserve joins the comparison.
inline std::vector<std::string> default_policy_specs(std::int32_t budget, bool rope, bool gates = false) {
    if (budget < 1) throw invalid_argument("budget = " + std::to_string(budget) + ": must be at least 1");
    std::vector<std::string> specs;
    for (const PolicyEntry& entry : policy_table()) {
        for (std::string& s : entry.defaults(budget, rope, gates)) specs.push_back(std::move(s));
    }
    return specs;
}

/// For --help: every policy with its keys.
inline std::string policy_help() {
    std::string out = "Policies (--policy name:key=value,...):\n";
    for (const PolicyEntry& entry : policy_table()) {
        out += "  " + std::string(entry.name) + ": " + std::string(entry.summary) + "\n";
        for (const KeySpec& key : entry.keys) {
            out += "      " + std::string(key.name) + "=";
            if (key.kind == ValueKind::word) {
                out += detail::join_names(key.words);
            } else {
                out += key.kind == ValueKind::integer ? "integer" : "number";
            }
            out += key.fallback.empty() ? " (required)" : " (default " + std::string(key.fallback) + ")";
            if (!key.help.empty()) out += ": " + std::string(key.help);
            out += "\n";
        }
    }
    return out;
}

}  // namespace kvsparse::tools
