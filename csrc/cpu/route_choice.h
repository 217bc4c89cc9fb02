// Which CPU route runs a GEMM-shaped op, chosen by timing the candidates on
// this machine, once per shape, the way cuDNN's benchmark mode does: fixed
// thresholds tuned on one machine are wrong on another (another cache size,
// another BLAS, another torch).
//
// A choice is kept in memory and in a file, one line per shape, named after
// the CPU model, the instruction set variant and the torch version, so a new
// process on the same machine does not time again. Environment:
//   LIGHTNING_HW_AUTOTUNE=0       no timing: the built-in rule (`fallback`)
//   LIGHTNING_HW_ROUTE=NAME       run this route wherever it can run (tests)
//   LIGHTNING_HW_CACHE_DIR=DIR    the folder of the file (default
//                                 $XDG_CACHE_HOME/lightning_hw or ~/.cache/lightning_hw;
//                                 an empty value keeps choices in memory only)
// Under torch.use_deterministic_algorithms(True) the built-in rule decides, so
// that results are the same on every machine; it also decides problems too small
// to time reliably (under kMinTimedFlops). Deleting the file times again.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace lightning_hw {
namespace cpu {

struct RouteQuery {
  std::string op;                 // e.g. "linear_relu_forward"
  std::string shape;              // e.g. "float 1000x3072x900"
  std::vector<std::string> candidates;  // the routes that can run this shape
  std::string fallback;           // the built-in rule's route (one of candidates)
  double flops = 0;               // the work of one call, to skip timing tiny problems
};

constexpr double kMinTimedFlops = 4e6;

// The route to run. The first time a shape is seen (and timing is on), every
// candidate runs through `run` a few times and the fastest is kept; `run`
// must compute the op's whole result by the named route, so the caller runs
// the chosen route afterwards as on any call.
std::string choose_route(const RouteQuery& query, const std::function<void(const std::string&)>& run);

// The choices this process knows (made or read from the file), as
// "op<TAB>shape<TAB>route" lines.
std::vector<std::string> route_choices();

// Forget the choices made in this process (not the file): for tests.
void clear_route_choices();

}  // namespace cpu
}  // namespace lightning_hw
