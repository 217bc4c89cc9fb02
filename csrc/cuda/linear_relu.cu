// Fused Linear+ReLU on CUDA. The GEMMs are cuBLASLt's; the forward applies
// bias and ReLU in the GEMM epilogue (RELU_BIAS, or RELU without a bias).
//
// Backward: one pass over (grad_output, output) writes the masked gradient
// grad_pre = grad_output * (output > 0) and, in the same pass, per-split column
// sums of it, added in a fixed order by a second small pass: the bias gradient,
// deterministic. Then the two GEMMs grad_input = grad_pre @ weight and
// grad_weight = grad_pre^T @ input. cuBLASLt's DRELU_BGRAD epilogue does not
// fit this op: it applies the ReLU derivative to a GEMM's *result* and needs the
// forward's ReLU bit-mask, whereas here the mask applies to grad_output, the
// GEMMs' operand, and only the forward output is saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "linear_relu_geometry.h"

namespace lightning_hw {
namespace cuda {
namespace {

// ---- cuBLASLt GEMM with an optional bias + ReLU epilogue ----

template <typename Handle, cublasStatus_t (*destroy)(Handle)>
struct LtDestroy {
  void operator()(Handle handle) const { destroy(handle); }
};
using MatmulDesc = std::unique_ptr<
    std::remove_pointer_t<cublasLtMatmulDesc_t>, LtDestroy<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>>;
using MatrixLayout = std::unique_ptr<
    std::remove_pointer_t<cublasLtMatrixLayout_t>, LtDestroy<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>>;
using MatmulPreference = std::unique_ptr<
    std::remove_pointer_t<cublasLtMatmulPreference_t>,
    LtDestroy<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>>;

// A 2-D operand as cuBLAS sees it: row-major (rows contiguous) or column-major,
// with its leading dimension; other strides are copied to row-major first.
struct Operand {
  at::Tensor tensor;
  bool row_major;
  int64_t ld;
};

Operand describe(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = m.size(1);
  if ((cols == 1 || m.stride(1) == 1) && (rows == 1 || m.stride(0) >= std::max<int64_t>(cols, 1)))
    return {m, true, rows == 1 ? std::max<int64_t>(cols, 1) : m.stride(0)};
  if ((rows == 1 || m.stride(0) == 1) && (cols == 1 || m.stride(1) >= std::max<int64_t>(rows, 1)))
    return {m, false, cols == 1 ? std::max<int64_t>(rows, 1) : m.stride(1)};
  return {m.contiguous(), true, std::max<int64_t>(cols, 1)};
}

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kDouble: return CUDA_R_64F;
    default: TORCH_CHECK(false, "linear_relu: no cuBLASLt type for ", t);
  }
}

// Largest power of two (up to 256) dividing the address: what cuBLASLt's
// heuristic must assume of the operand.
uint32_t alignment(const void* pointer) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  uint32_t align = 256;
  while (align > 1 && address % align != 0) align /= 2;
  return align;
}

template <typename T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const T& value) {
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

template <typename T>
void set_preference(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attribute, const T& value) {
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &value, sizeof(value)));
}

