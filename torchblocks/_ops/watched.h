// What torchblocks/_ops/_dispatch.py's nothing_watching() asks, but in C++,
// where it costs nanoseconds: whether something must see the ops of a call.
// The optimizers' steps leave a watched step to the reference, whose ops that
// something then sees. The fused head's kernel holds no gradients computed in
// the forward for a watched call: it runs the op below autograd, where that
// something sees it. A compiling trace is asked in Python before the call
// (torchblocks/_ops/_eager_cpu.py): torch.compile never runs C++ it cannot trace.
// The nodes' backward asks it too: watched (a vmap over the gradients, as in
// jacobian(vectorize=True)), it runs in out-of-place ATen ops only.

#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/profiler/orchestration/observer.h>

namespace torchblocks {

// A dispatch mode (FakeTensorMode, an op counter), the torch profiler,
// torch.jit.trace (which records ATen ops: none of a call made below autograd
// here), or a torch.func transform:
// torch._C's _len_torch_dispatch_stack, _autograd._profiler_enabled,
// _get_tracing_state and _are_functorch_transforms_active.
inline bool watched() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return c10::impl::TorchDispatchModeTLS::stack_len() > 0 || torch::profiler::impl::profilerEnabled() ||
         torch::jit::tracer::isTracing() ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode);
}

}  // namespace torchblocks
