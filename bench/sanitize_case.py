"""A small forward+backward of each CUDA op, for compute-sanitizer (memcheck, racecheck)."""
import torch

from timing import require_gpu  # bench/ is this script's directory

require_gpu("sanitize_case.py")
import polykern  # noqa: E402

torch.manual_seed(0)
for cls, cfg in ((polykern.PeraLinear, {"terms": "full"}), (polykern.PeraLinear,
                 {"terms": "cross"}), (polykern.GenLoraLinear, {"num_rbf": 9, "latent_dim": 2})):
    for dtype in (torch.float32, torch.bfloat16):
        layer = cls(37, 53, r=5, device="cuda", dtype=dtype, **cfg)
        with torch.no_grad():
            for p in layer.adapter_parameters():
                p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(3, 7, 37, device="cuda", dtype=dtype, requires_grad=True)
        for _ in range(2):
            layer(x).float().square().sum().backward()
        # skinny GEMMs on the side stream, merged path and unmerged
        old = polykern.ops._option("side_stream", 2)
        for policy in ("always", "never"):
            with polykern.ops.merge_policy(policy):
                layer(x).float().square().sum().backward()
        polykern.ops._option("side_stream", old)
# the fused gY pass (csrc/gy_pass.cu): R = 16 and 8 (padded), partial tiles in both directions
for N, m, R in ((70, 136, 16), (300, 72, 8)):
    gy = torch.randn(N, m, device="cuda", dtype=torch.bfloat16)
    B = torch.randn(m, R, device="cuda", dtype=torch.bfloat16)
    U = torch.randn(N, R, device="cuda", dtype=torch.bfloat16)
    assert torch.ops.polykern._gy_pass_takes(gy, B, U)
    torch.ops.polykern._gy_pass(gy, B, U)
torch.cuda.synchronize()
print("sanitize case ran")
