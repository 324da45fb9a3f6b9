// qpeft._C_layer: a QLoRALinear's whole fp32 call in C++ (docs/design.md, "Per-call
// overhead"): the small kernels, the fused fp32 GEMM or W's decoded panels, whichever the
// Python path takes for the call. The only qpeft module that links libtorch: it needs
// torch's autograd (one C++ Node costs a few us where torch.autograd.Function.apply costs
// 12-23 us) and reads tensors without going through Python. It is therefore built for
// one torch version (recorded as `torch_version`); qpeft/autograd.py loads it only when
// that is the running torch's, else the Python path serves every call. The kernels stay
// in qpeft._C, called through the function table of include/qpeft/small_layer_abi.h.
//
// call(plan, module, x) -> Tensor | None | NotImplemented
//   plan: the tuple qpeft/autograd.py's small_layer_plan builds from a call the full
//   Python path has served and checked: (id(owner), guards, tensors, ints, scaling).
//   NotImplemented: the plan is stale (a guard failed: an attribute was reassigned,
//   a held tensor changed dtype, size, device or layout); the caller drops it and takes
//   the full path, which builds a new plan. None: the plan holds but this call is not
//   one the fast path serves (x's dtype, device, layout or rows; autocast, a profiler,
//   a tracer, a dispatch or function mode, a functorch transform, a forced backend, the
//   bf16 compute mode); the caller takes the full path. Else y, computed by the same
//   kernels (and for the backward the same kernel and torch's sum for dbias) the full
//   path runs for such a call, so values and gradients are the same bits.
#include <Python.h>
#include <qpeft/small_layer_abi.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#ifndef QPEFT_TORCH_VERSION
#error "QPEFT_TORCH_VERSION (the torch version built against) must be defined"
#endif

namespace {

using at::Tensor;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

const qpeft::SmallLayerAbi* g_abi = nullptr;
PyObject* g_profiler = nullptr;          // torch.autograd.profiler (its _is_profiler_enabled)
PyObject* g_forced = nullptr;            // qpeft._dispatch._forced (use_backend's ContextVar)
PyObject* g_cpu_qlora = nullptr;         // qpeft.backends.cpu.qlora (PANEL_ELEMS, fp32_takes_bf16)
PyObject* g_graph_backward = nullptr;    // qpeft.autograd.layer_graph_backward (create_graph)
PyObject* g_panel_elems_name = nullptr;  // interned "PANEL_ELEMS"
PyObject* g_profiler_flag = nullptr;     // interned "_is_profiler_enabled"
// the autograd input standing in for an absent bias (never needs a gradient); never freed,
// so no tensor outlives libtorch at exit
Tensor* g_no_bias = nullptr;
c10::DispatchKeySet g_plain_keys;      // a plain dense CPU tensor's dispatch keys
c10::DispatchKeySet g_inference_keys;  // the same created in inference mode
c10::DispatchKeySet
    g_usual_included;  // the thread-local included keys, with and without inference mode

// Indices of plan's parts (qpeft/autograd.py small_layer_plan writes them in this order).
enum PlanPart { kOwner = 0, kGuards, kTensors, kInts, kScaling, kPlanSize };
enum TensorIdx {
  kPacked = 0,
  kAbsmax,
  kNestedAbsmax,
  kNestedCode,
  kOffset,
  kA,
  kB,
  kBias,
  kTensorCount
};
enum IntIdx {
  kN = 0,
  kK,
  kR,
  kBlocksize,
  kNestedBlocksize,
  kQuantType,
  kFwdMaxRows,
  kFwdMaxWork,
  kBwdMaxRows,
  kBwdMaxWork,
  kPackedLen,
  kAbsmaxLen,
  kNestedAbsmaxLen,
  kSmallMaxElems,     // W sizes the small kernels take (n k at most this)
  kGemvMaxRows,       // up to this M the fp32 forward is the GEMV (not the fused GEMM)
  kPanelsMinRows,     // at or above both of these the layer keeps oneDNN on decoded
  kPanelsMinWeights,  //   panels (backends/cpu/f32gemm.py use_for)
  kMergeRatio,        // the LoRA term merges into W when inner <= this * M (merges_lora)
  kPanelRows,         // rows of W per decoded panel (backends/cpu/qlora.py _panel_rows)
  kPanelKeptElems,    // panels up to this many elements reuse one buffer (_panel_buffer)
  kPanelElemsSet,     // backends/cpu/qlora.py PANEL_ELEMS when planned (-1: None)
  kBf16MinWork,       // fp32 x may compute in bf16 from this M N K on (fp32_may_take_bf16)
  kMaxExtraCols,      // ranks up to this ride in the fused GEMM's pass (f32gemm.MAX_EXTRA_COLS)
  kIntCount
};

// The frozen part of one call: what the kernels take besides x, A, B, bias. `scaling` is
// the adapter's (a Python float); the small kernels take it as fp32, the ATen products of
// the GEMM route as the double the Python path hands them.
struct Frozen {
  Tensor packed, absmax, nested_absmax, nested_code, offset;
  Tensor bias;
  int64_t n, k, r, blocksize, nested_blocksize, quant_type;
  double scaling;
  int64_t merge_ratio;
  int64_t panel_rows, panel_kept_elems;  // the panel route's (kPanelRows, kPanelKeptElems)
  int64_t max_extra_cols;                // the GEMM route's (kMaxExtraCols)
};

inline uintptr_t ptr(const Tensor& t) {
  return t.defined() ? reinterpret_cast<uintptr_t>(t.data_ptr()) : 0;
}
inline int64_t len(const Tensor& t) {
  return t.defined() ? t.numel() : 0;
}

void run_forward(const Frozen& f, const Tensor& x, int64_t m, const Tensor& a, const Tensor& b,
                 const Tensor& bias, const Tensor& y, const Tensor& xa) {
  g_abi->forward(ptr(x), x.numel(), m, f.n, f.k, ptr(f.packed), f.packed.numel(), ptr(f.absmax),
                 f.absmax.numel(), f.blocksize, static_cast<int>(f.quant_type),
                 ptr(f.nested_absmax), len(f.nested_absmax), ptr(f.nested_code), ptr(f.offset),
                 f.nested_blocksize, ptr(a), a.numel(), ptr(b), b.numel(), f.r,
                 static_cast<float>(f.scaling), 0, 0, ptr(bias), len(bias), 0, 0, ptr(y), y.numel(),
                 ptr(xa), len(xa), at::get_num_threads());
}

// The autograd nodes of a call with a gradient: QLoRAFunction's backward, for a call the
// small kernels serve (SmallQLoRABackward) or the fused GEMM does (GemmQLoRABackward,
// below). Both save the tensors QLoRAFunction saves (x as [M, K], A, B, the packed weight
// and its state, xa when B needs a gradient) as SavedVariables, so the same version-counter
// checks and "backward through the graph a second time" errors. Nodes of their own (as
// torch's generated backward functions are), not a torch::autograd::Function: that one's
// context map and per-input bookkeeping cost about as much again as the rest of the call.
struct QLoRANode : public torch::autograd::Node {
  SavedVariable x2_, a_, b_, packed_, absmax_, nested_absmax_, nested_code_, offset_, xa_;
  Frozen f{};  // the call's sizes and scaling; its tensors are the SavedVariables above
  int64_t m = 0;
  std::vector<int64_t> x_sizes;

