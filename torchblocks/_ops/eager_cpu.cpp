// The reference backend's eager CPU path, compiled: the plain-PyTorch bodies
// of relu.py, dense.py and cross_entropy.py's common case, op for op, as C++
// autograd Functions. A Python autograd Function costs about 20 us a call in
// autograd's Python handling alone, more than a small block's arithmetic;
// these cost what a native op does. torchblocks/_ops/_eager_cpu.py builds
// this file once per environment and decides when it runs.

#include <torch/extension.h>

#include <optional>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace torchblocks {

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

RowStats forward_rows(const Tensor& logits, const Tensor& target, bool with_gradient) {
  Tensor x = logits.to(accumulation_dtype(logits.scalar_type()));
  Tensor index = target.to(at::kLong).unsqueeze(1);
  Tensor row_max = x.amax({1}, true);
  Tensor target_logit = x.gather(1, index).squeeze(1);
  Tensor exp_shifted = (x - row_max).mul_(kLog2E).exp2_();  // exp as the kernels compute it
  Tensor sum_exp = exp_shifted.sum({1}, true);
  Tensor lse = (row_max + sum_exp.log()).squeeze(1);
  Tensor gradient;
  if (with_gradient) {
    gradient = exp_shifted.div_(sum_exp).scatter_(1, index, -1.0, "add");
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
    Tensor row_scale = grad[0].to(acc);
    if (reduction == kMean) {
      row_scale = row_scale / logits.size(0);
    }
    if (reduction == kNone) {
      row_scale = row_scale.unsqueeze(1);
    }
    Tensor grad_logits;
    if (at::GradMode::is_enabled()) {  // create_graph: p - onehot(y) again, in differentiable ops
      Tensor x = logits.to(acc);
      Tensor exp_shifted = (x - x.amax({1}, true).detach()).mul(kLog2E).exp2();
      Tensor onehot = at::zeros_like(x).scatter_(1, target.to(at::kLong).unsqueeze(1), 1.0);
      grad_logits = (exp_shifted / exp_shifted.sum({1}, true) - onehot) * row_scale;
    } else {
      // The forward's buffer, let go after its first use; a retained graph's
      // next backward recomputes it with the same code, so to the same bits.
      Tensor gradient = ctx->saved_data.count("gradient") ? ctx->saved_data["gradient"].toTensor()
                                                          : forward_rows(logits, target, true).gradient;
      ctx->saved_data.erase("gradient");
      grad_logits = gradient.mul_(row_scale);
    }
    return {grad_logits.to(logits.scalar_type()), Tensor(), Tensor(), Tensor()};
  }
};

// True for the case CrossEntropy computes: every target a class, none
// ignored (on the CPU reading the targets' range is no host sync).
bool plain_rows(const Tensor& target, int64_t classes, int64_t ignore_index) {
  if (target.numel() == 0) {
    return false;
  }
  auto [low_tensor, high_tensor] = at::aminmax(target);
  int64_t low = low_tensor.item<int64_t>(), high = high_tensor.item<int64_t>();
  if (low < 0 || high >= classes) {
    return false;
  }
  return !(low <= ignore_index && ignore_index <= high && target.eq(ignore_index).any().item<bool>());
}

}  // namespace torchblocks

using namespace torchblocks;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchblocks' reference blocks for plain eager CPU calls, as C++ autograd Functions";
  m.def("relu", [](const Tensor& input, bool inplace) { return ReLU::apply(input, inplace); },
        "relu(input, inplace): max(input, 0), with its backward");
  m.def("dense",
        [](const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, bool relu) {
          return Dense::apply(input, weight, bias, relu);
        },
        "dense(input (M, K), weight (N, K), bias (N,) or None, relu): act(input @ weight^T + bias)");
  m.def("cross_entropy",
        [](const Tensor& logits, const Tensor& target, int64_t ignore_index,
           int64_t reduction) -> std::optional<Tensor> {
          if (!plain_rows(target, logits.size(1), ignore_index)) {
            return std::nullopt;
          }
          bool with_gradient = at::GradMode::is_enabled() && logits.requires_grad();
          return CrossEntropy::apply(logits, target, reduction, with_gradient);
        },
        "cross_entropy(logits (R, C), target (R,), ignore_index, reduction 0 none / 1 mean / 2 sum): "
        "the loss, or None where a target is out of range or ignored (the Python path then handles it)");
}
