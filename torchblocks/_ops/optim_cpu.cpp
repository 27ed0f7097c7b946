// The optimizers' CPU steps in one pass over memory: each element's
// parameter, gradient and state are read once and written once, where the
// reference's torch._foreach_* ops (torchblocks/optim/<optimizer>.py) pass
// over them once per op. The updates are the formulas of the optimizers'
// docstrings, as the Triton kernels compute them (kernels/optim.py), in the
// parameters' dtype. Built with eager_cpu.cpp (see optim_cpu.h).

#include "optim_cpu.h"
#include "watched.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <cmath>
#include <initializer_list>
#include <numeric>
#include <type_traits>

namespace torchblocks {
namespace {

// Elements per at::parallel_for task: a smaller tensor is updated on one thread.
constexpr int64_t kGrain = 1 << 15;

// Whether one flat index serves every role of an entry: the parameter's
// dtype (float32 or float64), size and strides, over gap-free memory, and
// no lazy negation (torch._neg_view), which no pointer carries.
bool one_flat_layout(std::initializer_list<const at::Tensor*> roles) {
  const at::Tensor& param = **roles.begin();
  if (param.scalar_type() != at::kFloat && param.scalar_type() != at::kDouble) {
    return false;
  }
  for (const at::Tensor* role : roles) {
    if (!role->is_cpu() || role->scalar_type() != param.scalar_type() || role->sizes() != param.sizes() ||
        role->strides() != param.strides() || !role->is_non_overlapping_and_dense() || role->is_neg()) {
      return false;
    }
  }
  return true;
}

// 0, 1, ..., count - 1: every entry left to the reference, as under watched().
std::vector<int64_t> every_index(size_t count) {
  std::vector<int64_t> indices(count);
  std::iota(indices.begin(), indices.end(), int64_t{0});
  return indices;
}

// f(std::true_type{}) or f(std::false_type{}): a runtime switch made a
// compile-time one, so that each combination compiles to its own loop with
// no branch in it, which the compiler vectorises.
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define TORCHBLOCKS_AVX2 __attribute__((target("avx2")))

// Whether torch's own CPU kernels run in AVX2 or AVX-512 here (ATEN_CPU_CAPABILITY=default turns both off).
bool runs_avx2() {
  static const bool avx2 = at::get_cpu_capability() != "DEFAULT";
  return avx2;
}
#else
#define TORCHBLOCKS_AVX2
bool runs_avx2() {
  return false;
}
#endif

// update(i) for i in [begin, end), vectorised for the build's baseline
// instruction set (x86-64's SSE2: 4 floats a vector).
template <typename Update>
void update_range(int64_t begin, int64_t end, const Update& update) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    update(i);
  }
}

// The same loop in AVX2: 8 floats a vector, and no FMA, so the same numbers.
// Timed by hand on the bench's 1M float32 parameters in 20 tensors (three
// processes each way; ATEN_CPU_CAPABILITY=default for SSE2), a step took
// 0.16-0.66 ms against 0.24-0.90 in SSE2 (RMSprop 0.29 against 0.48-0.62); at
// 10M, bound by memory, 0.74-1.19x SSE2's time. In the book network's training
// step, where the GEMMs have just read the weights on both threads and each
// store waits for the other core's copy to go, in the VM's slow mode
// (benchmarks/README) RMSprop's step took 790 us, native's 848 (SSE2's 1,110
// against native's 895 at 872a944): likely as half as many stores a cache
// line let twice as many lines wait at once.
template <typename Update>
TORCHBLOCKS_AVX2 void update_range_avx2(int64_t begin, int64_t end, const Update& update) {
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    update(i);
  }
}

// update(i) for every element i of a tensor of numel elements, split over the threads.
template <typename Update>
void for_each_element(int64_t numel, const Update& update) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    if (runs_avx2()) {
      update_range_avx2(begin, end, update);
    } else {
      update_range(begin, end, update);
    }
  });
}

