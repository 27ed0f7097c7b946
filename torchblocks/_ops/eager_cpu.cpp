// The reference backend's eager CPU path, compiled: the plain-PyTorch bodies
// of relu.py, dense.py, and the common cases of cross_entropy.py and
// dense_cross_entropy.py, the same arithmetic, with the same hand-derived
// backward passes as C++ autograd nodes. A Python autograd Function costs
// about 20 us a call in autograd's Python handling alone, more than a small
// block's arithmetic, and a C++ custom Function still 4-6 us more than a
// native op; a node attached as torch's generated code attaches its own
// costs what a native op does.
// Each block's are kernels of its dispatcher ops (registered by
// register_kernels), which take the common case and hand the rest to the
// ops' Python kernels.
// torchblocks/_ops/_eager_cpu.py builds this file once per environment and
// decides when it runs.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/SavedTensorHooks.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/csrc/dynamo/compiled_autograd.h>
#include <torch/library.h>
#include <torch/csrc/utils/pybind.h>  // torch/extension.h without the C++ frontend: 19 s to build, not 26

#include <ATen/OpMathType.h>
#include <ATen/autocast_mode.h>

#include "optim_cpu.h"
#include "watched.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <utility>

using at::Tensor;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

namespace torchblocks {

// Nodes are held in c10::intrusive_ptr since pytorch#181782 (torch 2.13 has
// it, 2.11 does not), in std::shared_ptr before; the branch not taken is
// never instantiated.
using NodePtr = std::decay_t<decltype(std::declval<const Tensor&>().grad_fn())>;
constexpr bool kSharedNodes = std::is_same_v<NodePtr, std::shared_ptr<Node>>;

template <typename BackwardNode>
auto make_node() {
  if constexpr (kSharedNodes) {  // deleteNode frees a long chain without deep recursion
    return std::shared_ptr<BackwardNode>(new BackwardNode(), [](BackwardNode* node) { deleteNode(node); });
  } else {
    return c10::make_intrusive<BackwardNode>();
  }
}

template <typename BackwardNode>
auto self_pointer(BackwardNode* node) {  // what SavedVariable::unpack takes
  if constexpr (kSharedNodes) {
    return node->shared_from_this();
  } else {
    return node->getptr();
  }
}

// Attach ``node`` as the grad_fn of ``output``, with one edge per input (an
// undefined input gets none), as torch's generated code does for its ops.
template <typename NodeHandle, typename... Inputs>
void attach(const Tensor& output, const NodeHandle& node, const Inputs&... inputs) {
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  torch::autograd::set_history(output, node);
}

// Whether a saved_tensors_hooks context (save_on_cpu, non-reentrant
// checkpointing) packs what is saved now: then no gradient is computed in the
// forward and held beside the saved tensors, where the hooks cannot see it;
// the backward computes it from the saved inputs.
bool saved_tensors_hooked() {
  return at::SavedTensorDefaultHooks::get_hooks().has_value();
}

// A backward whose incoming gradient is batched (torch.func's vmap, or the
// legacy one of jacobian(vectorize=True) and gradcheck's batched check) or
// watched: its held buffers, one per call, cannot take a batched factor in place.
bool batched_or_watched(const Tensor& grad) {
  return grad.key_set().has(c10::DispatchKey::Batched) || watched();
}

// Whether an input carries a tangent (forward mode): then the op's Python autograd records a call the C++ leaves.
template <typename... Inputs>
bool forward_grad_defined(const Inputs&... inputs) {
  return (torch::autograd::isFwGradDefined(inputs) || ...);
}

// cross_entropy.py's LOG2E and kernels/_common.py's accumulation_dtype, in C++.
constexpr double kLog2E = 1.4426950408889634;

at::ScalarType accumulation_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

bool floating(const Tensor& tensor) {
  const auto dtype = tensor.scalar_type();
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// Whether a loop may read ``tensor`` through its pointer: a CPU tensor with
// storage of its own, not a functorch wrapper or batch, a subclass, or a lazy
// negation or conjugation.
bool readable(const Tensor& tensor) {
  return tensor.is_cpu() && !tensor.is_neg() && !tensor.is_conj() &&
         !tensor.key_set().has_any(c10::functorch_transforms_ks) && !tensor.key_set().has(c10::DispatchKey::Python);
}

// ReLU, as the kernels of the ops torchblocks::relu, relu_ and relu_backward
// (their schemas, fakes, vmap rules and CUDA kernels: relu.py):
//   y = max(x, 0);   dx = relu_backward(dy, y) = dy * 1[y > 0]   (y saved, not x)
//   relu_backward is linear in dy and flat in y:  d(dx) = relu_backward(d(dy), y)
//   forward mode:  y_t = relu_backward(x_t, y)
// CPU holds the arithmetic, AutogradCPU the nodes (what torch's generated
// VariableType code does for a native op); both are registered by
// register_kernels (below) while this module serves the CPU reference backend.

using UnaryOp = Tensor(const Tensor&);
using InPlaceOp = void(const Tensor&);
using BinaryOp = Tensor(const Tensor&, const Tensor&);

// An op's handle, found on first use (each accessor keeps it in a static):
// the schema is defined in Python before this module loads.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
const auto& relu_op() { static const auto handle = find_op<UnaryOp>("torchblocks::relu"); return handle; }
const auto& relu__op() { static const auto handle = find_op<InPlaceOp>("torchblocks::relu_"); return handle; }
const auto& relu_backward_op() {
  static const auto handle = find_op<BinaryOp>("torchblocks::relu_backward");
  return handle;
}

Tensor relu_cpu(const Tensor& input) { return input.clamp_min(0); }
void relu__cpu(const Tensor& input) { input.clamp_min_(0); }
Tensor relu_backward_cpu(const Tensor& grad_output, const Tensor& output) {
  return at::threshold_backward(grad_output, output, 0);  // one pass: output <= 0 ? 0 : grad_output
}

// Compiled autograd: a node lists what it holds (compiled_args) and, while a
// backward graph is captured, puts one call of a functional form of its
// backward into it (apply_with_saved), bound once per process, as torch's
// generated nodes do. The functionals call the ops, so the captured graph
// holds torchblocks' ops (relu_backward, matmul, ...), traced through their fakes.
using Functional = variable_list (*)(const variable_list&, const torch::autograd::ivalue_list&);

struct Binding {
  const char* key;
  Functional functional;
  std::vector<at::TypePtr> arg_types;
  std::once_flag once;
  std::string name;
};

// ``held`` are swapped for the graph's proxies around the call; ``make_args``
// reads them (unpacked after the swap) with the node's other arguments.
template <typename MakeArgs>
variable_list call_bound(Node& node, Binding& binding, std::initializer_list<SavedVariable*> held,
                         const variable_list& grads, torch::dynamo::autograd::SwapSavedVariables& saved,
                         MakeArgs make_args) {
  for (SavedVariable* variable : held) {
    saved.before(*variable);
  }
  const auto& compiler = torch::dynamo::autograd::getPyCompilerInterface();
  std::call_once(binding.once, [&] {
    binding.name = compiler->bind_function(saved.get_py_compiler(), binding.key, binding.functional,
                                           binding.arg_types, /*is_custom_function=*/false, /*is_traceable=*/true);
  });
  const torch::autograd::ivalue_list args = make_args();
  const auto metadata =
      torch::dynamo::autograd::IValuePacker<std::vector<std::optional<torch::autograd::InputMetadata>>>::pack(
          torch::dynamo::autograd::get_input_metadata(node.next_edges()));
  auto grad_inputs = compiler->call_function(saved.get_py_compiler(), "apply_functional", binding.name, grads, args,
                                             metadata);
  for (SavedVariable* variable : held) {
    saved.after(*variable);
  }
  return grad_inputs;
}

// A saved tensor as a functional's argument (None where nothing was saved), and back.
c10::IValue optional_arg(const Tensor& tensor) { return tensor.defined() ? c10::IValue(tensor) : c10::IValue(); }
Tensor tensor_arg(const c10::IValue& arg) { return arg.isNone() ? Tensor() : arg.toTensor(); }
at::TypePtr optional_tensor_type() { return at::OptionalType::create(at::TensorType::get()); }

// The backward of the ReLU ops' nodes: relu_backward(grad, y).
variable_list relu_mask(const Tensor& grad, const Tensor& output) {
  return {grad.defined() ? relu_backward_op().call(grad, output) : Tensor()};
}
variable_list relu_mask_functional(const variable_list& grads, const torch::autograd::ivalue_list& args) {
  return relu_mask(grads[0], args[0].toTensor());
}

Binding relu_mask_binding{"TorchblocksReLUMask", relu_mask_functional, {at::TensorType::get()}};

// The node of relu and relu_ (output_ saved as an output) and of relu_backward
// (its saved y is an input there, and the edge is to dy alone: the mask is flat in y).
template <bool kOfBackward>
struct ReLUMaskNode : Node {
  SavedVariable output_;

  variable_list apply(variable_list&& grad) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return relu_mask(grad[0], kOfBackward ? output_.unpack() : output_.unpack(self_pointer(this)));
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    output_.reset_data();
  }
  std::string name() const override {
    return kOfBackward ? "torchblocks::ReLUBackwardBackward" : "torchblocks::ReLUBackward";
  }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(output_, /*is_output=*/!kOfBackward);
  }
  variable_list apply_with_saved(const variable_list& grad,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return call_bound(*this, relu_mask_binding, {&output_}, grad, saved,
                      [&] { return torch::autograd::ivalue_list{c10::IValue(output_.unpack())}; });
  }
};
using ReLUBackward = ReLUMaskNode<false>;
using ReLUBackwardBackward = ReLUMaskNode<true>;

