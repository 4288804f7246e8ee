"""What is measured: cases, their inputs, the implementations compared, the float64
truth, the numerics rule, and the bytes / FLOPs each case must move or do.

Shared by the runner (``python -m bench``) and the pytest-benchmark suite, so both time
exactly the same calls. Every implementation is an :class:`Impl` whose ``prepare`` turns
one input set into a zero-argument call; anything that is not the op itself (folding the
fc weight, normalising the floor's input, compiling) happens in ``prepare`` or before,
never inside the call.

Ops (the names the command line takes):

``rms_norm_cat``        K=3 chunks of one ``[T, K*H]`` tensor (the serving layout: the
                        aux hidden states arrive concatenated), one weight per chunk.
``midlayer_cat``        K=2 separate ``[T, H]`` tensors: ``cat([input_layernorm(e),
                        hidden_norm(h)])``, the midlayer's qkv input.
``fused_add_rms_norm``  ``(norm(x + residual), x + residual)`` on ``[T, H]``.
``rms_norm_cat_linear`` the fc: ``F.linear(norm_cat(xs), W)`` with ``W`` ``[N, K*H]``,
                        N = H, K=3; ``norm`` is none / chunk / shared.
``drafter_step``        the whole drafter step without logits: ``h = combine_hidden_states(aux)``
                        (aux ``[T, K*H]``, K=3, norm_before_fc: ``norm`` = shared), then
                        ``drafter(ids, positions, h)`` -> ``(hidden_for_logits, hidden_fed_back)``
                        over one causal sequence of T tokens (``[T]`` ids / positions, no KV
                        cache), on a Llama-3-8B-like layer 0 of width H (see
                        :func:`drafter_config`). eagle3 = ``eagle3_ops.nn.Eagle3LlamaDrafter``;
                        eager / compile = ``reference_modules.ReferenceLlamaDrafter`` with the
                        same state dict; the truth is that reference in float64.
``mla_drafter_step``    the same step for the DeepSeek (MLA) drafter: a Kimi-K2-like layer 0
                        of width H (:func:`mla_drafter_config`), fc_norm (``norm`` = chunk)
                        and norm_output, eagle3 = ``Eagle3DeepseekDrafter``, eager / compile
                        = ``reference_modules.ReferenceDeepseekDrafter``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import eagle3_ops
from eagle3_ops import reference as R

OPS = ("rms_norm_cat", "midlayer_cat", "fused_add_rms_norm", "rms_norm_cat_linear", "drafter_step",
       "mla_drafter_step")
FC_OP = "rms_norm_cat_linear"
DRAFTER_OP = "drafter_step"
MLA_DRAFTER_OP = "mla_drafter_step"
#: The drafter steps and their combine normalisation: norm_before_fc (one RMSNorm over the
#: K*H row, "shared") for the Llama drafter, fc_norm (one per chunk, "chunk") for the MLA one.
DRAFTER_OPS = {DRAFTER_OP: "shared", MLA_DRAFTER_OP: "chunk"}
DRAFTER_NORM = DRAFTER_OPS[DRAFTER_OP]
#: The step excludes embed_tokens' full table and lm_head (no logits): a small vocab keeps
#: memory small without changing what is timed (T embedding rows are gathered either way).
DRAFTER_VOCAB = 1024
#: Most input sets rotated for the drafter step (see rotation_copies).
DRAFTER_ROTATION_CAP = 4
FC_NORMS = ("none", "chunk", "shared")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
EPS = 1e-6
# Numerics rule (DESIGN.md section 4): rel err <= 2 x eager's rel err + floor.
ERR_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-3, torch.float32: 1e-5}

#: Implementation names, in table order. "eagle3" is ours; the rest are baselines.
IMPL_ORDER = ("eagle3", "eager", "compile", "liger", "linear")
#: GB/s is reported for the norms, and for the fc and the drafter step up to this T (while
#: they are a weight stream).
FC_GBPS_MAX_T = 128

Outputs = Any  # a tensor or a tuple of tensors


@dataclass(frozen=True)
class Case:
    """One measured configuration. ``K`` is the number of chunks (1 for the fused add; the
    number of aux states for the drafter step), ``N`` the fc's output width, ``norm`` the
    fc's normalisation (the drafter's combine normalisation for drafter_step)."""

    op: str
    T: int
    H: int
    dtype: torch.dtype
    device: str
    K: int = 3
    N: Optional[int] = None
    norm: Optional[str] = None

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        extra = f" N={self.N} norm={self.norm}" if self.op == FC_OP else ""
        if self.op in DRAFTER_OPS:
            extra = f" norm={self.norm}"
        return f"{self.op} T={self.T} H={self.H} K={self.K}{extra} {self.dtype_name} {self.device}"

    def bytes_moved(self) -> int:
        """Fewest bytes through memory: every input read once, every output written once,
        weights included (the fc weight too).

        drafter_step: every weight of the step read once (:func:`drafter_param_counts`
        "weights": combine + layer 0 + final norm, not embed_tokens / lm_head), the inputs
        (aux ``[T, K*H]``, the T gathered embedding rows ``[T, H]``, int64 ids and positions)
        and the two ``[T, H]`` outputs; intermediate activations are not counted."""
        T, H, K, e = self.T, self.H, self.K, self.elem
        if self.op in DRAFTER_OPS:
            # weights + aux + embedding rows + int64 ids and positions + two outputs
            return drafter_param_counts(H, self.op)["weights"] * e + T * K * H * e + T * H * e + 2 * 8 * T + 2 * T * H * e
        if self.op in ("rms_norm_cat", "midlayer_cat"):
            return 2 * T * K * H * e + K * H * e
        if self.op == "fused_add_rms_norm":
            return 4 * T * H * e + H * e
        return T * K * H * e + self.N * K * H * e + T * self.N * e

    def flops(self) -> int:
        """Matrix FLOPs of the fc (2 T N K H); 0 for the norms. drafter steps: 2 T x the
        matrix weights (fc, attention projections, gate/up/down) + causal attention, QK^T and
        PV over the T(T+1)/2 query-key pairs: 2 x 2 x attn_width x T(T+1)/2 (attn_width:
        heads x the mean of the query-key and value widths). Norms, RoPE, SiLU and softmax
        are left out."""
        if self.op in DRAFTER_OPS:
            p = drafter_param_counts(self.H, self.op)
            return 2 * self.T * p["matmul"] + 2 * p["attn_width"] * self.T * (self.T + 1)
        return 2 * self.T * self.N * self.K * self.H if self.op == FC_OP else 0

    def shared_bytes(self) -> int:
        """Bytes every rotated input set reads in common (not rotated, not in input_bytes):
        the drafter's weights; 0 for the other ops, whose weights travel with each set."""
        return drafter_param_counts(self.H, self.op)["weights"] * self.elem if self.op in DRAFTER_OPS else 0

    def input_bytes(self) -> int:
        """Bytes of one input set (what input rotation copies)."""
        T, H, K, e = self.T, self.H, self.K, self.elem
        if self.op in DRAFTER_OPS:  # aux, ids, positions (the models are shared: shared_bytes)
            return T * K * H * e + 2 * 8 * T
        if self.op == "fused_add_rms_norm":
            return 2 * T * H * e + H * e
        if self.op == FC_OP:
            return T * K * H * e + self.N * K * H * e + K * H * e
        return T * K * H * e + K * H * e

    def check_rows(self) -> Optional[torch.Tensor]:
        """Rows checked against float64; None = all. The float64 fc is slow on a CPU, so
        there large T checks 64 rows spread over the tensor (first and last included). The
        drafter step is always checked whole (attention mixes every row into the last)."""
        if self.op == FC_OP and self.device == "cpu" and self.T > 64:
            return torch.linspace(0, self.T - 1, 64).round().long().unique()
        return None


