// The experimental build of the fused adapter GEMMs (csrc/lora_gemm.cu): every variant
// registered as torch.ops.polykern_exp.* for bench/wgmma_gemm_check.py and
// bench/sm_partition_probe.py (built there with torch.utils.cpp_extension.load; not by setup.py,
// which builds csrc/lora_gemm.cu into the package without these ops).
#define POLYKERN_EXPERIMENTAL_OPS
#include "../lora_gemm.cu"