// The tangent of ``input`` at forward-mode level 0 (torch.func maps its levels onto it), or undefined.
Tensor tangent_of(const Tensor& input) {
  return torch::autograd::isFwGradDefined(input) ? input._fw_grad(/*level=*/0) : Tensor();
}

// ``input`` without its tangent, for a tangent's formula (whose result must carry none).
Tensor primal_of(const Tensor& input) {
  return torch::autograd::isFwGradDefined(input) ? input._fw_primal(/*level=*/0) : input;
}

Tensor relu_autograd(c10::DispatchKeySet keys, const Tensor& input) {
  decltype(make_node<ReLUBackward>()) node;
  if (torch::autograd::compute_requires_grad(input)) {
    node = make_node<ReLUBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input));
  }
  Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = relu_op().redispatch(keys & c10::after_autograd_keyset, input);
  }
  if (node) {
    torch::autograd::set_history(output, node);
    node->output_ = SavedVariable(output, /*is_output=*/true);
  }
  if (const Tensor tangent = tangent_of(input); tangent.defined()) {
    output._set_fw_grad(relu_backward_op().call(tangent, output), /*level=*/0, /*is_inplace_op=*/false);
  }
  return output;
}

// In place, as torch's generated relu_: the checks of an in-place op on a
// tensor autograd tracks; the node's edges taken before the write (after the
// version bump, a view's grad_fn would be regenerated on the old base); the
// write below ADInplaceOrView and one bump here; the history rebased (a
// view's base through CopySlices); the input's tangent masked in place, as native's.
void relu__autograd(c10::DispatchKeySet keys, const Tensor& input) {
  const bool requires_grad = torch::autograd::compute_requires_grad(input);
  torch::autograd::check_inplace(input, requires_grad);
  decltype(make_node<ReLUBackward>()) node;
  if (requires_grad) {
    node = make_node<ReLUBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input));
  }
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    relu__op().redispatch(keys & c10::after_ADInplaceOrView_keyset, input);
  }
  torch::autograd::increment_version(input);
  if (node) {
    torch::autograd::rebase_history(input, node);
    node->output_ = SavedVariable(input, /*is_output=*/true, input.is_view());
  }
  if (const Tensor tangent = tangent_of(input); tangent.defined()) {
    tangent.copy_(relu_backward_op().call(tangent, input));
  }
}

Tensor relu_backward_autograd(c10::DispatchKeySet keys, const Tensor& grad_output, const Tensor& output) {
  decltype(make_node<ReLUBackwardBackward>()) node;
  if (torch::autograd::compute_requires_grad(grad_output)) {
    node = make_node<ReLUBackwardBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(grad_output));
    node->output_ = SavedVariable(output, /*is_output=*/false);
  }
  Tensor grad_input;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grad_input = relu_backward_op().redispatch(keys & c10::after_autograd_keyset, grad_output, output);
  }
  if (node) {
    torch::autograd::set_history(grad_input, node);
  }
  if (const Tensor tangent = tangent_of(grad_output); tangent.defined()) {
    grad_input._set_fw_grad(relu_backward_op().call(tangent, output), /*level=*/0, /*is_inplace_op=*/false);
  }
  return grad_input;
}

// Dense, as the kernels of the ops torchblocks::dense, matmul and
// matmul_row_sum (their schemas, fakes, vmap rules, other kernels: dense.py):
//   dense:  y = act(x @ W^T + b), x (M, K), W (N, K), b (N,)
//     g = relu ? relu_backward(dy, y) : dy
//     dx = matmul(g, W),   (dW, db) = matmul_row_sum(g^T, x)   (dW alone: matmul(g^T, x); db alone: sum of g's rows)
//     forward mode: y_t = (x_t @ W^T + x @ W_t^T + b_t), masked by relu_backward(., y) under relu
//   matmul:  C = A @ B;   dA = matmul(dC, B^T),   dB = matmul(A^T, dC);   C_t = A_t @ B + A @ B_t
//   matmul_row_sum:  (C, r) = (A @ B, rows of A summed);   dA = matmul(dC, B^T) + dr (along rows),
//     dB = matmul(A^T, dC);   (C_t, r_t) = (A_t @ B + A @ B_t, rows of A_t summed)
// The gradients are themselves ops, so a backward with create_graph records
// their nodes, and the second derivative needs nothing more.

using DenseOp = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, bool);
using PairOp = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&);

const auto& dense_op() { static const auto handle = find_op<DenseOp>("torchblocks::dense"); return handle; }
const auto& matmul_op() { static const auto handle = find_op<BinaryOp>("torchblocks::matmul"); return handle; }
const auto& matmul_row_sum_op() {
  static const auto handle = find_op<PairOp>("torchblocks::matmul_row_sum");
  return handle;
}

// x @ W^T + b, or x @ W^T where ``bias`` is undefined: dense.py's GEMM.
Tensor affine(const Tensor& input, const Tensor& weight, const Tensor& bias) {
  return bias.defined() ? at::addmm(bias, input, weight.t()) : at::mm(input, weight.t());
}

Tensor dense_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, bool relu) {
  Tensor output = affine(input, weight, bias ? *bias : Tensor());
  return relu ? output.clamp_min_(0) : output;
}
Tensor matmul_cpu(const Tensor& a, const Tensor& b) { return a.mm(b); }
std::tuple<Tensor, Tensor> matmul_row_sum_cpu(const Tensor& a, const Tensor& b) { return {a.mm(b), a.sum(1)}; }

// dx, dW, db of dense from dy, where ``needs`` asks for them.
variable_list dense_grads(const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& output,
                          bool relu, std::array<bool, 3> needs) {
  variable_list grads(3);
  if (!grad_output.defined()) {
    return grads;
  }
  const Tensor g = relu ? relu_backward_op().call(grad_output, output) : grad_output;
  if (needs[0]) {
    grads[0] = matmul_op().call(g, weight);
  }
  if (needs[1] && needs[2]) {
    std::tie(grads[1], grads[2]) = matmul_row_sum_op().call(g.t(), input);
  } else if (needs[1]) {
    grads[1] = matmul_op().call(g.t(), input);
  } else if (needs[2]) {
    grads[2] = g.sum(0);
  }
  return grads;
}

// dA, dB of matmul from dC, and of matmul_row_sum from dC and dr (added along A's rows; undefined for matmul).
variable_list matmul_grads(const Tensor& grad_c, const Tensor& grad_row_sum, const Tensor& a, const Tensor& b,
                           std::array<bool, 2> needs) {
  variable_list grads(2);
  if (!grad_c.defined() && !grad_row_sum.defined()) {
    return grads;
  }
  if (needs[0]) {
    grads[0] = grad_c.defined() ? matmul_op().call(grad_c, b.t()) : at::zeros({a.size(0), a.size(1)}, a.options());
    if (grad_row_sum.defined()) {
      grads[0] = grads[0] + grad_row_sum.unsqueeze(1);
    }
  }
  if (needs[1]) {
    grads[1] = grad_c.defined() ? matmul_op().call(a.t(), grad_c) : at::zeros({b.size(0), b.size(1)}, b.options());
  }
  return grads;
}

