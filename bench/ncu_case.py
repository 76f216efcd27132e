"""One training step of each adapted layer at the main benchmark shape (n = m = 4096, r = 16,
GenLoRA K = 32), for Nsight Compute: ncu --kernel-name regex:NAME python bench/ncu_case.py.
The generator kernels' cost does not depend on N, so N is small."""
import torch
import torch.nn as nn

import polykern


def main():
    dev, dt = "cuda", torch.bfloat16
    for cls, cfg in ((polykern.PeraLinear, {"r": 16}),
                     (polykern.GenLoraLinear, {"r": 16, "num_rbf": 32})):
        layer = cls.from_linear(nn.Linear(4096, 4096, bias=False, device=dev, dtype=dt), **cfg)
        with torch.no_grad():
            for p in layer.adapter_parameters():
                p.add_(torch.randn_like(p) * 0.02)
        x = torch.randn(64, 4096, device=dev, dtype=dt, requires_grad=True)
        for _ in range(2):
            layer(x).float().square().mean().backward()
    torch.cuda.synchronize()
    print("ncu case ran")


if __name__ == "__main__":
    main()
