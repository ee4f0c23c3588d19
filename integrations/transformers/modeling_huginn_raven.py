"""The recurrent model `surgery` writes (model_type huginn_raven), in PyTorch for transformers.

`surgery apply`, `surgery heal` and `surgery export safetensors` write this file beside the
checkpoint's config.json, which names it in `auto_map`:

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    logits = model(ids, num_steps=4).logits

The forward is the one of surgery's runtime (src/model/ in the surgery repository), step for step:

    e = prelude(wte(ids))                                   # (B, T, h)
    s = s_0                                                 # zeros, or N(0, std) cut at 3 std
    repeat r times: s = core(adapter(cat([s, e], -1)))      # (B, T, 2h) @ (2h, h) -> (B, T, h)
    logits = lm_head(ln_f(coda(s)))                         # (B, T, V)

r is `num_steps` (default: the config's `mean_recurrence`). Without an adapter (`injection_type:
none`) s starts as e and the core is applied to it r times. Blocks are Llama's (pre-norm),
OLMo-2's (norms on the attention and MLP outputs, RMSNorm over the whole projected q and k),
Qwen2's (Llama's with a bias on the fused q, k, v projection) or Qwen3's (Llama's with RMSNorm
over each head of q and k, one [head_dim] weight shared by the heads, before RoPE); grouped-query
attention, rotate-half RoPE (with Llama-3 frequency scaling), SwiGLU. Tensor names are the
checkpoint's: transformer.wte, transformer.{prelude,core_block,coda}.{i}.{attn.Wqkv (rows of q,
k, v; Qwen2: with attn.Wqkv.bias), attn.proj, mlp.fc (rows of gate, up), mlp.proj, norm_1, norm_2
(Qwen3: and attn.q_norm, attn.k_norm) | attn.q_norm, attn.k_norm, post_attn_norm,
post_mlp_norm}, transformer.adapter [h, 2h] (columns 0..h read the state, h..2h the prelude
output), transformer.ln_f, lm_head.

No KV cache: `generate` runs the whole sequence again for every new token (correct, and slow for
long outputs; `surgery generate` and llama.cpp with surgery's patch keep a cache per recurrence).

Written for surgery, independently of the paper's code.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_huginn_raven import RavenConfig


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, computed in float32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        normed = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def inverse_frequencies(config):
    """The RoPE inverse frequencies of one head, in float32 as transformers' Llama computes them,
    with Llama-3 scaling when `rope_scaling` asks for it (its `_compute_llama3_parameters` rule)."""
    dim = config.head_dim
    theta = torch.tensor(float(config.rope_theta), dtype=torch.float32)
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
    old = float(scaling["original_max_position_embeddings"])
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    smooth = (old / wavelen - low) / (high - low)
    between = (1 - smooth) * inv / factor + smooth * inv
    scaled = torch.where(wavelen >= old / high, between, inv)
    return torch.where(wavelen > old / low, inv / factor, scaled)


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] over the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention over a fused [q | k | v] projection, RoPE on q and k."""

    def __init__(self, config):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.widths = (q, kv, kv)
        self.Wqkv = nn.Linear(config.n_embd, q + 2 * kv, bias=config.block_type == "qwen2")
        # OLMo-2 norms the whole projected q and k; Qwen3 each head of them.
        self.qk_norm = config.block_type == "olmo2"
        self.head_norm = config.block_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(q, config.norm_eps)
            self.k_norm = RMSNorm(kv, config.norm_eps)
        if self.head_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.proj = nn.Linear(q, config.n_embd, bias=False)

    def forward(self, x, cos, sin, bias):
        b, t, _ = x.shape
        # (B, T, h) @ (h, q + 2kv) -> (B, T, q + 2kv), split into q, k, v
        q, k, v = self.Wqkv(x).split(self.widths, dim=-1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # (B, T, heads * D) -> (B, heads, T, D)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        if self.head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # Query head i reads key-value head i // (heads / kv heads).
        group = self.n_heads // self.n_kv_heads
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        # softmax(q k^T / sqrt(D) + bias) v: (B, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # (B, H, T, D) -> (B, T, H * D) @ (q, h) -> (B, T, h)
        return self.proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)) over a fused [gate | up] projection."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x):
        # (B, T, h) -> (B, T, 2f) -> two (B, T, f) -> (B, T, h)
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class RavenBlock(nn.Module):
    """Llama, Qwen2, Qwen3: x += attn(norm_1(x)); x += mlp(norm_2(x)).
    OLMo-2: x += post_attn_norm(attn(x)); x += post_mlp_norm(mlp(x))."""

    def __init__(self, config):
        super().__init__()
        self.post_norms = config.block_type == "olmo2"
        self.attn = Attention(config)
        self.mlp = MLP(config)
        if self.post_norms:
            self.post_attn_norm = RMSNorm(config.n_embd, config.norm_eps)
            self.post_mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        else:
            self.norm_1 = RMSNorm(config.n_embd, config.norm_eps)
            self.norm_2 = RMSNorm(config.n_embd, config.norm_eps)

    def forward(self, x, cos, sin, bias):
        if self.post_norms:
            x = x + self.post_attn_norm(self.attn(x, cos, sin, bias))
            return x + self.post_mlp_norm(self.mlp(x))
        x = x + self.attn(self.norm_1(x), cos, sin, bias)
        return x + self.mlp(self.norm_2(x))