variable_list dense_functional(const variable_list& grads, const torch::autograd::ivalue_list& args) {
  return dense_grads(grads[0], tensor_arg(args[0]), tensor_arg(args[1]), tensor_arg(args[2]), args[3].toBool(),
                     {args[4].toBool(), args[5].toBool(), args[6].toBool()});
}
variable_list matmul_functional(const variable_list& grads, const torch::autograd::ivalue_list& args) {
  return matmul_grads(grads[0], grads.size() > 1 ? grads[1] : Tensor(), tensor_arg(args[0]), tensor_arg(args[1]),
                      {args[2].toBool(), args[3].toBool()});
}

Binding dense_binding{"TorchblocksDense", dense_functional,
                      {optional_tensor_type(), optional_tensor_type(), optional_tensor_type(), at::BoolType::get(),
                       at::BoolType::get(), at::BoolType::get(), at::BoolType::get()}};
Binding matmul_binding{"TorchblocksMatmul", matmul_functional,  // both matmul nodes: dr is absent or not
                       {optional_tensor_type(), optional_tensor_type(), at::BoolType::get(), at::BoolType::get()}};

struct DenseBackward : Node {
  SavedVariable input_, weight_, output_;  // each only where a gradient needs it
  bool relu_ = false;

  variable_list apply(variable_list&& grad) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const Tensor output = relu_ ? output_.unpack(self_pointer(this)) : Tensor();
    return dense_grads(grad[0], input_.unpack(), weight_.unpack(), output, relu_,
                       {should_compute_output(0), should_compute_output(1), should_compute_output(2)});
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    output_.reset_data();
  }
  std::string name() const override { return "torchblocks::DenseBackward"; }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(input_, /*is_output=*/false);
    args.collect(weight_, /*is_output=*/false);
    args.collect(output_, /*is_output=*/true);
    args.collect(relu_);
    for (size_t edge = 0; edge < 3; ++edge) {  // the functional's arguments: part of what the graph is
      args.collect(should_compute_output(edge));
    }
  }
  variable_list apply_with_saved(const variable_list& grad,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return call_bound(*this, dense_binding, {&input_, &weight_, &output_}, grad, saved, [&] {
      return torch::autograd::ivalue_list{
          optional_arg(input_.unpack()), optional_arg(weight_.unpack()),
          optional_arg(relu_ ? output_.unpack(self_pointer(this)) : Tensor()), c10::IValue(relu_),
          c10::IValue(should_compute_output(0)), c10::IValue(should_compute_output(1)),
          c10::IValue(should_compute_output(2))};
    });
  }
};

template <bool kRowSum>
struct MatmulNode : Node {
  SavedVariable a_, b_;  // a only where dB is needed, b only where dA is

  variable_list apply(variable_list&& grad) override {
    std::lock_guard<std::mutex> lock(mutex_);
    return matmul_grads(grad[0], kRowSum ? grad[1] : Tensor(), a_.unpack(), b_.unpack(),
                        {should_compute_output(0), should_compute_output(1)});
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    a_.reset_data();
    b_.reset_data();
  }
  std::string name() const override {
    return kRowSum ? "torchblocks::MatmulRowSumBackward" : "torchblocks::MatmulBackward";
  }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(a_, /*is_output=*/false);
    args.collect(b_, /*is_output=*/false);
    args.collect(should_compute_output(0));
    args.collect(should_compute_output(1));
  }
  variable_list apply_with_saved(const variable_list& grad,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return call_bound(*this, matmul_binding, {&a_, &b_}, grad, saved, [&] {
      return torch::autograd::ivalue_list{optional_arg(a_.unpack()), optional_arg(b_.unpack()),
                                          c10::IValue(should_compute_output(0)),
                                          c10::IValue(should_compute_output(1))};
    });
  }
};
using MatmulBackward = MatmulNode<false>;
using MatmulRowSumBackward = MatmulNode<true>;

// The tangent of A @ B: A_t @ B + A @ B_t, a missing tangent counting as zero; undefined if both are.
Tensor product_tangent(const Tensor& a, const Tensor& b, const Tensor& tangent_a, const Tensor& tangent_b) {
  if (!tangent_a.defined() && !tangent_b.defined()) {
    return Tensor();
  }
  Tensor tangent = at::zeros({a.size(0), b.size(1)}, a.options());
  if (tangent_a.defined()) {
    tangent = tangent + tangent_a.mm(b);
  }
  if (tangent_b.defined()) {
    tangent = tangent + a.mm(tangent_b);
  }
  return tangent;
}

Tensor dense_autograd(c10::DispatchKeySet keys, const Tensor& input, const Tensor& weight,
                      const std::optional<Tensor>& bias, bool relu) {
  const Tensor bias_or_none = bias ? *bias : Tensor();  // undefined: no edge, no gradient
  decltype(make_node<DenseBackward>()) node;
  if (torch::autograd::compute_requires_grad(input, weight, bias_or_none)) {
    node = make_node<DenseBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(input, weight, bias_or_none));
  }
  Tensor output;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    output = dense_op().redispatch(keys & c10::after_autograd_keyset, input, weight, bias, relu);
  }
  if (node) {
    torch::autograd::set_history(output, node);
    node->relu_ = relu;
    if (weight.requires_grad()) {
      node->input_ = SavedVariable(input, /*is_output=*/false);
    }
    if (input.requires_grad()) {
      node->weight_ = SavedVariable(weight, /*is_output=*/false);
    }
    if (relu) {
      node->output_ = SavedVariable(output, /*is_output=*/true);
    }
  }
  const Tensor tangent_weight = tangent_of(weight);
  Tensor tangent = product_tangent(primal_of(input), primal_of(weight).t(), tangent_of(input),
                                   tangent_weight.defined() ? tangent_weight.t() : Tensor());
  if (const Tensor tangent_bias = bias ? tangent_of(*bias) : Tensor(); tangent_bias.defined()) {
    tangent = tangent.defined() ? tangent + tangent_bias : tangent_bias.expand({input.size(0), weight.size(0)}).clone();
  }
  if (tangent.defined()) {
    output._set_fw_grad(relu ? relu_backward_op().call(tangent, output) : tangent, /*level=*/0,
                        /*is_inplace_op=*/false);
  }
  return output;
}

// matmul and matmul_row_sum: one node kind each, a saved only for dB and b only for dA.
template <bool kRowSum, typename Result>
Result matmul_autograd(c10::DispatchKeySet keys, const Tensor& a, const Tensor& b) {
  using Backward = MatmulNode<kRowSum>;
  decltype(make_node<Backward>()) node;
  if (torch::autograd::compute_requires_grad(a, b)) {
    node = make_node<Backward>();
    node->set_next_edges(torch::autograd::collect_next_edges(a, b));
    if (b.requires_grad()) {
      node->a_ = SavedVariable(a, /*is_output=*/false);
    }
    if (a.requires_grad()) {
      node->b_ = SavedVariable(b, /*is_output=*/false);
    }
  }
  Result result;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if constexpr (kRowSum) {
      result = matmul_row_sum_op().redispatch(keys & c10::after_autograd_keyset, a, b);
    } else {
      result = matmul_op().redispatch(keys & c10::after_autograd_keyset, a, b);
    }
  }
  const Tensor tangent_a = tangent_of(a);
  const Tensor tangent = product_tangent(primal_of(a), primal_of(b), tangent_a, tangent_of(b));
  if constexpr (kRowSum) {
    if (node) {
      torch::autograd::set_history(std::get<0>(result), node);
      torch::autograd::set_history(std::get<1>(result), node);
    }
    if (tangent.defined()) {
      std::get<0>(result)._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
      std::get<1>(result)._set_fw_grad(tangent_a.defined() ? tangent_a.sum(1) : at::zeros({a.size(0)}, a.options()),
                                       /*level=*/0, /*is_inplace_op=*/false);
    }
  } else {
    if (node) {
      torch::autograd::set_history(result, node);
    }
    if (tangent.defined()) {
      result._set_fw_grad(tangent, /*level=*/0, /*is_inplace_op=*/false);
    }
  }
  return result;
}

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

