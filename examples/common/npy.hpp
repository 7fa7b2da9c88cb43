#pragma once
// NumPy .npy files: read and write float32, float16 and uint8 arrays, C order, little-endian, format
// versions 1.0 and 2.0 (3.0, which only allows a UTF-8 header, is read too).
//
// File layout: the magic "\x93NUMPY", major and minor version bytes, the header length (uint16 in
// version 1, uint32 in versions 2 and 3, little-endian), then the header: a Python dict literal such as
// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }, space padded and ending in '\n' so that
// the data starts at a multiple of 64 bytes. The data follows, exactly product(shape) items.
//
// Every problem with a file throws kvsparse::format_error naming the file and what is wrong.
// Reading and writing assemble bytes explicitly, so the host's byte order does not matter.

#include <algorithm>
#include <bit>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <kvsparse/dtype.hpp>
#include <kvsparse/error.hpp>

namespace kvsparse::npy {

/// Element types this reader and writer support.
enum class DType : std::uint8_t { float32, float16, uint8 };

inline std::size_t item_size(DType type) {
    switch (type) {
        case DType::float32:
            return 4;
        case DType::float16:
            return 2;
        case DType::uint8:
            return 1;
    }
    return 0;
}

/// NumPy's dtype string as written in headers.
inline std::string_view descr_of(DType type) {
    switch (type) {
        case DType::float32:
            return "<f4";
        case DType::float16:
            return "<f2";
        case DType::uint8:
            return "|u1";
    }
    return "?";
}

inline std::string_view name_of(DType type) {
    switch (type) {
        case DType::float32:
            return "float32";
        case DType::float16:
            return "float16";
        case DType::uint8:
            return "uint8";
    }
    return "?";
}

/// "[2, 3]" (and "[]" for a 0-d array).
inline std::string shape_string(std::span<const std::int64_t> shape) {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[i]);
    }
    return s + "]";
}

/// Items of an array of this shape (1 for a 0-d array); throws format_error beyond 2^62 bytes.
inline std::int64_t element_count(std::span<const std::int64_t> shape, DType type) {
    std::int64_t count = 1;
    const std::int64_t limit = (std::int64_t{1} << 62) / static_cast<std::int64_t>(item_size(type));
    for (const std::int64_t n : shape) {
        if (n < 0) throw format_error("npy: negative dimension in shape " + shape_string(shape));
        if (n != 0 && count > limit / n) throw format_error("npy: shape " + shape_string(shape) + " is too large");
        count *= n;
    }
    return count;
}

/// An array as stored: raw little-endian bytes in C order.
struct Array {
    DType dtype = DType::float32;
    std::vector<std::int64_t> shape;
    std::vector<std::byte> bytes;

    std::int64_t size() const { return element_count(shape, dtype); }

    /// Elements widened to float (uint8 as its value).
    std::vector<float> to_float() const {
        const std::size_t n = static_cast<std::size_t>(size());
        std::vector<float> out(n);
        const auto* b = reinterpret_cast<const unsigned char*>(bytes.data());
        for (std::size_t i = 0; i < n; ++i) {
            switch (dtype) {
                case DType::float32: {
                    const std::uint32_t u = std::uint32_t{b[4 * i]} | std::uint32_t{b[4 * i + 1]} << 8 |
                                            std::uint32_t{b[4 * i + 2]} << 16 | std::uint32_t{b[4 * i + 3]} << 24;
                    out[i] = std::bit_cast<float>(u);
                    break;
                }
                case DType::float16:
                    out[i] = half::to_float(static_cast<std::uint16_t>(b[2 * i] | b[2 * i + 1] << 8));
                    break;
                case DType::uint8:
                    out[i] = static_cast<float>(b[i]);
                    break;
            }
        }
        return out;
    }

    /// The elements of a uint8 array.
    std::vector<std::uint8_t> to_uint8() const {
        if (dtype != DType::uint8) {
            throw format_error("npy: array has dtype " + std::string(name_of(dtype)) + ", expected uint8");
        }
        std::vector<std::uint8_t> out(bytes.size());
        std::memcpy(out.data(), bytes.data(), bytes.size());
        return out;
    }