// torch.maximum: NaN if either is NaN (| rather than ||: a branch in the loop
// would stop its vectorisation).
template <typename T>
T maximum(T a, T b) {
  return ((a > b) | (a != a)) ? a : b;
}

}  // namespace

std::string step_instruction_set() {
  return runs_avx2() ? "avx2" : "baseline";
}

std::vector<int64_t> sgd_step(const TensorList& params, const TensorList& grads,
                              const std::optional<TensorList>& momentum_buffers, const std::vector<bool>& new_buffer,
                              double lr, double weight_decay, double momentum, double dampening, bool nesterov,
                              bool maximize) {
  if (watched()) {
    return every_index(params.size());
  }
  std::vector<int64_t> left;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& param = params[t];
    const at::Tensor* buffer = momentum_buffers ? &(*momentum_buffers)[t] : &param;  // absent: never read
    if (!one_flat_layout({&param, &grads[t], buffer})) {
      left.push_back(static_cast<int64_t>(t));
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_step", [&] {
      using T = scalar_t;
      T* p = param.data_ptr<T>();
      const T* g = grads[t].data_ptr<T>();
      T* b = buffer->data_ptr<T>();
      const T sign = maximize ? T(-1) : T(1), decay = T(weight_decay), rate = T(lr), mu = T(momentum),
              keep = T(1 - dampening);
      with_flag(weight_decay != 0, [&](auto decays) {
        with_flag(momentum != 0, [&](auto has_momentum) {
          with_flag(has_momentum && new_buffer[t], [&](auto starts) {
            with_flag(nesterov, [&](auto is_nesterov) {
              for_each_element(param.numel(), [&](int64_t i) {
                T grad = sign * g[i];
                if constexpr (decays) grad += decay * p[i];
                if constexpr (has_momentum) {
                  T momentum_buffer = starts ? grad : mu * b[i] + keep * grad;
                  b[i] = momentum_buffer;
                  grad = is_nesterov ? grad + mu * momentum_buffer : momentum_buffer;
                }
                p[i] = p[i] - rate * grad;
              });
            });
          });
        });
      });
    });
  }
  return left;
}

std::vector<int64_t> rmsprop_step(const TensorList& params, const TensorList& grads, const TensorList& square_avgs,
                                  const std::optional<TensorList>& grad_avgs,
                                  const std::optional<TensorList>& momentum_buffers, double lr, double alpha,
                                  double eps, double weight_decay, double momentum, bool centered, bool maximize) {
  if (watched()) {
    return every_index(params.size());
  }
  std::vector<int64_t> left;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& param = params[t];
    const at::Tensor* grad_avg = grad_avgs ? &(*grad_avgs)[t] : &param;  // absent states: never read
    const at::Tensor* buffer = momentum_buffers ? &(*momentum_buffers)[t] : &param;
    if (!one_flat_layout({&param, &grads[t], &square_avgs[t], grad_avg, buffer})) {
      left.push_back(static_cast<int64_t>(t));
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "rmsprop_step", [&] {
      using T = scalar_t;
      T* p = param.data_ptr<T>();
      const T* g = grads[t].data_ptr<T>();
      T* v = square_avgs[t].data_ptr<T>();
      T* a = grad_avg->data_ptr<T>();
      T* b = buffer->data_ptr<T>();
      const T sign = maximize ? T(-1) : T(1), decay = T(weight_decay), rate = T(lr), smoothing = T(alpha),
              fresh = T(1 - alpha), epsilon = T(eps), mu = T(momentum);
      with_flag(weight_decay != 0, [&](auto decays) {
        with_flag(centered, [&](auto is_centered) {
          with_flag(momentum > 0, [&](auto has_momentum) {
            for_each_element(param.numel(), [&](int64_t i) {
              T grad = sign * g[i];
              if constexpr (decays) grad += decay * p[i];
              const T square_avg = smoothing * v[i] + fresh * grad * grad;
              v[i] = square_avg;
              T denom;
              if constexpr (is_centered) {
                const T grad_avg = a[i] + fresh * (grad - a[i]);
                a[i] = grad_avg;
                denom = std::sqrt(square_avg - grad_avg * grad_avg) + epsilon;
              } else {
                denom = std::sqrt(square_avg) + epsilon;
              }
              if constexpr (has_momentum) {
                const T momentum_buffer = mu * b[i] + grad / denom;
                b[i] = momentum_buffer;
                p[i] = p[i] - rate * momentum_buffer;
              } else {
                p[i] = p[i] - rate * (grad / denom);
              }
            });
          });
        });
      });
    });
  }
  return left;
}