// Up to this many logits, passes over the rows instead of the ops below: at
// the book's 128 x 10, each op's fixed cost (about 2 us) outweighs its
// arithmetic. The exponentials are one ATen op, whose kernel is vectorised
// (a scalar exp2 per logit made 64 x 64 logits take 0.68x native's time);
// the max and the sum run in kLanes independent lanes, which the compiler
// vectorises (a single running max or sum cannot be reordered): 2.2-3.9x
// faster than one lane from 32 x 100 to 64 x 4096. Forward + backward by
// hand: 16 x 1000 and 256 x 100 took 53-55 and 63-67 us against 69 and 82
// through the ops; 64 x 1000 took 116 against 95-117, so the ops from 2^15.
constexpr int64_t kSmallLogits = 1 << 15;
constexpr int64_t kLanes = 8;

// max_c row[c], NaNs passed over: a NaN logit makes its row's sum, and so
// its loss and gradient, NaN whatever the max.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t row_max_of(const scalar_t* row, int64_t classes) {
  acc_t lane_max[kLanes];
  std::fill(lane_max, lane_max + kLanes, -std::numeric_limits<acc_t>::infinity());
  const int64_t body = classes - classes % kLanes;
  for (int64_t c = 0; c < body; c += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const acc_t value = row[c + lane];
      lane_max[lane] = value > lane_max[lane] ? value : lane_max[lane];
    }
  }
  acc_t m = *std::max_element(lane_max, lane_max + kLanes);
  for (int64_t c = body; c < classes; ++c) {
    const acc_t value = row[c];
    m = value > m ? value : m;
  }
  return m;
}

// sum_c row[c], in kLanes partial sums.
template <typename acc_t>
acc_t row_sum_of(const acc_t* row, int64_t classes) {
  acc_t lane_sum[kLanes] = {};
  const int64_t body = classes - classes % kLanes;
  for (int64_t c = 0; c < body; c += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      lane_sum[lane] += row[c + lane];
    }
  }
  acc_t sum = std::accumulate(lane_sum, lane_sum + kLanes, acc_t(0));
  for (int64_t c = body; c < classes; ++c) {
    sum += row[c];
  }
  return sum;
}

// loss_i into ``loss`` (R,) and exp2((x - m_i) log2 e) into ``exp_shifted``
// (R, C), then, ``with_gradient``, p - onehot(y) over it; the logits' rows
// contiguous (stride 1 along C).
template <typename scalar_t, typename index_t>
void small_rows(const Tensor& logits, const Tensor& target, Tensor& loss, Tensor& exp_shifted, bool with_gradient) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = logits.size(0), classes = logits.size(1);
  const int64_t row_stride = logits.stride(0), target_stride = target.stride(0);
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const index_t* y = target.const_data_ptr<index_t>();
  acc_t* row_max = loss.mutable_data_ptr<acc_t>();  // m_i, until the loss overwrites it
  acc_t* e = exp_shifted.mutable_data_ptr<acc_t>();
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* row = x + i * row_stride;
    const acc_t m = row_max_of(row, classes);
    row_max[i] = m;
    for (int64_t c = 0; c < classes; ++c) {
      e[i * classes + c] = (static_cast<acc_t>(row[c]) - m) * acc_t(kLog2E);
    }
  }
  exp_shifted.exp2_();
  for (int64_t i = 0; i < rows; ++i) {
    acc_t* row_e = e + i * classes;
    const acc_t sum_exp = row_sum_of(row_e, classes);
    const int64_t label = static_cast<int64_t>(y[i * target_stride]);
    row_max[i] = (row_max[i] + std::log(sum_exp)) - static_cast<acc_t>(x[i * row_stride + label]);
    if (with_gradient) {
      for (int64_t c = 0; c < classes; ++c) {
        row_e[c] /= sum_exp;
      }
      row_e[label] += acc_t(-1);
    }
  }
}

// Up to kSmallLogits, small_rows (on logits it can read); above, or ``in_place`` (the gradient written
// over float32 or float64 logits), the ops of cross_entropy.py's
// _plain_forward_and_gradient, one for one: its numbers to the bit.
RowStats forward_rows(const Tensor& logits, const Tensor& target, bool with_gradient, bool in_place = false) {
  const auto acc = accumulation_dtype(logits.scalar_type());
  if (logits.numel() <= kSmallLogits && !in_place && readable(logits)) {
    const Tensor rows_contiguous = logits.stride(1) == 1 ? logits : logits.contiguous();
    Tensor exp_shifted = at::empty(logits.sizes(), logits.options().dtype(acc));
    RowStats rows{at::empty({logits.size(0)}, logits.options().dtype(acc)), Tensor()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_small_rows", [&] {
      if (target.scalar_type() == at::kLong) {
        small_rows<scalar_t, int64_t>(rows_contiguous, target, rows.loss, exp_shifted, with_gradient);
      } else {
        small_rows<scalar_t, uint8_t>(rows_contiguous, target, rows.loss, exp_shifted, with_gradient);
      }
    });
    if (with_gradient) {
      rows.gradient = std::move(exp_shifted);
    }
    return rows;
  }
  Tensor x = logits.to(acc);  // the logits themselves in float32 and float64
  const Tensor index = target.to(at::kLong).unsqueeze(1);
  const Tensor row_max = x.amax({1}, true);
  const Tensor target_logit = x.gather(1, index).squeeze(1);
  Tensor exp_shifted = in_place ? at::sub_out(x, x, row_max) : x - row_max;
  exp_shifted.mul_(kLog2E).exp2_();  // exp as the kernels compute it
  const Tensor sum_exp = exp_shifted.sum({1}, true);
  const Tensor lse = (row_max + sum_exp.log()).squeeze(1);
  Tensor gradient;
  if (with_gradient) {
    gradient = exp_shifted.div_(sum_exp).scatter_add_(1, index, at::full({logits.size(0), 1}, -1.0, x.options()));
  }
  return {lse - target_logit, gradient};
}

// p - onehot(y) of logits (R, C) again, in differentiable ops: for a backward
// that is itself differentiated (create_graph).
Tensor differentiable_gradient(const Tensor& logits, const Tensor& target) {
  const Tensor x = logits.to(accumulation_dtype(logits.scalar_type()));
  const Tensor exp_shifted = (x - x.amax({1}, true).detach()).mul(kLog2E).exp2();
  const Tensor onehot = at::zeros_like(x).scatter_(1, target.to(at::kLong).unsqueeze(1), 1.0);
  return exp_shifted / exp_shifted.sum({1}, true) - onehot;
}

// dL/dx of the common case from dL/dloss (() or (R,)) in differentiable ops,
// p - onehot(y) recomputed: for a backward that is itself differentiated,
// batched, or captured by compiled autograd.
Tensor cross_entropy_grad(const Tensor& grad_loss, const Tensor& logits, const Tensor& target, int64_t reduction) {
  const Tensor row_scale = grad_loss.to(accumulation_dtype(logits.scalar_type()));
  const Tensor factor = reduction == kMean ? row_scale / logits.sym_size(0)
                        : reduction == kNone ? row_scale.unsqueeze(1) : row_scale;
  return (differentiable_gradient(logits, target) * factor).to(logits.scalar_type());
}

variable_list cross_entropy_functional(const variable_list& grads, const torch::autograd::ivalue_list& args) {
  return {grads[0].defined() ? cross_entropy_grad(grads[0], args[0].toTensor(), args[1].toTensor(), args[2].toInt())
                             : Tensor()};
}

Binding cross_entropy_binding{"TorchblocksCrossEntropy", cross_entropy_functional,
                              {at::TensorType::get(), at::TensorType::get(), at::IntType::get()}};

struct CrossEntropyBackward : Node {
  SavedVariable logits_, target_;
  int64_t reduction_ = kMean;
  Tensor gradient_;  // p - onehot(y) from the forward, where it was computed then: scaled in place, let go

