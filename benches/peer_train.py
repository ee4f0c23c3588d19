"""Peak RSS and tokens/s of the peer's training step at a chosen batch, sequence length and
recurrence split, on SmolLM2-135M's shapes cut (4,8,4), random weights (AdamW, as perf_peer.py).
One setting per process, so ru_maxrss is that setting's peak.

usage: python peer_train.py THREADS BATCH SEQ NO_GRAD WITH_GRAD     (PYTHONPATH as perf_peer.py)
"""
import json, resource, sys, time
import torch
from raven.raven_config_minimal import RavenConfig
from raven.raven_modeling_minimal_llama import RavenForCausalLM

threads, batch, seq, n, k = (int(a) for a in sys.argv[1:6])
torch.set_num_threads(threads)
H, HEADS, KV, FF, V = 576, 9, 3, 1536, 49152
conf = RavenConfig(n_embd=H, n_heads=HEADS, n_layers=16, n_layers_in_prelude=4, n_layers_in_recurrent_block=8,
                   n_layers_in_coda=4, vocab_size=V, intermediate_size=FF, tie_embeddings=False, bias=False,
                   qk_bias=False, norm_eps=1e-5, rope_base=100000.0, mean_recurrence=4, mean_backprop_depth=8)
conf.num_key_value_heads, conf.head_dim, conf.rope_theta, conf.max_position_embeddings = KV, H // HEADS, 100000.0, 8192
conf.init_values["embed_scale"] = 1.0
torch.manual_seed(0)
m = RavenForCausalLM(conf)
m.train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-5)
ids = torch.randint(0, V, (batch, seq + 1))
def step():
    out = m(ids[:, :-1].contiguous(), labels=ids[:, 1:].contiguous(), num_steps=torch.tensor([n, k]))
    out.loss.backward(); opt.step(); opt.zero_grad()
step()
t = time.perf_counter()
step()
sec = time.perf_counter() - t
print(json.dumps({"batch": batch, "seq": seq, "no_grad": n, "with_grad": k,
                  "train_tok_s": batch * seq / sec,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