std::vector<int64_t> adam_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                               const TensorList& exp_avg_sqs, const std::optional<TensorList>& max_exp_avg_sqs,
                               const std::vector<double>& steps, double lr, double beta1, double beta2, double eps,
                               double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                               bool capturable) {
  TORCH_CHECK(!capturable, "adam_step: capturable=True keeps the step counts on the device, and this step "
              "reads them as host floats; expected capturable=False");
  if (watched()) {
    return every_index(params.size());
  }
  std::vector<int64_t> left;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& param = params[t];
    const at::Tensor* max_exp_avg_sq = max_exp_avg_sqs ? &(*max_exp_avg_sqs)[t] : &param;  // absent: never read
    if (!one_flat_layout({&param, &grads[t], &exp_avgs[t], &exp_avg_sqs[t], max_exp_avg_sq})) {
      left.push_back(static_cast<int64_t>(t));
      continue;
    }
    // the bias corrections in double, as the reference computes them: -lr / (1 - beta1^t), sqrt(1 - beta2^t)
    const double step_size = -lr / (1 - std::pow(beta1, steps[t]));
    const double bias_correction2_sqrt = std::pow(1 - std::pow(beta2, steps[t]), 0.5);
    AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "adam_step", [&] {
      using T = scalar_t;
      T* p = param.data_ptr<T>();
      const T* g = grads[t].data_ptr<T>();
      T* m = exp_avgs[t].data_ptr<T>();
      T* v = exp_avg_sqs[t].data_ptr<T>();
      T* v_max = max_exp_avg_sq->data_ptr<T>();
      const T sign = maximize ? T(-1) : T(1), decay = T(weight_decay), decay_factor = T(1 - lr * weight_decay),
              fresh1 = T(1 - beta1), smoothing2 = T(beta2), fresh2 = T(1 - beta2), epsilon = T(eps),
              scaled_rate = T(step_size), correction2 = T(bias_correction2_sqrt);
      with_flag(weight_decay != 0 && !decoupled_weight_decay, [&](auto decays_grad) {
        with_flag(weight_decay != 0 && decoupled_weight_decay, [&](auto decays_param) {
          with_flag(amsgrad, [&](auto keeps_max) {
            for_each_element(param.numel(), [&](int64_t i) {
              T grad = sign * g[i];
              T param_i = p[i];
              if constexpr (decays_param) param_i *= decay_factor;
              if constexpr (decays_grad) grad += decay * param_i;
              const T exp_avg = m[i] + fresh1 * (grad - m[i]);
              m[i] = exp_avg;
              T exp_avg_sq = smoothing2 * v[i] + fresh2 * grad * grad;
              v[i] = exp_avg_sq;
              if constexpr (keeps_max) {
                exp_avg_sq = maximum(v_max[i], exp_avg_sq);
                v_max[i] = exp_avg_sq;
              }
              const T denom = std::sqrt(exp_avg_sq) / correction2 + epsilon;
              p[i] = param_i + scaled_rate * (exp_avg / denom);
            });
          });
        });
      });
    });
  }
  return left;
}

}  // namespace torchblocks
