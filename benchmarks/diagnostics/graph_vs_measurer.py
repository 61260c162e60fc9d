"""Device time of one backend call three ways: auto's Measurer (queued behind a sleep), a CUDA graph of
one call replayed from an idle device, and 20 back-to-back replays (steady state)."""
import math, statistics, sys, json
import torch
import panther
from panther.backends import autotune
from panther.backends.registry import load_backend

def build(T, I, L, k, dtype, dev="cuda"):
    new = lambda *s: torch.randn(*s, device=dev, dtype=dtype)
    r = lambda s: (torch.randint(0, 2, s, device=dev) * 2 - 1).to(dtype) / math.sqrt(k)
    return [new(T, I).requires_grad_(), (new(L, I, k) / math.sqrt(I)).requires_grad_(),
            (new(L, k, I) / math.sqrt(k)).requires_grad_(), r((L, k, I)), r((L, I, k)), (new(I) * .1).requires_grad_()]

def ev(): return torch.cuda.Event(enable_timing=True)

out = {}
for (T, I, dtype, tf32, grad) in [(128, 1024, torch.float32, True, True), (128, 2048, torch.float32, True, True),
                                  (4096, 2048, torch.bfloat16, False, False), (128, 1024, torch.bfloat16, False, True)]:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    args = build(T, I, 1, 64, dtype)
    names = ["torch", "triton", "cuda"]
    bes = [load_backend(n) for n in names]
    label = f"T={T} I={I} {dtype} tf32={tf32} {'fwd+bwd' if grad else 'fwd'}"
    rows = {}
    with torch.set_grad_enabled(grad):
        with autotune._runs_on_copies("sketched_linear", bes, torch.device("cuda"), tuple(args), {}) as runs:
            meas = [autotune.measurer.time(runs, torch.device("cuda")) for _ in range(3)]
            for n in names:
                run = runs[n]
                s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3): run()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    run()
                one = []
                for _ in range(30):
                    torch.cuda.synchronize(); a, b = ev(), ev(); a.record(); g.replay(); b.record(); torch.cuda.synchronize()
                    one.append(a.elapsed_time(b))
                many = []
                for _ in range(7):
                    torch.cuda.synchronize(); a, b = ev(), ev(); a.record()
                    for _ in range(20): g.replay()
                    b.record(); torch.cuda.synchronize(); many.append(a.elapsed_time(b) / 20)
                rows[n] = {"measurer_gpu_ms": [m[n].gpu_ms for m in meas], "measurer_eager_ms": [m[n].eager_ms for m in meas],
                           "graph_one_ms": statistics.median(one), "graph_20_ms": statistics.median(many),
                           "nodes": None}
                del g
    out[label] = rows
    print(label)
    for n, r in rows.items():
        print(f"  {n:7s} measurer gpu {[round(v,4) for v in r['measurer_gpu_ms']]} eager {[round(v,4) for v in r['measurer_eager_ms']]}"
              f"  graph one {r['graph_one_ms']:.4f}  graph x20 {r['graph_20_ms']:.4f}")
json.dump(out, open(sys.argv[1], "w"), indent=1)