    static Array float32(std::vector<std::int64_t> shape, std::span<const float> values) {
        Array a = sized(DType::float32, std::move(shape), values.size());
        auto* b = reinterpret_cast<unsigned char*>(a.bytes.data());
        for (std::size_t i = 0; i < values.size(); ++i) {
            const auto u = std::bit_cast<std::uint32_t>(values[i]);
            for (int byte = 0; byte < 4; ++byte)
                b[4 * i + static_cast<std::size_t>(byte)] = static_cast<unsigned char>(u >> (8 * byte));
        }
        return a;
    }

    /// Rounds each value to the nearest float16 (ties to even).
    static Array float16(std::vector<std::int64_t> shape, std::span<const float> values) {
        Array a = sized(DType::float16, std::move(shape), values.size());
        auto* b = reinterpret_cast<unsigned char*>(a.bytes.data());
        for (std::size_t i = 0; i < values.size(); ++i) {
            const std::uint16_t h = half::from_float(values[i]);
            b[2 * i] = static_cast<unsigned char>(h & 0xffu);
            b[2 * i + 1] = static_cast<unsigned char>(h >> 8);
        }
        return a;
    }

    static Array uint8(std::vector<std::int64_t> shape, std::span<const std::uint8_t> values) {
        Array a = sized(DType::uint8, std::move(shape), values.size());
        std::memcpy(a.bytes.data(), values.data(), values.size());
        return a;
    }

private:
    static Array sized(DType type, std::vector<std::int64_t> shape, std::size_t values) {
        Array a;
        a.dtype = type;
        a.shape = std::move(shape);
        const std::int64_t n = element_count(a.shape, type);
        if (static_cast<std::size_t>(n) != values) {
            throw invalid_argument("npy: shape " + shape_string(a.shape) + " holds " + std::to_string(n) +
                                   " elements, " + std::to_string(values) + " given");
        }
        a.bytes.resize(values * item_size(type));
        return a;
    }
};

namespace detail {

/// A parser for the header's Python dict literal (strings, True/False, tuples of integers).
class HeaderParser {
public:
    HeaderParser(std::string_view text, std::string_view file) : text_(text), file_(file) {}

    struct Fields {
        std::string descr;
        bool fortran_order = false;
        std::vector<std::int64_t> shape;
    };

    Fields parse() {
        Fields fields;
        bool have_descr = false, have_order = false, have_shape = false;
        expect('{');
        while (true) {
            skip_space();
            if (peek() == '}') break;
            const std::string key = string_literal();
            expect(':');
            skip_space();
            if (key == "descr") {
                fields.descr = string_literal();
                have_descr = true;
            } else if (key == "fortran_order") {
                fields.fortran_order = boolean();
                have_order = true;
            } else if (key == "shape") {
                fields.shape = tuple();
                have_shape = true;
            } else {
                fail("unexpected key '" + key + "' in the header");
            }
            skip_space();
            if (peek() == ',') {
                ++pos_;
                continue;
            }
            if (peek() != '}') fail("expected ',' or '}' in the header dict");
        }
        ++pos_;
        skip_space();
        if (pos_ != text_.size()) fail("unexpected text after the header dict");
        if (!have_descr) fail("the header has no 'descr'");
        if (!have_order) fail("the header has no 'fortran_order'");
        if (!have_shape) fail("the header has no 'shape'");
        return fields;
    }

private:
    [[noreturn]] void fail(const std::string& what) const {
        throw format_error(std::string(file_) + ": " + what + " (header: " + std::string(text_) + ")");
    }
    char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
    void skip_space() {
        while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
    }
    void expect(char c) {
        skip_space();
        if (peek() != c) fail(std::string("expected '") + c + "' in the header");
        ++pos_;
    }
    std::string string_literal() {
        skip_space();
        const char quote = peek();
        if (quote != '\'' && quote != '"') fail("expected a quoted string in the header");
        const std::size_t end = text_.find(quote, pos_ + 1);
        if (end == std::string_view::npos) fail("unterminated string in the header");
        std::string s(text_.substr(pos_ + 1, end - pos_ - 1));
        pos_ = end + 1;
        return s;
    }
    bool boolean() {
        if (text_.substr(pos_, 4) == "True") {
            pos_ += 4;
            return true;
        }
        if (text_.substr(pos_, 5) == "False") {
            pos_ += 5;
            return false;
        }
        fail("'fortran_order' must be True or False");
    }
    std::vector<std::int64_t> tuple() {
        std::vector<std::int64_t> dims;
        expect('(');
        while (true) {
            skip_space();
            if (peek() == ')') break;
            if (!std::isdigit(static_cast<unsigned char>(peek())))
                fail("'shape' must be a tuple of non-negative integers");
            std::int64_t n = 0;
            while (std::isdigit(static_cast<unsigned char>(peek()))) {
                const int digit = peek() - '0';
                if (n > (std::numeric_limits<std::int64_t>::max() - digit) / 10)
                    fail("a dimension of 'shape' overflows");
                n = n * 10 + digit;
                ++pos_;
            }
            if (peek() == 'L') ++pos_;  // Python 2 long literals
            dims.push_back(n);
            skip_space();
            if (peek() == ',') {
                ++pos_;
                continue;
            }
            if (peek() != ')') fail("expected ',' or ')' in 'shape'");
        }
        ++pos_;
        return dims;
    }