  variable_list apply(variable_list&& grad) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grad[0].defined()) {
      return {Tensor()};
    }
    const Tensor logits = logits_.unpack(), target = target_.unpack();
    if (at::GradMode::is_enabled() || batched_or_watched(grad[0])) {
      gradient_ = Tensor();
      return {cross_entropy_grad(grad[0], logits, target, reduction_)};
    }
    // The forward's buffer, let go after its first use; a retained graph's
    // next backward recomputes it with the same code, so to the same bits.
    Tensor gradient = gradient_.defined() ? std::exchange(gradient_, Tensor())
                                          : forward_rows(logits, target, true).gradient;
    const Tensor row_scale = grad[0].to(gradient.scalar_type());  // (R,) for "none", else ()
    Tensor grad_logits;
    if (reduction_ == kNone) {
      grad_logits = gradient.mul_(row_scale.unsqueeze(1));
    } else {  // one factor for every row, read on the host: dL/dloss (/ R for the mean)
      grad_logits = AT_DISPATCH_FLOATING_TYPES(gradient.scalar_type(), "cross_entropy_scale", [&] {
        const scalar_t scale = row_scale.item<scalar_t>();
        return gradient.mul_(reduction_ == kMean ? scale / static_cast<scalar_t>(logits.size(0)) : scale);
      });
    }
    return {grad_logits.to(logits.scalar_type())};
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    logits_.reset_data();
    target_.reset_data();
    gradient_ = Tensor();
  }
  std::string name() const override { return "torchblocks::CrossEntropyBackward"; }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(logits_, /*is_output=*/false);
    args.collect(target_, /*is_output=*/false);
    args.collect(reduction_);
  }
  variable_list apply_with_saved(const variable_list& grad,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return call_bound(*this, cross_entropy_binding, {&logits_, &target_}, grad, saved, [&] {
      return torch::autograd::ivalue_list{c10::IValue(logits_.unpack()), c10::IValue(target_.unpack()),
                                          c10::IValue(reduction_)};
    });
  }
};

// loss_i (R,) reduced as ``reduction`` asks ("mean": over the R rows), in ``dtype``.
Tensor reduce_rows(Tensor loss, int64_t reduction, at::ScalarType dtype) {
  if (reduction != kNone) {
    const int64_t rows = loss.size(0);
    loss = loss.sum();
    if (reduction == kMean) {
      loss.div_(rows);
    }
  }
  return loss.to(dtype);
}

// The op torchblocks::cross_entropy (its schema, fake, vmap rule and other
// kernels: cross_entropy.py), as logits (R, C) against class indices (R,)
// with class weights, a reduction (kNone, kMean, kSum: aten's), an ignored
// index and label smoothing. Its C++ kernels take the common case above and
// hand every other call to the op's Python kernels (cross_entropy.py's body
// and recording autograd), set by register_kernels.
using CrossEntropyOp = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t, int64_t, double);

const auto& cross_entropy_op() {
  static const auto handle = find_op<CrossEntropyOp>("torchblocks::cross_entropy");
  return handle;
}

// An op's Python kernels (_dispatch.python_kernels): its body and its recording autograd.
struct PythonKernels {
  pybind11::object body, recorded;
};

// The losses' ops' Python kernels, set by register_kernels; never destroyed:
// there is no interpreter to release them at exit.
struct LossPythonKernels {
  PythonKernels cross_entropy, head;
};
LossPythonKernels& python() {
  static auto* kernels = new LossPythonKernels();
  return *kernels;
}

template <typename... Args>
Tensor call_python(const pybind11::object& kernel, const Args&... args) {
  pybind11::gil_scoped_acquire gil;
  return kernel(args...).template cast<Tensor>();
}

// A call an op's AutogradCPU kernel leaves: recorded by the op's Python
// autograd where autograd records it (``recording``), else run below autograd.
template <typename Signature, typename... Args>
Tensor leave_to_python(const PythonKernels& kernels, const c10::TypedOperatorHandle<Signature>& op,
                       c10::DispatchKeySet keys, bool recording, const Args&... args) {
  if (recording) {
    return call_python(kernels.recorded, args...);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.redispatch(keys & c10::after_autograd_keyset, args...);
}

template <typename index_t>
bool indices_plain(const Tensor& target, int64_t classes, int64_t ignore_index) {
  const index_t* y = target.const_data_ptr<index_t>();
  for (int64_t i = 0, stride = target.stride(0); i < target.size(0); ++i) {
    const int64_t label = static_cast<int64_t>(y[i * stride]);
    if (label < 0 || label >= classes || label == ignore_index) {
      return false;
    }
  }
  return true;
}

// Whether every class index of ``target`` (R,) is a class and none is
// ignore_index: read through its pointer where it can be, else (wrapped by
// torch.func's gradient transforms, which wrap every argument of a call,
// the class indices too) in ops; false for a batch or a subclass, whose
// values are not one row's.
bool targets_plain(const Tensor& target, int64_t classes, int64_t ignore_index) {
  if (readable(target)) {
    return target.scalar_type() == at::kLong ? indices_plain<int64_t>(target, classes, ignore_index)
                                             : indices_plain<uint8_t>(target, classes, ignore_index);
  }
  const c10::DispatchKeySet keys = target.key_set();
  if (!target.is_cpu() || keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::FuncTorchBatched) ||
      keys.has(c10::DispatchKey::Batched)) {
    return false;
  }
  return target.ge(0).logical_and_(target.lt(classes)).logical_and_(target.ne(ignore_index)).all().item<bool>();
}

// The common case: rows (R, C), R and C > 0, of a floating dtype on the CPU
// against class indices (R,), every one a class and none ignored; no class
// weights, no smoothing.
bool plain_rows(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight, int64_t ignore_index,
                double label_smoothing) {
  const bool indices = target.scalar_type() == at::kLong || target.scalar_type() == at::kByte;
  return !weight.has_value() && label_smoothing == 0 && floating(logits) && indices && logits.dim() == 2 &&
         target.dim() == 1 && target.size(0) == logits.size(0) && logits.numel() > 0 && logits.is_cpu() &&
         targets_plain(target, logits.size(1), ignore_index);
}

Tensor cross_entropy_cpu(const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,
                         int64_t reduction, int64_t ignore_index, double label_smoothing) {
  if (!plain_rows(logits, target, weight, ignore_index, label_smoothing)) {
    return call_python(python().cross_entropy.body, logits, target, weight, reduction, ignore_index, label_smoothing);
  }
  return reduce_rows(forward_rows(logits, target, false).loss, reduction, logits.scalar_type());
}

// The common case with its node; with a tangent (forward mode),
//   loss_t = reduction of sum_c (p_c - 1[c = y]) * x_t,c
// from p recomputed in differentiable ops, so that the tangent can be differentiated in turn.
Tensor cross_entropy_autograd(c10::DispatchKeySet keys, const Tensor& logits, const Tensor& target,
                              const std::optional<Tensor>& weight, int64_t reduction, int64_t ignore_index,
                              double label_smoothing) {
  if (!plain_rows(logits, target, weight, ignore_index, label_smoothing)) {
    const Tensor weight_or_none = weight ? *weight : Tensor();
    const bool recording = torch::autograd::compute_requires_grad(logits, weight_or_none) ||
                           forward_grad_defined(logits, weight_or_none);
    return leave_to_python(python().cross_entropy, cross_entropy_op(), keys, recording, logits, target, weight,
                           reduction, ignore_index, label_smoothing);
  }
  const bool with_gradient = torch::autograd::compute_requires_grad(logits);
  // The gradient is computed with the loss and held, unless what is saved is
  // packed by hooks that must see what the backward reads, or a dispatch
  // mode or the profiler must see the op run below autograd.
  const bool held = with_gradient && !saved_tensors_hooked() &&
                    c10::impl::TorchDispatchModeTLS::stack_len() == 0 && !torch::profiler::impl::profilerEnabled();
  Tensor loss, gradient;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (held) {
      RowStats rows = forward_rows(logits, target, true);
      loss = reduce_rows(rows.loss, reduction, logits.scalar_type());
      gradient = std::move(rows.gradient);
    } else {
      loss = cross_entropy_op().redispatch(keys & c10::after_autograd_keyset, logits, target, weight, reduction,
                                           ignore_index, label_smoothing);
    }
  }
  if (with_gradient) {
    auto node = make_node<CrossEntropyBackward>();
    attach(loss, node, logits);
    node->logits_ = SavedVariable(logits, /*is_output=*/false);
    node->target_ = SavedVariable(target, /*is_output=*/false);
    node->reduction_ = reduction;
    node->gradient_ = std::move(gradient);
  }
  if (const Tensor tangent = tangent_of(logits); tangent.defined()) {
    const Tensor primal = primal_of(logits);
    const Tensor grad_rows = differentiable_gradient(primal, target);
    const Tensor tangent_rows = (grad_rows * tangent.to(grad_rows.scalar_type())).sum({1});
    loss._set_fw_grad(reduce_rows(tangent_rows, reduction, logits.scalar_type()), /*level=*/0,
                      /*is_inplace_op=*/false);
  }
  return loss;
}

