"""What a request joining a running batch costs the batch's step on CPU (#8), per backend.

The default model; seven running sequences (150 positions each) feed one token while a new
request brings a 120-token prompt. Medians of 7, three rounds, in ms:
  batch     the seven feeds alone
  apart     the prompt in a pass of its own, then the batch with the new sequence's last token
  together  one forward_batch holding the whole prompt and the seven feeds
Usage: python scripts/cpu_join_cost.py llama.cpp|torch
"""
import statistics, time, torch, specdec
import sys
engine = specdec.load(backend=sys.argv[1])
t = engine.target
engine.reserve_sequences(8)
g = torch.Generator().manual_seed(0)
running = [t.new_cache() for _ in range(7)]
for c in running:
    t.prefill(torch.randint(10, 1000, (150,), generator=g), c)
joiner = t.new_cache()
prompt = torch.randint(10, 1000, (120,), generator=g)
feeds = [torch.randint(10, 1000, (1,), generator=g) for _ in running]
def reset():
    for c in running: t.rewind(c, 150)
    t.rewind(joiner, 0)
def apart():
    t.prefill(prompt[:-1], joiner); t.forward_batch([prompt[-1:]] + feeds, [joiner] + running, [1] * 8)
def together():
    t.forward_batch([prompt] + feeds, [joiner] + running, [1] * 8)
def alone_batch():
    t.forward_batch(feeds, running, [1] * 7)
res = {}
for name, f in [("batch", alone_batch), ("apart", apart), ("together", together)] * 3:
    xs = []
    for _ in range(7):
        reset(); s = time.perf_counter(); f(); xs.append(time.perf_counter() - s)
    res.setdefault(name, []).append(statistics.median(xs) * 1e3)
for k, v in res.items(): print(k, [round(x, 1) for x in v])
