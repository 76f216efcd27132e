// The process-wide switches of the CUDA ops, in one place: each is read once from its environment
// variable at first use and can be changed through one op, polykern::_config(name, value), which
// tests and benchmarks use to run both sides of a decision in one process.
#include "common.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace polykern {
namespace {

struct OptionInfo {
  const char* name;     // the name _config takes
  const char* env;      // read once at first use
  int fallback;         // when the variable is unset or not a number
  int max;              // values 0..max
  const char* meaning;  // for the error message
};

constexpr OptionInfo kOptions[] = {
    {"merge", "POLYKERN_MERGE", 0, 2, "0 auto, 1 always merge, 2 never merge"},
    {"side_stream", "POLYKERN_OVERLAP", 1, 2, "0 off, 1 auto, 2 always"},
    {"fused_gy", "POLYKERN_FUSED_GY", 1, 1, "0 off, 1 on"},
    {"poison", "POLYKERN_POISON", 0, 1, "0 off, 1 fill kernel outputs with NaN first"},
};
static_assert(sizeof(kOptions) / sizeof(kOptions[0]) == static_cast<size_t>(Opt::kCount),
              "one OptionInfo per Opt");

std::atomic<int> g_values[static_cast<int>(Opt::kCount)] = {-1, -1, -1, -1};

int from_env(const OptionInfo& o) {
  const char* v = std::getenv(o.env);
  if (v == nullptr || *v == '\0') return o.fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  return (*end == '\0' && x >= 0 && x <= o.max) ? static_cast<int>(x) : o.fallback;
}

int64_t config_op(c10::string_view name, int64_t value) {
  for (int i = 0; i < static_cast<int>(Opt::kCount); ++i) {
    const OptionInfo& o = kOptions[i];
    if (name != o.name) continue;
    const int old = option(static_cast<Opt>(i));
    if (value >= 0) {
      TORCH_CHECK(value <= o.max, "polykern: option '", o.name, "' takes ", o.meaning, ", got ",
                  num(value));
      g_values[i].store(static_cast<int>(value));
    }
    return old;
  }
  std::string names;
  for (const OptionInfo& o : kOptions) names += std::string(names.empty() ? "" : ", ") + o.name;
  TORCH_CHECK(false, "polykern: unknown option '", std::string(name), "': expected one of ", names);
}

}  // namespace

int option(Opt which) {
  const int i = static_cast<int>(which);
  int v = g_values[i].load(std::memory_order_relaxed);
  if (v < 0) {
    v = from_env(kOptions[i]);
    g_values[i].store(v);
  }
  return v;
}

TORCH_LIBRARY_FRAGMENT(polykern, m) {
  // name: one of kOptions above; value >= 0 sets it, -1 only reads. Returns the old value.
  m.def("_config(str name, int value=-1) -> int", &config_op);
}

}  // namespace polykern