  void save(const Frozen& call, const Tensor& x, const Tensor& x2, const Tensor& a, const Tensor& b,
            const Tensor& xa) {
    x2_ = SavedVariable(x2, false);
    a_ = SavedVariable(a, false);
    b_ = SavedVariable(b, false);
    packed_ = SavedVariable(call.packed, false);
    absmax_ = SavedVariable(call.absmax, false);
    nested_absmax_ = SavedVariable(call.nested_absmax, false);
    nested_code_ = SavedVariable(call.nested_code, false);
    offset_ = SavedVariable(call.offset, false);
    xa_ = SavedVariable(xa, false);
    f = call;
    f.packed = f.absmax = f.nested_absmax = f.nested_code = f.offset = f.bias = Tensor();
    m = x2.size(0);
    x_sizes = x.sizes().vec();
  }

  // f with the saved frozen tensors (unpacking checks their version counters)
  Frozen frozen() {
    Frozen w = f;
    w.packed = packed_.unpack();
    w.absmax = absmax_.unpack();
    w.nested_absmax = nested_absmax_.unpack();
    w.nested_code = nested_code_.unpack();
    w.offset = offset_.unpack();
    return w;
  }

  // The incoming gradient as the composed backward (_backward_composed) takes it:
  // grad_y.reshape(-1, n) in fp32, any strides; an undefined gradient is zeros, as
  // torch.autograd.Function materializes it.
  Tensor composed_dy(const variable_list& grads, const Tensor& x2) const {
    Tensor dy = grads[0].defined() ? grads[0].reshape({-1, f.n})
                                   : at::zeros({m, f.n}, x2.options().dtype(at::kFloat));
    return dy.scalar_type() == at::kFloat ? dy : dy.to(at::kFloat);
  }

  // The backward of a graph task with create_graph=True (grad mode on in the backward): the
  // kernels form no graph, so the gradients are computed by qpeft.autograd's
  // layer_graph_backward in differentiable torch ops, as QLoRAFunction's backward does
  // then (second-order gradients: gradient penalties, Hessian-vector products).
  variable_list graph_grads(const variable_list& grads) {
    const Tensor x2 = x2_.unpack(), a = a_.unpack(), b = b_.unpack();
    const Frozen w = frozen();
    const Tensor dy =
        grads[0].defined() ? grads[0] : at::zeros({m, f.n}, x2.options().dtype(at::kFloat));
    pybind11::gil_scoped_acquire gil;
    auto wrap = [](const Tensor& t) -> PyObject* {
      if (t.defined()) return THPVariable_Wrap(t);
      Py_RETURN_NONE;
    };
    PyObject* args[] = {wrap(dy),
                        wrap(x2),
                        wrap(a),
                        wrap(b),
                        wrap(w.packed),
                        wrap(w.absmax),
                        wrap(w.nested_absmax),
                        wrap(w.nested_code),
                        wrap(w.offset),
                        PyLong_FromLongLong(w.blocksize),
                        PyLong_FromLongLong(w.nested_blocksize),
                        PyLong_FromLongLong(w.quant_type),
                        PyLong_FromLongLong(w.n),
                        PyLong_FromLongLong(w.k),
                        PyFloat_FromDouble(w.scaling),
                        PyBool_FromLong(task_should_compute_output(0)),
                        PyBool_FromLong(task_should_compute_output(1)),
                        PyBool_FromLong(task_should_compute_output(2)),
                        PyBool_FromLong(task_should_compute_output(3))};
    constexpr size_t nargs = sizeof(args) / sizeof(args[0]);
    PyObject* res = nullptr;
    if (std::all_of(args, args + nargs, [](PyObject* o) { return o != nullptr; }))
      res = PyObject_Vectorcall(g_graph_backward, args, nargs, nullptr);
    for (PyObject* o : args) Py_XDECREF(o);
    if (res == nullptr || !PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 4) {
      if (res != nullptr) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_RuntimeError, "qpeft: layer_graph_backward must return 4 gradients");
      }
      python_error err;
      err.persist();
      throw err;
    }
    variable_list out(4);
    for (Py_ssize_t i = 0; i < 4; ++i) {
      PyObject* g = PyTuple_GET_ITEM(res, i);
      if (g != Py_None) out[i] = THPVariable_Unpack(g);
    }
    Py_DECREF(res);
    if (out[0].defined()) out[0] = out[0].reshape(x_sizes);
    return out;
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* v :
         {&x2_, &a_, &b_, &packed_, &absmax_, &nested_absmax_, &nested_code_, &offset_, &xa_})
      v->reset_data();
  }
};

