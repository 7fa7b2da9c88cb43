// kvsparse-eval's pieces: NPY files, policy specs, traces, and the replay's masks and metrics checked
// against brute-force constructions written here from REFERENCE.md.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

#include "catch.hpp"
#include "error_message.hpp"

#include "common/npy.hpp"
#include "common/parallel.hpp"
#include "common/policy_spec.hpp"
#include "eval/replay.hpp"
#include "eval/report.hpp"
#include "eval/synthetic.hpp"
#include "eval/trace.hpp"

namespace fs = std::filesystem;
using namespace kvsparse;
using namespace kvsparse::tools;

namespace {

/// A fresh directory under the system's temporary directory, removed afterwards.
struct TempDir {
    fs::path path;
    explicit TempDir(const std::string& name) {
        static std::atomic<int> counter{0};
        path =
            fs::temp_directory_path() / ("kvsparse_test_eval_" + name + "_" + std::to_string(counter++) + "_" +
                                         std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
        fs::create_directories(path);
    }
    ~TempDir() {
        std::error_code ignored;
        fs::remove_all(path, ignored);
    }
};

std::vector<std::byte> bytes_of(const std::string& s) {
    std::vector<std::byte> b(s.size());
    std::memcpy(b.data(), s.data(), s.size());
    return b;
}

/// A .npy file assembled by hand: version bytes, a header dict (padded to `align` with spaces and '\n'), data.
std::string handmade_npy(int major, const std::string& dict, const std::string& data, std::size_t align = 64) {
    std::string out = "\x93NUMPY";
    out += static_cast<char>(major);
    out += '\0';
    const std::size_t length_bytes = major == 1 ? 2 : 4;
    std::string header = dict;
    while ((10 - 2 + length_bytes + header.size() + 1) % align != 0) header += ' ';
    header += '\n';
    for (std::size_t i = 0; i < length_bytes; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xffu);
    return out + header + data;
}

std::string float_bytes(std::initializer_list<float> values) {
    std::string s;
    for (const float f : values) {
        std::uint32_t u;
        std::memcpy(&u, &f, 4);
        for (int i = 0; i < 4; ++i) s += static_cast<char>((u >> (8 * i)) & 0xffu);
    }
    return s;
}
std::vector<float> ramp(std::size_t n, float scale) {
    std::vector<float> v(n);
    for (std::size_t i = 0; i < n; ++i) v[i] = scale * (static_cast<float>(i % 97) - 48.0f) / 8.0f;
    return v;
}

}  // namespace

// ---- NPY ------------------------------------------------------------------------------------------------

TEST_CASE("npy: every dtype and shape round-trips / version 1 and 2 headers", "[eval][npy]") {
    const std::vector<std::vector<std::int64_t>> shapes = {{},     {0},       {1},          {7},
                                                           {2, 3}, {3, 0, 2}, {2, 3, 4, 5}, {1, 2, 1, 3}};
    TempDir dir("npy_round_trip");
    for (const auto& shape : shapes) {
        const std::size_t n = static_cast<std::size_t>(npy::element_count(shape, npy::DType::float32));
        std::vector<float> values = ramp(n, 1.0f);  // multiples of 1/8: exact in float16
        std::vector<std::uint8_t> bytes(n);
        for (std::size_t i = 0; i < n; ++i) bytes[i] = static_cast<std::uint8_t>((i * 37 + 5) % 256);
        const std::vector<npy::Array> arrays = {npy::Array::float32(shape, values), npy::Array::float16(shape, values),
                                                npy::Array::uint8(shape, bytes)};
        for (const npy::Array& array : arrays) {
            for (const int version : {0, 1, 2}) {
                CAPTURE(npy::shape_string(shape), std::string(npy::name_of(array.dtype)), version);
                const std::vector<std::byte> file = npy::serialize(array, version);
                const auto* b = reinterpret_cast<const unsigned char*>(file.data());
                REQUIRE(std::memcmp(b, "\x93NUMPY", 6) == 0);
                CHECK(b[6] == (version == 2 ? 2 : 1));
                CHECK(b[7] == 0);
                const std::size_t prefix = version == 2 ? 12 : 10;
                const std::size_t header_length =
                    version == 2 ? (b[8] | b[9] << 8 | b[10] << 16 | b[11] << 24) : (b[8] | b[9] << 8);
                CHECK((prefix + header_length) % 64 == 0);  // data aligned as NumPy does
                CHECK(b[prefix + header_length - 1] == '\n');

                const npy::Array back = npy::parse(file, "round_trip.npy");
                CHECK(back.dtype == array.dtype);
                CHECK(back.shape == shape);
                CHECK((back.bytes == array.bytes));  // parenthesized: no std::byte printing
                CHECK(back.size() == static_cast<std::int64_t>(n));
                if (array.dtype == npy::DType::uint8) {
                    CHECK(back.to_uint8() == bytes);
                } else {
                    CHECK(back.to_float() == values);
                }
            }
            // Through a file as well.
            const fs::path path = dir.path / "a.npy";
            npy::write(path, array, 2);
            const npy::Array read = npy::read(path);
            CHECK(read.shape == shape);
            CHECK((read.bytes == array.bytes));
        }
    }
}

TEST_CASE("npy: float16 rounds to nearest even and widens exactly", "[eval][npy]") {
    const std::vector<float> values = {0.0f, -0.0f, 1.0f, 65504.0f, 1e-8f, 1.0f + 1.0f / 2048.0f, 3.14159265f, -2.5f};
    const npy::Array a = npy::Array::float16({8}, values);
    const std::vector<float> back = npy::parse(npy::serialize(a)).to_float();
    for (std::size_t i = 0; i < values.size(); ++i) CHECK(back[i] == half::to_float(half::from_float(values[i])));
    CHECK(back[5] == 1.0f);  // the tie goes to the even neighbour
}

TEST_CASE("npy: reads headers as other writers produce them", "[eval][npy]") {
    // NumPy's own layout.
    const npy::Array a = npy::parse(bytes_of(handmade_npy(
        1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", float_bytes({1.5f, -2.0f, 0.25f, 8.0f}))));
    CHECK(a.shape == std::vector<std::int64_t>{2, 2});
    CHECK(a.to_float() == std::vector<float>{1.5f, -2.0f, 0.25f, 8.0f});
    // Old NumPy: 16-byte alignment, Python 2 long literals; double quotes, no trailing comma, other key order.
    const npy::Array b = npy::parse(bytes_of(handmade_npy(
        1, "{\"shape\": (1L, 3L), \"fortran_order\": False, \"descr\": \"|u1\"}", std::string("\x01\x02\xff", 3), 16)));
    CHECK(b.dtype == npy::DType::uint8);
    CHECK(b.to_uint8() == std::vector<std::uint8_t>{1, 2, 255});
    // Version 2 and 3 (3 only differs in allowing a UTF-8 header).
    for (const int major : {2, 3}) {
        const npy::Array c = npy::parse(bytes_of(handmade_npy(
            major, "{'descr': '<f2', 'fortran_order': False, 'shape': (), }", std::string("\x00\x3c", 2))));
        CHECK(c.shape.empty());
        CHECK(c.to_float() == std::vector<float>{1.0f});
    }
}

TEST_CASE("npy: corrupt and truncated files are rejected with clear errors", "[eval][npy]") {
    const auto error_of = [](const std::string& file) {
        return error_message_of<format_error>([&] { npy::parse(bytes_of(file), "x.npy"); });
    };
    const std::string dict2x2 = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }";
    const std::string data4 = float_bytes({1, 2, 3, 4});

    CHECK_THAT(error_of(""), Catch::Contains("x.npy") && Catch::Contains("not a NumPy .npy file"));
    CHECK_THAT(error_of("PK\x03\x04 a zip file"), Catch::Contains("not a NumPy .npy file"));
    CHECK_THAT(error_of(std::string("\x93NUMPY\x01\x00", 8)), Catch::Contains("truncated header"));
    CHECK_THAT(error_of(std::string("\x93NUMPY\x01\x00\xc8\x00{'descr'", 18)),
               Catch::Contains("truncated header") && Catch::Contains("200"));
    CHECK_THAT(error_of(handmade_npy(4, dict2x2, data4)), Catch::Contains("unsupported .npy format version 4.0"));
    CHECK_THAT(error_of(handmade_npy(1, dict2x2, data4.substr(0, 15))),
               Catch::Contains("truncated data") && Catch::Contains("needs 16 bytes") && Catch::Contains("has 15"));
    CHECK_THAT(error_of(handmade_npy(1, dict2x2, data4 + "xx")), Catch::Contains("2 unexpected bytes after the data"));
    CHECK_THAT(
        error_of(handmade_npy(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", std::string(8, '\0'))),
        Catch::Contains("unsupported dtype '<f8'"));
    CHECK_THAT(
        error_of(handmade_npy(1, "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", std::string(4, '\0'))),
        Catch::Contains("big-endian"));
    CHECK_THAT(error_of(handmade_npy(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", data4)),
               Catch::Contains("Fortran-order"));
    CHECK_THAT(error_of(handmade_npy(1, "{'descr': '<f4', 'shape': (2, 2), }", data4)),
               Catch::Contains("no 'fortran_order'"));
    CHECK_THAT(error_of(handmade_npy(1, "{'descr': '<f4' 'fortran_order': False, 'shape': (2, 2), }", data4)),
               Catch::Contains("expected ',' or '}'"));
    CHECK_THAT(error_of(handmade_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -2), }", data4)),
               Catch::Contains("'shape' must be a tuple of non-negative integers"));
    CHECK_THAT(
        error_of(handmade_npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), 'extra': 1}", data4)),
        Catch::Contains("unexpected key 'extra'"));
    CHECK_THAT(error_of(handmade_npy(1, "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2, 2), }", data4)),
               Catch::Contains("True or False"));
    CHECK_THAT(error_of(handmade_npy(
                   1, "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }", data4)),
               Catch::Contains("too large"));

    // Every proper prefix of a valid file is rejected.
    const std::vector<std::byte> good = npy::serialize(npy::Array::float32({2, 3}, ramp(6, 1.0f)));
    for (std::size_t n = 0; n < good.size(); ++n) {
        CAPTURE(n);
        CHECK_THROWS_AS(npy::parse(std::span<const std::byte>(good).first(n), "cut.npy"), format_error);
    }
    TempDir dir("npy_missing");
    CHECK_THAT(error_message_of<format_error>([&] { npy::read(dir.path / "missing.npy"); }),
               Catch::Contains("missing.npy") && Catch::Contains("cannot open"));
    CHECK_THROWS_AS(npy::Array::float32({2, 2}, ramp(4, 1.0f)).to_uint8(), format_error);
}

// ---- policy specs ---------------------------------------------------------------------------------------

TEST_CASE("policy spec: every documented key of the existing policies is accepted", "[eval][spec]") {
    CHECK(std::holds_alternative<Dense>(make_policy(parse_policy_spec("dense"))));
    CHECK(std::holds_alternative<Dense>(make_policy(parse_policy_spec("  dense:  "))));

    const AnyPolicy w = make_policy(parse_policy_spec("window:window=512"));
    REQUIRE(std::holds_alternative<SlidingWindow>(w));
    CHECK(std::get<SlidingWindow>(w).window() == 512);

    const AnyPolicy s = make_policy(parse_policy_spec("sink:window=508"));
    REQUIRE(std::holds_alternative<AttentionSink>(s));
    CHECK(std::get<AttentionSink>(s).config().sinks == 4);  // default
    CHECK(std::get<AttentionSink>(s).config().window == 508);
    CHECK(std::get<AttentionSink>(s).config().positions == PositionMode::absolute);

    const PolicySpec spec = parse_policy_spec(" sink: sinks = 2 , window=10,positions=in_cache ");
    CHECK(spec.text == "sink: sinks = 2 , window=10,positions=in_cache");
    CHECK(std::string(spec.name()) == "sink");
    const AnyPolicy s2 = make_policy(spec);
    REQUIRE(std::holds_alternative<AttentionSink>(s2));
    CHECK(std::get<AttentionSink>(s2).config().sinks == 2);
    CHECK(std::get<AttentionSink>(s2).config().window == 10);
    CHECK(std::get<AttentionSink>(s2).config().positions == PositionMode::in_cache);
    CHECK(
        std::get<AttentionSink>(make_policy(parse_policy_spec("sink:sinks=0,window=1,positions=absolute"))).budget() ==
        1);

    const AnyPolicy h = make_policy(parse_policy_spec("h2o:heavy=100,recent=28"));
    REQUIRE(std::holds_alternative<kvsparse::H2OHeavyHitter>(h));
    CHECK(std::get<kvsparse::H2OHeavyHitter>(h).heavy() == 100);
    CHECK(std::get<kvsparse::H2OHeavyHitter>(h).recent() == 28);
    CHECK(std::get<kvsparse::H2OHeavyHitter>(make_policy(parse_policy_spec("h2o:heavy=0,recent=1"))).budget() == 1);

    // The default comparison.
    CHECK(default_policy_specs(512, true) == std::vector<std::string>{"dense", "window:window=512",
                                                                      "sink:sinks=4,window=508",
                                                                      "sink:sinks=4,window=508,positions=in_cache",
                                                                      "h2o:heavy=256,recent=256",
                                                                      "quest:page=16,budget=512,dense_layers=0"});
    CHECK(default_policy_specs(512, false) ==
          std::vector<std::string>{"dense", "window:window=512", "sink:sinks=4,window=508", "h2o:heavy=256,recent=256",
                                   "quest:page=16,budget=512,dense_layers=0"});
    for (const std::int32_t budget : {1, 2, 4, 5, 64}) {
        for (const std::string& text : default_policy_specs(budget, true)) {
            const AnyPolicy p = make_policy(parse_policy_spec(text));
            if (const auto* sink = std::get_if<AttentionSink>(&p)) CHECK(sink->budget() == budget);
            if (const auto* h2o = std::get_if<kvsparse::H2OHeavyHitter>(&p)) CHECK(h2o->budget() == budget);
            if (const auto* quest = std::get_if<kvsparse::QuestPageSelector>(&p)) {  // reads at most `budget` tokens
                CHECK(quest->page_budget() * quest->page_size() <= budget);
                CHECK(quest->config().dense_layers == 0);
            }
        }
    }
    const AnyPolicy q = make_policy(parse_policy_spec("quest:budget=256"));
    REQUIRE(std::holds_alternative<kvsparse::QuestPageSelector>(q));
    CHECK(std::get<kvsparse::QuestPageSelector>(q).config().page_size == 16);
    CHECK(std::get<kvsparse::QuestPageSelector>(q).config().token_budget == 256);
    CHECK(std::get<kvsparse::QuestPageSelector>(q).config().dense_layers == 2);
    CHECK(std::get<kvsparse::QuestPageSelector>(q).config().gqa == kvsparse::GqaAggregation::max);
    const auto q2 = std::get<kvsparse::QuestPageSelector>(
        make_policy(parse_policy_spec("quest:page=64,budget=1000,dense_layers=0,gqa=per_query_head")));
    CHECK(q2.page_budget() == 15);
    CHECK(q2.per_query_head());
    CHECK(std::get<kvsparse::QuestPageSelector>(make_policy(parse_policy_spec("quest:budget=8,gqa=sum"))).config().gqa ==
          kvsparse::GqaAggregation::sum);
    CHECK_THAT(policy_help(),
               Catch::Contains("window=integer (required)") && Catch::Contains("positions=absolute, in_cache") &&
                   Catch::Contains("gqa=max, sum, per_query_head"));
}

TEST_CASE("policy spec: unknown names and keys / missing keys and bad values are named", "[eval][spec]") {
    const auto error_of = [](const std::string& text) {
        return error_message_of<kvsparse::invalid_argument>([&] { make_policy(parse_policy_spec(text)); });
    };
    CHECK_THAT(error_of(""), Catch::Contains("empty"));
    CHECK_THAT(error_of("windw:window=5"),
               Catch::Contains("unknown policy 'windw'") && Catch::Contains("dense, window, sink"));
    CHECK_THAT(error_of("window"), Catch::Contains("missing required key 'window'"));
    CHECK_THAT(error_of("sink:sinks=4"),
               Catch::Contains("missing required key 'window'") && Catch::Contains("policy 'sink'"));
    CHECK_THAT(error_of("window:size=5"), Catch::Contains("unknown key 'size'") && Catch::Contains("keys: window"));
    CHECK_THAT(error_of("dense:window=5"), Catch::Contains("unknown key 'window'") && Catch::Contains("takes no keys"));
    CHECK_THAT(error_of("sink:window=5,window=6"), Catch::Contains("key 'window' given twice"));
    CHECK_THAT(error_of("window:window=0"),
               Catch::Contains("key 'window' = '0'") && Catch::Contains("[1, 2147483647]"));
    CHECK_THAT(error_of("window:window=abc"), Catch::Contains("key 'window' = 'abc'"));
    CHECK_THAT(error_of("window:window=12x"), Catch::Contains("key 'window' = '12x'"));
    CHECK_THAT(error_of("window:window=1.5"), Catch::Contains("key 'window' = '1.5'"));
    CHECK_THAT(error_of("window:window=99999999999"), Catch::Contains("key 'window' = '99999999999'"));
    CHECK_THAT(error_of("window:window="), Catch::Contains("key 'window' = ''"));
    CHECK_THAT(error_of("sink:window=5,sinks=-1"), Catch::Contains("key 'sinks' = '-1'"));
    CHECK_THAT(error_of("sink:window=5,positions=relative"),
               Catch::Contains("key 'positions' = 'relative'") && Catch::Contains("one of absolute, in_cache"));
    CHECK_THAT(error_of("sink:window"), Catch::Contains("expected key=value, got 'window'"));
    CHECK_THAT(error_of("sink:=5"), Catch::Contains("expected key=value"));
    CHECK_THAT(error_of("window:window=5,"), Catch::Contains("expected key=value, got ''"));
    // A combination the policy itself rejects names the spec.
    CHECK_THAT(
        error_of("sink:sinks=2147483000,window=2147483000"),
        Catch::Contains("policy spec 'sink:sinks=2147483000,window=2147483000'") && Catch::Contains("overflows"));
    CHECK_THAT(error_of("h2o:heavy=4"), Catch::Contains("missing required key 'recent'") && Catch::Contains("policy 'h2o'"));
    CHECK_THAT(error_of("h2o:heavy=4,recent=0"), Catch::Contains("key 'recent' = '0'"));
    CHECK_THAT(error_of("h2o:heavy=-1,recent=4"), Catch::Contains("key 'heavy' = '-1'"));
    CHECK_THAT(error_of("h2o:heavy=2147483000,recent=2147483000"),
               Catch::Contains("policy spec 'h2o:heavy=2147483000,recent=2147483000'") && Catch::Contains("overflows"));
    CHECK_THAT(error_of("quest:page=16"), Catch::Contains("missing required key 'budget'") && Catch::Contains("policy 'quest'"));
    CHECK_THAT(error_of("quest:page=12,budget=64"),
               Catch::Contains("policy spec 'quest:page=12,budget=64'") && Catch::Contains("power of two"));
    CHECK_THAT(error_of("quest:budget=64,gqa=mean"), Catch::Contains("key 'gqa' = 'mean'"));
    CHECK_THAT(error_of("quest:budget=0"), Catch::Contains("key 'budget' = '0'"));
    CHECK_THROWS_AS(default_policy_specs(0, false), kvsparse::invalid_argument);
}

// ---- traces ---------------------------------------------------------------------------------------------

TEST_CASE("synthetic traces: deterministic / shaped as asked / options checked", "[eval][trace]") {
    const SyntheticConfig config = parse_synthetic("tokens=40,layers=2,q_heads=6,kv_heads=3,dim=8,prefill=3,seed=7");
    CHECK(config.tokens == 40);
    CHECK(config.prefill_tokens() == 3);
    const Trace a = make_synthetic(config);
    const Trace b = make_synthetic(config);
    CHECK(a.q == b.q);
    CHECK(a.k == b.k);
    CHECK(a.v == b.v);
    CHECK(a.q.size() == 2u * 40 * 6 * 8);
    CHECK(a.k.size() == 2u * 40 * 3 * 8);
    CHECK(a.prefill == 3);
    REQUIRE(a.rope.has_value());
    const Trace c = make_synthetic(parse_synthetic("tokens=40,layers=2,q_heads=6,kv_heads=3,dim=8,prefill=3,seed=8"));
    CHECK(a.k != c.k);
    CHECK(parse_synthetic("").tokens == 4096);
    CHECK(parse_synthetic("").prefill_tokens() == 1024);

    CHECK_THAT(error_message_of<kvsparse::invalid_argument>([] { parse_synthetic("tokens=10,heads=2"); }),
               Catch::Contains("unknown key 'heads'"));
    CHECK_THAT(error_message_of<kvsparse::invalid_argument>([] { parse_synthetic("tokens=ten"); }), Catch::Contains("key 'tokens' = 'ten'"));
    CHECK_THAT(error_message_of<kvsparse::invalid_argument>([] { parse_synthetic("q_heads=6,kv_heads=4"); }),
               Catch::Contains("multiple of kv_heads"));
    CHECK_THAT(error_message_of<kvsparse::invalid_argument>([] { parse_synthetic("dim=7"); }), Catch::Contains("even"));
    CHECK_THAT(error_message_of<kvsparse::invalid_argument>([] { parse_synthetic("tokens=10,prefill=10"); }), Catch::Contains("prefill"));
}

TEST_CASE("traces: saved and loaded / float16 files / meta.json / errors", "[eval][trace]") {
    TempDir dir("trace");
    const Trace original =
        make_synthetic(parse_synthetic("tokens=24,layers=2,q_heads=4,kv_heads=2,dim=8,prefill=5,seed=3"));
    save_trace(original, dir.path / "f32");
    const Trace loaded = load_trace(dir.path / "f32");
    CHECK(loaded.q == original.q);
    CHECK(loaded.k == original.k);
    CHECK(loaded.v == original.v);
    CHECK(loaded.prefill == 5);
    CHECK(loaded.shape.q_heads == 4);
    CHECK(loaded.shape.kv_heads == 2);
    REQUIRE(loaded.rope.has_value());
    CHECK(loaded.rope->theta == original.rope->theta);

    // float16 files and every meta.json member.
    const fs::path h = dir.path / "f16";
    fs::create_directories(h);
    npy::write(h / "q.npy", npy::Array::float16({1, 6, 4, 2}, ramp(48, 0.5f)));
    npy::write(h / "k.npy", npy::Array::float16({1, 6, 2, 2}, ramp(24, 0.25f)), 2);
    npy::write(h / "v.npy", npy::Array::float16({1, 6, 2, 2}, ramp(24, 2.0f)));
    std::ofstream(h / "meta.json")
        << R"({"prefill": 2, "rope": {"style": "half_split", "theta": 1e6}, "alpha": [[0.5, 1.0]], "note": "ignored"})";
    const Trace f16 = load_trace(h);
    CHECK(f16.dtype == "float16");
    CHECK(f16.tokens == 6);
    CHECK(f16.shape.layers == 1);
    CHECK(f16.prefill == 2);
    CHECK(f16.rope->style == RopeStyle::half_split);
    CHECK(f16.rope->theta == 1e6f);
    CHECK(f16.alpha == std::vector<std::vector<float>>{{0.5f, 1.0f}});
    CHECK(f16.q == ramp(48, 0.5f));

    // Without meta.json: prefill 1, no declared RoPE, in-cache positions use interleaved / 10000.
    fs::remove(h / "meta.json");
    const Trace plain = load_trace(h);
    CHECK(plain.prefill == 1);
    CHECK_FALSE(plain.rope.has_value());
    CHECK(plain.effective_rope().style == RopeStyle::interleaved);
    CHECK(plain.effective_rope().theta == 10000.0f);

    const auto meta_error = [&](const std::string& json) {
        std::ofstream(h / "meta.json") << json;
        return error_message_of<format_error>([&] { load_trace(h); });
    };
    CHECK_THAT(meta_error(R"({"prefill": 6})"), Catch::Contains("meta.json") && Catch::Contains("\"prefill\" = 6"));
    CHECK_THAT(meta_error(R"({"prefill": "2"})"), Catch::Contains("\"prefill\" must be an integer"));
    CHECK_THAT(meta_error(R"({"rope": {"style": "neox"}})"), Catch::Contains("\"rope.style\" = \"neox\""));
    CHECK_THAT(meta_error(R"({"rope": {"theta": -1}})"), Catch::Contains("\"rope.theta\""));
    CHECK_THAT(meta_error(R"({"alpha": [[0.5]]})"), Catch::Contains("alpha row 0 has 1 values"));
    CHECK_THAT(meta_error(R"({"alpha": [[0.5, 1], [1, 1]]})"), Catch::Contains("alpha has 2 rows"));
    CHECK_THAT(meta_error("{not json"), Catch::Contains("not valid JSON"));
    fs::remove(h / "meta.json");

    npy::write(h / "v.npy", npy::Array::float16({1, 6, 1, 2}, ramp(12, 2.0f)));
    CHECK_THAT(error_message_of<format_error>([&] { load_trace(h); }), Catch::Contains("differ in shape"));
    npy::write(h / "v.npy", npy::Array::uint8({1, 6, 2, 2}, std::vector<std::uint8_t>(24)));
    CHECK_THAT(error_message_of<format_error>([&] { load_trace(h); }),
               Catch::Contains("v.npy") && Catch::Contains("expected float32 or float16"));
    npy::write(h / "v.npy", npy::Array::float32({6, 2, 2}, ramp(24, 1.0f)));
    CHECK_THAT(error_message_of<format_error>([&] { load_trace(h); }), Catch::Contains("expected 4 dimensions"));
    fs::remove(h / "k.npy");
    CHECK_THAT(error_message_of<format_error>([&] { load_trace(h); }), Catch::Contains("k.npy") && Catch::Contains("cannot open"));
}

// ---- replay: masks and metrics against brute force ------------------------------------------------------

namespace {

/// S_t of REFERENCE.md, written out: dense, window W, sink (S, W); `kind` 0, 1, 2.
struct BruteSpec {
    std::string text;
    int kind;
    std::int32_t sinks = 0, window = 0;

    bool selected(std::int32_t t, std::int32_t j) const {
        if (j > t) return false;
        if (kind == 0) return true;
        if (kind == 1) return j >= std::max(0, t - window + 1);
        return j < std::min(sinks, t + 1) || (j >= std::max(sinks, t - window + 1));
    }
};

/// Masks as REFERENCE.md defines them: prefill rows causal (dense prefill), decode rows S_t.
std::vector<std::uint8_t> brute_mask(const Trace& trace, const BruteSpec& spec) {
    const std::int64_t L = trace.shape.layers, T = trace.tokens, Hq = trace.shape.q_heads;
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(L * T * Hq * T), 0);
    for (std::int64_t l = 0; l < L; ++l) {
        for (std::int64_t t = 0; t < T; ++t) {
            for (std::int64_t h = 0; h < Hq; ++h) {
                for (std::int64_t j = 0; j < T; ++j) {
                    const bool on = t < trace.prefill
                                        ? j <= t
                                        : spec.selected(static_cast<std::int32_t>(t), static_cast<std::int32_t>(j));
                    mask[static_cast<std::size_t>(((l * T + t) * Hq + h) * T + j)] = on ? 1 : 0;
                }
            }
        }
    }
    return mask;
}

struct BruteFigures {
    double recall_mean = 0, recall_min = 1, error_mean = 0;
};

/// Recall and output error from the definitions, in double. With `in_cache`, the policy's output turns
/// the i-th key of S_t (already rotated at its position j) by i - j and the query by |S_t| - 1 - t.
BruteFigures brute_figures(const Trace& trace, const BruteSpec& spec, std::optional<Rope> in_cache = {}) {
    const std::int32_t L = trace.shape.layers, T = trace.tokens, Hq = trace.shape.q_heads, G = trace.shape.group_size();
    const std::size_t D = static_cast<std::size_t>(trace.shape.head_dim);
    const double scale = 1.0 / std::sqrt(static_cast<double>(D));
    const auto dot = [&](const float* a, const float* b) {
        double s = 0;
        for (std::size_t d = 0; d < D; ++d) s += static_cast<double>(a[d]) * b[d];
        return s * scale;
    };
    // out = softmax(scores) . values of `positions`; returns the largest score, `sum` the exponentials' sum.
    const auto attention = [&](const std::vector<double>& scores, const std::vector<std::int32_t>& positions,
                               std::int32_t l, std::int32_t g, std::vector<double>& out, double& sum) {
        const double top = *std::max_element(scores.begin(), scores.end());
        sum = 0;
        for (const double x : scores) sum += std::exp(x - top);
        out.assign(D, 0.0);
        for (std::size_t i = 0; i < positions.size(); ++i) {
            const double p = std::exp(scores[i] - top) / sum;
            const float* v = trace.values(l, positions[i]).data() + static_cast<std::size_t>(g) * D;
            for (std::size_t d = 0; d < D; ++d) out[d] += p * v[d];
        }
        return top;
    };
    BruteFigures f;
    double count = 0;
    for (std::int32_t l = 0; l < L; ++l) {
        for (std::int32_t t = trace.prefill; t < T; ++t) {
            for (std::int32_t h = 0; h < Hq; ++h) {
                const std::int32_t g = h / G;
                const float* q = trace.queries(l, t).data() + static_cast<std::size_t>(h) * D;
                const auto key = [&](std::int32_t j) {
                    return trace.keys(l, j).data() + static_cast<std::size_t>(g) * D;
                };
                std::vector<std::int32_t> all, set;
                std::vector<double> dense_scores;
                for (std::int32_t j = 0; j <= t; ++j) {
                    all.push_back(j);
                    dense_scores.push_back(dot(q, key(j)));
                    if (spec.selected(t, j)) set.push_back(j);
                }
                std::vector<double> dense, sparse;
                double dense_sum = 0, sparse_sum = 0;
                const double top = attention(dense_scores, all, l, g, dense, dense_sum);
                double recall = 0;
                for (const std::int32_t j : set) {
                    recall += std::exp(dense_scores[static_cast<std::size_t>(j)] - top) / dense_sum;
                }

                const auto n = static_cast<std::int32_t>(set.size());
                std::vector<float> q_turned(q, q + D);
                if (in_cache) rope_rotate(q_turned.data(), static_cast<std::int32_t>(D), n - 1 - t, *in_cache);
                std::vector<double> sparse_scores;
                for (std::int32_t i = 0; i < n; ++i) {
                    const std::int32_t j = set[static_cast<std::size_t>(i)];
                    std::vector<float> k_turned(key(j), key(j) + D);
                    if (in_cache) rope_rotate(k_turned.data(), static_cast<std::int32_t>(D), i - j, *in_cache);
                    sparse_scores.push_back(dot(q_turned.data(), k_turned.data()));
                }
                attention(sparse_scores, set, l, g, sparse, sparse_sum);

                double diff = 0, norm = 0;
                for (std::size_t d = 0; d < D; ++d) {
                    diff += (sparse[d] - dense[d]) * (sparse[d] - dense[d]);
                    norm += dense[d] * dense[d];
                }
                f.recall_mean += recall;
                f.recall_min = std::min(f.recall_min, recall);
                f.error_mean += std::sqrt(diff / norm);
                ++count;
            }
        }
    }
    f.recall_mean /= count;
    f.error_mean /= count;
    return f;
}

std::vector<PolicyResult> run_specs(const Trace& trace, const std::vector<std::string>& specs, ReplayOptions options) {
    std::vector<AnyPolicy> policies;
    for (const std::string& s : specs) policies.push_back(make_policy(parse_policy_spec(s)));
    options.progress = false;
    return replay(trace, specs, policies, options);
}

}  // namespace

TEST_CASE("replay: masks of dense / window and sink equal the brute-force sets", "[eval][replay]") {
    const std::vector<BruteSpec> specs = {
        {"dense", 0},
        {"window:window=5", 1, 0, 5},
        {"window:window=1", 1, 0, 1},
        {"sink:sinks=2,window=6", 2, 2, 6},
        {"sink:sinks=2,window=6,positions=in_cache", 2, 2, 6},
        {"sink:sinks=0,window=3", 2, 0, 3},
        {"sink:sinks=4,window=1", 2, 4, 1},
    };
    std::vector<std::string> texts;
    for (const BruteSpec& s : specs) texts.push_back(s.text);
    for (const std::int32_t prefill : {0, 1, 9}) {
        for (const int threads : {1, 2}) {
            CAPTURE(prefill, threads);
            const Trace trace = make_synthetic(parse_synthetic(
                "tokens=33,layers=2,q_heads=4,kv_heads=2,dim=8,seed=11,prefill=" + std::to_string(prefill)));
            TempDir dir("masks");
            ReplayOptions options;
            options.threads = threads;
            options.masks_dir = dir.path;
            const auto results = run_specs(trace, texts, options);
            REQUIRE(results.size() == specs.size());
            for (std::size_t i = 0; i < specs.size(); ++i) {
                CAPTURE(specs[i].text);
                const npy::Array mask = npy::read(dir.path / (std::to_string(i) + ".npy"));
                CHECK(mask.dtype == npy::DType::uint8);
                CHECK(mask.shape == std::vector<std::int64_t>{2, 33, 4, 33});
                CHECK(mask.to_uint8() == brute_mask(trace, specs[i]));
            }
        }
    }
}

TEST_CASE("replay: recall and output error match the definitions / budgets covering the trace are exact",
          "[eval][replay]") {
    Trace trace = make_synthetic(parse_synthetic("tokens=40,layers=2,q_heads=4,kv_heads=2,dim=16,prefill=6,seed=5"));
    // In-cache positions turn keys with the RoPE the trace declares: half-split here, to see it is used.
    trace.rope = Rope{RopeStyle::half_split, 300.0f};
    const std::vector<BruteSpec> partial = {{"window:window=7", 1, 0, 7},
                                            {"sink:sinks=3,window=5", 2, 3, 5},
                                            {"sink:sinks=3,window=5,positions=in_cache", 2, 3, 5}};
    std::vector<std::string> texts;
    for (const BruteSpec& s : partial) texts.push_back(s.text);
    const auto results = run_specs(trace, texts, ReplayOptions{});
    CHECK(std::fabs(results[2].output_error_mean - results[1].output_error_mean) > 1e-3);
    for (std::size_t i = 0; i < partial.size(); ++i) {
        CAPTURE(partial[i].text);
        const BruteFigures expected = brute_figures(trace, partial[i], i == 2 ? trace.rope : std::nullopt);
        CHECK(results[i].spec == partial[i].text);
        CHECK(results[i].recall_mean == Approx(expected.recall_mean).margin(1e-9));
        CHECK(results[i].recall_min == Approx(expected.recall_min).margin(1e-9));
        CHECK(results[i].output_error_mean == Approx(expected.error_mean).margin(1e-5));
        CHECK(results[i].recall_mean < 0.999);  // the small budget does miss attention
        CHECK(results[i].peak_tokens == (i == 0 ? 7 : 8));
    }

    // Budgets at least the trace's length: recall 1, output error 0 to float tolerance, in both position modes.
    const std::vector<std::string> full = {"dense", "window:window=40", "sink:sinks=4,window=36",
                                           "sink:sinks=4,window=36,positions=in_cache", "window:window=1000"};
    const auto covered = run_specs(trace, full, ReplayOptions{});
    for (const PolicyResult& r : covered) {
        CAPTURE(r.spec);
        CHECK(r.recall_mean == Approx(1.0).margin(1e-12));
        CHECK(r.recall_min == Approx(1.0).margin(1e-12));
        CHECK(r.output_error_mean < 1e-5);
        CHECK(r.peak_tokens == 40);
        // 2 layers x 2 KV heads x 3 pages of 16 tokens, keys and values in float32.
        CHECK(r.peak_bytes == 2 * 2 * 3 * (2 * 16 * 16 * 4));
    }
}

TEST_CASE("replay: figures do not depend on the thread count / JSON carries them", "[eval][replay]") {
    const Trace trace =
        make_synthetic(parse_synthetic("tokens=64,layers=3,q_heads=4,kv_heads=1,dim=8,prefill=20,seed=9"));
    const std::vector<std::string> specs = default_policy_specs(16, true);
    ReplayOptions one, many;
    one.threads = 1;
    many.threads = 3;
    const auto a = run_specs(trace, specs, one);
    const auto b = run_specs(trace, specs, many);
    REQUIRE(a.size() == specs.size());
    REQUIRE(specs.size() >= 4);
    for (std::size_t i = 0; i < a.size(); ++i) {
        CHECK(a[i].recall_mean == b[i].recall_mean);
        CHECK(a[i].recall_min == b[i].recall_min);
        CHECK(a[i].output_error_mean == b[i].output_error_mean);
        CHECK(a[i].peak_tokens == b[i].peak_tokens);
        CHECK(a[i].peak_bytes == b[i].peak_bytes);
    }
    // Sink and window hold 16 tokens; the prefill's transient (20 tokens) is cut back within the call.
    CHECK(a[0].peak_tokens == 64);
    CHECK(a[1].peak_tokens == 16);
    CHECK(a[2].peak_tokens == 16);
    CHECK(a[3].peak_tokens == 16);
    // in_cache and absolute keep the same sets: same recall, different rotation so different outputs.
    CHECK(a[3].recall_mean == a[2].recall_mean);
    for (std::size_t i = 0; i < specs.size(); ++i) {  // H2O holds its budget too, per (layer, KV head)
        if (specs[i].rfind("h2o:", 0) == 0) CHECK(a[i].peak_tokens == 16);
        if (specs[i].rfind("quest:", 0) == 0) CHECK(a[i].peak_tokens == 64);  // Quest keeps every token
    }

    const nlohmann::ordered_json json = to_json(trace, a);
    CHECK(json["trace"]["layers"] == 3);
    CHECK(json["trace"]["tokens"] == 64);
    CHECK(json["trace"]["q_heads"] == 4);
    CHECK(json["trace"]["kv_heads"] == 1);
    CHECK(json["trace"]["head_dim"] == 8);
    CHECK(json["trace"]["prefill"] == 20);
    REQUIRE(json["policies"].size() == specs.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
        const auto& p = json["policies"][i];
        CHECK(p["spec"] == specs[i]);
        for (const char* key : {"recall_mean", "recall_min", "output_error_mean", "select_ns_per_step"})
            CHECK(p[key].is_number());
        CHECK(p["peak_tokens"] == a[i].peak_tokens);
        CHECK(p["peak_bytes"] == a[i].peak_bytes);
    }
    const std::string table = format_table(a);
    for (const std::string& s : specs) CHECK_THAT(table, Catch::Contains(s));
}

TEST_CASE("replay: on the needle queries Quest recalls more than a sliding window at 1/8 of the context",
          "[eval][replay][quest]") {
    // The synthetic trace marks the queries it aligned with an earlier needle key; kvsparse-eval reports
    // their mean recall. At a budget of 1/8 of the context, a window only sees needles that happen to be
    // recent, while Quest finds the needle's page through its key bounds.
    const Trace trace = make_synthetic(parse_synthetic("tokens=1024,layers=1,q_heads=8,kv_heads=4,dim=64,prefill=256"));
    std::int64_t marked = 0;
    for (std::int32_t t = trace.prefill; t < trace.tokens; ++t)
        for (std::int32_t h = 0; h < trace.shape.q_heads; ++h) marked += trace.needle_query(0, t, h) ? 1 : 0;
    const double rate = static_cast<double>(marked) / (trace.decode_steps() * trace.shape.q_heads);
    CHECK(rate > 0.09);  // about 1 query in 8 once needles exist
    CHECK(rate < 0.14);

    const std::int32_t budget = trace.tokens / 8;
    const std::string b = std::to_string(budget);
    const std::vector<std::string> specs{"window:window=" + b, "quest:page=16,budget=" + b + ",dense_layers=0",
                                         "quest:page=16,budget=" + b + ",dense_layers=0,gqa=sum",
                                         "quest:page=16,budget=" + b + ",dense_layers=0,gqa=per_query_head",
                                         "dense"};
    ReplayOptions options;
    options.threads = 1;
    const auto results = run_specs(trace, specs, options);
    const double window = results[0].needle_recall_mean;
    CAPTURE(window, results[1].needle_recall_mean, results[2].needle_recall_mean, results[3].needle_recall_mean);
    for (std::size_t i = 1; i <= 3; ++i) {
        CHECK(results[i].needle_recall_mean > window + 0.3);
        CHECK(results[i].recall_mean > results[0].recall_mean);
    }
    CHECK(results[4].needle_recall_mean == Approx(1.0).margin(1e-9));
    CHECK_THAT(format_table(results), Catch::Contains("needle recall"));
    CHECK(to_json(trace, results)["policies"][1]["needle_recall_mean"].is_number());

    // The marks travel with the trace (needles.npy); a trace without them reports no needle recall.
    TempDir dir("needles");
    save_trace(trace, dir.path);
    const Trace loaded = load_trace(dir.path);
    CHECK(loaded.needle_queries == trace.needle_queries);
    fs::remove(dir.path / "needles.npy");
    const Trace unmarked = load_trace(dir.path);
    CHECK(unmarked.needle_queries.empty());
    const auto none = run_specs(unmarked, {"window:window=" + b}, options);
    CHECK(std::isnan(none[0].needle_recall_mean));
    CHECK(to_json(unmarked, none)["policies"][0]["needle_recall_mean"].is_null());
}

TEST_CASE("parallel_for runs every task once and passes on the first error", "[eval][parallel]") {
    std::vector<std::atomic<int>> hits(100);
    parallel_for(100, 4, [&](std::int64_t i) { hits[static_cast<std::size_t>(i)]++; });
    for (const auto& h : hits) CHECK(h == 1);
    CHECK_THROWS_WITH(parallel_for(10, 3,
                                   [](std::int64_t i) {
                                       if (i == 4) throw kvsparse::error("task 4 failed");
                                   }),
                      "task 4 failed");
}

TEST_CASE("eval: lserve takes its head kinds from the trace's gate values", "[eval][lserve]") {
    // The synthetic trace carries alpha measured on itself (attention mass beyond the sinks and the last
    // 256 positions); lserve joins the default comparison only for traces with gate values.
    const Trace trace = make_synthetic(parse_synthetic("tokens=300,layers=2,q_heads=4,kv_heads=2,dim=16,prefill=64,seed=4"));
    REQUIRE(trace.alpha.size() == 2);
    for (const auto& row : trace.alpha) {
        REQUIRE(row.size() == 2);
        for (const float a : row) CHECK((a >= 0.0f && a <= 1.0f));
    }
    CHECK(default_policy_specs(512, true, true).back() ==
          "lserve:sink=4,local=508,logical_page=16,physical_page=64,budget=512,reuse=4,sparsity=0.5");
    const std::vector<std::string> specs = default_policy_specs(64, true, true);
    CHECK(specs.back() == "lserve:sink=4,local=60,logical_page=16,physical_page=16,budget=64,reuse=4,sparsity=0.5");
    const PolicyContext context{2, 2, trace.alpha};
    for (const std::int32_t budget : {1, 2, 4, 5, 64, 200}) {
        const std::string text = default_policy_specs(budget, false, true).back();
        CAPTURE(text);
        const AnyPolicy made = make_policy(parse_policy_spec(text), context);
        const auto& lserve = std::get<LServeHybrid>(made);
        CHECK(lserve.streaming_policy().budget() == budget);
        if (budget >= 3) CHECK(lserve.page_budget() * lserve.config().physical_page <= budget);
    }
    const AnyPolicy policy = make_policy(parse_policy_spec(specs.back()), context);
    const auto& lserve = std::get<LServeHybrid>(policy);
    CHECK(lserve.head_kinds().streaming_count() == 2);
    CHECK(kvsparse::prefill_visible(lserve, 0, 0, 10, 3) == true);

    const auto error_of = [&](const std::string& text, const PolicyContext& c) {
        return error_message_of<kvsparse::error>([&] { make_policy(parse_policy_spec(text), c); });
    };
    CHECK_THAT(error_of("lserve:budget=64", PolicyContext{}), Catch::Contains("gate values") && Catch::Contains("has none"));
    CHECK_THAT(error_of("lserve:budget=64", PolicyContext{3, 2, trace.alpha}), Catch::Contains("the trace has 3 layers"));
    CHECK_THAT(error_of("lserve:budget=64,sparsity=2", context), Catch::Contains("key 'sparsity' = '2'"));
    CHECK_THAT(error_of("lserve:budget=64,logical_page=16,physical_page=24", context), Catch::Contains("physical_page"));

    ReplayOptions options;
    options.progress = false;
    const auto results = replay(trace, {specs.back()}, {policy}, options);
    REQUIRE(results.size() == 1);
    CHECK(results[0].peak_tokens == 300);  // retrieval heads keep every token
    CHECK(results[0].recall_mean > 0.5);
}
