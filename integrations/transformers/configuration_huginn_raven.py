"""The configuration of a recurrent checkpoint written by `surgery` (model_type huginn_raven).

`surgery apply`, `surgery heal` and `surgery export safetensors` write this file beside the
checkpoint's config.json, which names it in `auto_map`, so that
`AutoConfig.from_pretrained(DIR, trust_remote_code=True)` reads the config without any package of
ours installed. The keys are those of schemas/recurrent-config.schema.json in the surgery
repository: the published huginn_raven keys plus `block_type` and `injection_type`. Every key this
class does not name (the `surgery` record, `n_layers`, `bias`, ...) is kept as it is, so the config
saves back unchanged.

Written for surgery, independently of the paper's code (which it loads the same checkpoints as).
"""

from transformers import PretrainedConfig

# Kept in step with surgery's src/formats/hf_config.rs: its defaults for absent keys.
DEFAULT_MEAN_RECURRENCE = 32
DEFAULT_MEAN_BACKPROP_DEPTH = 8
DEFAULT_NORM_EPS = 1e-5
DEFAULT_ROPE_THETA = 10000.0
# sigma of the initial state when `init_values.std` is absent (the reference's, from Huginn).
REFERENCE_STATE_STD = 0.008703882797784892

BLOCK_TYPES = ("llama", "olmo2", "qwen2", "qwen3")
INJECTION_TYPES = ("linear", "none")


class RavenConfig(PretrainedConfig):
    """A prelude, a core looped r times through a linear adapter, a coda (surgery's layout).

    Sizes: `n_embd` (hidden), `n_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size`,
    `padded_vocab_size` (rows of `wte` and `lm_head`; `vocab_size` when absent). The cut:
    `n_layers_in_prelude`, `n_layers_in_recurrent_block`, `n_layers_in_coda`. Recurrence:
    `mean_recurrence` (the r a forward runs unless told otherwise), `init_values["std"]` (sigma of
    the initial state; 0 for a zero state). `block_type` is `llama` or `olmo2`; `injection_type`
    `linear` (the adapter) or `none` (the core applied to its own output, no adapter).
    """

    model_type = "huginn_raven"
    keys_to_ignore_at_inference = ["past_key_values"]
    # The names other tools look for, mapped to ours.
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "rms_norm_eps": "norm_eps",
    }
    # A plain attribute, so that newer transformers do not turn our `rope_scaling` key into their
    # `rope_parameters` (their base class makes `rope_scaling` a property): the key saves back as
    # it was read, and surgery reads it.
    rope_scaling = None

    def __init__(
        self,
        n_embd=4096,
        n_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        intermediate_size=11008,
        n_layers_in_prelude=2,
        n_layers_in_recurrent_block=4,
        n_layers_in_coda=2,
        mean_recurrence=DEFAULT_MEAN_RECURRENCE,
        mean_backprop_depth=DEFAULT_MEAN_BACKPROP_DEPTH,
        norm_eps=DEFAULT_NORM_EPS,
        rope_theta=None,
        rope_base=None,
        rope_scaling=None,
        vocab_size=32000,
        padded_vocab_size=None,
        tie_embeddings=False,
        block_type="llama",
        injection_type="linear",
        init_values=None,
        max_position_embeddings=None,
        n_layers=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type {block_type!r} is not one of {BLOCK_TYPES}")
        if injection_type not in INJECTION_TYPES:
            raise ValueError(f"injection_type {injection_type!r} is not one of {INJECTION_TYPES}")
        if head_dim is None:
            if n_embd % n_heads != 0:
                raise ValueError(f"n_embd {n_embd} is not divisible by {n_heads} heads")
            head_dim = n_embd // n_heads
        self.n_embd = n_embd
        self.n_heads = n_heads
        self.num_key_value_heads = n_heads if num_key_value_heads is None else num_key_value_heads
        if self.n_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"{n_heads} attention heads are not a multiple of "
                f"{self.num_key_value_heads} key-value heads"
            )
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.n_layers_in_prelude = n_layers_in_prelude
        self.n_layers_in_recurrent_block = n_layers_in_recurrent_block
        self.n_layers_in_coda = n_layers_in_coda
        self.n_layers = n_layers_in_prelude + n_layers_in_recurrent_block + n_layers_in_coda
        if n_layers is not None and n_layers != self.n_layers:
            raise ValueError(f"n_layers {n_layers} is not P + C + K = {self.n_layers}")
        if n_layers_in_recurrent_block < 1:
            raise ValueError("n_layers_in_recurrent_block must be at least 1")
        self.mean_recurrence = mean_recurrence
        self.mean_backprop_depth = mean_backprop_depth
        self.norm_eps = norm_eps
        # Published checkpoints name it rope_base; ours rope_theta (surgery reads either).
        if rope_theta is None:
            rope_theta = DEFAULT_ROPE_THETA if rope_base is None else rope_base
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.vocab_size = vocab_size
        self.padded_vocab_size = vocab_size if padded_vocab_size is None else padded_vocab_size
        self.tie_embeddings = tie_embeddings
        self.block_type = block_type
        self.injection_type = injection_type
        self.init_values = dict(init_values or {"std": REFERENCE_STATE_STD, "embed_scale": 1.0})
        # Left unset when unknown (null), so that tools reading it (lm-evaluation-harness's
        # max_length) fall back to the tokenizer's limit instead of taking None.
        if max_position_embeddings is not None:
            self.max_position_embeddings = max_position_embeddings
        # No KV cache: generate() runs the whole prefix at every new token (see the README).
        kwargs.setdefault("use_cache", False)
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_embeddings,
            **kwargs,
        )

    @property
    def state_std(self):
        """sigma of the initial state s_0 (0: a zero state)."""
        std = self.init_values.get("std")
        return REFERENCE_STATE_STD if std is None else float(std)