    std::string_view text_;
    std::string_view file_;
    std::size_t pos_ = 0;
};

inline constexpr char magic[] = "\x93NUMPY";
inline constexpr std::size_t magic_size = 6;

}  // namespace detail

/// The complete header (magic, version, length, dict, padding, '\n') for an array of this type and
/// shape. `version` 1 or 2; 0 picks 1 unless the dict needs more than 65535 bytes.
inline std::string header(DType type, std::span<const std::int64_t> shape, int version = 0) {
    std::string dict = "{'descr': '" + std::string(descr_of(type)) + "', 'fortran_order': False, 'shape': (";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        if (i) dict += ", ";
        dict += std::to_string(shape[i]);
    }
    dict += shape.size() == 1 ? ",), }" : "), }";
    // Spaces and '\n' pad magic, version, length field and dict to a multiple of 64 bytes.
    const auto padding = [&](int v) {
        const std::size_t unpadded = detail::magic_size + 2 + (v == 1 ? 2 : 4) + dict.size() + 1;
        return (64 - unpadded % 64) % 64;
    };
    if (version == 0) version = dict.size() + padding(1) + 1 <= 65535 ? 1 : 2;
    if (version != 1 && version != 2)
        throw invalid_argument("npy: version " + std::to_string(version) + " must be 1 or 2");
    dict.append(padding(version), ' ');
    dict += '\n';
    if (version == 1 && dict.size() > 65535) throw invalid_argument("npy: header too long for version 1");
    std::string out(detail::magic, detail::magic_size);
    out += static_cast<char>(version);
    out += '\0';
    const std::size_t n = dict.size();
    out += static_cast<char>(n & 0xffu);
    out += static_cast<char>((n >> 8) & 0xffu);
    if (version != 1) {
        out += static_cast<char>((n >> 16) & 0xffu);
        out += static_cast<char>((n >> 24) & 0xffu);
    }
    return out + dict;
}

/// The file's bytes for `array`.
inline std::vector<std::byte> serialize(const Array& array, int version = 0) {
    const std::int64_t n = array.size();
    if (array.bytes.size() != static_cast<std::size_t>(n) * item_size(array.dtype)) {
        throw invalid_argument("npy: array of shape " + shape_string(array.shape) + " has " +
                               std::to_string(array.bytes.size()) + " bytes of data");
    }
    const std::string head = header(array.dtype, array.shape, version);
    std::vector<std::byte> out(head.size() + array.bytes.size());
    std::memcpy(out.data(), head.data(), head.size());
    if (!array.bytes.empty()) std::memcpy(out.data() + head.size(), array.bytes.data(), array.bytes.size());
    return out;
}

