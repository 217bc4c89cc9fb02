// Which CPU route runs a GEMM-shaped op, chosen by timing the candidates on
// this machine, once per shape, the way cuDNN's benchmark mode does: fixed
// thresholds tuned on one machine are wrong on another (another cache size,
// another BLAS, another torch). Torch's own kernel (aten, blas) is kept unless
// one of ours is at least 10% faster.
//
// A choice is kept in memory and in a file, one line per shape, named after
// the CPU model, the instruction set variant and the torch version, so a new
// process on the same machine does not time again. Environment:
//   LIGHTNING_HW_AUTOTUNE=0       no timing: the built-in rule (`fallback`)
//   LIGHTNING_HW_ROUTE=NAME[,NAME...]
//                                 force routes, read on every call. Route names
//                                 belong to their op (op_routes(); "amx" to both): each part of
//                                 an op runs the first route listed for that op that
//                                 can run its shape, and listing routes of an op none
//                                 of which can run the shape is an error that names
//                                 each one and why. An op none of whose routes is
//                                 listed is not forced (timing or the rule decide);
//                                 a name of no op is an error. So "tiles" forces
//                                 linear_relu and leaves conv2d alone, and
//                                 "direct,depthwise" runs our direct kernels on every
//                                 convolution but the depthwise ones.
//   LIGHTNING_HW_CACHE_DIR=DIR    the folder of the file (default
//                                 $XDG_CACHE_HOME/lightning_hw or ~/.cache/lightning_hw;
//                                 an empty value keeps choices in memory only)
// Under torch.use_deterministic_algorithms(True) the built-in rule decides, so
// that results are the same on every machine; it also decides problems too small
// to time reliably (under kMinTimedFlops). Deleting the file times again.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace lightning_hw {
namespace cpu {

struct RouteQuery {
  std::string op;                 // the op's part, e.g. "linear_relu_forward"
  std::string family;             // the op whose routes these are: "conv2d" or "linear_relu"
  std::string shape;              // e.g. "float 1000x3072x900"
  std::vector<std::string> candidates;  // the routes that can run this shape
  // The op's other routes, each with why it cannot run this shape (the error
  // of forcing it). Candidates and excluded routes are op_routes() of the family.
  std::vector<std::pair<std::string, std::string>> excluded;
  std::string fallback;           // the built-in rule's route (one of candidates)
  double flops = 0;               // the work of one call, to skip timing tiny problems

  // A candidate where why_not is empty, else an excluded route with that reason.
  void offer(const std::string& route, std::string why_not) {
    if (why_not.empty()) {
      candidates.push_back(route);
    } else {
      excluded.emplace_back(route, std::move(why_not));
    }
  }
};

constexpr double kMinTimedFlops = 4e6;

// Every CPU route of each op, by the names LIGHTNING_HW_ROUTE takes: conv2d's
// direct, planar, depthwise (ours) and aten (torch's convolution); linear_relu's
// streamed, tiles, bf16dot (ours; bf16dot bfloat16 on AVX512-BF16 dot
// products: bf16_dot.h) and blas (torch's GEMM); both ops' amx (ours, bfloat16
// on AMX tiles: amx.h). A new route is added here and to its op's query.
const std::vector<std::pair<std::string, std::vector<std::string>>>& op_routes();

// The route to run. The first time a shape is seen (and timing is on), every
// candidate runs through `run` a few times and the fastest is kept (torch's
// where ours leads it by less than 10%); `run`
// must compute the op's whole result by the named route, so the caller runs
// the chosen route afterwards as on any call. An unknown or unrunnable
// LIGHTNING_HW_CPU_ISA (tile_kernels.h) is an error here, whichever route runs.
std::string choose_route(const RouteQuery& query, const std::function<void(const std::string&)>& run);

// Whether LIGHTNING_HW_ROUTE forces the routes of the query's op.
bool routes_forced(const RouteQuery& query);

// The choices this process knows (made or read from the file), as
// "op<TAB>shape<TAB>route" lines.
std::vector<std::string> route_choices();

// Forget the choices made in this process (not the file): for tests.
void clear_route_choices();

// How often choose_route returned each route in this process, as
// "op<TAB>route<TAB>calls" lines: which route ran (the tests check it).
std::vector<std::string> routes_run();

// Every route of a query as "op<TAB>route<TAB>why not" lines, "why not" empty
// where the route can run the shape.
std::vector<std::string> describe_routes(const RouteQuery& query);

// describe_routes for each part of the ops on a shape (the forward, and the
// gradients as a training step asks for them), defined with the ops; the
// tensors' sizes and dtype are read, never their data (meta tensors do).
std::vector<std::string> conv2d_routes(
    const at::Tensor& input,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool pad_same);
std::vector<std::string> linear_relu_routes(const at::Tensor& input, const at::Tensor& weight);

}  // namespace cpu
}  // namespace lightning_hw
