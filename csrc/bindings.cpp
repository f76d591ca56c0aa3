// pybind11 module fastattn._C: exports only. The Python side checks tensors and passes data pointers as
// integers and the CUDA stream as an integer handle, so this module needs neither torch nor its ABI.
// Each launcher returns a cudaError_t code (0 = success); error_string() names it.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>
#include <vector>

#include <array>
#include <string>

#include "fastattn/attention.cuh"
#include "fastattn/norm.cuh"
#include "fastattn/posenc.cuh"

// Built twice: as fastattn._C against the CUDA runtime, and as fastattn._C_host against the host emulation
// (csrc/emulate), where the same launchers run the kernels on the CPU and check them as they run.
#if defined(FASTATTN_HOST_EMULATION)
#include "fastattn_emulate_host.h"
#define FASTATTN_MODULE _C_host
#else
#define FASTATTN_MODULE _C
#endif

namespace py = pybind11;
using fastattn::DType;
using Strides = std::array<int64_t, 3>;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

fastattn::Strides3 strides3(const Strides& s) { return {s[0], s[1], s[2]}; }

int norm_forward(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t mean, uintptr_t rstd,
                 int64_t rows, int64_t n, int64_t x_stride, int64_t y_stride, float eps, int dtype, int w_dtype,
                 bool rms, uintptr_t stream) {
  fastattn::NormParams p{ptr<const void>(x), ptr<const void>(weight), ptr<const void>(bias), ptr<void>(y),
                         ptr<float>(mean), ptr<float>(rstd), rows, n, x_stride, y_stride, eps,
                         static_cast<DType>(dtype), static_cast<DType>(w_dtype), rms};
  return static_cast<int>(fastattn::norm_forward(p, stream_of(stream)));
}

int norm_backward(uintptr_t x, uintptr_t weight, uintptr_t dy, uintptr_t dx, uintptr_t mean, uintptr_t rstd,
                  uintptr_t dw_partial, uintptr_t db_partial, int64_t rows, int64_t n, int64_t x_stride,
                  int64_t dy_stride, int64_t dx_stride, int64_t groups, int dtype, int w_dtype, bool rms,
                  uintptr_t stream) {
  fastattn::NormBwdParams p{ptr<const void>(x), ptr<const void>(weight), ptr<const void>(dy), ptr<void>(dx),
                            ptr<const float>(mean), ptr<const float>(rstd), ptr<float>(dw_partial),
                            ptr<float>(db_partial), rows, n, x_stride, dy_stride, dx_stride, groups,
                            static_cast<DType>(dtype), static_cast<DType>(w_dtype), rms};
  return static_cast<int>(fastattn::norm_backward(p, stream_of(stream)));
}

// The forward's parameters from Python: pointers (q, k, v, o, lse), strides of q, k, v, o, the sizes
// (z, h, hk, l, s, d), the scale, the visibility (offset, left, right, has_left, has_right), key padding
// (seqlens_k pointer, key_mask pointer and row stride), dropout (p, seed, offset) and the dtype code.
fastattn::AttentionParams attention_params(const py::tuple& ptrs, const std::array<Strides, 4>& st,
                                           const std::array<int, 6>& sizes, float scale,
                                           const std::array<int64_t, 3>& vis, const std::array<bool, 2>& sides,
                                           uintptr_t seqlens_k, uintptr_t key_mask, int64_t key_mask_stride,
                                           float dropout_p, uint64_t seed, uint32_t philox_offset, int dtype) {
  if (ptrs.size() != 5) throw py::value_error("attention: expected 5 pointers (q, k, v, o, lse)");
  fastattn::AttentionParams p{};
  p.q = ptr<const void>(ptrs[0].cast<uintptr_t>());
  p.k = ptr<const void>(ptrs[1].cast<uintptr_t>());
  p.v = ptr<const void>(ptrs[2].cast<uintptr_t>());
  p.o = ptr<void>(ptrs[3].cast<uintptr_t>());
  p.lse = ptr<float>(ptrs[4].cast<uintptr_t>());
  p.q_stride = strides3(st[0]);
  p.k_stride = strides3(st[1]);
  p.v_stride = strides3(st[2]);
  p.o_stride = strides3(st[3]);
  p.z = sizes[0], p.h = sizes[1], p.hk = sizes[2], p.l = sizes[3], p.s = sizes[4], p.d = sizes[5];
  p.scale = scale;
  p.vis = {vis[0], vis[1], vis[2], sides[0], sides[1]};
  p.seqlens_k = ptr<const int32_t>(seqlens_k);
  p.key_mask = ptr<const bool>(key_mask);
  p.key_mask_stride = key_mask_stride;
  p.dropout_p = dropout_p;
  p.seed = seed;
  p.philox_offset = philox_offset;
  p.dtype = static_cast<DType>(dtype);
  return p;
}