// Dense + softmax cross-entropy head (dense_cross_entropy.py), its common
// case: class indices, none ignored, no smoothing, "mean" or "sum". Over
// chunks of rows c, so the (R, C) logits are never all in memory at once:
//   z_c = x_c W^T + b,   g_c = p_c - onehot(y_c), written over z_c
//   dL/dx_c = s g_c @ W,   dL/dW = s sum_c g_c^T @ x_c,   dL/db = s sum_c (row sums of g_c^T)
// s = dL/dloss (/ R for the mean) is one scalar: the forward computes the
// gradients at s = 1 and the backward scales them, in place.
struct HeadRows {
  Tensor loss;               // (R,)
  variable_list gradients;   // dL/dx, dL/dW, dL/db at s = 1, each undefined unless wanted
};

// The ops of dense_cross_entropy.py's forward_and_gradients, one for one:
// its numbers to the bit. ``wanted``: which gradients (x, W, b) to compute.
HeadRows head_rows(const Tensor& input, const Tensor& weight, const Tensor& bias, const Tensor& target,
                   int64_t chunk_rows, std::array<bool, 3> wanted) {
  const int64_t rows = input.size(0);
  HeadRows head{at::empty({rows}, input.options()), variable_list(3)};
  Tensor &grad_input = head.gradients[0], &grad_weight = head.gradients[1], &grad_bias = head.gradients[2];
  if (wanted[0]) {
    grad_input = at::empty_like(input);
  }
  if (wanted[1]) {
    grad_weight = at::empty(weight.sizes(), weight.options());
  }
  if (wanted[2]) {
    grad_bias = at::empty({weight.size(0)}, weight.options());
  }
  const bool with_gradient = wanted[0] || wanted[1] || wanted[2];
  for (int64_t start = 0; start < rows; start += chunk_rows) {
    const int64_t count = std::min(chunk_rows, rows - start);
    const Tensor x = input.narrow(0, start, count);
    const Tensor logits = affine(x, weight, bias);
    const RowStats stats = forward_rows(logits, target.narrow(0, start, count), with_gradient, /*in_place=*/true);
    head.loss.narrow(0, start, count).copy_(stats.loss);
    if (!with_gradient) {
      continue;
    }
    const Tensor grad_logits_t = stats.gradient.t();  // over the logits
    if (wanted[0]) {
      Tensor grad_input_rows = grad_input.narrow(0, start, count);
      at::mm_out(grad_input_rows, stats.gradient, weight);
    }
    if (wanted[1] && start == 0) {
      at::mm_out(grad_weight, grad_logits_t, x);
    } else if (wanted[1]) {
      grad_weight.addmm_(grad_logits_t, x);
    }
    if (wanted[2] && start == 0) {
      at::sum_out(grad_bias, grad_logits_t, {1});
    } else if (wanted[2]) {
      grad_bias.add_(grad_logits_t.sum({1}));
    }
  }
  return head;
}

// The gradients at s = ``scale`` again, chunk by chunk in differentiable ops:
// for a backward that is itself differentiated (create_graph).
variable_list differentiable_head_gradients(const Tensor& input, const Tensor& weight, const Tensor& bias,
                                            const Tensor& target, const Tensor& scale, int64_t chunk_rows) {
  std::vector<Tensor> grad_input_rows;
  Tensor grad_weight = at::zeros_like(weight), grad_bias = bias.defined() ? at::zeros_like(bias) : Tensor();
  for (int64_t start = 0; start < input.size(0); start += chunk_rows) {
    const int64_t count = std::min(chunk_rows, input.size(0) - start);
    const Tensor x = input.narrow(0, start, count);
    const Tensor logits = affine(x, weight, bias);
    const Tensor grad_logits = differentiable_gradient(logits, target.narrow(0, start, count)) * scale;
    grad_input_rows.push_back(grad_logits.mm(weight));
    grad_weight = grad_weight + grad_logits.t().mm(x);
    if (bias.defined()) {
      grad_bias = grad_bias + grad_logits.sum(0);
    }
  }
  return {at::cat(grad_input_rows), grad_weight, grad_bias};
}

// The head's gradients at s from dL/dloss in differentiable ops, unchunked
// (the sizes may be symbolic): for compiled autograd's graph, which its
// compiler schedules.
variable_list head_functional(const variable_list& grads, const torch::autograd::ivalue_list& args) {
  if (!grads[0].defined()) {
    return variable_list(3);
  }
  const Tensor input = args[0].toTensor(), weight = args[1].toTensor(), bias = tensor_arg(args[2]);
  const Tensor scale = args[4].toInt() == kMean ? grads[0] / input.sym_size(0) : grads[0];
  const Tensor logits = affine(input, weight, bias);
  const Tensor grad_logits = (differentiable_gradient(logits, args[3].toTensor()) * scale).to(input.scalar_type());
  return {grad_logits.mm(weight), grad_logits.t().mm(input), bias.defined() ? grad_logits.sum(0) : Tensor()};
}

Binding head_binding{"TorchblocksDenseCrossEntropy", head_functional,
                     {at::TensorType::get(), at::TensorType::get(), optional_tensor_type(), at::TensorType::get(),
                      at::IntType::get()}};

struct DenseCrossEntropyBackward : Node {
  SavedVariable input_, weight_, bias_, target_;
  int64_t reduction_ = kMean, chunk_rows_ = 1;
  std::array<bool, 3> wanted_{};
  variable_list gradients_;  // from the forward, where they were computed then: the first backward scales them

  variable_list apply(variable_list&& grad) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!grad[0].defined()) {
      return variable_list(3);
    }
    const Tensor input = input_.unpack(), weight = weight_.unpack(), bias = bias_.unpack();
    const Tensor target = target_.unpack();
    const Tensor scale = reduction_ == kMean ? grad[0] / input.size(0) : grad[0];
    if (at::GradMode::is_enabled() || batched_or_watched(grad[0])) {  // create_graph, or a vmap over the gradients
      gradients_.clear();
      return differentiable_head_gradients(input, weight, bias, target, scale, chunk_rows_);
    }
    // The forward's gradients, let go after their first use; a retained graph's
    // next backward recomputes them with the same code, so to the same bits.
    variable_list gradients = gradients_.empty() ? head_rows(input, weight, bias, target, chunk_rows_, wanted_).gradients
                                                 : std::exchange(gradients_, variable_list());
    for (Tensor& gradient : gradients) {
      if (gradient.defined()) {
        gradient.mul_(scale);
      }
    }
    return gradients;
  }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input_.reset_data();
    weight_.reset_data();
    bias_.reset_data();
    target_.reset_data();
    gradients_.clear();
  }
  std::string name() const override { return "torchblocks::DenseCrossEntropyBackward"; }
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    args.collect(input_, /*is_output=*/false);
    args.collect(weight_, /*is_output=*/false);
    args.collect(bias_, /*is_output=*/false);
    args.collect(target_, /*is_output=*/false);
    args.collect(reduction_);
  }
  variable_list apply_with_saved(const variable_list& grad,
                                 torch::dynamo::autograd::SwapSavedVariables& saved) override {
    return call_bound(*this, head_binding, {&input_, &weight_, &bias_, &target_}, grad, saved, [&] {
      return torch::autograd::ivalue_list{c10::IValue(input_.unpack()), c10::IValue(weight_.unpack()),
                                          optional_arg(bias_.unpack()), c10::IValue(target_.unpack()),
                                          c10::IValue(reduction_)};
    });
  }
};

