#include "cpu/route_choice.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <sstream>
#include <sys/stat.h>
#include <utility>

#include "cpu/amx.h"
#include "cpu/tile_kernels.h"

namespace lightning_hw {
namespace cpu {
namespace {

// Each candidate runs once untimed (first-touch page faults, workspace growth),
// then the candidates take turns, at least kMinTimedRuns each and until
// kMinTimedSeconds have passed, so a burst of other work slows them alike; each
// one's best time counts (the least disturbed).
constexpr int kMinTimedRuns = 3;
constexpr double kMinTimedSeconds = 0.05;
constexpr int kMaxTimedRuns = 30;

using ChoiceKey = std::pair<std::string, std::string>;  // (op, shape)

struct Choices {
  std::mutex mutex;
  std::map<std::string, std::map<ChoiceKey, std::string>> by_file;  // "" = memory only
};

Choices& choices() {
  static Choices instance;
  return instance;
}

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr ? std::string() : std::string(value);
}

bool env_is_set(const char* name) {
  return std::getenv(name) != nullptr;
}

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown CPU";
}

// Bumped when the routes or the conditions of their timing change, so that
// files of earlier choices are left alone (2: conv2d's routes; timings with
// lightning_hw.allocation's malloc settings).
constexpr int kChoicesVersion = 2;

// What makes timings comparable: the CPU, our kernel variant, torch (its BLAS).
const std::string& fingerprint() {
  static const std::string tiles = amx::tile_source() == amx::TileSource::kHardware   ? "+amx"
                                  : amx::tile_source() == amx::TileSource::kEmulated ? "+amx-emulated"
                                                                                     : "";
  static const std::string text = cpu_model() + " | " + cpu_isa_name() + tiles + " | torch " + std::string(TORCH_VERSION) +
                                  " | choices v" + std::to_string(kChoicesVersion);
  return text;
}

std::string cache_file() {
  std::string dir;
  if (env_is_set("LIGHTNING_HW_CACHE_DIR")) {
    dir = env("LIGHTNING_HW_CACHE_DIR");
    if (dir.empty()) return "";
  } else if (!env("XDG_CACHE_HOME").empty()) {
    dir = env("XDG_CACHE_HOME") + "/lightning_hw";
  } else if (!env("HOME").empty()) {
    dir = env("HOME") + "/.cache/lightning_hw";
  } else {
    return "";
  }
  std::ostringstream name;
  name << dir << "/routes-" << std::hex << std::hash<std::string>{}(fingerprint()) << ".tsv";
  return name.str();
}

// Lines "op<TAB>shape<TAB>route<TAB>comment"; later lines win. A line that does
// not parse is ignored: the file is a cache, never a reason to fail.
std::map<ChoiceKey, std::string> read_choices(const std::string& file) {
  std::map<ChoiceKey, std::string> read;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::string op, shape, route;
    if (std::getline(fields, op, '\t') && std::getline(fields, shape, '\t') && std::getline(fields, route, '\t'))
      read[{op, shape}] = route;
  }
  return read;
}

void make_dirs(const std::string& path) {
  for (size_t slash = path.find('/', 1); slash != std::string::npos; slash = path.find('/', slash + 1))
    ::mkdir(path.substr(0, slash).c_str(), 0755);
}

// One line appended in one write (processes of a DDP run may append at once).
void append_choice(const std::string& file, const RouteQuery& query, const std::string& route, const std::string& note) {
  if (file.empty()) return;
  make_dirs(file);
  std::FILE* out = std::fopen(file.c_str(), "a");
  if (out == nullptr) return;  // a read-only home: the choice stays in memory
  std::string line;
  if (std::ftell(out) == 0) line = "# lightning_hw route choices for " + fingerprint() + "\n";
  line += query.op + "\t" + query.shape + "\t" + route + "\t" + note + "\n";
  std::fwrite(line.data(), 1, line.size(), out);
  std::fclose(out);
}

bool is_candidate(const RouteQuery& query, const std::string& route) {
  return std::find(query.candidates.begin(), query.candidates.end(), route) != query.candidates.end();
}

std::vector<double> best_seconds(
    const std::vector<std::string>& routes, const std::function<void(const std::string&)>& run) {
  using clock = std::chrono::steady_clock;
  for (const std::string& route : routes) run(route);
  std::vector<double> best(routes.size(), std::numeric_limits<double>::infinity());
  double total = 0.0;
  for (int round = 0; round < kMaxTimedRuns && (round < kMinTimedRuns || total < kMinTimedSeconds); ++round) {
    for (size_t i = 0; i < routes.size(); ++i) {
      const auto start = clock::now();
      run(routes[i]);
      const double seconds = std::chrono::duration<double>(clock::now() - start).count();
      best[i] = std::min(best[i], seconds);
      total += seconds;
    }
  }
  return best;
}

}  // namespace

std::string choose_route(const RouteQuery& query, const std::function<void(const std::string&)>& run) {
  TORCH_INTERNAL_ASSERT(is_candidate(query, query.fallback), "route fallback must be a candidate");
  const std::string forced = env("LIGHTNING_HW_ROUTE");
  if (!forced.empty()) return is_candidate(query, forced) ? forced : query.fallback;
  if (query.candidates.size() == 1 || query.flops < kMinTimedFlops || env("LIGHTNING_HW_AUTOTUNE") == "0" ||
      at::globalContext().deterministicAlgorithms())
    return query.fallback;

  const std::string file = cache_file();
  const ChoiceKey key{query.op, query.shape};
  {
    std::lock_guard<std::mutex> lock(choices().mutex);
    auto& known = choices().by_file;
    auto found_file = known.find(file);
    if (found_file == known.end()) found_file = known.emplace(file, read_choices(file)).first;  // "": nothing to read
    const auto found = found_file->second.find(key);
    if (found != found_file->second.end() && is_candidate(query, found->second)) return found->second;
  }
  const std::vector<double> seconds = best_seconds(query.candidates, run);
  const size_t fastest = std::min_element(seconds.begin(), seconds.end()) - seconds.begin();
  const std::string chosen = query.candidates[fastest];
  std::ostringstream note;
  note.precision(4);
  for (size_t i = 0; i < seconds.size(); ++i)
    note << (i > 0 ? " " : "") << query.candidates[i] << "=" << seconds[i] * 1e3 << "ms";
  {
    std::lock_guard<std::mutex> lock(choices().mutex);
    choices().by_file[file][key] = chosen;
  }
  append_choice(file, query, chosen, note.str());
  return chosen;
}

std::vector<std::string> route_choices() {
  std::lock_guard<std::mutex> lock(choices().mutex);
  std::vector<std::string> lines;
  for (const auto& file : choices().by_file)
    for (const auto& choice : file.second)
      lines.push_back(choice.first.first + "\t" + choice.first.second + "\t" + choice.second);
  return lines;
}

void clear_route_choices() {
  std::lock_guard<std::mutex> lock(choices().mutex);
  choices().by_file.clear();
}

}  // namespace cpu
}  // namespace lightning_hw
