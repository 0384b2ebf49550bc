// ONNX Runtime custom op ARM (domain armquant, opset 1): a CPU kernel and, when the library
// carries the CUDA kernel, a CUDAExecutionProvider kernel of the same name.
//
// Built against the ONNX Runtime 1.21 API headers only: the API table comes from the OrtApiBase
// passed to RegisterCustomOps (ORT_API_MANUAL_INIT), so the library loads into any
// onnxruntime >= 1.21. C++ exceptions never cross the C boundary: they become OrtStatus.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "arm_internal.h"
#include "onnxruntime_cxx_api.h"

namespace {

const char* kDomain = "armquant";

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    default: return "a type other than float32, float16 or bfloat16";
  }
}

// A float as Python prints it (shortest round trip), for messages.
std::string num(float v) {
  char buf[48];
  int precision = 1;
  for (; precision < 9; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtof(buf, nullptr) == v) break;
  }
  // Whole digits in full (150, not 1.5e+02).
  const double magnitude = std::fabs(static_cast<double>(v));
  if (magnitude >= 1.0 && magnitude < 1e15) precision = std::max(precision, static_cast<int>(std::log10(magnitude)) + 1);
  std::snprintf(buf, sizeof buf, "%.*g", precision, v);
  return buf;
}

struct InvalidArgument : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Attributes, with the spec's names and defaults, checked as ARMConfig checks them.
armq_attrs read_attributes(const OrtApi& api, const OrtKernelInfo* info) {
  auto get_float = [&](const char* name, float fallback) {
    float value = fallback;
    if (OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, &value)) {
      api.ReleaseStatus(st);
      int64_t as_int;
      if (OrtStatus* st2 = api.KernelInfoGetAttribute_int64(info, name, &as_int)) {
        api.ReleaseStatus(st2);
        size_t size = 0;
        if (OrtStatus* st3 = api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
          api.ReleaseStatus(st3);
          return fallback;  // absent
        }
      }
      throw InvalidArgument(std::string("ARM attribute ") + name + " must be a float attribute; got another type");
    }
    if (!std::isfinite(value)) throw InvalidArgument(std::string("ARM attribute ") + name + " must be a finite number");
    return value;
  };
  auto get_string = [&](const char* name, const char* fallback) -> std::string {
    size_t size = 0;
    if (OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size)) {
      api.ReleaseStatus(st);
      float f;
      int64_t i;
      OrtStatus* sf = api.KernelInfoGetAttribute_float(info, name, &f);
      OrtStatus* si = api.KernelInfoGetAttribute_int64(info, name, &i);
      const bool absent = sf && si;
      if (sf) api.ReleaseStatus(sf);
      if (si) api.ReleaseStatus(si);
      if (absent) return fallback;
      throw InvalidArgument(std::string("ARM attribute ") + name + " must be a string attribute; got another type");
    }
    std::string out(size, '\0');
    Ort::ThrowOnError(api.KernelInfoGetAttribute_string(info, name, &out[0], &size));
    out.resize(std::strlen(out.c_str()));
    return out;
  };

  armq_attrs a{};
  a.c = get_float("c", 0.13f);
  a.p1 = get_float("p1", 99.5f);
  a.k = get_float("k", 1.0f);
  a.pmin = get_float("pmin", 0.02f);
  a.pmax = get_float("pmax", 0.25f);
  a.kappa = get_float("kappa", 1.4826f);
  if (!(a.p1 >= 0.0f && a.p1 <= 100.0f))
    throw InvalidArgument("ARM attribute p1=" + num(a.p1) + " must lie in [0, 100] (it is a percentile)");
  if (!(a.pmin >= 0.0f && a.pmax <= 1.0f && a.pmin <= a.pmax))
    throw InvalidArgument("ARM attributes pmin=" + num(a.pmin) + ", pmax=" + num(a.pmax) +
                          " must satisfy 0 <= pmin <= pmax <= 1");
  if (a.c < 0.0f || a.k < 0.0f || a.kappa < 0.0f)
    throw InvalidArgument("ARM attributes c, k and kappa must be >= 0; got c=" + num(a.c) +
                          ", k=" + num(a.k) + ", kappa=" + num(a.kappa));

  const std::string share = get_string("share", "mad");
  if (share != "mad" && share != "fixed")
    throw InvalidArgument("ARM attribute share='" + share + "' must be 'mad' or 'fixed'");
  a.share_fixed = share == "fixed";
  const std::string percentile_of = get_string("percentile_of", "signed");
  if (percentile_of != "signed" && percentile_of != "abs")
    throw InvalidArgument("ARM attribute percentile_of='" + percentile_of + "' must be 'signed' or 'abs'");
  a.percentile_abs = percentile_of == "abs";
  const std::string scope = get_string("scope", "sequence");
  if (scope == "tensor") a.scope = ARMQ_SCOPE_TENSOR;
  else if (scope == "sequence") a.scope = ARMQ_SCOPE_SEQUENCE;
  else if (scope == "token") a.scope = ARMQ_SCOPE_TOKEN;
  else throw InvalidArgument("ARM attribute scope='" + scope + "' must be 'tensor', 'sequence' or 'token'");

  int64_t seed = 0;
  if (OrtStatus* st = api.KernelInfoGetAttribute_int64(info, "seed", &seed)) {
    api.ReleaseStatus(st);
    float f;
    if (OrtStatus* sf = api.KernelInfoGetAttribute_float(info, "seed", &f)) {
      api.ReleaseStatus(sf);
      seed = 0;
    } else {
      throw InvalidArgument("ARM attribute seed must be an int attribute; got a float");
    }
  }
  if (seed < 0) throw InvalidArgument("ARM attribute seed=" + std::to_string(seed) + " must lie in [0, 2**63)");
  a.seed = static_cast<uint64_t>(seed);
  return a;
}