// The op torchblocks::dense_cross_entropy (its schema, fake, vmap rule and
// other kernels: dense_cross_entropy.py), as cross_entropy's: its C++
// kernels take the common case above and hand every other call to the op's
// Python kernels, set by register_kernels.
using HeadOp = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, int64_t, int64_t,
                      double, int64_t);

const auto& head_op() {
  static const auto handle = find_op<HeadOp>("torchblocks::dense_cross_entropy");
  return handle;
}

// The common case: input (R, K), weight (C, K) and bias (C,) or none, all
// float32 or all float64 on the CPU, R and C > 0; class indices (R,), every
// one a class and none ignored; "mean" or "sum"; no smoothing.
bool plain_head(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& target,
                int64_t reduction, int64_t ignore_index, double label_smoothing, int64_t chunk_rows) {
  const auto dtype = input.scalar_type();
  const bool indices = target.scalar_type() == at::kLong || target.scalar_type() == at::kByte;
  if (reduction == kNone || label_smoothing != 0 || (dtype != at::kFloat && dtype != at::kDouble) ||
      input.dim() != 2 || weight.dim() != 2 || weight.scalar_type() != dtype || !input.is_cpu() || !weight.is_cpu() ||
      input.size(1) != weight.size(1) || input.size(0) == 0 || weight.size(0) == 0 || !indices ||
      target.dim() != 1 || target.size(0) != input.size(0) || chunk_rows < 1) {
    return false;
  }
  if (bias && (bias->scalar_type() != dtype || !bias->is_cpu() || bias->dim() != 1 ||
               bias->size(0) != weight.size(0))) {
    return false;
  }
  return targets_plain(target, weight.size(0), ignore_index);
}

Tensor head_cpu(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& target,
                int64_t reduction, int64_t ignore_index, double label_smoothing, int64_t chunk_rows) {
  if (!plain_head(input, weight, bias, target, reduction, ignore_index, label_smoothing, chunk_rows)) {
    return call_python(python().head.body, input, weight, bias, target, reduction, ignore_index, label_smoothing,
                       chunk_rows);
  }
  const Tensor bias_or_none = bias ? *bias : Tensor();
  return reduce_rows(head_rows(input, weight, bias_or_none, target, chunk_rows, {}).loss, reduction,
                     input.scalar_type());
}

// The common case with its node; with tangents (forward mode), chunk by chunk
// as the forward, from the tangent of the logits dz = dx W^T + x dW^T + db and
// g = p - onehot(y) recomputed in differentiable ops:
//   loss_t = reduction of sum_c g_c * dz_c
Tensor head_autograd(c10::DispatchKeySet keys, const Tensor& input, const Tensor& weight,
                     const std::optional<Tensor>& bias, const Tensor& target, int64_t reduction, int64_t ignore_index,
                     double label_smoothing, int64_t chunk_rows) {
  const Tensor bias_or_none = bias ? *bias : Tensor();
  if (!plain_head(input, weight, bias, target, reduction, ignore_index, label_smoothing, chunk_rows)) {
    const bool recording = torch::autograd::compute_requires_grad(input, weight, bias_or_none) ||
                           forward_grad_defined(input, weight, bias_or_none);
    return leave_to_python(python().head, head_op(), keys, recording, input, weight, bias, target, reduction,
                           ignore_index, label_smoothing, chunk_rows);
  }
  const bool with_gradient = torch::autograd::compute_requires_grad(input, weight, bias_or_none);
  const std::array<bool, 3> wanted{with_gradient && input.requires_grad(), with_gradient && weight.requires_grad(),
                                   with_gradient && bias_or_none.defined() && bias_or_none.requires_grad()};
  // The gradients are computed with the loss and held, unless what is saved
  // is packed by hooks that must see what the backward reads, or something
  // watches (a dispatch mode or the profiler must see the op run below
  // autograd; torch.func's wrappers take no out= writes).
  const bool held = with_gradient && !saved_tensors_hooked() && !watched();
  Tensor loss;
  HeadRows head;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    if (held) {
      head = head_rows(input, weight, bias_or_none, target, chunk_rows, wanted);
      loss = reduce_rows(head.loss, reduction, input.scalar_type());
    } else {
      loss = head_op().redispatch(keys & c10::after_autograd_keyset, input, weight, bias, target, reduction,
                                  ignore_index, label_smoothing, chunk_rows);
    }
  }
  if (with_gradient) {
    auto node = make_node<DenseCrossEntropyBackward>();
    attach(loss, node, input, weight, bias_or_none);
    node->input_ = SavedVariable(input, /*is_output=*/false);
    node->weight_ = SavedVariable(weight, /*is_output=*/false);
    node->bias_ = SavedVariable(bias_or_none, /*is_output=*/false);
    node->target_ = SavedVariable(target, /*is_output=*/false);
    node->reduction_ = reduction;
    node->chunk_rows_ = chunk_rows;
    node->wanted_ = wanted;
    if (held) {
      node->gradients_ = std::move(head.gradients);
    }
  }
  const Tensor tangent_input = tangent_of(input), tangent_weight = tangent_of(weight);
  const Tensor tangent_bias = tangent_of(bias_or_none);
  if (tangent_input.defined() || tangent_weight.defined() || tangent_bias.defined()) {
    const Tensor x = primal_of(input), w = primal_of(weight), b = primal_of(bias_or_none);
    std::vector<Tensor> tangent_rows;
    for (int64_t start = 0; start < x.size(0); start += chunk_rows) {
      const int64_t count = std::min(chunk_rows, x.size(0) - start);
      Tensor tangent_logits = product_tangent(x.narrow(0, start, count), w.t(),
                                              tangent_input.defined() ? tangent_input.narrow(0, start, count)
                                                                      : Tensor(),
                                              tangent_weight.defined() ? tangent_weight.t() : Tensor());
      if (tangent_bias.defined()) {
        tangent_logits = tangent_logits.defined() ? tangent_logits + tangent_bias
                                                  : tangent_bias.expand({count, w.size(0)});
      }
      const Tensor grad_logits = differentiable_gradient(affine(x.narrow(0, start, count), w, b),
                                                         target.narrow(0, start, count));
      tangent_rows.push_back((grad_logits * tangent_logits.to(grad_logits.scalar_type())).sum({1}));
    }
    loss._set_fw_grad(reduce_rows(at::cat(tangent_rows), reduction, input.scalar_type()), /*level=*/0,
                      /*is_inplace_op=*/false);
  }
  return loss;
}

// The CPU and AutogradCPU kernels of the ReLU, Dense, cross-entropy and
// fused-head ops, registered while ``serve`` holds (the reference backend's
// CPU calls) and removed otherwise, when the Python kernels registered for
// every device (relu.py, dense.py, cross_entropy.py, dense_cross_entropy.py)
// serve again.
void register_kernels(bool serve, const pybind11::function& python_kernels) {
  static std::unique_ptr<torch::Library> cpu, autograd_cpu;
  if (!python().cross_entropy.body) {
    for (auto [name, kernels] : {std::pair{"cross_entropy", &python().cross_entropy},
                                 std::pair{"dense_cross_entropy", &python().head}}) {
      std::tie(kernels->body, kernels->recorded) =
          python_kernels(name).cast<std::tuple<pybind11::object, pybind11::object>>();
    }
  }
  if (!serve) {
    autograd_cpu.reset();
    cpu.reset();
    return;
  }
  if (cpu) {
    return;
  }
  cpu = std::make_unique<torch::Library>(torch::Library::IMPL, "torchblocks", c10::DispatchKey::CPU, __FILE__,
                                         __LINE__);
  cpu->impl("relu", relu_cpu);
  cpu->impl("relu_", relu__cpu);
  cpu->impl("relu_backward", relu_backward_cpu);
  cpu->impl("dense", dense_cpu);
  cpu->impl("matmul", matmul_cpu);
  cpu->impl("matmul_row_sum", matmul_row_sum_cpu);
  cpu->impl("cross_entropy", cross_entropy_cpu);
  cpu->impl("dense_cross_entropy", head_cpu);
  autograd_cpu = std::make_unique<torch::Library>(torch::Library::IMPL, "torchblocks", c10::DispatchKey::AutogradCPU,
                                                  __FILE__, __LINE__);
  autograd_cpu->impl("relu", TORCH_FN(relu_autograd));
  autograd_cpu->impl("relu_", TORCH_FN(relu__autograd));
  autograd_cpu->impl("relu_backward", TORCH_FN(relu_backward_autograd));
  autograd_cpu->impl("dense", TORCH_FN(dense_autograd));
  autograd_cpu->impl("matmul", TORCH_FN((matmul_autograd<false, Tensor>)));
  autograd_cpu->impl("matmul_row_sum", TORCH_FN((matmul_autograd<true, std::tuple<Tensor, Tensor>>)));
  autograd_cpu->impl("cross_entropy", TORCH_FN(cross_entropy_autograd));
  autograd_cpu->impl("dense_cross_entropy", TORCH_FN(head_autograd));
}

