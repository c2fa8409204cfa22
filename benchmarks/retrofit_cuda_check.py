"""Both retrofit recipes on the toy base on a CUDA GPU (bf16 autocast): a check that the GPU path trains.

    python benchmarks/retrofit_cuda_check.py     # prints one line per recipe (results: docs/results/retrofit-cuda.md)
"""
import time, json
from pathlib import Path
import kvshrink
from kvshrink.train.toy import build_toy_base, SEQ
from kvshrink.train.retrofit import RetrofitConfig, retrofit
tmp = Path("/tmp/toy"); base = build_toy_base(tmp / "base")
for train in ("all", "adapter"):
    cfg = RetrofitConfig(model=str(base), out=str(tmp / train), target_cr=4, window=8, steps=200, data=str(tmp / "train.txt"), batch_size=4, seq_len=SEQ, train=train, lr=1e-3, save_every=200, device="cuda")
    t = time.time(); last = retrofit(cfg, progress=False)
    m, tok = kvshrink.load(tmp / train, device="cuda")
    held = tok((tmp / "heldout.txt").read_text())["input_ids"]
    from kvshrink.generation import generate_ids
    from kvshrink.policies import DMSPolicy
    _, st, _ = generate_ids(m, [held[i*256:(i+1)*256] for i in range(8)], DMSPolicy(8), max_new_tokens=16)
    print(train, "cuda bf16 retrofit", round(time.time()-t,1), "s; last", json.dumps(last), "reads CR", st["compression_ratio"], "dtype", next(m.parameters()).dtype)