struct SmallQLoRABackward final : public QLoRANode {
  std::string name() const override { return "SmallQLoRABackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (c10::GradMode::is_enabled()) return graph_grads(grads);  // create_graph=True
    const Tensor x2 = x2_.unpack(), a = a_.unpack(), b = b_.unpack(), xa = xa_.unpack();
    const Frozen w = frozen();
    const int64_t n = w.n, k = w.k, r = w.r;
    const bool need_dx = task_should_compute_output(0), need_da = task_should_compute_output(1),
               need_db = task_should_compute_output(2), need_dbias = task_should_compute_output(3);
    // as qpeft/backends/cpu/qlora.py _small_backward: dy contiguous fp32 [M, N]; an
    // undefined gradient is zeros, as torch.autograd.Function materializes it
    const Tensor dy = grads[0].defined() ? grads[0].reshape({-1, n}).to(at::kFloat).contiguous()
                                         : at::zeros({m, n}, x2.options().dtype(at::kFloat));
    const auto opts = dy.options();
    Tensor dx = need_dx ? at::empty({m, k}, opts) : Tensor();
    Tensor da = need_da ? at::empty({r, k}, opts) : Tensor();
    Tensor db = need_db ? at::empty({n, r}, opts) : Tensor();
    if (need_dx || need_da || need_db)
      g_abi->backward(ptr(dy), dy.numel(), need_da ? ptr(x2) : 0, need_da ? x2.numel() : 0, m, n, k,
                      ptr(w.packed), w.packed.numel(), ptr(w.absmax), w.absmax.numel(), w.blocksize,
                      static_cast<int>(w.quant_type), ptr(w.nested_absmax), len(w.nested_absmax),
                      ptr(w.nested_code), ptr(w.offset), w.nested_blocksize, ptr(a), a.numel(),
                      ptr(b), b.numel(), need_db ? ptr(xa) : 0, need_db ? len(xa) : 0, r,
                      static_cast<float>(w.scaling), 0, 0, 0, 0, ptr(dx), len(dx), ptr(da), len(da),
                      ptr(db), len(db));
    // dbias: torch's sum over the rows, as the reference and the Python path sum it
    Tensor dbias = need_dbias ? dy.sum(0) : Tensor();
    if (need_dx) dx = dx.view(x_sizes);
    return {dx, da, db, dbias};
  }
};

// y with its autograd node: next edges to x, A, B and the bias (or its stand-in).
Tensor forward_with_grad(const Frozen& f, const Tensor& x, int64_t m, const Tensor& a,
                         const Tensor& b, const Tensor& bias_input) {
  auto node = c10::make_intrusive<SmallQLoRABackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, a, b, bias_input));
  const bool need_db = node->should_compute_output(2);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = f.n;
  Tensor y = at::empty(out_sizes, x.options());
  Tensor xa = need_db ? at::empty({m, f.r}, x.options()) : Tensor();
  run_forward(f, x, m, a, b, f.bias, y, xa);
  node->save(f, x, x.dim() == 2 ? x : x.view({m, f.k}), a, b, xa);
  torch::autograd::set_history(y, node);
  return y;
}

// --- The fused-GEMM route ---------------------------------------------------------------
// The calls the Python path serves with the fused fp32 GEMM (backends/cpu/qlora.py:
// qlora_linear's f32gemm branch and _backward_composed with its add_dy_w, at the avx2
// level): the same kernel calls and the same ATen ops, in the same order, on tensors of
// the same layouts, so the same bits.

// out (+)= x @ W'^T (dx: x @ W'), W' = W + l rr when l is defined; extra E: out2 = x @ E^T
// (dx: x @ E) in the same pass. x, l, rr, extra, out, out2 contiguous fp32.
void gemm(const Frozen& f, bool dx, const Tensor& x, const Tensor& l, const Tensor& rr,
          const Tensor& out, bool accumulate, const Tensor& extra, const Tensor& out2) {
  const bool nested = f.nested_absmax.defined();
  const int64_t rank = l.defined() ? l.size(1) : 0;
  const int64_t ne = extra.defined() ? extra.size(dx ? 1 : 0) : 0;
  g_abi->gemm_f32(dx, ptr(x), x.numel(), x.size(0), f.n, f.k, ptr(f.packed), f.packed.numel(),
                  ptr(f.absmax), f.absmax.numel(), f.blocksize, static_cast<int>(f.quant_type),
                  ptr(f.nested_absmax), len(f.nested_absmax), ptr(f.nested_code), ptr(f.offset),
                  nested ? f.nested_blocksize : 0, ptr(l), len(l), ptr(rr), len(rr), rank, ptr(out),
                  out.numel(), accumulate, ptr(extra), len(extra), ne, ptr(out2), len(out2), 0, 0,
                  at::get_num_threads());
}

// (s g)^T q [r, cols] (transpose_out: its transpose, [cols, r]) for g [m, r] of any strides
// and a contiguous q [m, cols]: the layer's dA = (s g)^T x and dB = ((s xa)^T dy)^T.
Tensor lora_grad(const Tensor& g, const Tensor& q, double scaling, bool transpose_out) {
  const int64_t m = g.size(0), r = g.size(1), cols = q.size(1);
  Tensor out =
      at::empty(transpose_out ? at::IntArrayRef{cols, r} : at::IntArrayRef{r, cols}, q.options());
  g_abi->lora_grad(ptr(g) /* the storage offset is in data_ptr */,
                   g.storage().nbytes() / 4 - g.storage_offset(), g.stride(0), g.stride(1), m, r,
                   scaling, ptr(q), q.numel(), cols, ptr(out), out.numel(), transpose_out,
                   at::get_num_threads());
  return out;
}

// qlora_linear's f32gemm branch for x [..., K] (x2: its [M, K] view): y [..., N] and, with
// want_xa, xa = x A^T [M, r] from the same pass over x (also computed when the LoRA term is
// not merged). Runs without recording autograd history, as Function.forward does.
std::pair<Tensor, Tensor> gemm_forward(const Frozen& f, const Tensor& x, const Tensor& x2,
                                       const Tensor& a, const Tensor& b, bool want_xa) {
  at::NoGradGuard no_grad;
  const int64_t m = x2.size(0);
  const bool merge = f.k <= f.merge_ratio * m;  // merges_lora(m, k)
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = f.n;
  Tensor y = at::empty(out_sizes, x.options());
  const Tensor y2 = x.dim() == 2 ? y : y.view({m, f.n});
  // xa rides in the pass when the rank fits the kernel's extra block, else (A x^T)^T
  const bool ride = (want_xa || !merge) && f.r <= f.max_extra_cols;
  Tensor xa = ride ? at::empty({m, f.r}, x.options()) : Tensor();
  gemm(f, false, x2, merge ? at::mul(b, f.scaling) : Tensor(), merge ? a : Tensor(), y2, false,
       ride ? a : Tensor(), xa);
  if ((want_xa || !merge) && !ride) xa = at::mm(a, x2.t()).t();
  if (!merge) y2.addmm_(at::mul(xa.t(), f.scaling).t(), b.t());
  if (f.bias.defined()) y2.add_(f.bias);
  return {y, want_xa ? xa : Tensor()};
}

