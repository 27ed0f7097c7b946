// The reference backend's eager CPU path, compiled: the plain-PyTorch bodies
// of relu.py, dense.py and cross_entropy.py's common case, the same arithmetic,
// as C++ autograd Functions. A Python autograd Function costs about 20 us a call in
// autograd's Python handling alone, more than a small block's arithmetic;
// these cost what a native op does. torchblocks/_ops/_eager_cpu.py builds
// this file once per environment and decides when it runs.

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>  // torch/extension.h without the C++ frontend: 19 s to build, not 26

#include <ATen/OpMathType.h>
#include <ATen/autocast_mode.h>

#include <cmath>
#include <limits>
#include <optional>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace torchblocks {

// cross_entropy.py's LOG2E and kernels/_common.py's accumulation_dtype, in C++.
constexpr double kLog2E = 1.4426950408889634;

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// ReLU: y = max(x, 0)
//   dL/dx = dL/dy * 1[y > 0]      (y saved, not x)
struct ReLU : Function<ReLU> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, bool inplace) {
    Tensor output = inplace ? input.clamp_min_(0) : input.clamp_min(0);
    if (inplace) {
      ctx->mark_dirty({input});
    }
    ctx->save_for_backward({output});
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    return {at::threshold_backward(grad[0], ctx->get_saved_variables()[0], 0), Tensor()};
  }
};

// Dense: y = act(x @ W^T + b), x (M, K), W (N, K), b (N,)
//   g = dL/dy * 1[y > 0] under relu, else dL/dy
//   dL/dx = g @ W,    dL/dW = g^T @ x,    dL/db = sum over rows of g
struct Dense : Function<Dense> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight,
                        const std::optional<Tensor>& bias, bool relu) {
    Tensor output = bias ? at::addmm(*bias, input, weight.t()) : at::mm(input, weight.t());
    if (relu) {
      output.clamp_min_(0);
    }
    ctx->save_for_backward({weight.requires_grad() ? input : Tensor(),
                            input.requires_grad() ? weight : Tensor(), relu ? output : Tensor()});
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["bias"] = bias.has_value();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[1], &output = saved[2];
    Tensor g = ctx->saved_data["relu"].toBool() ? at::threshold_backward(grad[0], output, 0) : grad[0];
    Tensor grad_input, grad_weight, grad_bias;
    if (ctx->needs_input_grad(0)) {
      grad_input = g.mm(weight);
    }
    if (ctx->needs_input_grad(1)) {
      grad_weight = g.t().mm(input);
    }
    if (ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)) {
      grad_bias = g.sum(0);
    }
    return {grad_input, grad_weight, grad_bias, Tensor()};
  }
};

// Softmax cross-entropy of rows x (R, C) against class indices y, the common
// case only: no class weights, no smoothing, no row ignored.
//   lse_i = m_i + log sum_c exp(x_ic - m_i),    loss_i = lse_i - x_iy
//   dL/dx_ic = s_i * (p_ic - 1[c = y_i]),      p = exp(x - m) / sum_c exp(x - m)
// s_i = dL/dloss_i, with the reduction ("mean": sum_i loss_i / R) inside the
// Function. The forward's exp(x - m) is the backward's p once divided by its
// row sum, so the forward makes p - onehot(y) and the backward scales it.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

struct RowStats {
  Tensor loss;      // (R,)
  Tensor gradient;  // (R, C): p - onehot(y), or undefined
};

// Up to this many logits, one scalar pass per row instead of the ops below: at
// the book's 128 x 10, each op's fixed cost (about 2 us) outweighs its arithmetic.
constexpr int64_t kSmallLogits = 1 << 12;

// loss_i and, where ``gradient`` is defined, p - onehot(y), row by row; the
// logits' rows contiguous (stride 1 along C).
template <typename scalar_t, typename index_t>
void small_rows(const Tensor& logits, const Tensor& target, Tensor& loss, Tensor& gradient) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t classes = logits.size(1), row_stride = logits.stride(0), target_stride = target.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const index_t* y = target.const_data_ptr<index_t>();
  acc_t* loss_out = loss.mutable_data_ptr<acc_t>();
  acc_t* p = gradient.defined() ? gradient.mutable_data_ptr<acc_t>() : nullptr;
  for (int64_t i = 0; i < logits.size(0); ++i) {
    const scalar_t* row = x + i * row_stride;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t value = row[c];
      m = (value > m || value != value) ? value : m;  // a NaN wins, as amax
    }
    acc_t sum_exp = 0;
    for (int64_t c = 0; c < classes; ++c) {
      const acc_t exp_shifted = std::exp2((static_cast<acc_t>(row[c]) - m) * acc_t(kLog2E));
      sum_exp += exp_shifted;
      if (p) {
        p[i * classes + c] = exp_shifted;
      }
    }
    const int64_t label = static_cast<int64_t>(y[i * target_stride]);
    loss_out[i] = (m + std::log(sum_exp)) - static_cast<acc_t>(row[label]);
    if (p) {
      for (int64_t c = 0; c < classes; ++c) {
        p[i * classes + c] /= sum_exp;
      }
      p[i * classes + label] += acc_t(-1);
    }
  }
}