class RavenPreTrainedModel(PreTrainedModel):
    """Loading, saving and initialization of a recurrent checkpoint."""

    config_class = RavenConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["RavenBlock"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        # Only for tensors a checkpoint lacks; surgery's outputs have every one.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class RavenForCausalLM(RavenPreTrainedModel, GenerationMixin):
    """Prelude, core looped `num_steps` times through the adapter, coda, ln_f, lm_head."""

    def __init__(self, config):
        super().__init__(config)
        if config.tie_embeddings:
            raise ValueError(
                "tie_embeddings: true is not supported here; surgery's outputs store lm_head"
            )

        def blocks(n):
            return nn.ModuleList(RavenBlock(config) for _ in range(n))

        parts = dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            prelude=blocks(config.n_layers_in_prelude),
            core_block=blocks(config.n_layers_in_recurrent_block),
            coda=blocks(config.n_layers_in_coda),
            ln_f=RMSNorm(config.n_embd, config.norm_eps),
        )
        if config.injection_type == "linear":
            # (B, T, 2h) @ (2h, h) -> (B, T, h): columns 0..h read the state, h..2h the prelude.
            parts["adapter"] = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls):
        # No KV cache (the module docstring says why): generate() runs without one.
        return False

    def initial_state(self, like):
        """s_0 shaped like `like`: zeros for std 0, else N(0, std) redrawn beyond 3 std, as
        surgery's runtime draws it (from torch's generator here, so not the same numbers)."""
        std = self.config.state_std
        if std == 0:
            return torch.zeros_like(like)
        s = torch.randn(like.shape, device=like.device, dtype=torch.float32) * std
        while (outside := s.abs() > 3 * std).any():
            s[outside] = torch.randn(int(outside.sum()), device=like.device) * std
        return s.to(like.dtype)

    def frame(self, input_ids, attention_mask, position_ids, dtype):
        """RoPE cos and sin (B, 1, T, D) and the additive attention bias (B, 1, T, T) of a pass:
        causal, padding keys masked, and positions counting real tokens only, so a padded row
        gives its tokens the logits of the row run alone."""
        b, t = input_ids.shape
        device = input_ids.device
        allowed = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]
        if attention_mask is not None:
            mask = attention_mask.to(device=device, dtype=torch.long)
            allowed = allowed & mask[:, None, None, :].bool()
            if position_ids is None:
                position_ids = mask.cumsum(-1) - mask
        if position_ids is None:
            position_ids = torch.arange(t, device=device)[None].expand(b, t)
        # Half the dtype's lowest: finite after adding a score, so a row with no key allowed (a
        # padding query) stays finite, and its keys cannot poison the real rows with NaN.
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        bias = bias.masked_fill(~allowed, torch.finfo(dtype).min / 2)
        inv = inverse_frequencies(self.config).to(device)
        # (B, T, 1) * (D/2) -> (B, T, D/2); [freqs, freqs] -> (B, 1, T, D)
        freqs = position_ids.to(torch.float32)[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype), bias

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        num_steps=None,
        initial_state=None,
        past_key_values=None,
        use_cache=None,
        return_dict=None,
        **kwargs,
    ):
        """Logits (B, T, V) of `input_ids` (B, T) at recurrence r = `num_steps` (default: the
        config's `mean_recurrence`), from `initial_state` (B, T, h) when given; with `labels`,
        also the mean next-token cross-entropy (labels shifted inside, -100 ignored)."""
        if past_key_values is not None:
            raise ValueError("this model keeps no KV cache; call it without past_key_values")
        r = self.config.mean_recurrence if num_steps is None else int(num_steps)
        if r < 1:
            raise ValueError(f"num_steps {r}: the core runs at least once")
        t = self.transformer
        x = t.wte(input_ids)
        cos, sin, bias = self.frame(input_ids, attention_mask, position_ids, x.dtype)
        for block in t.prelude:
            x = block(x, cos, sin, bias)
        s = self.recur(x, r, initial_state, cos, sin, bias)
        for block in t.coda:
            s = block(s, cos, sin, bias)
        logits = self.lm_head(t.ln_f(s))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def recur(self, e, r, initial_state, cos, sin, bias):
        """The core looped r times on the prelude's output e (B, T, h): the last state."""
        t = self.transformer
        if "adapter" not in t:
            s = e
        elif initial_state is not None:
            s = initial_state.to(device=e.device, dtype=e.dtype)
        else:
            s = self.initial_state(e)
        for _ in range(r):
            if "adapter" in t:
                # state first: (B, T, 2h) @ (2h, h) -> (B, T, h)
                s = t.adapter(torch.cat((s, e), dim=-1))
            for block in t.core_block:
                s = block(s, cos, sin, bias)
        return s

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # The whole sequence at every step: there is no cache to continue from.
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if kwargs.get("num_steps") is not None:
            inputs["num_steps"] = kwargs["num_steps"]
        return inputs