// The inputs of one call, checked: X [B, S, I] or [S, I]; mask, positions [B, S] (or [S]).
struct Call {
  armq_dtype dtype;
  std::vector<int64_t> shape;
  int64_t B, S, I;
  const void* x;
  const void* mask = nullptr;
  armq_mask_type mask_type = ARMQ_MASK_NONE;
  const int64_t* positions = nullptr;
};

Call check_inputs(Ort::KernelContext& ctx) {
  Call call;
  Ort::ConstValue x = ctx.GetInput(0);
  auto x_info = x.GetTensorTypeAndShapeInfo();
  const auto x_type = x_info.GetElementType();
  switch (x_type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: call.dtype = ARMQ_FLOAT32; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: call.dtype = ARMQ_FLOAT16; break;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: call.dtype = ARMQ_BFLOAT16; break;
    default:
      throw InvalidArgument(std::string("ARM input X must be float32, float16 or bfloat16; got ") + type_name(x_type));
  }
  call.shape = x_info.GetShape();
  if (call.shape.size() != 2 && call.shape.size() != 3)
    throw InvalidArgument("ARM input X must have shape [B, S, I] or [S, I]; got " + shape_text(call.shape));
  call.B = call.shape.size() == 3 ? call.shape[0] : 1;
  call.S = call.shape[call.shape.size() - 2];
  call.I = call.shape.back();
  call.x = x.GetTensorRawData();
  const std::vector<int64_t> token_shape =
      call.shape.size() == 3 ? std::vector<int64_t>{call.B, call.S} : std::vector<int64_t>{1, call.S};

  auto check_token_shape = [&](const char* name, const std::vector<int64_t>& shape) {
    const bool rank2_short = call.shape.size() == 2 && shape == std::vector<int64_t>{call.S};
    if (shape != token_shape && !rank2_short)
      throw InvalidArgument(std::string("ARM input ") + name + " must have shape " + shape_text(token_shape) +
                            " to match X " + shape_text(call.shape) + "; got " + shape_text(shape));
  };
  const size_t inputs = ctx.GetInputCount();
  if (inputs > 1) {
    Ort::ConstValue mask = ctx.GetInput(1);
    if (mask != nullptr) {
      auto info = mask.GetTensorTypeAndShapeInfo();
      const auto t = info.GetElementType();
      if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) call.mask_type = ARMQ_MASK_BOOL;
      else if (t == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) call.mask_type = ARMQ_MASK_INT64;
      else throw InvalidArgument(std::string("ARM input mask must be bool or int64 (an attention mask); got ") + type_name(t));
      check_token_shape("mask", info.GetShape());
      call.mask = mask.GetTensorRawData();
    }
  }
  if (inputs > 2) {
    Ort::ConstValue positions = ctx.GetInput(2);
    if (positions != nullptr) {
      auto info = positions.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64)
        throw InvalidArgument(std::string("ARM input positions must be int64 (position_ids); got ") +
                              type_name(info.GetElementType()));
      check_token_shape("positions", info.GetShape());
      call.positions = positions.GetTensorData<int64_t>();
    }
  }
  return call;
}

// armq::ParallelFor on ONNX Runtime's intra-op pool, through the kernel context.
struct OrtPool {
  const OrtApi* api;
  const OrtKernelContext* context;
};
void run_on_ort_pool(void* context, void (*fn)(void*, size_t), size_t n, void* data) {
  const OrtPool& pool = *static_cast<const OrtPool*>(context);
  // num_batch = n: each call its own task, so that n calls can run at once.
  if (OrtStatus* status = pool.api->KernelContext_ParallelFor(pool.context, fn, n, n, data)) {
    const std::string message = pool.api->GetErrorMessage(status);
    pool.api->ReleaseStatus(status);
    throw std::runtime_error("ARM: ONNX Runtime's thread pool failed: " + message);
  }
}