// Up to kSmallLogits, small_rows; above, the ops of cross_entropy.py's
// _plain_forward_and_gradient, one for one: its numbers to the bit.
RowStats forward_rows(const Tensor& logits, const Tensor& target, bool with_gradient) {
  const auto acc = accumulation_dtype(logits.scalar_type());
  if (logits.numel() <= kSmallLogits) {
    const Tensor rows_contiguous = logits.stride(1) == 1 ? logits : logits.contiguous();
    RowStats rows{at::empty({logits.size(0)}, logits.options().dtype(acc)),
                  with_gradient ? at::empty(logits.sizes(), logits.options().dtype(acc)) : Tensor()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_small_rows", [&] {
      if (target.scalar_type() == at::kLong) {
        small_rows<scalar_t, int64_t>(rows_contiguous, target, rows.loss, rows.gradient);
      } else {
        small_rows<scalar_t, uint8_t>(rows_contiguous, target, rows.loss, rows.gradient);
      }
    });
    return rows;
  }
  const Tensor x = logits.to(acc);
  const Tensor index = target.to(at::kLong).unsqueeze(1);
  const Tensor row_max = x.amax({1}, true);
  const Tensor target_logit = x.gather(1, index).squeeze(1);
  Tensor exp_shifted = (x - row_max).mul_(kLog2E).exp2_();  // exp as the kernels compute it
  const Tensor sum_exp = exp_shifted.sum({1}, true);
  const Tensor lse = (row_max + sum_exp.log()).squeeze(1);
  Tensor gradient;
  if (with_gradient) {
    gradient = exp_shifted.div_(sum_exp).scatter_add_(1, index, at::full({logits.size(0), 1}, -1.0, x.options()));
  }
  return {lse - target_logit, gradient};
}