int attention_forward(const py::tuple& ptrs, const std::array<Strides, 4>& st, const std::array<int, 6>& sizes,
                      float scale, const std::array<int64_t, 3>& vis, const std::array<bool, 2>& sides,
                      uintptr_t seqlens_k, uintptr_t key_mask, int64_t key_mask_stride, float dropout_p,
                      uint64_t seed, uint32_t philox_offset, int dtype, uintptr_t stream) {
  const auto p = attention_params(ptrs, st, sizes, scale, vis, sides, seqlens_k, key_mask, key_mask_stride,
                                  dropout_p, seed, philox_offset, dtype);
  return static_cast<int>(fastattn::attention_forward(p, stream_of(stream)));
}

// The backward adds pointers (dout, delta, dq_accum, dq, dk, dv) and the strides of dout, dq, dk, dv.
int attention_backward(const py::tuple& ptrs, const std::array<Strides, 4>& st, const std::array<int, 6>& sizes,
                       float scale, const std::array<int64_t, 3>& vis, const std::array<bool, 2>& sides,
                       uintptr_t seqlens_k, uintptr_t key_mask, int64_t key_mask_stride, float dropout_p,
                       uint64_t seed, uint32_t philox_offset, int dtype, const std::array<uintptr_t, 6>& grads,
                       const std::array<Strides, 4>& grad_st, uintptr_t stream) {
  fastattn::AttentionBwdParams bp{};
  bp.fwd = attention_params(ptrs, st, sizes, scale, vis, sides, seqlens_k, key_mask, key_mask_stride, dropout_p,
                            seed, philox_offset, dtype);
  bp.dout = ptr<const void>(grads[0]);
  bp.delta = ptr<float>(grads[1]);
  bp.dq_accum = ptr<float>(grads[2]);
  bp.dq = ptr<void>(grads[3]);
  bp.dk = ptr<void>(grads[4]);
  bp.dv = ptr<void>(grads[5]);
  bp.do_stride = strides3(grad_st[0]);
  bp.dq_stride = strides3(grad_st[1]);
  bp.dk_stride = strides3(grad_st[2]);
  bp.dv_stride = strides3(grad_st[3]);
  return static_cast<int>(fastattn::attention_backward(bp, stream_of(stream)));
}

int sinusoidal_forward(uintptr_t x, uintptr_t y, uintptr_t freq, int64_t rows, int64_t l, int64_t d,
                       int64_t x_stride, int64_t y_stride, int64_t offset, float scale, int dtype, uintptr_t stream) {
  fastattn::SinusoidalParams p{ptr<const void>(x), ptr<void>(y), ptr<const double>(freq), rows, l, d, x_stride,
                               y_stride, offset, scale, static_cast<DType>(dtype)};
  return static_cast<int>(fastattn::sinusoidal_forward(p, stream_of(stream)));
}

