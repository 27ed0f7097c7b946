// The optimizers' compiled CPU steps (optim_cpu.cpp), bound in eager_cpu.cpp.
// Each takes the lists of its reference in torchblocks/optim/<optimizer>.py,
// updates in place, in one pass over memory, every entry whose tensors are
// float32 or float64 and share one dense layout, and returns the indices of
// the entries it left to the reference: all of them when something watches
// (watched.h).

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace torchblocks {

using TensorList = std::vector<at::Tensor>;

// What the steps' loops run in: "avx2" on x86-64 where torch's own CPU
// kernels run AVX2 or AVX-512, else "baseline", the build's target.
std::string step_instruction_set();

std::vector<int64_t> sgd_step(const TensorList& params, const TensorList& grads,
                              const std::optional<TensorList>& momentum_buffers, const std::vector<bool>& new_buffer,
                              double lr, double weight_decay, double momentum, double dampening, bool nesterov,
                              bool maximize);

std::vector<int64_t> rmsprop_step(const TensorList& params, const TensorList& grads, const TensorList& square_avgs,
                                  const std::optional<TensorList>& grad_avgs,
                                  const std::optional<TensorList>& momentum_buffers, double lr, double alpha,
                                  double eps, double weight_decay, double momentum, bool centered, bool maximize);

std::vector<int64_t> adam_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                               const TensorList& exp_avg_sqs, const std::optional<TensorList>& max_exp_avg_sqs,
                               const std::vector<double>& steps, double lr, double beta1, double beta2, double eps,
                               double weight_decay, bool decoupled_weight_decay, bool amsgrad, bool maximize,
                               bool capturable);

}  // namespace torchblocks