struct ArmKernel {
  ArmKernel(const OrtApi& api, const OrtKernelInfo* info, bool cuda) : api_(api), attrs_(read_attributes(api, info)), cuda_(cuda) {
    if (cuda_) Ort::ThrowOnError(api.KernelInfoGetAllocator(info, OrtMemTypeDefault, &device_allocator_));
  }
  ~ArmKernel() {
    if (device_allocator_) api_.ReleaseAllocator(device_allocator_);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Ort::KernelContext ctx(context);
      const Call call = check_inputs(ctx);
      Ort::UnownedValue y = ctx.GetOutput(0, call.shape);
      void* y_data = y.GetTensorMutableRawData();
      int code;
      if (!cuda_) {
        // The kernel's threads come from the session's intra-op pool: its workers spin for a
        // while after each op, and threads of the kernel's own would fight them for cores.
        OrtPool pool{&api_, context};
        const armq::ParallelFor parallel_for{run_on_ort_pool, &pool};
        code = armq::cpu_forward(call.dtype, call.x, y_data, call.B, call.S, call.I, call.mask, call.mask_type,
                                 call.positions, &attrs_, 0, &parallel_for);
      } else {
        void* stream = ctx.GetGPUComputeStream();
        const size_t bytes = armq_cuda_workspace_bytes(call.dtype, call.B, call.S, call.I, &attrs_);
        void* workspace = bytes ? device_allocator_->Alloc(device_allocator_, bytes) : nullptr;
        if (bytes && !workspace) return api_.CreateStatus(ORT_FAIL, "ARM: could not allocate the CUDA workspace");
        code = armq_cuda_forward(call.dtype, call.x, y_data, call.B, call.S, call.I, call.mask, call.mask_type,
                                 call.positions, &attrs_, workspace, bytes, stream);
        // The arena reuses this block only for work enqueued later on the same stream.
        if (workspace) device_allocator_->Free(device_allocator_, workspace);
      }
      if (code != ARMQ_OK) {
        return api_.CreateStatus(ORT_FAIL, (std::string("ARM kernel failed: ") + armq_error_string(code) + " (code " +
                                            std::to_string(code) + ", X " + shape_text(call.shape) + ")")
                                               .c_str());
      }
      return nullptr;
    } catch (const InvalidArgument& e) {
      return api_.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const Ort::Exception& e) {
      return api_.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api_.CreateStatus(ORT_FAIL, (std::string("ARM: ") + e.what()).c_str());
    }
  }

 private:
  const OrtApi& api_;
  armq_attrs attrs_;
  bool cuda_;
  OrtAllocator* device_allocator_ = nullptr;
};

// Output type and shape are those of X (ONNX Runtime's own inference would take them from
// the last input whose type is open, which can be the mask).
OrtStatusPtr ORT_API_CALL infer_like_x(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;
  // The context owns `info`: not released here.
  if (OrtStatusPtr st = api.ShapeInferContext_GetInputTypeShape(ctx, 0, &info)) return st;
  return api.ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
}

struct ArmOp : Ort::CustomOpBase<ArmOp, ArmKernel, true> {
  explicit ArmOp(bool cuda) : cuda_(cuda) { OrtCustomOp::InferOutputShapeFn = infer_like_x; }

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new ArmKernel(api, info, cuda_);
      return nullptr;
    } catch (const InvalidArgument& e) {
      return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    } catch (const Ort::Exception& e) {
      return api.CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_FAIL, (std::string("ARM: ") + e.what()).c_str());
    }
  }

  const char* GetName() const { return "ARM"; }
  const char* GetExecutionProviderType() const { return cuda_ ? "CUDAExecutionProvider" : "CPUExecutionProvider"; }

  // X: float32/float16/bfloat16, mask: bool/int64 (checked in ComputeV2), positions: int64.
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; }

 private:
  bool cuda_;
};

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // Older than 1.21: the version-1 table can still report it.
    const OrtApi* v1 = api_base->GetApi(1);
    const std::string msg = std::string("libarmquant_ort needs onnxruntime >= 1.21; this is ") + api_base->GetVersionString();
    return v1 ? v1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);
  // The ops outlive every session that uses them; one static instance each.
  static ArmOp cpu_op(false);
  static ArmOp cuda_op(true);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &cpu_op)) return st;
  if (armq_has_cuda()) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, &cuda_op)) return st;
  }
  // ONNX Runtime keeps using the domain for the life of the sessions; it is released with the
  // process (as in ONNX Runtime's own custom-op examples).
  static std::mutex lock;
  static std::vector<OrtCustomOpDomain*> domains;
  {
    std::lock_guard<std::mutex> guard(lock);
    domains.push_back(domain);
  }
  return api->AddCustomOpDomain(options, domain);
}
