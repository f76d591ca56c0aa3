// pybind11 module fastattn._C: exports only. The Python side checks tensors and passes data pointers as
// integers and the CUDA stream as an integer handle, so this module needs neither torch nor its ABI.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

#include "fastattn/norm.cuh"

namespace py = pybind11;
using fastattn::DType;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

int norm_forward(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, uintptr_t mean, uintptr_t rstd,
                 int64_t rows, int64_t n, int64_t x_stride, int64_t y_stride, float eps, int dtype, int w_dtype,
                 bool rms, uintptr_t stream) {
  fastattn::NormParams p{ptr<const void>(x), ptr<const void>(weight), ptr<const void>(bias), ptr<void>(y),
                         ptr<float>(mean), ptr<float>(rstd), rows, n, x_stride, y_stride, eps,
                         static_cast<DType>(dtype), static_cast<DType>(w_dtype), rms};
  return static_cast<int>(fastattn::norm_forward(p, reinterpret_cast<cudaStream_t>(stream)));
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastattn's CUDA kernels (framework-free launchers taking pointers and a stream)";
  m.def("norm_forward", &norm_forward, "Layer norm / RMSNorm forward; returns a cudaError_t code");
  m.def("error_string", [](int code) { return std::string(cudaGetErrorString(static_cast<cudaError_t>(code))); });
  m.def("runtime_info", &runtime_info, "Device count (or the error of asking), runtime version, compiled archs");
}
