import gc, weakref, torch
from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.sampling import SamplingParams
e = Engine(EngineConfig(model="moeserve/assets/default_model", device="cuda", max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory=64<<20))
e.generate([[1,2,3,4,5]], SamplingParams(max_tokens=4, temperature=0))
r = e.executor.runner
caches = [weakref.ref(t) for t in r.kv_caches.values()]
model = weakref.ref(r.model)
e.close()
gc.collect()
print("model alive:", model() is not None, "caches alive:", sum(c() is not None for c in caches), "/", len(caches))
t = next((c() for c in caches if c() is not None), None)
if t is not None:
    for ref in gc.get_referrers(t):
        print(type(ref), str(ref)[:200] if not isinstance(ref, dict) else list(ref.keys())[:10])
        for rr in gc.get_referrers(ref)[:5]:
            print("   <-", type(rr), str(rr)[:150] if not isinstance(rr, dict) else list(rr.keys())[:8])
m = model()
if m is not None:
    for ref in gc.get_referrers(m)[:10]:
        print("model <-", type(ref), str(ref)[:150] if not isinstance(ref, dict) else list(ref.keys())[:8])
print("allocated after close MiB:", torch.cuda.memory_allocated() / 2**20)
live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.is_cuda]
print("live cuda tensors:", len(live), "MiB:", sum(o.numel() * o.element_size() for o in live) / 2**20)
for o in sorted(live, key=lambda o: -o.numel() * o.element_size())[:5]:
    print(tuple(o.shape), o.dtype, [type(r).__name__ for r in gc.get_referrers(o)][:6])
    for r in gc.get_referrers(o)[:3]:
        if isinstance(r, dict):
            print("    dict keys", list(r.keys())[:8], [type(x).__name__ for x in gc.get_referrers(r)][:4])
