"""Model FLOPs of a training step, counted from the config (the analytic count: what MFU figures divide by).

`analytic_flops_per_token` counts a vanilla step's matmuls, MLA attention and the KDA core per token (forward x 3 for
forward + backward); `recursive_flops_per_token` the recursive phases' step from it. `experiments.plan` prints them
next to the compiled program's own count; `experiments.bench` divides by them for MFU; the demo's recursion study
gives its vanilla fine-tune the FLOPs of the recursive one with them.
"""

from __future__ import annotations

__all__ = ["analytic_flops_per_token", "recursive_flops_per_token"]


def analytic_flops_per_token(cfg, seq_len: int) -> dict:
    """Training FLOPs per token (forward x 3): 2 x active matmul weights, plus causal MLA attention and KDA."""
    D, V = cfg.hidden_size, cfg.vocab_size
    H, K = cfg.kda_num_heads, cfg.kda_head_dim
    P = H * K
    kda_proj = D * 3 * P + D * K + K * P + D * H + D * K + K * P + P * D
    mla_q = D * cfg.num_attention_heads * cfg.qk_head_dim if cfg.q_lora_rank is None else (
        D * cfg.q_lora_rank + cfg.q_lora_rank * cfg.num_attention_heads * cfg.qk_head_dim)
    mla_proj = (mla_q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                + cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
                + cfg.num_attention_heads * cfg.v_head_dim * D)
    dense = 3 * D * cfg.intermediate_size
    moe = (D * cfg.num_experts + 3 * D * cfg.moe_intermediate_size
           * (cfg.num_experts_per_token + cfg.num_shared_experts))
    weights = D * V  # lm_head (the embedding lookup is not a matmul)
    for mixer, ffn in cfg.layer_kinds:
        weights += (kda_proj if mixer == "kda" else mla_proj) + (moe if ffn == "moe" else dense)
    n_mla = sum(k == "mla" for k in cfg.mixer_types)
    n_kda = cfg.num_hidden_layers - n_mla
    # Causal attention: each token attends to seq_len/2 keys on average: QK^T and PV.
    mla_attention = n_mla * 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    # KDA per head per token: state decay/update/readout ~8 K^2 (as MaxText/Megatron count gated delta nets), plus
    # the chunk's intra-block scores and WY products ~2 C (2K + K) with C = the chunk length.
    kda_core = n_kda * H * (8 * K * K + 2 * cfg.kda_chunk_size * 3 * K)
    forward = 2 * weights + 2 * (mla_attention + kda_core)
    return {"matmul_weights": weights, "forward": forward, "train": 3 * forward,
            "mla_attention": 3 * 2 * mla_attention, "kda_core": 3 * 2 * kda_core}


def recursive_flops_per_token(flops: dict, rcfg, windows: int, seq_len: int, remat: bool) -> dict:
    """Phase A: one clean forward (no backward), then K window passes over N (W + 1) window tokens per sequence,
    each with an activation-only backward (~1 forward: no weight gradients of the frozen base) and, with remat, one
    recomputed forward. The sidecar's own matmuls (~0.1% of the base) are left out. Phase B adds only LoRA's rank-r
    matmuls (left out too). Phase C trains blocks in the clean stream as well: its clean forward gets a full
    backward (2 forwards, an upper bound: layers below the lowest unfrozen block need none); the weight gradients of
    the unfrozen blocks in the window passes are left out."""
    window_tokens = windows * (rcfg.chunk_width + (1 if rcfg.use_latent_token else 0)) / seq_len
    clean = 3 if rcfg.phase == "c" else 1
    factor = clean + rcfg.max_inner_steps * window_tokens * (2 + (1 if remat else 0))
    scale = factor / 3  # the vanilla entries count forward x 3
    return dict(flops, train=factor * flops["forward"], mla_attention=scale * flops["mla_attention"],
                kda_core=scale * flops["kda_core"], recursive_factor=factor, window_tokens_per_token=window_tokens)
