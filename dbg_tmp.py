import sys, torch
sys.path.insert(0, "tests"); sys.path.insert(0, "src")
import tiny
from specdec import Engine, SamplingParams
from specdec.batching import BatchStepper
from specdec.models.graph_decoder import GraphDecoder
from test_greedy_exactness import PROMPTS
dt = torch.float64
for tg, dg in ((True, True), (False, True), (True, False), (False, False)):
    target = GraphDecoder(tiny.llama(0, dtype=dt).cuda(), "s", dt, set(), 384, 256)
    draft = GraphDecoder(tiny.llama(0, dtype=dt).cuda(), "d", dt, set(), 384, 256)
    target._graphs, draft._graphs = tg, dg
    engine = Engine(target, drafter="model", draft_model=draft)
    params = [SamplingParams(max_new_tokens=30, num_draft_tokens=k) for k in (None, 2, 4, None, 1, 3)]
    alone = [engine.start(p, q).run().token_ids for p, q in zip(PROMPTS, params)]
    plain = [engine.start(p, SamplingParams(max_new_tokens=30, num_draft_tokens=0)).run().token_ids for p in PROMPTS]
    gens = [engine.start(p, q) for p, q in zip(PROMPTS, params)]
    st = BatchStepper(target)
    while not all(g.finished for g in gens):
        r = st.step([g for g in gens if not g.finished])
        assert not any(isinstance(x, BaseException) for x in r), r
    batch = [g.output().token_ids for g in gens]
    print("target graphs", tg, "draft graphs", dg, "alone==plain", alone == plain, "batch==plain", [b == p for b, p in zip(batch, plain)])