// QLoRAFunction's backward for a call the fused GEMM serves (_backward_composed).
struct GemmQLoRABackward final : public QLoRANode {
  std::string name() const override { return "GemmQLoRABackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (c10::GradMode::is_enabled()) return graph_grads(grads);  // create_graph=True
    const Tensor x2 = x2_.unpack(), a = a_.unpack(), b = b_.unpack(), xa = xa_.unpack();
    const Frozen w = frozen();
    // what QLoRAFunction's ctx.needs_input_grad says: every input that requires a gradient,
    // whether or not this graph task asks for it (whether dx is computed decides how g =
    // dy B is, and so dA's bits)
    const bool need_dx = should_compute_output(0), need_da = should_compute_output(1),
               need_db = should_compute_output(2), need_dbias = should_compute_output(3);
    const int64_t n = w.n, k = w.k;
    const Tensor dy = composed_dy(grads, x2);
    Tensor dx, da, db, dbias, g_t;
    const bool merge = need_dx && n <= w.merge_ratio * m;  // merges_lora(m, n)
    if (need_dx && merge) {  // dy (W + (s B) A), g = dy B from the same pass over dy
      dx = at::empty({m, k}, dy.options());
      const bool ride = need_da && w.r <= w.max_extra_cols;  // else g by mm below
      Tensor g = ride ? at::empty({m, w.r}, dy.options()) : Tensor();
      gemm(w, true, dy.contiguous(), at::mul(b, w.scaling), a, dx, false, ride ? b : Tensor(), g);
      if (ride) g_t = g.t();
    }
    if (need_da || (need_dx && !merge)) {
      if (!g_t.defined()) g_t = at::mm(b.t(), dy.t());
      if (need_dx && !merge) {
        dx = at::mm(at::mul(g_t, w.scaling).t(), a);
        gemm(w, true, dy.contiguous(), Tensor(), Tensor(), dx, true, Tensor(), Tensor());
      }
      if (need_da) da = lora_grad(g_t.t(), x2.contiguous(), w.scaling, false);
    }
    if (need_db) db = lora_grad(xa, dy.contiguous(), w.scaling, true);
    if (need_dbias) dbias = dy.sum(0);
    if (need_dx) dx = dx.view(x_sizes);
    return {dx, da, db, dbias};
  }
};

// y with its autograd node Node (GemmQLoRABackward, PanelQLoRABackward) for a route whose
// forward(f, x, x2, a, b, want_xa) gives (y, xa): next edges to x, A, B and the bias (or
// its stand-in).
template <class Node, class Forward>
Tensor route_forward_with_grad(Forward forward, const Frozen& f, const Tensor& x, int64_t m,
                               const Tensor& a, const Tensor& b, const Tensor& bias_input) {
  auto node = c10::make_intrusive<Node>();
  node->set_next_edges(torch::autograd::collect_next_edges(x, a, b, bias_input));
  const Tensor x2 = x.dim() == 2 ? x : x.view({m, f.k});
  auto [y, xa] = forward(f, x, x2, a, b, node->should_compute_output(2));
  node->save(f, x, x2, a, b, xa);
  torch::autograd::set_history(y, node);
  return y;
}

// --- The panel route ----------------------------------------------------------------------
// The calls the Python path serves with W decoded a panel of rows at a time for torch's
// fp32 GEMM (backends/cpu/qlora.py: qlora_linear's _base_panels branch, and
// _backward_composed with add_dy_w's panel loop, fused=False): below the avx2 level, at the
// AVX-512 levels, and at avx2 for large M and W together. The same decode kernel into one
// reused buffer per thread, the same ATen ops on the same views, in the same order.

thread_local Tensor t_panel_buffer;  // as _panel_buffer's thread-local fp32 buffer

// A buffer of numel fp32 elements: the thread's reused one, or (a panel larger than two
// regular ones: a W whose rows forbid aligned panels, decoded whole) one of its own.
Tensor panel_buffer(const Frozen& f, int64_t numel) {
  if (numel > f.panel_kept_elems) return at::empty({numel}, at::kFloat);
  if (!t_panel_buffer.defined() || t_panel_buffer.numel() < numel)
    t_panel_buffer = at::empty({numel}, at::kFloat);
  return t_panel_buffer.narrow(0, 0, numel);
}

// fn(r0, r1, panel) for each panel of rows [r0, r1) of W, decoded to fp32 [r1 - r0, k]
// (_decode_panels: a panel starts on a quantization block, and with double quantization
// on a block of nested absmax, so its codes and statistics are plain slices).
template <class Fn>
void for_each_panel(const Frozen& f, Fn&& fn) {
  const int64_t n = f.n, k = f.k, bs = f.blocksize, rows = std::min(f.panel_rows, n);
  const bool nested = f.nested_absmax.defined();
  Tensor buf = panel_buffer(f, rows * k);
  const auto* packed = static_cast<const uint8_t*>(f.packed.data_ptr());
  const auto* absmax = static_cast<const uint8_t*>(f.absmax.data_ptr());
  const int64_t absmax_item = nested ? 1 : 4;  // uint8 codes or fp32 absmax
  const int threads = at::get_num_threads();
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(n, r0 + rows);
    const int64_t e0 = r0 * k, count = (r1 - r0) * k;
    const int64_t b0 = e0 / bs, blocks = (count + bs - 1) / bs;
    const Tensor panel = buf.narrow(0, 0, count).view({r1 - r0, k});
    const int64_t codes = std::min((e0 + count + 1) / 2, f.packed.numel()) - e0 / 2;
    uintptr_t na = 0, nc = 0, off = 0;
    int64_t na_len = 0;
    if (nested) {
      const int64_t g0 = b0 / f.nested_blocksize;
      na = ptr(f.nested_absmax) + static_cast<uintptr_t>(g0) * 4;
      na_len = std::min((blocks + f.nested_blocksize - 1) / f.nested_blocksize,
                        f.nested_absmax.numel() - g0);
      nc = ptr(f.nested_code);
      off = ptr(f.offset);
    }
    g_abi->dequantize_4bit(reinterpret_cast<uintptr_t>(packed + e0 / 2), codes,
                           reinterpret_cast<uintptr_t>(absmax + b0 * absmax_item),
                           std::min(blocks, f.absmax.numel() - b0), count, bs,
                           static_cast<int>(f.quant_type), ptr(panel), 0 /* fp32 */, na, na_len, nc,
                           off, nested ? f.nested_blocksize : 0, threads);
    fn(r0, r1, panel);
  }
}