// functional.dense's call of the op torchblocks::dense for the arguments it
// takes as they are: input (*, K) and weight (N, K), bias (N,) or none, of one
// floating dtype on the CPU; activation none or "relu"; autocast off. (*)
// folds into the rows of one matmul and unfolds after. nullopt for any other,
// which Python checks (and casts, under autocast) before it calls the op:
// here the checks cost nanoseconds, there microseconds.
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
    return dense_op().call(input, weight, bias, relu);
  }
  std::vector<int64_t> output_shape(input.sizes().begin(), input.sizes().end() - 1);
  const int64_t rows = c10::multiply_integers(output_shape);
  output_shape.push_back(weight.size(0));
  return dense_op().call(input.reshape({rows, weight.size(1)}), weight, bias, relu).reshape(output_shape);
}

// functional.softmax_cross_entropy's call of the op torchblocks::cross_entropy
// for the common case (plain_rows, autocast off), and nullopt for any other,
// which Python checks before it calls the op: the checks of a plain call cost
// nanoseconds here.
std::optional<Tensor> cross_entropy(const Tensor& logits, const Tensor& target, int64_t ignore_index,
                                    const std::string& reduction_name) {
  const int64_t reduction = reduction_name == "mean" ? kMean
                            : reduction_name == "sum" ? kSum
                            : reduction_name == "none" ? kNone : -1;
  if (reduction < 0 || at::autocast::is_autocast_enabled(at::kCPU) ||
      !plain_rows(logits, target, std::nullopt, ignore_index, 0.0)) {
    return std::nullopt;
  }
  return cross_entropy_op().call(logits, target, std::nullopt, reduction, ignore_index, 0.0);
}

// functional.dense_cross_entropy's call of the op torchblocks::dense_cross_entropy
// for the common case (plain_head, autocast off), and nullopt for any other,
// which Python checks before it calls the op.
std::optional<Tensor> dense_cross_entropy(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                                          const Tensor& target, int64_t ignore_index,
                                          const std::string& reduction_name, int64_t chunk_rows) {
  const int64_t reduction = reduction_name == "mean" ? kMean : reduction_name == "sum" ? kSum : -1;
  if (reduction < 0 || at::autocast::is_autocast_enabled(at::kCPU) ||
      !plain_head(input, weight, bias, target, reduction, ignore_index, 0.0, chunk_rows)) {
    return std::nullopt;
  }
  return head_op().call(input, weight, bias, target, reduction, ignore_index, 0.0, chunk_rows);
}

// Each node's own Python type, registered as a torch.autograd.graph.Node (as
// torch's generated nodes are), so that ``isinstance(y.grad_fn, Node)`` holds
// and ``type(y.grad_fn).__name__`` names the block.
template <typename NodeType>
void register_node_type(pybind11::module_& m, PyTypeObject& type, const char* name) {
  torch::autograd::_initFunctionPyTypeObject(type, name, nullptr, nullptr);
  Py_INCREF(&type);
  torch::autograd::registerCppFunction(typeid(NodeType), &type);
  const pybind11::handle type_object(reinterpret_cast<PyObject*>(&type));
  m.attr(name) = type_object;
  pybind11::module_::import("torch.autograd.graph").attr("Node").attr("register")(type_object);
}

PyTypeObject relu_backward_type, relu_backward_backward_type, dense_backward_type, matmul_backward_type,
    matmul_row_sum_backward_type, cross_entropy_backward_type, head_backward_type;

}  // namespace torchblocks

using namespace torchblocks;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torchblocks' reference blocks for plain eager CPU calls, with C++ autograd nodes";
  namespace py = pybind11;
  // Each call runs without the GIL, as torch's own ops do, so that other
  // Python threads go on meanwhile (the arguments are converted before, the
  // result after; a saved-tensor hook takes the GIL itself).
  const auto without_gil = py::call_guard<py::gil_scoped_release>();
  register_node_type<ReLUBackward>(m, relu_backward_type, "ReLUBackward");
  register_node_type<ReLUBackwardBackward>(m, relu_backward_backward_type, "ReLUBackwardBackward");
  register_node_type<DenseBackward>(m, dense_backward_type, "DenseBackward");
  register_node_type<MatmulBackward>(m, matmul_backward_type, "MatmulBackward");
  register_node_type<MatmulRowSumBackward>(m, matmul_row_sum_backward_type, "MatmulRowSumBackward");
  register_node_type<CrossEntropyBackward>(m, cross_entropy_backward_type, "CrossEntropyBackward");
  register_node_type<DenseCrossEntropyBackward>(m, head_backward_type, "DenseCrossEntropyBackward");
  m.def("register_kernels", &register_kernels,
        "register_kernels(serve, python_kernels): the CPU and AutogradCPU kernels of the blocks' ops on or off; "
        "python_kernels(name) gives an op's (body, recorder) for the calls they leave");
  // the dispatcher from the top, as torch.ops.torchblocks.relu.default(input) calls it, without its Python
  m.def("relu", [](const Tensor& input) { return relu_op().call(input); }, "relu(input): torchblocks::relu",
        without_gil);
  m.def("relu_", [](const Tensor& input) { relu__op().call(input); return input; },
        "relu_(input): torchblocks::relu_, returning input", without_gil);
  m.def("dense", &dense,
        "dense(input (*, K), weight (N, K), bias (N,) or None, activation None or 'relu'): torchblocks::dense "
        "for arguments it takes as they are, else None", without_gil);
  m.def("cross_entropy", &cross_entropy,
        "cross_entropy(logits (R, C), target (R,), ignore_index, reduction): torchblocks::cross_entropy for the "
        "common case, else None", without_gil);
  m.def("dense_cross_entropy", &dense_cross_entropy,
        "dense_cross_entropy(input (R, K), weight (C, K), bias (C,) or None, target (R,), ignore_index, reduction, "
        "chunk_rows): torchblocks::dense_cross_entropy for the common case, else None", without_gil);
  m.def("step_instruction_set", &step_instruction_set,
        "what the optimizers' steps run in: 'avx2' or 'baseline' (optim_cpu.h)");
  // the optimizers' steps take their references' argument names: the optimizers call either with keywords
  m.def("sgd_step", &sgd_step, "SGD's step in one pass (optim_cpu.h); returns the indices it left",
        py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"), py::arg("new_buffer"), py::kw_only(),
        py::arg("lr"), py::arg("weight_decay"), py::arg("momentum"), py::arg("dampening"), py::arg("nesterov"),
        py::arg("maximize"), without_gil);
  m.def("rmsprop_step", &rmsprop_step, "RMSprop's step in one pass (optim_cpu.h); returns the indices it left",
        py::arg("params"), py::arg("grads"), py::arg("square_avgs"), py::arg("grad_avgs"),
        py::arg("momentum_buffers"), py::kw_only(), py::arg("lr"), py::arg("alpha"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("momentum"), py::arg("centered"), py::arg("maximize"), without_gil);
  m.def("adam_step", &adam_step, "Adam's step in one pass (optim_cpu.h); returns the indices it left",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"),
        py::arg("steps"), py::kw_only(), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("decoupled_weight_decay"), py::arg("amsgrad"), py::arg("maximize"),
        py::arg("capturable"), without_gil);
}
