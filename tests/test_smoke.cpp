#include "catch.hpp"
#include <kvsparse/kvsparse.hpp>
TEST_CASE("smoke") { REQUIRE(kvsparse::is_power_of_two(16)); }