// out (rows x cols, contiguous) = a (rows x inner) @ b (inner x cols), with
// epilogue relu(. + bias) (bias of length cols, or none) when `relu`. Returns
// false, computing nothing, when cuBLASLt has no algorithm for that epilogue.
bool lt_matmul(const at::Tensor& a_in, const at::Tensor& b_in, at::Tensor& out, const at::Tensor* bias, bool relu) {
  const Operand a = describe(a_in), b = describe(b_in);
  const int64_t rows = a_in.size(0), inner = a_in.size(1), cols = b_in.size(1);
  const at::ScalarType dtype = out.scalar_type();
  const cudaDataType_t data_type = cuda_type(dtype);
  const bool is_double = dtype == at::kDouble;
  const cublasComputeType_t compute =
      is_double                                 ? CUBLAS_COMPUTE_64F
      : dtype == at::kFloat && at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                                     : CUBLAS_COMPUTE_32F;
  const cudaDataType_t scale_type = is_double ? CUDA_R_64F : CUDA_R_32F;

  // Column-major view: out^T (cols x rows) = b^T (cols x inner) @ a^T (inner x rows).
  cublasLtMatmulDesc_t raw_desc;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulDescCreate(&raw_desc, compute, scale_type));
  const MatmulDesc desc(raw_desc);
  const cublasOperation_t op_b = b.row_major ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasOperation_t op_a = a.row_major ? CUBLAS_OP_N : CUBLAS_OP_T;
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_TRANSA, op_b);
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_TRANSB, op_a);
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  if (relu) epilogue = bias != nullptr ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (relu && bias != nullptr) {
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias->const_data_ptr());
    set_attribute(raw_desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, data_type);
  }

  auto layout = [&](int64_t r, int64_t c, int64_t ld) {
    cublasLtMatrixLayout_t raw;
    TORCH_CUDABLAS_CHECK(cublasLtMatrixLayoutCreate(&raw, data_type, r, c, ld));
    return MatrixLayout(raw);
  };
  const MatrixLayout layout_b = b.row_major ? layout(cols, inner, b.ld) : layout(inner, cols, b.ld);
  const MatrixLayout layout_a = a.row_major ? layout(inner, rows, a.ld) : layout(rows, inner, a.ld);
  const MatrixLayout layout_out = layout(cols, rows, cols);

  const size_t workspace_size = at::cuda::getChosenWorkspaceSize();
  cublasLtMatmulPreference_t raw_pref;
  TORCH_CUDABLAS_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  const MatmulPreference pref(raw_pref);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, workspace_size);
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(b.tensor.const_data_ptr()));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(a.tensor.const_data_ptr()));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(out.const_data_ptr()));
  set_preference(raw_pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(out.const_data_ptr()));

  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle, raw_desc, layout_b.get(), layout_a.get(), layout_out.get(), layout_out.get(), raw_pref, 1,
      &heuristic, &found);
  if (status != CUBLAS_STATUS_SUCCESS || found == 0) {
    TORCH_CHECK(
        epilogue != CUBLASLT_EPILOGUE_DEFAULT, "linear_relu: cuBLASLt has no algorithm for a ", dtype,
        " GEMM of (", rows, " x ", inner, ") @ (", inner, " x ", cols, ")");
    return false;
  }
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(workspace_size)}, out.options().dtype(at::kByte));
  const double one_d = 1.0, zero_d = 0.0;
  const float one_f = 1.f, zero_f = 0.f;
  const void* one = is_double ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f);
  const void* zero = is_double ? static_cast<const void*>(&zero_d) : static_cast<const void*>(&zero_f);
  TORCH_CUDABLAS_CHECK(cublasLtMatmul(
      handle, raw_desc, one, b.tensor.const_data_ptr(), layout_b.get(), a.tensor.const_data_ptr(),
      layout_a.get(), zero, out.mutable_data_ptr(), layout_out.get(), out.mutable_data_ptr(),
      layout_out.get(), &heuristic.algo, workspace.mutable_data_ptr(), workspace_size,
      at::cuda::getCurrentCUDAStream()));
  return true;
}

// ---- element-wise passes ----

// out = relu(out + bias) in place: the epilogue when cuBLASLt has none for the
// dtype, and the whole op when in_features is 0.
template <typename scalar_t>
__global__ void bias_relu_kernel(scalar_t* out, const scalar_t* bias, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    acc_t v = static_cast<acc_t>(out[i]);
    if (bias != nullptr) v += static_cast<acc_t>(bias[i % cols]);
    out[i] = static_cast<scalar_t>(v > acc_t(0) ? v : acc_t(0));
  }
}

constexpr int kMaskColumns = 32;  // a warp spans 32 consecutive columns of one row
constexpr int kMaskRowLanes = 8;  // warps per block, each on its own rows
constexpr int kMaskMinRowsPerSplit = 64;

// grad_pre = output <= 0 ? 0 : grad_output (NaN passes, as in torch); with partial != nullptr also the
// column sums of grad_pre over this block's rows, one split per blockIdx.y
// (reduced in a fixed order inside the block).
template <typename scalar_t>
__global__ void __launch_bounds__(kMaskColumns * kMaskRowLanes) relu_mask_kernel(
    const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ output,
    scalar_t* __restrict__ grad_pre, at::opmath_type<scalar_t>* __restrict__ partial, int64_t rows,
    int64_t cols, int64_t column_blocks, int64_t splits) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kMaskRowLanes][kMaskColumns];
  const int tx = threadIdx.x % kMaskColumns, ty = threadIdx.x / kMaskColumns;
  for (int64_t block = blockIdx.x; block < column_blocks * splits; block += gridDim.x) {
    const int64_t column = (block % column_blocks) * kMaskColumns + tx;
    const int64_t split = block / column_blocks;
    acc_t sum = 0;
    if (column < cols) {
      for (int64_t r = rows * split / splits + ty; r < rows * (split + 1) / splits; r += kMaskRowLanes) {
        const int64_t i = r * cols + column;
        const scalar_t g = output[i] <= scalar_t(0) ? scalar_t(0) : grad_output[i];
        grad_pre[i] = g;
        sum += static_cast<acc_t>(g);
      }
    }
    if (partial == nullptr) continue;
    __syncthreads();  // the previous block's sums are read
    sums[ty][tx] = sum;
    __syncthreads();
    if (ty == 0 && column < cols) {
      for (int lane = 1; lane < kMaskRowLanes; ++lane) sum += sums[lane][tx];
      partial[split * cols + column] = sum;
    }
  }
}

