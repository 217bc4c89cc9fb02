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
  std::map<std::pair<std::string, std::string>, int64_t> runs;      // (op, route) -> calls
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
  static const std::string text = cpu_model() + " | " + cpu_isa_name() + " | torch " + std::string(TORCH_VERSION) +
                                  " | choices v" + std::to_string(kChoicesVersion);
  return text;
}

std::string cache_file_of_environment() {
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

// cache_file_of_environment, worked out again only when one of the variables
// it reads changes (tests change them within a process): it runs on every call
// of an op that times its routes.
std::string cache_file() {
  static std::mutex mutex;
  static std::string inputs, file;  // inputs: never empty once set (it holds two '\0')
  const auto value = [](const char* name) {
    const char* text = std::getenv(name);
    return text == nullptr ? std::string("\x01") : std::string(text);  // unset differs from empty
  };
  const std::string now =
      value("LIGHTNING_HW_CACHE_DIR") + '\0' + value("XDG_CACHE_HOME") + '\0' + value("HOME");
  std::lock_guard<std::mutex> lock(mutex);
  if (now != inputs) {
    file = cache_file_of_environment();
    inputs = now;
  }
  return file;
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

std::string join(const std::vector<std::string>& names, const char* separator = ", ") {
  std::string text;
  for (const std::string& name : names) text += (text.empty() ? "" : separator) + name;
  return text;
}

// Whether `route` is one of op's routes (op "": of any op's).
bool has_route(const std::string& op, const std::string& route) {
  for (const auto& [family, routes] : op_routes())
    if ((op.empty() || family == op) && std::find(routes.begin(), routes.end(), route) != routes.end()) return true;
  return false;
}

// The query's routes are its op's, each once: a route added to an op and
// forgotten in its query (or the reverse) fails every call, not just forcing.
// Runs on every call, so it counts instead of building and sorting lists.
void check_query(const RouteQuery& query) {
  const auto family = std::find_if(
      op_routes().begin(), op_routes().end(), [&](const auto& entry) { return entry.first == query.family; });
  TORCH_INTERNAL_ASSERT(family != op_routes().end(), "route query of an unknown op ", query.family);
  const auto& expected = family->second;
  bool routes_match = query.candidates.size() + query.excluded.size() == expected.size();
  for (const std::string& route : expected) {
    const auto listed = std::count(query.candidates.begin(), query.candidates.end(), route) +
                        std::count_if(query.excluded.begin(), query.excluded.end(),
                                      [&](const auto& entry) { return entry.first == route; });
    routes_match = routes_match && listed == 1;
  }
  TORCH_INTERNAL_ASSERT(routes_match, "the routes of ", query.op, " are not those of ", query.family);
  TORCH_INTERNAL_ASSERT(is_candidate(query, query.fallback), "route fallback must be a candidate");
}

// The routes LIGHTNING_HW_ROUTE lists for the query's op, in order (empty: not
// forced). Names are separated by commas, blanks around them ignored.
std::vector<std::string> forced_routes(const RouteQuery& query, const std::string& value) {
  std::vector<std::string> listed;
  if (value.find_first_not_of(" \t,") == std::string::npos) return listed;
  std::istringstream names(value);
  std::string name;
  while (std::getline(names, name, ',')) {
    const size_t first = name.find_first_not_of(" \t");
    if (first == std::string::npos) continue;
    name = name.substr(first, name.find_last_not_of(" \t") - first + 1);
    if (!has_route("", name)) {
      std::string known;
      for (const auto& [op, routes] : op_routes()) known += (known.empty() ? "" : "; ") + op + ": " + join(routes);
      TORCH_CHECK(false, "LIGHTNING_HW_ROUTE=", value, ": '", name, "' is not a CPU route (", known, ")");
    }
    if (has_route(query.family, name)) listed.push_back(name);
  }
  return listed;
}

// The first listed route that can run the query's shape, else the error that
// says why none can.
std::string first_runnable(const RouteQuery& query, const std::vector<std::string>& listed, const std::string& value) {
  for (const std::string& route : listed)
    if (is_candidate(query, route)) return route;
  const auto why_not = [&](const std::string& route) {
    return std::find_if(query.excluded.begin(), query.excluded.end(), [&](const auto& entry) {
             return entry.first == route;
           })->second;
  };
  std::ostringstream why;
  why << "LIGHTNING_HW_ROUTE=" << value << ": ";
  if (listed.size() == 1) {
    why << "route '" << listed[0] << "' cannot run " << query.op << " of shape " << query.shape << ": "
        << why_not(listed[0]) << " (the routes that can: " << join(query.candidates) << ")";
  } else {
    why << "none of the " << query.family << " routes it names can run " << query.op << " of shape " << query.shape
        << " (the routes that can: " << join(query.candidates) << ")";
    for (const std::string& route : listed) why << "; route '" << route << "': " << why_not(route);
  }
  TORCH_CHECK(false, why.str());
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

// A route of ours replaces torch's own kernel (aten, blas) only where its
// timing is at least kTorchMargin faster: the timing runs one part alone, and
// kernels of ours ahead by up to 8% there ran slower than torch's inside a
// training step, where they lost 10-25% against their time alone
// (benchmarks/NOTES.md, round 8), so near-ties go to torch.
constexpr double kTorchMargin = 0.10;

bool is_torch_route(const std::string& route) {
  return route == "aten" || route == "blas";
}

// The index of the route to keep among timed candidates.
size_t chosen_candidate(const std::vector<std::string>& candidates, const std::vector<double>& seconds) {
  const size_t fastest = std::min_element(seconds.begin(), seconds.end()) - seconds.begin();
  size_t chosen = fastest;
  if (!is_torch_route(candidates[fastest]))
    for (size_t i = 0; i < seconds.size(); ++i)
      if (is_torch_route(candidates[i]) && seconds[i] <= seconds[fastest] * (1 + kTorchMargin) &&
          (chosen == fastest || seconds[i] < seconds[chosen]))
        chosen = i;
  return chosen;
}

// The route to run, without counting it.
std::string pick_route(const RouteQuery& query, const std::function<void(const std::string&)>& run) {
  const std::string forced = env("LIGHTNING_HW_ROUTE");
  const std::vector<std::string> listed = forced_routes(query, forced);
  if (!listed.empty()) return first_runnable(query, listed, forced);
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
  const std::string chosen = query.candidates[chosen_candidate(query.candidates, seconds)];
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

}  // namespace

const std::vector<std::pair<std::string, std::vector<std::string>>>& op_routes() {
  static const std::vector<std::pair<std::string, std::vector<std::string>>> routes{
      {"conv2d", {"direct", "planar", "depthwise", "amx", "aten"}},
      {"linear_relu", {"streamed", "tiles", "amx", "bf16dot", "blas"}},
  };
  return routes;
}

std::string choose_route(const RouteQuery& query, const std::function<void(const std::string&)>& run) {
  check_query(query);
  cpu_isa_name();  // throws for a LIGHTNING_HW_CPU_ISA this process cannot run
  const std::string route = pick_route(query, run);
  std::lock_guard<std::mutex> lock(choices().mutex);
  ++choices().runs[{query.op, route}];
  return route;
}

bool routes_forced(const RouteQuery& query) {
  return !forced_routes(query, env("LIGHTNING_HW_ROUTE")).empty();
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

std::vector<std::string> routes_run() {
  std::lock_guard<std::mutex> lock(choices().mutex);
  std::vector<std::string> lines;
  for (const auto& [key, calls] : choices().runs)
    lines.push_back(key.first + "\t" + key.second + "\t" + std::to_string(calls));
  return lines;
}

std::vector<std::string> describe_routes(const RouteQuery& query) {
  check_query(query);
  std::vector<std::string> lines;
  for (const std::string& route : query.candidates) lines.push_back(query.op + "\t" + route + "\t");
  for (const auto& [route, why] : query.excluded) lines.push_back(query.op + "\t" + route + "\t" + why);
  return lines;
}

}  // namespace cpu
}  // namespace lightning_hw