/// Parses a whole .npy file held in memory; `name` is used in error messages.
inline Array parse(std::span<const std::byte> file, std::string_view name = "npy") {
    const std::string where(name);
    const auto* b = reinterpret_cast<const unsigned char*>(file.data());
    if (file.size() < detail::magic_size || std::memcmp(b, detail::magic, detail::magic_size) != 0) {
        throw format_error(where + ": not a NumPy .npy file (no \\x93NUMPY magic)");
    }
    if (file.size() < detail::magic_size + 4)
        throw format_error(where + ": truncated header (" + std::to_string(file.size()) + " bytes)");
    const int major = b[6];
    const int minor = b[7];
    if (major < 1 || major > 3 || minor != 0) {
        throw format_error(where + ": unsupported .npy format version " + std::to_string(major) + "." +
                           std::to_string(minor) + " (supported: 1.0, 2.0, 3.0)");
    }
    const std::size_t length_bytes = major == 1 ? 2 : 4;
    const std::size_t prefix = detail::magic_size + 2 + length_bytes;
    if (file.size() < prefix)
        throw format_error(where + ": truncated header (" + std::to_string(file.size()) + " bytes)");
    std::size_t header_length = std::size_t{b[8]} | std::size_t{b[9]} << 8;
    if (major != 1) header_length |= std::size_t{b[10]} << 16 | std::size_t{b[11]} << 24;
    if (file.size() - prefix < header_length) {
        throw format_error(where + ": truncated header: it declares " + std::to_string(header_length) +
                           " bytes, the file has " + std::to_string(file.size() - prefix) + " after the length field");
    }
    const std::string_view text(reinterpret_cast<const char*>(b + prefix), header_length);
    const auto fields = detail::HeaderParser(text, where).parse();

    Array array;
    if (fields.descr == "<f4") {
        array.dtype = DType::float32;
    } else if (fields.descr == "<f2") {
        array.dtype = DType::float16;
    } else if (fields.descr == "|u1" || fields.descr == "<u1" || fields.descr == "u1") {
        array.dtype = DType::uint8;
    } else if (!fields.descr.empty() && fields.descr[0] == '>') {
        throw format_error(where + ": big-endian data ('" + fields.descr +
                           "') is not supported; save it little-endian");
    } else {
        throw format_error(where + ": unsupported dtype '" + fields.descr +
                           "' (supported: '<f4' float32, '<f2' float16, '|u1' uint8)");
    }
    if (fields.fortran_order)
        throw format_error(where + ": Fortran-order arrays are not supported; save it in C order");
    array.shape = fields.shape;
    std::int64_t count = 0;
    try {
        count = element_count(array.shape, array.dtype);
    } catch (const format_error& e) {
        throw format_error(where + ": " + e.what());
    }
    const std::size_t data_bytes = static_cast<std::size_t>(count) * item_size(array.dtype);
    const std::size_t have = file.size() - prefix - header_length;
    if (have < data_bytes) {
        throw format_error(where + ": truncated data: shape " + shape_string(array.shape) + " of " +
                           std::string(name_of(array.dtype)) + " needs " + std::to_string(data_bytes) +
                           " bytes, the file has " + std::to_string(have));
    }
    if (have > data_bytes) {
        throw format_error(where + ": " + std::to_string(have - data_bytes) +
                           " unexpected bytes after the data of shape " + shape_string(array.shape));
    }
    array.bytes.assign(file.begin() + static_cast<std::ptrdiff_t>(prefix + header_length), file.end());
    return array;
}

/// Reads a .npy file.
inline Array read(const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw format_error(path.string() + ": cannot open");
    std::vector<std::byte> file;
    in.seekg(0, std::ios::end);
    const std::streamoff size = in.tellg();
    in.seekg(0, std::ios::beg);
    if (size < 0) throw format_error(path.string() + ": cannot read");
    file.resize(static_cast<std::size_t>(size));
    if (size > 0 && !in.read(reinterpret_cast<char*>(file.data()), size))
        throw format_error(path.string() + ": read failed");
    return parse(file, path.string());
}

/// Writes `array` as a .npy file (`version` as in `header`).
inline void write(const std::filesystem::path& path, const Array& array, int version = 0) {
    const std::vector<std::byte> file = serialize(array, version);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) throw format_error(path.string() + ": cannot create");
    out.write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
    if (!out) throw format_error(path.string() + ": write failed");
}

}  // namespace kvsparse::npy