struct CrossEntropy : Function<CrossEntropy> {
  static Tensor forward(AutogradContext* ctx, const Tensor& logits, const Tensor& target, int64_t reduction,
                        bool with_gradient) {
    RowStats rows = forward_rows(logits, target, with_gradient);
    Tensor loss = rows.loss;
    if (reduction != kNone) {
      loss = loss.sum();
      if (reduction == kMean) {
        loss.div_(logits.size(0));
      }
    }
    ctx->save_for_backward({logits, target});
    ctx->saved_data["reduction"] = reduction;
    if (with_gradient) {  // held, not saved: the first backward scales it in place
      ctx->saved_data["gradient"] = rows.gradient;
    }
    return loss.to(logits.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    variable_list saved = ctx->get_saved_variables();
    const Tensor &logits = saved[0], &target = saved[1];
    int64_t reduction = ctx->saved_data["reduction"].toInt();
    at::ScalarType acc = accumulation_dtype(logits.scalar_type());
    const Tensor row_scale = grad[0].to(acc);  // (R,) for "none", else ()
    Tensor grad_logits;
    if (at::GradMode::is_enabled()) {  // create_graph: p - onehot(y) again, in differentiable ops
      const Tensor factor = reduction == kMean ? row_scale / logits.size(0)
                            : reduction == kNone ? row_scale.unsqueeze(1) : row_scale;
      Tensor x = logits.to(acc);
      Tensor exp_shifted = (x - x.amax({1}, true).detach()).mul(kLog2E).exp2();
      Tensor onehot = at::zeros_like(x).scatter_(1, target.to(at::kLong).unsqueeze(1), 1.0);
      grad_logits = (exp_shifted / exp_shifted.sum({1}, true) - onehot) * factor;
    } else {
      // The forward's buffer, let go after its first use; a retained graph's
      // next backward recomputes it with the same code, so to the same bits.
      Tensor gradient = ctx->saved_data.count("gradient") ? ctx->saved_data["gradient"].toTensor()
                                                          : forward_rows(logits, target, true).gradient;
      ctx->saved_data.erase("gradient");
      if (reduction == kNone) {
        grad_logits = gradient.mul_(row_scale.unsqueeze(1));
      } else {  // one factor for every row, read on the host: dL/dloss (/ R for the mean)
        grad_logits = AT_DISPATCH_FLOATING_TYPES(acc, "cross_entropy_scale", [&] {
          const scalar_t scale = row_scale.item<scalar_t>();
          return gradient.mul_(reduction == kMean ? scale / static_cast<scalar_t>(logits.size(0)) : scale);
        });
      }
    }
    return {grad_logits.to(logits.scalar_type()), Tensor(), Tensor(), Tensor()};
  }
};

bool floating(const Tensor& tensor) {
  const auto dtype = tensor.scalar_type();
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Each entry point below takes a call only where its Function computes it,
// and returns nullopt for any other: the Python path then checks that call
// and computes it or raises, with its messages. The checks here are what
// makes a call plain, not a second copy of the argument checks.

template <typename index_t>
bool targets_plain(const Tensor& target, int64_t classes, int64_t ignore_index) {
  const index_t* y = target.const_data_ptr<index_t>();
  for (int64_t i = 0, stride = target.stride(0); i < target.size(0); ++i) {
    const int64_t label = static_cast<int64_t>(y[i * stride]);
    if (label < 0 || label >= classes || label == ignore_index) {
      return false;
    }
  }
  return true;
}

// Logits (R, C) and class indices (R,) on the CPU, R and C > 0, every target
// a class and none ignored, autocast off.
std::optional<Tensor> cross_entropy(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                    const std::string& reduction_name) {
  const int64_t reduction = reduction_name == "mean" ? kMean
                            : reduction_name == "sum" ? kSum
                            : reduction_name == "none" ? kNone : -1;
  const bool indices = target.scalar_type() == at::kLong || target.scalar_type() == at::kByte;
  if (reduction < 0 || !floating(logits) || !indices || logits.dim() != 2 || target.dim() != 1 || !logits.is_cpu() ||
      !target.is_cpu() || target.size(0) != logits.size(0) || logits.numel() == 0 ||
      at::autocast::is_autocast_enabled(at::kCPU)) {
    return std::nullopt;
  }
  const bool plain = target.scalar_type() == at::kLong ? targets_plain<int64_t>(target, logits.size(1), ignore_index)
                                                       : targets_plain<uint8_t>(target, logits.size(1), ignore_index);
  if (!plain) {
    return std::nullopt;
  }
  const bool with_gradient = at::GradMode::is_enabled() && logits.requires_grad();
  return CrossEntropy::apply(logits, target, reduction, with_gradient);
}

// A real dtype on the CPU; in place, no two elements sharing memory.
std::optional<Tensor> relu(const Tensor& input, bool inplace) {
  if (!input.is_cpu() || input.is_complex() || input.scalar_type() == at::kBool) {
    return std::nullopt;
  }
  for (int64_t d = 0; inplace && d < input.dim(); ++d) {
    if (input.size(d) > 1 && input.stride(d) == 0) {
      return std::nullopt;
    }
  }
  return ReLU::apply(input, inplace);
}

// input (*, K) and weight (N, K), bias (N,) or none, of one floating dtype on
// the CPU; activation none or "relu"; autocast off. (*) folds into the rows
// of one matmul and unfolds after.
std::optional<Tensor> dense(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                            const std::optional<std::string>& activation) {
  const bool relu = activation == "relu";
  if ((activation && !relu) || !floating(input) || !input.is_cpu() || input.dim() == 0 || weight.dim() != 2 ||
      weight.scalar_type() != input.scalar_type() || !weight.is_cpu() || input.size(-1) != weight.size(1) ||
      at::autocast::is_autocast_enabled(at::kCPU)) {
    return std::nullopt;
  }
  if (bias && (bias->scalar_type() != input.scalar_type() || !bias->is_cpu() || bias->dim() != 1 ||
               bias->size(0) != weight.size(0))) {
    return std::nullopt;
  }
  if (input.dim() == 2) {
    return Dense::apply(input, weight, bias, relu);
  }
  std::vector<int64_t> output_shape(input.sizes().begin(), input.sizes().end() - 1);
  const int64_t rows = c10::multiply_integers(output_shape);
  output_shape.push_back(weight.size(0));
  return Dense::apply(input.reshape({rows, weight.size(1)}), weight, bias, relu).reshape(output_shape);
}

}  // namespace torchblocks

using namespace torchblocks;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchblocks' reference blocks for plain eager CPU calls, as C++ autograd Functions";
  m.def("relu", &relu, "relu(input, inplace): max(input, 0) of a plain call, else None");
  m.def("dense", &dense,
        "dense(input (*, K), weight (N, K), bias (N,) or None, activation None or 'relu'): "
        "act(input @ weight^T + bias) of a plain call, else None");
  m.def("cross_entropy", &cross_entropy,
        "cross_entropy(logits (R, C), target (R,), ignore_index, reduction): the loss of a plain call, else None");
}
