"""A small forward+backward of each CUDA op, for compute-sanitizer (memcheck, racecheck)."""
import torch

import polykern

assert polykern.cuda_available(), "needs a GPU and the compiled extension"
torch.manual_seed(0)
for cls, cfg in ((polykern.PeraLinear, {"terms": "full"}), (polykern.PeraLinear,
                 {"terms": "cross"}), (polykern.GenLoraLinear, {"num_rbf": 9, "latent_dim": 2})):
    for dtype in (torch.float32, torch.bfloat16):
        layer = cls(37, 53, r=5, device="cuda", dtype=dtype, **cfg)
        with torch.no_grad():
            for p in layer.adapter_parameters():
                p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(3, 7, 37, device="cuda", dtype=dtype, requires_grad=True)
        layer(x).float().square().sum().backward()
torch.cuda.synchronize()
print("sanitize case ran")