int rotary_forward(uintptr_t x, uintptr_t y, uintptr_t pos, uintptr_t freq, int64_t rows, int64_t h, int64_t l,
                   int64_t e, int64_t rot, int64_t x_stride, int64_t y_stride, int64_t pos_stride, int64_t offset,
                   float sign, bool interleaved, int dtype, uintptr_t stream) {
  fastattn::RotaryParams p{ptr<const void>(x), ptr<void>(y), ptr<const int64_t>(pos), ptr<const double>(freq),
                           rows, h, l, e, rot, x_stride, y_stride, pos_stride, offset, sign, interleaved,
                           static_cast<DType>(dtype)};
  return static_cast<int>(fastattn::rotary_forward(p, stream_of(stream)));
}

py::dict runtime_info() {
  py::dict info;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  info["device_count"] = err == cudaSuccess ? count : 0;
  info["device_error"] = err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  info["runtime_version"] = runtime;
  info["archs"] = std::string(FASTATTN_CUDA_ARCHS);
  return info;
}

// Host runs of the kernels' shared logic, for tests on machines without a GPU.
py::bytes dropout_keep_host(uint64_t seed, uint32_t offset, uint32_t bh, int rows, int cols, float p) {
  std::string out(static_cast<size_t>(rows) * cols, '\0');
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j) out[size_t(i) * cols + j] = fastattn::dropout_keep(seed, offset, bh, i, j, p);
  return py::bytes(out);
}

py::tuple sincos_host(double pos, double freq) {
  float s, c;
  fastattn::sincos_reduced(pos, freq, &s, &c);
  return py::make_tuple(s, c);
}

}  // namespace

PYBIND11_MODULE(FASTATTN_MODULE, m) {
  m.doc() = "fastattn's CUDA kernels (framework-free launchers taking pointers and a stream)";
#if defined(FASTATTN_HOST_EMULATION)
  m.attr("emulated") = true;
  py::register_exception<fastattn_emu::EmulationError>(m, "EmulationError", PyExc_RuntimeError);
  m.def(
      "set_buffers",
      [](const std::vector<std::tuple<std::string, uintptr_t, uint64_t, bool>>& bufs) {
        std::vector<fastattn_emu::Buffer> out;
        for (const auto& [name, p, bytes, writable] : bufs) out.push_back({name, p, bytes, writable});
        fastattn_emu::set_buffers(std::move(out));
      },
      "The global buffers (name, pointer, bytes, writable) the next launches may access");
  m.def("stats", &fastattn_emu::stats, "Counts of what the emulator ran and checked");
#else
  m.attr("emulated") = false;
#endif
  m.def("norm_forward", &norm_forward, "Layer norm / RMSNorm forward; returns a cudaError_t code");
  m.def("norm_backward", &norm_backward, "Layer norm / RMSNorm backward with per-group dw/db partials");
  m.def("norm_row_threads", [](int dtype, int64_t n) { return fastattn::norm_row_threads(static_cast<DType>(dtype), n); });
  m.def("norm_bwd_max_n", [](int dtype) { return fastattn::norm_bwd_max_n(static_cast<DType>(dtype)); });
  m.def("norm_bwd_groups", &fastattn::norm_bwd_groups, "Row groups of the norm backward for a target count");
  m.def("attention_forward", &attention_forward, "Flash attention forward (mma.sync); returns a cudaError_t code");
  m.def("attention_backward", &attention_backward, "Flash attention backward; returns a cudaError_t code");
  m.def("sinusoidal_forward", &sinusoidal_forward, "x * scale + sinusoidal table; returns a cudaError_t code");
  m.def("rotary_forward", &rotary_forward, "Rotary embedding (sign -1: inverse); returns a cudaError_t code");
  m.def("error_string", [](int code) { return std::string(cudaGetErrorString(static_cast<cudaError_t>(code))); });
  m.def("runtime_info", &runtime_info, "Device count (or the error of asking), runtime version, compiled archs");
  m.def("dropout_keep_host", &dropout_keep_host, "Keep-mask bytes (rows x cols) of the kernels' dropout, on the host");
  m.def("sincos_host", &sincos_host, "sin, cos of pos * freq by the kernels' reduced series, on the host");
}