def make_case(op: str, T: int, H: int, dtype: torch.dtype, device: str, norm: Optional[str] = None) -> Case:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if op in DRAFTER_OPS:
        if norm not in (None, DRAFTER_OPS[op]):
            raise ValueError(f"{op} measures norm={DRAFTER_OPS[op]!r} only, got {norm!r}")
        drafter_config(H, op)  # validates H
        return Case(op, T, H, dtype, device, K=3, norm=DRAFTER_OPS[op])
    if op == "midlayer_cat":
        return Case(op, T, H, dtype, device, K=2)
    if op == "fused_add_rms_norm":
        return Case(op, T, H, dtype, device, K=1)
    if op == FC_OP:
        if norm not in FC_NORMS:
            raise ValueError(f"fc norm must be one of {FC_NORMS}, got {norm!r}")
        return Case(op, T, H, dtype, device, K=3, N=H, norm=norm)
    return Case(op, T, H, dtype, device, K=3)


# ---- the drafter step: shape, models -------------------------------------------------------


def drafter_config(H: int, op: str = DRAFTER_OP) -> Dict[str, Any]:
    """A Llama-3(.1)-8B-like EAGLE-3 drafter of width H (eagle3 config layout): head_dim 128
    (H // heads when H < 128, rounded down to even for RoPE), heads = H / 128, kv heads =
    heads / 4 (the largest divisor of heads not above it), intermediate = 3.5 H rounded to
    a multiple of 256 (14336 at H = 4096), one layer, K=3 aux states of width H,
    norm_before_fc, rope theta 5e5 with llama3 scaling, vocab :data:`DRAFTER_VOCAB`."""
    if op == MLA_DRAFTER_OP:
        return mla_drafter_config(H)
    if H < 2:
        raise ValueError(f"drafter_step needs H >= 2 (RoPE needs an even head_dim), got H={H}")
    heads = max(1, H // 128)
    head_dim = (H // heads) // 2 * 2
    kv = max(d for d in range(1, max(1, heads // 4) + 1) if heads % d == 0)
    return {
        "hidden_size": H, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "intermediate_size": max(256, round(3.5 * H / 256) * 256), "num_hidden_layers": 1,
        "vocab_size": DRAFTER_VOCAB, "draft_vocab_size": DRAFTER_VOCAB, "num_aux_hidden_states": 3,
        "norm_before_fc": True, "fc_norm": False, "rms_norm_eps": EPS, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072,
    }


def mla_drafter_config(H: int) -> Dict[str, Any]:
    """A Kimi-K2-like MLA EAGLE-3 drafter of width H (eagle_config layout): at H = 7168
    64 heads, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128 + qk_rope 64, v 128,
    intermediate 18432; other widths scale heads (H / 112), the ranks (3H/14 and H/14,
    multiples of 32) and the intermediate size (18432/7168 H, a multiple of 256) with H and
    keep the head dims. One layer, K=3 aux states of width H, fc_norm and norm_output,
    rope theta 5e4 with DeepSeek YaRN (factor 64 over 4096 positions, mscale =
    mscale_all_dim = 1), vocab :data:`DRAFTER_VOCAB`."""
    if H < 2:
        raise ValueError(f"mla_drafter_step needs H >= 2, got H={H}")
    return {
        "architectures": ["Eagle3DeepseekV2ForCausalLM"], "model_type": "kimi_k2",
        "hidden_size": H, "num_attention_heads": max(1, H // 112), "num_key_value_heads": max(1, H // 112),
        "q_lora_rank": max(32, 3 * H // 14 // 32 * 32), "kv_lora_rank": max(32, H // 14 // 32 * 32),
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "intermediate_size": max(256, round(18432 / 7168 * H / 256) * 256), "num_hidden_layers": 1,
        "vocab_size": DRAFTER_VOCAB, "draft_vocab_size": DRAFTER_VOCAB, "rms_norm_eps": EPS,
        "fc_norm": True, "norm_output": True, "rope_theta": 50000.0, "max_position_embeddings": 262144,
        "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 29, 57]},
    }


def drafter_param_counts(H: int, op: str = DRAFTER_OP) -> Dict[str, int]:
    """Element counts of the step's parameters: ``weights`` = every parameter of combine
    (fc, input_norm / fc_norm) + layer 0 + final norm (embed_tokens and lm_head excluded);
    ``matmul`` = those of the matrices (fc, attention projections, gate/up/down);
    ``attn_width`` = heads x head_dim (MLA: heads x the mean of qk_nope + qk_rope and v)."""
    if op == MLA_DRAFTER_OP:
        c = mla_drafter_config(H)
        K, heads, inter = 3, c["num_attention_heads"], c["intermediate_size"]
        ql, kvl, dn, dr, dv = (c[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                              "qk_rope_head_dim", "v_head_dim"))
        fc = K * H * H
        attn = (2 * H * ql + ql * heads * (dn + dr) + 2 * H * (kvl + dr) + kvl * heads * (dn + dv)
                + heads * dv * H)  # q_a / kv_a read the 2H-wide input
        mlp = 3 * H * inter
        norms = K * H + 3 * H + ql + kvl + H  # fc_norm; layer norms; q_a / kv_a_layernorm; norm
        return {"weights": fc + attn + mlp + norms, "matmul": fc + attn + mlp,
                "attn_width": heads * (dn + dr + dv) // 2}
    c = drafter_config(H)
    K, heads, kv, hd = 3, c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    inter = c["intermediate_size"]
    fc = K * H * H
    attn = 2 * H * (heads + 2 * kv) * hd + heads * hd * H  # q/k/v read the 2H-wide input
    mlp = 3 * H * inter
    norms = K * H + 3 * H + H  # input_norm; input_layernorm, hidden_norm, post_attention_layernorm; norm
    return {"weights": fc + attn + mlp + norms, "matmul": fc + attn + mlp, "attn_width": heads * hd}


def _randomize_drafter_(model: torch.nn.Module, device: str, seed: int) -> None:
    """Fresh weights, generated in float32 on the device: matrices N(0, 1/in), norm weights
    1 + 0.1 N(0, 1), embeddings N(0, 1)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    for name, p in model.named_parameters():
        v = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
        if p.dim() == 2 and "embed" not in name:
            v *= 1.0 / math.sqrt(p.shape[1])
        elif p.dim() == 1:
            v = 1.0 + 0.1 * v
        p.copy_(v.to(p.dtype))
        del v


def build_drafters(H: int, dtype: torch.dtype, device: str, seed: int = 0,
                   op: str = DRAFTER_OP) -> Dict[str, torch.nn.Module]:
    """``{"eagle3": Eagle3LlamaDrafter, "eager": ReferenceLlamaDrafter, "ref64": the reference
    in float64}`` (for mla_drafter_step: Eagle3DeepseekDrafter and ReferenceDeepseekDrafter),
    all with the same weights (eagle3's state dict loaded strictly into the others),
    parameters without grad."""
    from eagle3_ops.nn import Eagle3DeepseekDrafter, Eagle3LlamaDrafter  # noqa: PLC0415
    from eagle3_ops.nn.reference_modules import ReferenceDeepseekDrafter, ReferenceLlamaDrafter  # noqa: PLC0415

    cfg = drafter_config(H, op)
    Ours, Ref = ((Eagle3DeepseekDrafter, ReferenceDeepseekDrafter) if op == MLA_DRAFTER_OP
                 else (Eagle3LlamaDrafter, ReferenceLlamaDrafter))
    # Ordinary tensors even when the runner is in inference mode (version counters: the
    # folded fc weight's cache sees the load), no autograd history.
    with torch.inference_mode(False), torch.no_grad():
        ours = Ours(cfg, device=device, dtype=dtype)
        _randomize_drafter_(ours, device, seed)
        sd = ours.state_dict()
        out = {"eagle3": ours}
        for name, dt in (("eager", dtype), ("ref64", torch.float64)):
            with torch.device("meta"):  # no throw-away init of the reference's weights
                ref = Ref(cfg)
            ref = ref.to(dtype=dt).to_empty(device=device)
            ref.load_state_dict(sd, strict=True)
            out[name] = ref
        del sd
    for m in out.values():
        m.requires_grad_(False).eval()
    return out


_DRAFTERS: Dict[tuple, Dict[str, torch.nn.Module]] = {}


def drafter_models(case: Case) -> Dict[str, torch.nn.Module]:
    """The models of ``case``, built once per (H, dtype, device) and kept for the next
    case of the same shape (one entry: a new shape frees the old models first)."""
    key = (case.op, case.H, case.dtype, case.device)
    if key not in _DRAFTERS:
        release_drafter_models()
        _DRAFTERS[key] = build_drafters(case.H, case.dtype, case.device, op=case.op)
    return _DRAFTERS[key]


def release_drafter_models() -> None:
    """Free the cached drafter models (the runner calls this when leaving drafter cases)."""
    if not _DRAFTERS:
        return
    _DRAFTERS.clear()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ---- inputs -------------------------------------------------------------------------------


def make_inputs(case: Case, seed: int = 0) -> Dict[str, Any]:
    """One fresh random input set (never zeros). Keys: ``xs`` (list of [T, H] inputs),
    ``ws`` (per-chunk norm weights) for the norm-cats; ``x``, ``residual``, ``w`` for the
    fused add; ``xs``, ``gs`` (per-chunk norm weights), ``W`` [N, K*H] for the fc; ``aux``
    [T, K*H], ``ids`` [T], ``positions`` [T] (seed .. seed + T - 1) and ``models`` (the
    shared :func:`drafter_models`) for the drafter step."""
    g = torch.Generator(device=case.device)
    g.manual_seed(seed)
    T, H, K, dt, dev = case.T, case.H, case.K, case.dtype, case.device

    def randn(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, device=dev, dtype=torch.float32)
        return (t * scale + shift).to(dt)

    def norm_weights(k):
        return [randn(H, scale=0.1, shift=1.0) for _ in range(k)]

    if case.op in DRAFTER_OPS:
        ids = torch.randint(0, DRAFTER_VOCAB, (T,), generator=g, device=dev)
        return {"aux": randn(T, K * H), "ids": ids, "positions": torch.arange(seed, seed + T, device=dev),
                "models": drafter_models(case)}
    if case.op == "midlayer_cat":  # e and h are separate tensors
        return {"xs": [randn(T, H), randn(T, H)], "ws": norm_weights(2)}
    if case.op == "fused_add_rms_norm":
        return {"x": randn(T, H), "residual": randn(T, H), "w": randn(H, scale=0.1, shift=1.0)}
    x = randn(T, K * H)  # the serving layout: aux hidden states concatenated, read as views
    xs = list(x.chunk(K, dim=-1))
    if case.op == "rms_norm_cat":
        return {"xs": xs, "ws": norm_weights(K)}
    return {"xs": xs, "gs": norm_weights(K), "W": randn(case.N, K * H, scale=1.0 / math.sqrt(K * H))}


def rotation_copies(case: Case, cache_bytes: int, cap: int, mem_cap_bytes: int) -> int:
    """How many input sets to rotate so they, with the bytes every set shares (the drafter's
    weights), exceed 2x the cache, within ``cap`` copies and ``mem_cap_bytes``; at least 1."""
    per = max(case.input_bytes(), 1)
    if case.op in DRAFTER_OPS:
        # The inputs are a sliver of the bytes (aux: 0.2% at H = 4096, T = 64): the weights
        # stream through the cache on every call whatever the number of sets, so a few sets
        # suffice (each warm-up pass calls every set once, and a step costs milliseconds on
        # a CPU).
        cap = min(cap, DRAFTER_ROTATION_CAP)
    want = math.ceil(max(0, 2 * cache_bytes - case.shared_bytes()) / per)
    return max(1, min(want, cap, mem_cap_bytes // per))


# ---- the compositions (module-level so torch.compile caches them by code object) -----------


def eager_norm_cat(xs: List[torch.Tensor], ws: List[torch.Tensor]) -> torch.Tensor:
    return R.rms_norm_cat(xs, ws, EPS)


def eager_fused_add(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor):
    return R.fused_add_rms_norm(x, residual, w, EPS)


def eager_norm_cat_fc_input(xs: List[torch.Tensor], gs: List[torch.Tensor], norm: str) -> torch.Tensor:
    """The fc's input as the serving engines build it: chunk -> K RMSNorms (or one shared
    statistic) with the norm weights -> cat; plain cat for norm="none"."""
    if norm == "none":
        return torch.cat(xs, dim=-1)
    return R.rms_norm_cat(xs, gs, EPS, shared_stats=(norm == "shared"))


def eager_fc(xs: List[torch.Tensor], gs: List[torch.Tensor], W: torch.Tensor, norm: str) -> torch.Tensor:
    """chunk -> norms -> cat -> F.linear with the unfolded fc weight."""
    return F.linear(eager_norm_cat_fc_input(xs, gs, norm), W)


def drafter_step(model: torch.nn.Module, aux: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor):
    """One drafter step without logits: ``model(ids, positions, model.combine_hidden_states(aux))``
    -> ``(hidden_for_logits, hidden_fed_back)``, for any of the drafter modules (ours, the
    reference, the float64 reference; compiled for "compile"). Under the runner's
    ``torch.inference_mode()``; the models' parameters need no grad either way."""
    return model(ids, positions, model.combine_hidden_states(aux))


# ---- implementations ----------------------------------------------------------------------


@dataclass
class Impl:
    """``prepare(inputs)`` returns the zero-argument call that is timed."""

    name: str
    prepare: Callable[[Dict[str, Any]], Callable[[], Outputs]]
    note: str = ""


@dataclass
class ImplSet:
    impls: List[Impl] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # baselines left out, and why


def _eager_args(case: Case, inp: Dict[str, Any]) -> tuple:
    if case.op in DRAFTER_OPS:
        return (inp["models"]["eager"], inp["aux"], inp["ids"], inp["positions"])
    if case.op == "fused_add_rms_norm":
        return (inp["x"], inp["residual"], inp["w"])
    if case.op == FC_OP:
        return (inp["xs"], inp["gs"], inp["W"], case.norm)
    return (inp["xs"], inp["ws"])


def _eager_fn(case: Case) -> Callable:
    return {"fused_add_rms_norm": eager_fused_add, FC_OP: eager_fc, DRAFTER_OP: drafter_step,
            MLA_DRAFTER_OP: drafter_step}.get(case.op, eager_norm_cat)


def _ours(case: Case) -> Impl:
    if case.op in DRAFTER_OPS:
        def prep(inp):
            m, aux, ids, pos = inp["models"]["eagle3"], inp["aux"], inp["ids"], inp["positions"]
            return lambda: drafter_step(m, aux, ids, pos)
        ours = "Eagle3DeepseekDrafter" if case.op == MLA_DRAFTER_OP else "Eagle3LlamaDrafter"
        return Impl("eagle3", prep, note="eagle3_ops.nn." + ours)
    if case.op == "fused_add_rms_norm":
        def prep(inp):
            x, r, w = inp["x"], inp["residual"], inp["w"]
            return lambda: eagle3_ops.fused_add_rms_norm(x, r, w, EPS)
    elif case.op == FC_OP:
        def prep(inp):
            xs, norm = inp["xs"], case.norm
            # Fold once, outside the timed region (norm="none": no norm weights).
            Wf = eagle3_ops.fold_norm_weights(inp["W"], None if norm == "none" else inp["gs"])
            return lambda: eagle3_ops.rms_norm_cat_linear(xs, Wf, EPS, norm)
    else:
        def prep(inp):
            xs, ws = inp["xs"], inp["ws"]
            return lambda: eagle3_ops.rms_norm_cat(xs, ws, EPS)
    return Impl("eagle3", prep)


def _bind(fn: Callable, case: Case) -> Callable[[Dict[str, Any]], Callable[[], Outputs]]:
    def prep(inp):
        args = _eager_args(case, inp)
        return lambda: fn(*args)
    return prep


def _compiled(case: Case) -> Impl:
    """torch.compile of the eager composition (dynamic=False, fullgraph=True; for the
    drafter step: of the reference drafter's step). Compilation happens at the first call,
    i.e. in the correctness check, where errors are caught."""
    fn = torch.compile(_eager_fn(case), dynamic=False, fullgraph=True)
    return Impl("compile", _bind(fn, case))


def _linear_floor(case: Case) -> Impl:
    """cuBLAS / ATen F.linear alone on the already normalised, already concatenated input."""
    def prep(inp):
        xn = eager_norm_cat_fc_input(inp["xs"], inp["gs"], case.norm)
        W = inp["W"]
        return lambda: F.linear(xn, W)
    return Impl("linear", prep, note="F.linear on the pre-normalised input")


def load_liger():
    """(module with liger_rms_norm [, liger_fused_add_rms_norm], None) or (None, reason)."""
    try:
        from liger_kernel.transformers import functional as lf  # noqa: PLC0415
    except Exception as e:  # ImportError, or a Triton / CUDA problem at import
        return None, f"liger_kernel not importable ({type(e).__name__}: {e}); liger baseline omitted"
    if not hasattr(lf, "liger_rms_norm"):
        return None, "liger_kernel has no liger_rms_norm; liger baseline omitted"
    return lf, None


def _liger(case: Case, lf) -> Optional[Impl]:
    """Liger's Triton RMSNorm applied per chunk (+ cat; + F.linear for the fc); none for
    the drafter step."""
    if case.op in DRAFTER_OPS:
        return None
    if case.op == "fused_add_rms_norm":
        if hasattr(lf, "liger_fused_add_rms_norm"):
            def prep(inp):
                x, r, w = inp["x"], inp["residual"], inp["w"]
                return lambda: lf.liger_fused_add_rms_norm(x, r, w, EPS)
            return Impl("liger", prep, note="liger_fused_add_rms_norm")

        def prep(inp):
            x, r, w = inp["x"], inp["residual"], inp["w"]

            def call():
                s = x + r
                return lf.liger_rms_norm(s, w, EPS), s
            return call
        return Impl("liger", prep, note="x + residual, then liger_rms_norm")
    if case.op == FC_OP:
        if case.norm != "chunk":
            return None  # liger has no shared-statistic norm; "none" has no norm at all

        def prep(inp):
            xs, gs, W = inp["xs"], inp["gs"], inp["W"]
            return lambda: F.linear(torch.cat([lf.liger_rms_norm(x, g, EPS) for x, g in zip(xs, gs)], -1), W)
        return Impl("liger", prep, note="liger_rms_norm per chunk, cat, F.linear")

    def prep(inp):
        xs, ws = inp["xs"], inp["ws"]
        return lambda: torch.cat([lf.liger_rms_norm(x, w, EPS) for x, w in zip(xs, ws)], -1)
    return Impl("liger", prep, note="liger_rms_norm per chunk, cat")


def implementations(case: Case, *, with_compile: bool = True, liger=None, liger_note: str = "") -> ImplSet:
    """Ours first, then the baselines: eager, compile, liger (CUDA, when importable), and
    for the fc the F.linear floor."""
    eager_note = {DRAFTER_OP: "reference_modules.ReferenceLlamaDrafter",
                  MLA_DRAFTER_OP: "reference_modules.ReferenceDeepseekDrafter"}.get(case.op, "")
    out = ImplSet([_ours(case), Impl("eager", _bind(_eager_fn(case), case), note=eager_note)])
    if with_compile:
        out.impls.append(_compiled(case))
    if case.device == "cuda":
        if liger is not None:
            impl = _liger(case, liger)
            if impl is not None:
                out.impls.append(impl)
        elif liger_note:
            out.notes.append(liger_note)
    if case.op == FC_OP:
        out.impls.append(_linear_floor(case))
    return out


def copy_roofline(case: Case) -> Impl:
    """``x.clone()`` of a tensor whose read + write bytes equal the case's bytes_moved."""
    def prep(inp):
        n = max(1, case.bytes_moved() // 2 // case.elem)
        src = torch.randn(n, device=case.device, dtype=torch.float32).to(case.dtype)
        return lambda: src.clone()
    return Impl("copy", prep, note="x.clone() of the same bytes")


# ---- truth and the numerics rule ----------------------------------------------------------


def reference_fp64(case: Case, inp: Dict[str, Any], rows: Optional[torch.Tensor] = None) -> Outputs:
    """The exact answer in float64 (on ``rows`` only when given)."""
    def take(t):
        return t if rows is None else t[rows.to(t.device)]

    if case.op in DRAFTER_OPS:  # the reference drafter in float64, on the exact (upcast) weights
        return drafter_step(inp["models"]["ref64"], inp["aux"].double(), inp["ids"], inp["positions"])
    if case.op == "fused_add_rms_norm":
        return R.fused_add_rms_norm_fp64(take(inp["x"]), take(inp["residual"]), inp["w"], EPS)
    xs = [take(x) for x in inp["xs"]]
    if case.op == FC_OP:
        # The model's fc: the norm weights folded in exactly (float64, never rounded).
        W = inp["W"].double()
        if case.norm != "none":
            W = W * torch.cat([g.double() for g in inp["gs"]])
        return R.rms_norm_cat_linear_fp64(xs, W, EPS, case.norm)
    return R.rms_norm_cat_fp64(xs, inp["ws"], EPS)


def as_tuple(out: Outputs) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def rel_err(out: Outputs, ref: Outputs, rows: Optional[torch.Tensor] = None) -> float:
    """max over outputs of ||out - ref|| / ||ref|| (float64); inf for a non-finite output or
    a shape mismatch."""
    worst = 0.0
    outs, refs = as_tuple(out), as_tuple(ref)
    if len(outs) != len(refs):
        return math.inf
    for o, r in zip(outs, refs):
        if rows is not None:
            o = o[rows.to(o.device)]
        if tuple(o.shape) != tuple(r.shape):
            return math.inf
        o64 = o.double()
        if not bool(torch.isfinite(o64).all()):
            return math.inf
        den = torch.linalg.vector_norm(r).item()
        num = torch.linalg.vector_norm(o64 - r).item()
        worst = max(worst, num / den if den > 0 else num)
    return worst


def tolerance(case: Case, eager_err: float) -> float:
    return 2.0 * eager_err + ERR_FLOOR[case.dtype]


@dataclass
class Check:
    err: float
    tol: float
    eager_err: float

    @property
    def ok(self) -> bool:
        return self.err <= self.tol


class Checker:
    """Computes the float64 truth and eager's error once per input set, then judges any
    implementation's output against the tolerance."""

    def __init__(self, case: Case, inp: Dict[str, Any]):
        self.case = case
        self.rows = case.check_rows()
        self.ref = reference_fp64(case, inp, self.rows)
        eager_out = _bind(_eager_fn(case), case)(inp)()
        self.eager_err = rel_err(eager_out, self.ref, self.rows)
        self.tol = tolerance(case, self.eager_err)

    def __call__(self, out: Outputs) -> Check:
        return Check(rel_err(out, self.ref, self.rows), self.tol, self.eager_err)


def case_sweep(ops: Sequence[str], Ts: Sequence[int], Hs: Sequence[int], dtypes: Sequence[torch.dtype],
               device: str, fc_Ts: Sequence[int], fc_Hs: Sequence[int], fc_norms: Sequence[str],
               drafter_Ts: Optional[Sequence[int]] = None, drafter_Hs: Optional[Sequence[int]] = None,
               mla_drafter_Hs: Optional[Sequence[int]] = None) -> List[Case]:
    """Cases in run order (dtype, op, [norm,] H, T); the drafter steps use drafter_Ts and
    drafter_Hs (the MLA step mla_drafter_Hs) (default: Ts / Hs)."""
    cases = []
    for dt in dtypes:
        for op in ops:
            if op in DRAFTER_OPS:
                op_Hs = (mla_drafter_Hs if op == MLA_DRAFTER_OP else None) or drafter_Hs or Hs
                cases += [make_case(op, T, H, dt, device) for H in op_Hs for T in (drafter_Ts or Ts)]
            elif op == FC_OP:
                cases += [make_case(op, T, H, dt, device, nm) for nm in fc_norms for H in fc_Hs for T in fc_Ts]
            else:
                cases += [make_case(op, T, H, dt, device) for H in Hs for T in Ts]
    return cases
