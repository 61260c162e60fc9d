"""Graph-replay time of one sketched_linear fwd+bwd in four call forms, torch and cuda backends."""
import math, statistics, sys
import torch
import panther, panther.ops
from panther.backends.registry import load_backend

torch.set_float32_matmul_precision("high")
def ev(): return torch.cuda.Event(enable_timing=True)
for T, I, dtype in [(128, 1024, torch.float32), (128, 2048, torch.float32), (128, 1024, torch.bfloat16)]:
    new = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)
    r = lambda s: ((torch.randint(0, 2, s, device="cuda") * 2 - 1).to(dtype) / 8)
    x, S1, S2, b = new(T, I).requires_grad_(), (new(1, I, 64) / 32).requires_grad_(), (new(1, 64, I) / 8).requires_grad_(), (new(I) * .1).requires_grad_()
    U1, U2 = r((1, 64, I)), r((1, I, 64))
    args, leaves, g = (x, S1, S2, U1, U2, b), [x, S1, S2, b], new(T, I)
    print(f"T={T} I={I} {dtype}")
    for n in ["torch", "cuda", "triton"]:
        be = load_backend(n)
        forms = {
            "direct+grad(ones)": lambda: torch.autograd.grad(be.sketched_linear(*args), leaves, torch.ones(T, I, device="cuda", dtype=dtype)),
            "direct+grad(g)": lambda: torch.autograd.grad(be.sketched_linear(*args), leaves, g),
            "ops+grad(g)": lambda: torch.autograd.grad(panther.ops.sketched_linear(*args, backend=n), leaves, g),
            "ops+backward(g)": lambda: panther.ops.sketched_linear(*args, backend=n).backward(g),
            "direct+backward(g)": lambda: be.sketched_linear(*args).backward(g),
        }
        res = {}
        for name, fn in forms.items():
            def reset():
                for t in leaves: t.grad = None
            s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3): reset(); fn()
            torch.cuda.current_stream().wait_stream(s)
            reset()
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                fn()
            one = []
            for _ in range(40):
                torch.cuda.synchronize(); a, c = ev(), ev(); a.record(); gr.replay(); c.record(); torch.cuda.synchronize()
                one.append(a.elapsed_time(c))
            res[name] = statistics.median(one)
            del gr
        print(f"  {n:7s} " + "  ".join(f"{k} {v:.4f}" for k, v in res.items()))