// ---- ops ----

at::Tensor linear_relu_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_linear_relu_operands(input, weight, bias, kCudaDtypes, "CUDA");
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  const at::Tensor input_2d = as_rows(input, in_features);
  const int64_t rows = input_2d.size(0);
  at::Tensor out = at::empty({rows, out_features}, input.options());
  if (out.numel() > 0) {
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    const bool fused = in_features > 0 &&
                       lt_matmul(input_2d, weight.t(), out, bias.has_value() ? &bias_c : nullptr, true);
    if (!fused) {
      if (in_features > 0)
        lt_matmul(input_2d, weight.t(), out, nullptr, false);
      else
        out.zero_();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_relu_cuda", [&] {
        constexpr int kThreads = 256;
        bias_relu_kernel<scalar_t><<<grid_blocks(ceil_div(out.numel(), kThreads)), kThreads, 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
            out.mutable_data_ptr<scalar_t>(),
            bias.has_value() ? bias_c.const_data_ptr<scalar_t>() : nullptr, rows, out_features);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  return out.view(linear_relu_output_sizes(input, out_features));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_relu_backward_cuda(
    const at::Tensor& grad_output,
    const at::Tensor& output,
    const at::Tensor& input,
    const at::Tensor& weight,
    std::array<bool, 3> output_mask) {
  check_linear_relu_backward_operands(grad_output, output, input, weight, kCudaDtypes, "CUDA");
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor grad_2d = as_rows(grad_output, out_features).contiguous();
  const at::Tensor out_2d = as_rows(output, out_features).contiguous();
  const int64_t rows = grad_2d.size(0);
  const auto options = grad_2d.options();
  at::Tensor grad_pre = at::empty_like(grad_2d);
  at::Tensor grad_bias = output_mask[2] ? at::empty({out_features}, options) : at::empty({0}, options);
  if (output_mask[2] && (rows == 0 || out_features == 0)) grad_bias.zero_();
  if (rows > 0 && out_features > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_relu_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int64_t column_blocks = ceil_div(out_features, kMaskColumns);
      constexpr int64_t kTargetBlocks = 1024;
      const int64_t splits =
          std::clamp<int64_t>(ceil_div(kTargetBlocks, column_blocks), 1, ceil_div(rows, kMaskMinRowsPerSplit));
      at::Tensor partial;
      if (output_mask[2])
        partial = at::empty({splits * out_features}, options.dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc_t* partial_data = output_mask[2] ? partial.mutable_data_ptr<acc_t>() : nullptr;
      relu_mask_kernel<scalar_t><<<grid_blocks(column_blocks * splits), kMaskColumns * kMaskRowLanes, 0, stream>>>(
          grad_2d.const_data_ptr<scalar_t>(), out_2d.const_data_ptr<scalar_t>(),
          grad_pre.mutable_data_ptr<scalar_t>(), partial_data, rows, out_features, column_blocks, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (output_mask[2])
        sum_splits(partial_data, out_features, static_cast<int>(splits), out_features,
                   grad_bias.mutable_data_ptr<scalar_t>(), stream);
    });
  }

  at::Tensor grad_input = at::empty({0}, options);
  if (output_mask[0]) {
    grad_input = at::empty({rows, in_features}, options);
    if (grad_input.numel() > 0) {
      if (out_features > 0)
        lt_matmul(grad_pre, weight, grad_input, nullptr, false);
      else
        grad_input.zero_();
    }
    grad_input = grad_input.view(input.sizes());
  }
  at::Tensor grad_weight = at::empty({0}, options);
  if (output_mask[1]) {
    grad_weight = at::empty({out_features, in_features}, options);
    if (grad_weight.numel() > 0) {
      if (rows > 0)
        lt_matmul(grad_pre.t(), as_rows(input, in_features), grad_weight, nullptr, false);
      else
        grad_weight.zero_();
    }
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace lightning_hw

TORCH_LIBRARY_IMPL(lightning_hw, CUDA, m) {
  m.impl("linear_relu", &lightning_hw::cuda::linear_relu_cuda);
  m.impl("linear_relu_backward", &lightning_hw::cuda::linear_relu_backward_cuda);
}