// x @ (W + l rr)^T (l undefined: x @ W^T) for x [M, K] fp32: _base_panels.
Tensor panels_forward(const Frozen& f, const Tensor& x2, const Tensor& l, const Tensor& rr) {
  Tensor base;
  for_each_panel(f, [&](int64_t r0, int64_t r1, const Tensor& w) {
    if (l.defined()) w.addmm_(l.narrow(0, r0, r1 - r0), rr);
    if (r0 == 0 && r1 == f.n) {
      base = at::linear(x2, w);
      return;
    }
    if (!base.defined()) base = at::empty({x2.size(0), f.n}, x2.options());
    base.narrow(1, r0, r1 - r0).copy_(at::linear(x2, w));
  });
  return base;
}

// acc (+)= dy @ (W + l rr) panel by panel (add_dy_w's panel loop); acc undefined: a new one.
Tensor panels_dx(const Frozen& f, const Tensor& dy, Tensor acc, const Tensor& l, const Tensor& rr) {
  for_each_panel(f, [&](int64_t r0, int64_t r1, const Tensor& w) {
    if (l.defined()) w.addmm_(l.narrow(0, r0, r1 - r0), rr);
    const Tensor dy_cols = dy.narrow(1, r0, r1 - r0);
    if (!acc.defined())
      acc = at::mm(dy_cols, w);
    else
      acc.addmm_(dy_cols, w);
  });
  return acc;
}

// qlora_linear's panel branch for x [..., K] (x2: its [M, K] view): y [..., N] and, with
// want_xa, xa = x A^T [M, r] (a transposed view of A x^T, as the Python path makes it).
std::pair<Tensor, Tensor> panel_forward(const Frozen& f, const Tensor& x, const Tensor& x2,
                                        const Tensor& a, const Tensor& b, bool want_xa) {
  at::NoGradGuard no_grad;
  const int64_t m = x2.size(0);
  const bool merge = f.k <= f.merge_ratio * m;  // merges_lora(m, k)
  Tensor y, xa;
  if (merge) {
    y = panels_forward(f, x2, at::mul(b, f.scaling), a);
    if (want_xa) xa = at::mm(a, x2.t()).t();
  } else {
    y = panels_forward(f, x2, Tensor(), Tensor());
    xa = at::mm(a, x2.t()).t();
    y.addmm_(at::mul(xa.t(), f.scaling).t(), b.t());
  }
  if (f.bias.defined()) y.add_(f.bias);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = f.n;
  return {x.dim() == 2 ? y : y.view(out_sizes), want_xa ? xa : Tensor()};
}

// QLoRAFunction's backward for a call the panels serve (_backward_composed, fused=False).
struct PanelQLoRABackward final : public QLoRANode {
  std::string name() const override { return "PanelQLoRABackward"; }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (c10::GradMode::is_enabled()) return graph_grads(grads);  // create_graph=True
    const Tensor x2 = x2_.unpack(), a = a_.unpack(), b = b_.unpack(), xa = xa_.unpack();
    const Frozen w = frozen();
    // every input that requires a gradient, as ctx.needs_input_grad (GemmQLoRABackward)
    const bool need_dx = should_compute_output(0), need_da = should_compute_output(1),
               need_db = should_compute_output(2), need_dbias = should_compute_output(3);
    const int64_t n = w.n;
    const Tensor dy = composed_dy(grads, x2);
    Tensor dx, da, db, dbias;
    const bool merge = need_dx && n <= w.merge_ratio * m;  // merges_lora(m, n)
    if (need_dx && merge) dx = panels_dx(w, dy, Tensor(), at::mul(b, w.scaling), a);
    if (need_da || (need_dx && !merge)) {
      const Tensor gs_t = at::mul(at::mm(b.t(), dy.t()), w.scaling);  // s (dy B)^T, [r, M]
      if (need_dx && !merge) dx = panels_dx(w, dy, at::mm(gs_t.t(), a), Tensor(), Tensor());
      if (need_da) da = at::mm(gs_t, x2);
    }
    if (need_db) db = at::mm(at::mul(xa.t(), w.scaling), dy).t().contiguous();
    if (need_dbias) dbias = dy.sum(0);
    if (need_dx) dx = dx.view(x_sizes);
    return {dx, da, db, dbias};
  }
};

bool plain_keys(const Tensor& t) {
  const c10::DispatchKeySet ks = t.key_set();
  return ks == g_plain_keys || ks == g_inference_keys;
}

// A held tensor still as the plan recorded it: plain dense CPU, contiguous, its dtype and
// exactly its element count (the kernels re-check every length before reading).
bool held_ok(const Tensor& t, at::ScalarType dtype, int64_t numel) {
  return t.defined() && plain_keys(t) && t.scalar_type() == dtype && t.is_contiguous() &&
         t.numel() == numel;
}

// QPEFT_CPU_COMPUTE (capability.compute_choice reads it on every call): fp32 compute is
// the default ("auto") and "fp32"; any other value takes the full path, which decides.
bool compute_is_fp32() {
  const char* v = std::getenv("QPEFT_CPU_COMPUTE");
  if (v == nullptr) return true;
  while (*v == ' ' || *v == '\t') ++v;
  if (*v == '\0') return true;
  const size_t len = std::strlen(v);
  auto is = [&](const char* word) {
    const size_t w = std::strlen(word);
    if (len < w || strncasecmp(v, word, w) != 0) return false;
    for (size_t i = w; i < len; ++i)
      if (v[i] != ' ' && v[i] != '\t' && v[i] != '\n') return false;
    return true;
  };
  return is("auto") || is("fp32");
}

// Something that must see the op (a profiler, a tracer, a mode, a transform), autocast,
// a forced backend or another compute mode: the full path serves the call.
bool observed_or_redirected() {
  if (at::autocast::is_autocast_enabled(at::kCPU)) return true;
  if (c10::impl::TorchDispatchModeTLS::stack_len() > 0) return true;
  if (at::impl::torch_function_mode_enabled()) return true;
  if (torch::jit::tracer::isTracing()) return true;
  const c10::impl::LocalDispatchKeySet tls = c10::impl::tls_local_dispatch_key_set();
  // functorch transforms, Python dispatch and friends include keys beyond the usual ones;
  // autocast and no_grad change none, inference mode only the excluded set
  if ((tls.included_ | g_usual_included) != g_usual_included) return true;
  PyObject* flag = PyObject_GetAttr(g_profiler, g_profiler_flag);
  if (flag == nullptr) return true;  // error set: reported by the caller
  const bool profiling = flag != Py_False;
  Py_DECREF(flag);
  if (profiling) return true;
  PyObject* forced = nullptr;
  if (PyContextVar_Get(g_forced, nullptr, &forced) < 0) return true;
  const bool is_forced = forced != nullptr && forced != Py_None;
  Py_XDECREF(forced);
  if (is_forced) return true;
  return !compute_is_fp32();
}

// guards: a flat tuple of (container, key, expected) triples; container is a dict, an
// object whose instance __dict__ is read now (so a module rebuilt by copy.deepcopy, whose
// __dict__ is a new dict, is checked where its attributes live), or None for the module
// called (so the plan, kept in that module's __dict__, holds no reference to it: no cycle).
bool guards_hold(PyObject* guards, PyObject* module) {
  const Py_ssize_t count = PyTuple_GET_SIZE(guards);
  for (Py_ssize_t i = 0; i + 2 < count; i += 3) {
    PyObject* container = PyTuple_GET_ITEM(guards, i);
    if (container == Py_None) container = module;
    PyObject* dict = container;
    if (!PyDict_CheckExact(container)) {
      dict = PyObject_GenericGetDict(container, nullptr);  // new reference
      if (dict == nullptr) {
        PyErr_Clear();
        return false;
      }
    } else {
      Py_INCREF(dict);
    }
    PyObject* got = PyDict_GetItemWithError(dict, PyTuple_GET_ITEM(guards, i + 1));
    Py_DECREF(dict);  // `got` is only compared, never dereferenced
    if (got != PyTuple_GET_ITEM(guards, i + 2)) {
      PyErr_Clear();
      return false;
    }
  }
  return true;
}

// What layer_call and linear_call read first: the plan's owner, guards, held tensors and
// ints (its parts kOwner .. kInts), as the plan recorded them. kStale: the caller returns
// NotImplemented (no Python error set); kError: a Python error is set.
enum class PlanRead { kOk, kStale, kError };
PlanRead read_plan(PyObject* plan, PyObject* module, Py_ssize_t plan_size, Tensor* held,
                   Py_ssize_t tensor_count, int64_t* iv, Py_ssize_t int_count) {
  // the owner is id(module) as an int: a plan copied with its module (copy.deepcopy)
  // names the original and is stale in the copy
  if (!PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != plan_size ||
      PyLong_AsVoidPtr(PyTuple_GET_ITEM(plan, kOwner)) != static_cast<void*>(module)) {
    PyErr_Clear();
    return PlanRead::kStale;
  }
  PyObject* guards = PyTuple_GET_ITEM(plan, kGuards);
  PyObject* tensors = PyTuple_GET_ITEM(plan, kTensors);
  PyObject* ints = PyTuple_GET_ITEM(plan, kInts);
  if (!PyTuple_CheckExact(guards) || !PyTuple_CheckExact(tensors) ||
      PyTuple_GET_SIZE(tensors) != tensor_count || !PyTuple_CheckExact(ints) ||
      PyTuple_GET_SIZE(ints) != int_count || !guards_hold(guards, module))
    return PlanRead::kStale;
  for (Py_ssize_t i = 0; i < int_count; ++i) {
    iv[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(ints, i));
    if (iv[i] == -1 && PyErr_Occurred()) return PlanRead::kError;
  }
  for (Py_ssize_t i = 0; i < tensor_count; ++i) {
    PyObject* t = PyTuple_GET_ITEM(tensors, i);
    if (t == Py_None) continue;
    if (!THPVariable_Check(t)) return PlanRead::kStale;
    held[i] = THPVariable_Unpack(t);
  }
  return PlanRead::kOk;
}

// The held packed weight and its state (packed, absmax, nested absmax, nested code,
// offset: the first five held tensors of either plan) and the bias, as recorded.
bool quant_and_bias_ok(const Tensor* held, int64_t packed_len, int64_t absmax_len,
                       int64_t nested_len, const Tensor& bias, int64_t n) {
  const bool nested = held[kNestedAbsmax].defined();
  if (!held_ok(held[kPacked], at::kByte, packed_len) ||
      !held_ok(held[kAbsmax], nested ? at::kByte : at::kFloat, absmax_len))
    return false;
  if (nested &&
      (!held_ok(held[kNestedAbsmax], at::kFloat, nested_len) ||
       !held_ok(held[kNestedCode], at::kFloat, 256) || !held_ok(held[kOffset], at::kFloat, 1)))
    return false;
  return !bias.defined() || (held_ok(bias, at::kFloat, n) && bias.dim() == 1 && bias.size(0) == n);
}

// backends/cpu/qlora.py fp32_takes_bf16(m, n, k): 1, 0, or -1 with a Python error set.
int takes_bf16(int64_t m, int64_t n, int64_t k) {
  PyObject* r =
      PyObject_CallMethod(g_cpu_qlora, "fp32_takes_bf16", "LLL", static_cast<long long>(m),
                          static_cast<long long>(n), static_cast<long long>(k));
  if (r == nullptr) return -1;
  const int takes = PyObject_IsTrue(r);
  Py_DECREF(r);
  return takes;
}

// Whether backends/cpu/qlora.py PANEL_ELEMS (tests set it) is what the plan's panel rows
// were computed from (planned: its value, -1 for None): 1, 0, or -1 with a Python error set.
int panel_elems_as_planned(int64_t planned) {
  PyObject* v = PyObject_GetAttr(g_cpu_qlora, g_panel_elems_name);
  if (v == nullptr) return -1;
  int64_t now = -1;
  if (v != Py_None) {
    now = PyLong_AsLongLong(v);
    if (now == -1 && PyErr_Occurred()) {
      Py_DECREF(v);
      return -1;
    }
  }
  Py_DECREF(v);
  return now == planned ? 1 : 0;
}

PyObject* layer_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "qpeft._C_layer.call(plan, module, x) takes 3 arguments");
    return nullptr;
  }
  if (g_abi == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "qpeft._C_layer.init() was not called");
    return nullptr;
  }
  PyObject *plan = args[0], *module = args[1], *xobj = args[2];
  int64_t iv[kIntCount];
  Tensor held[kTensorCount];
  switch (read_plan(plan, module, kPlanSize, held, kTensorCount, iv, kIntCount)) {
    case PlanRead::kStale:
      Py_RETURN_NOTIMPLEMENTED;
    case PlanRead::kError:
      return nullptr;
    case PlanRead::kOk:
      break;
  }
  const double scaling = PyFloat_AsDouble(PyTuple_GET_ITEM(plan, kScaling));
  if (scaling == -1.0 && PyErr_Occurred()) return nullptr;
  const int64_t n = iv[kN], k = iv[kK], r = iv[kR];
  const Tensor& bias = held[kBias];
  if (!quant_and_bias_ok(held, iv[kPackedLen], iv[kAbsmaxLen], iv[kNestedAbsmaxLen], bias, n) ||
      !held_ok(held[kA], at::kFloat, r * k) || held[kA].dim() != 2 || held[kA].size(0) != r ||
      held[kA].size(1) != k || !held_ok(held[kB], at::kFloat, n * r) || held[kB].dim() != 2 ||
      held[kB].size(0) != n || held[kB].size(1) != r)
    Py_RETURN_NOTIMPLEMENTED;

  // this call: x a plain contiguous fp32 CPU tensor [..., K], nothing observing
  if (!THPVariable_CheckExact(xobj)) Py_RETURN_NONE;
  const Tensor& x = THPVariable_Unpack(xobj);
  if (!plain_keys(x) || x.scalar_type() != at::kFloat || x.dim() < 1 || x.size(-1) != k ||
      !x.is_contiguous())
    Py_RETURN_NONE;
  const int64_t m = x.numel() / k;
  if (m < 1) Py_RETURN_NONE;
  if (observed_or_redirected()) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  const Tensor &a = held[kA], &b = held[kB];
  const bool grad =
      c10::GradMode::is_enabled() && (x.requires_grad() || a.requires_grad() || b.requires_grad() ||
                                      (bias.defined() && bias.requires_grad()));
  // the route the Python path takes for these sizes (backends/cpu/qlora.py): the small
  // kernels (forward and, with a gradient, backward), the fused GEMM, or neither (None)
  const int64_t nk = n * k;
  const int64_t work = m > std::numeric_limits<int64_t>::max() / std::max<int64_t>(nk, 1)
                           ? std::numeric_limits<int64_t>::max()
                           : m * nk;
  enum class Route { kSmall, kGemm, kPanels } route;
  if (nk <= iv[kSmallMaxElems] && m <= iv[kFwdMaxRows] && work <= iv[kFwdMaxWork]) {
    if (grad && (m > iv[kBwdMaxRows] || work > iv[kBwdMaxWork]))
      Py_RETURN_NONE;  // the small forward, then the composed backward
    route = Route::kSmall;
  } else if (m <= iv[kGemvMaxRows]) {
    Py_RETURN_NONE;  // the GEMV
  } else {
    if (work >= iv[kBf16MinWork]) {  // fp32 x of a large shape may compute in bf16 here
      const int bf16 = takes_bf16(m, n, k);
      if (bf16 < 0) return nullptr;
      if (bf16 > 0) Py_RETURN_NONE;  // the bf16 path
    }
    route = g_abi->gemm_f32_active() && !(m >= iv[kPanelsMinRows] && nk >= iv[kPanelsMinWeights])
                ? Route::kGemm
                : Route::kPanels;
    if (route == Route::kPanels) {
      const int same = panel_elems_as_planned(iv[kPanelElemsSet]);
      if (same < 0) return nullptr;
      if (same == 0) Py_RETURN_NOTIMPLEMENTED;  // other panels now: a new plan
    }
  }

  Frozen f{held[kPacked],
           held[kAbsmax],
           held[kNestedAbsmax],
           held[kNestedCode],
           held[kOffset],
           bias,
           n,
           k,
           r,
           iv[kBlocksize],
           iv[kNestedBlocksize],
           iv[kQuantType],
           scaling,
           iv[kMergeRatio],
           iv[kPanelRows],
           iv[kPanelKeptElems],
           iv[kMaxExtraCols]};
  Tensor y;
  // an autograd input must be a defined tensor: without a bias, a shared empty one that
  // needs no gradient stands in for it (the forward reads the bias from f)
  const Tensor& bias_input = bias.defined() ? bias : *g_no_bias;
  const Tensor x2 = x.dim() == 2 ? x : x.view({m, k});
  if (route == Route::kGemm) {
    y = grad ? route_forward_with_grad<GemmQLoRABackward>(gemm_forward, f, x, m, a, b, bias_input)
             : gemm_forward(f, x, x2, a, b, false).first;
  } else if (route == Route::kPanels) {
    y = grad ? route_forward_with_grad<PanelQLoRABackward>(panel_forward, f, x, m, a, b, bias_input)
             : panel_forward(f, x, x2, a, b, false).first;
  } else if (grad) {
    y = forward_with_grad(f, x, m, a, b, bias_input);
  } else {
    std::vector<int64_t> out_sizes = x.sizes().vec();
    out_sizes.back() = n;
    y = at::empty(out_sizes, x.options());
    run_forward(f, x, m, a, b, bias, y, Tensor());
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// linear_call(plan, module, x): a Linear4bit's inference call (qpeft/autograd.py
// linear_plan; docs/design.md, "Per-call overhead"): x a plain contiguous fp32, bf16 or
// fp16 CPU tensor of at most the GEMV's rows that needs no gradient (nor does the bias)
// gets y = the 4-bit GEMV + bias, as functional.linear_4bit computes it (x widened to fp32,
// the fp32 GEMV, add_ of the fp32 bias, one rounding to x's dtype); anything else None (the
// full path), a stale plan NotImplemented.
// The plan: (id(owner), guards, tensors (packed, absmax, nested absmax, nested code,
// offset, bias), ints), parts as enum PlanPart.
enum LinearTensor { kLinBias = kA, kLinTensorCount };
enum LinearInt {
  kLinN = 0,
  kLinK,
  kLinBlocksize,
  kLinNestedBlocksize,
  kLinQuantType,
  kLinPackedLen,
  kLinAbsmaxLen,
  kLinNestedAbsmaxLen,
  kLinGemvMaxRows,
  kLinIntCount
};

PyObject* linear_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError,
                    "qpeft._C_layer.linear_call(plan, module, x) takes 3 arguments");
    return nullptr;
  }
  if (g_abi == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "qpeft._C_layer.init() was not called");
    return nullptr;
  }
  PyObject *plan = args[0], *module = args[1], *xobj = args[2];
  int64_t iv[kLinIntCount];
  Tensor held[kLinTensorCount];
  switch (read_plan(plan, module, kInts + 1, held, kLinTensorCount, iv, kLinIntCount)) {
    case PlanRead::kStale:
      Py_RETURN_NOTIMPLEMENTED;
    case PlanRead::kError:
      return nullptr;
    case PlanRead::kOk:
      break;
  }
  const int64_t n = iv[kLinN], k = iv[kLinK];
  const Tensor& bias = held[kLinBias];
  if (!quant_and_bias_ok(held, iv[kLinPackedLen], iv[kLinAbsmaxLen], iv[kLinNestedAbsmaxLen], bias,
                         n))
    Py_RETURN_NOTIMPLEMENTED;

  if (!THPVariable_CheckExact(xobj)) Py_RETURN_NONE;
  const Tensor& x = THPVariable_Unpack(xobj);
  const at::ScalarType dtype = x.scalar_type();
  if (!plain_keys(x) || (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) ||
      x.dim() < 1 || x.size(-1) != k || !x.is_contiguous())
    Py_RETURN_NONE;
  const int64_t m = x.numel() / k;
  if (m < 1 || m > iv[kLinGemvMaxRows]) Py_RETURN_NONE;
  if (c10::GradMode::is_enabled() &&
      (x.requires_grad() || (bias.defined() && bias.requires_grad())))
    Py_RETURN_NONE;  // Linear4bitFunction's node: the full path
  if (observed_or_redirected()) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  // the GEMV in fp32 (x widened exactly), the bias added in fp32, one rounding to x's dtype
  const Tensor xf = dtype == at::kFloat ? x : x.to(at::kFloat);
  std::vector<int64_t> out_sizes = x.sizes().vec();
  out_sizes.back() = n;
  Tensor y = at::empty(out_sizes, xf.options());
  const Tensor &packed = held[kPacked], &absmax = held[kAbsmax];
  g_abi->gemv(ptr(xf), xf.numel(), m, n, k, ptr(packed), packed.numel(), ptr(absmax),
              absmax.numel(), iv[kLinBlocksize], static_cast<int>(iv[kLinQuantType]),
              ptr(held[kNestedAbsmax]), len(held[kNestedAbsmax]), ptr(held[kNestedCode]),
              ptr(held[kOffset]), iv[kLinNestedBlocksize], ptr(y), y.numel(),
              at::get_num_threads());
  if (bias.defined()) y.add_(bias);
  if (dtype != at::kFloat) y = y.to(dtype);
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// init(abi_capsule, torch.autograd.profiler, qpeft._dispatch._forced,
//      qpeft.backends.cpu.qlora, qpeft.autograd.layer_graph_backward)
PyObject* layer_init(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_SetString(PyExc_TypeError, "qpeft._C_layer.init takes 5 arguments");
    return nullptr;
  }
  auto* abi = static_cast<const qpeft::SmallLayerAbi*>(
      PyCapsule_GetPointer(args[0], qpeft::kSmallLayerAbiName));
  if (abi == nullptr) return nullptr;
  if (abi->version != qpeft::kSmallLayerAbiVersion) {
    PyErr_Format(PyExc_RuntimeError,
                 "qpeft._C_layer: qpeft._C exports small-layer ABI version %d, this module "
                 "needs %d (rebuild qpeft)",
                 abi->version, qpeft::kSmallLayerAbiVersion);
    return nullptr;
  }
  if (!PyContextVar_CheckExact(args[2])) {
    PyErr_SetString(PyExc_TypeError, "qpeft._C_layer.init: the third argument is a ContextVar");
    return nullptr;
  }
  if (!PyModule_Check(args[3])) {
    PyErr_SetString(PyExc_TypeError, "qpeft._C_layer.init: the fourth argument is a module");
    return nullptr;
  }
  if (!PyCallable_Check(args[4])) {
    PyErr_SetString(PyExc_TypeError, "qpeft._C_layer.init: the fifth argument is a callable");
    return nullptr;
  }
  Py_INCREF(args[1]);
  Py_INCREF(args[2]);
  Py_INCREF(args[3]);
  Py_INCREF(args[4]);
  Py_XSETREF(g_profiler, args[1]);
  Py_XSETREF(g_forced, args[2]);
  Py_XSETREF(g_cpu_qlora, args[3]);
  Py_XSETREF(g_graph_backward, args[4]);
  if (g_panel_elems_name == nullptr) g_panel_elems_name = PyUnicode_InternFromString("PANEL_ELEMS");
  if (g_profiler_flag == nullptr)
    g_profiler_flag = PyUnicode_InternFromString("_is_profiler_enabled");
  {
    c10::InferenceMode guard(false);  // init may run inside an inference_mode block
    g_plain_keys = at::empty({0}, at::kFloat).key_set();
    if (g_no_bias == nullptr) g_no_bias = new Tensor(at::empty({0}, at::kFloat));
    g_usual_included = c10::impl::tls_local_dispatch_key_set().included_;
  }
  {
    c10::InferenceMode guard;
    g_inference_keys = at::empty({0}, at::kFloat).key_set();
    g_usual_included = g_usual_included | c10::impl::tls_local_dispatch_key_set().included_;
  }
  g_abi = abi;
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(layer_call)), METH_FASTCALL,
     "call(plan, module, x): y, None (not served here) or NotImplemented (stale plan)"},
    {"linear_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(linear_call)),
     METH_FASTCALL,
     "linear_call(plan, module, x): a Linear4bit's y, None (not served here) or NotImplemented"},
    {"init", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(layer_init)), METH_FASTCALL,
     "init(abi_capsule, profiler_module, forced_backend_var, cpu_qlora_module, graph_backward)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                          "_C_layer",
                          "qpeft's small-layer call in C++ (docs/design.md, \"Per-call overhead\")",
                          -1,
                          methods,
                          nullptr,
                          nullptr,
                          nullptr,
                          nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C_layer() {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "torch_version", QPEFT_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "abi_version", qpeft::kSmallLayerAbiVersion) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
