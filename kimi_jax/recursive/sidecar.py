"""The recursive refinement sidecar (RECURSIVE_DESIGN.md §3.2): refine cells, z-mixer, [Z] token, halt/length heads.

Shapes: B batch (or batch x windows), W chunk width, S = W (+1 with the [Z] slot) window slots, D model hidden,
Z = d_state (the latent z), R refine rank, L refined layers, G gate_hidden, V vocab.

    cells     norm [L, D]  a_h [L, D, R]  a_z [L, Z, R]  b [L, R, D] (zero at init)  alpha [L]
              delta_l(h, z) = alpha_l * b_l^T silu(a_h_l^T RMSNorm_l(h) + a_z_l^T z)      (per position)
    z-mixer   in_h [D, Z]  in_tok [D, Z]  in_conf [3, Z]  in_step [16, Z] (sinusoidal step features, any K);
              `mixer_layers` bidirectional
              pre-norm blocks of width Z over the S slots; out [Z, Z]:  z <- z + out(blocks(inputs))
    [Z] token z_embed [D] + mean(z) @ z_to_embed [Z, D], appended after the last window position
    heads     halt: D -> G -> 1 (bias `halt_bias_init`, i.e. "never halt" at init); length: D -> G -> W + 1

Everything is float32 (the sidecar is ~0.1% of the base). With b = 0 every delta is exactly 0, so the base model's
outputs are unchanged bit for bit (0 * finite = 0 and h + 0 = h), whatever the other sidecar weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kimi_jax.config import KDA, MLA, KimiLinearConfig
from kimi_jax.layers.init import INITIALIZER_RANGE
from kimi_jax.layers.norms import rms_norm
from kimi_jax.layout import plan_segments
from kimi_jax.recursive.config import RecursiveConfig

F32 = jnp.float32
MASK_ID = -1  # draft id of the [M] embedding (mask seeding); never a real token
STEP_FEATURES = 16  # sinusoidal features of the inner-step index: a trained sidecar runs with any K


def step_features(step):
    """Sinusoidal encoding of the inner-step index (periods 2 .. ~2000 steps), so nothing depends on K."""
    freqs = jnp.exp(-jnp.log(1000.0) * jnp.arange(STEP_FEATURES // 2, dtype=F32) / (STEP_FEATURES // 2)) * jnp.pi
    angle = jnp.asarray(step, F32) * freqs
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)])


def _normal(rngs: nnx.Rngs, shape, std: float = INITIALIZER_RANGE) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, F32) * std)


def _zeros(shape) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, F32))


class RefineCells(nnx.Module):
    """All refine cells, stacked over the refined layers (in increasing layer order)."""

    def __init__(self, D: int, Z: int, R: int, layers: tuple[int, ...], gate_init: float, *, rngs: nnx.Rngs):
        L = len(layers)
        self.layers = layers
        self.norm = nnx.Param(jnp.ones((L, D), F32))
        self.a_h = _normal(rngs, (L, D, R))
        self.a_z = _normal(rngs, (L, Z, R))
        self.b = _zeros((L, R, D))
        self.alpha = nnx.Param(jnp.full((L,), gate_init, F32))


def refine_delta(cell: dict, h_BSD, z_BSZ, eps: float):
    """One layer's edit, float32: alpha * b^T silu(a_h^T RMSNorm(h) + a_z^T z)."""
    x_BSD = rms_norm(h_BSD.astype(F32), cell["norm"], eps)
    pre_BSR = (jnp.einsum("bsd,dr->bsr", x_BSD, cell["a_h"])
               + jnp.einsum("bsz,zr->bsr", z_BSZ.astype(F32), cell["a_z"]))
    return cell["alpha"] * jnp.einsum("bsr,rd->bsd", jax.nn.silu(pre_BSR), cell["b"])


class LoRA(nnx.Module):
    """Phase-B low-rank adapters (b zero at init) on the mixer projections of the chosen layers, stacked per mixer
    kind in layer order. KDA: qkv_proj and o_proj; MLA: q_proj (q_b_proj with q_lora_rank) and o_proj. They act in
    the noisy (window) stream only: the clean stream and every commit pass stay the baseline."""

    def __init__(self, cfg: KimiLinearConfig, layers: tuple[int, ...], rank: int, *, rngs: nnx.Rngs):
        D, r = cfg.hidden_size, rank
        self.kda_layers = tuple(i for i in layers if cfg.mixer_types[i] == KDA)
        self.mla_layers = tuple(i for i in layers if cfg.mixer_types[i] == MLA)
        Lk, Lm = len(self.kda_layers), len(self.mla_layers)
        H, K = cfg.kda_num_heads, cfg.kda_head_dim
        self.kda = nnx.Dict({"qkv_a": _normal(rngs, (Lk, D, r)), "qkv_b": _zeros((Lk, r, 3, H, K)),
                             "o_a": _normal(rngs, (Lk, H, K, r)), "o_b": _zeros((Lk, r, D))}) if Lk else None
        Hm, C, V = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
        q_in = cfg.q_lora_rank or D
        self.mla = nnx.Dict({"q_a": _normal(rngs, (Lm, q_in, r)), "q_b": _zeros((Lm, r, Hm, C)),
                             "o_a": _normal(rngs, (Lm, Hm, V, r)), "o_b": _zeros((Lm, r, D))}) if Lm else None


class MixerBlock(nnx.Module):
    """Bidirectional pre-norm transformer block of width Z over the window slots (the only non-causal part)."""

    def __init__(self, Z: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.attn_norm = nnx.Param(jnp.ones((Z,), F32))
        self.qkv = _normal(rngs, (Z, 3, heads, Z // heads))
        self.attn_out = _normal(rngs, (heads, Z // heads, Z))
        self.mlp_norm = nnx.Param(jnp.ones((Z,), F32))
        self.mlp_in = _normal(rngs, (Z, 4 * Z))
        self.mlp_out = _normal(rngs, (4 * Z, Z))

    def __call__(self, x_BSZ, eps: float):
        a_BSZ = rms_norm(x_BSZ, self.attn_norm[...], eps)
        qkv_BS3HC = jnp.einsum("bsz,zthc->bsthc", a_BSZ, self.qkv[...])
        q, k, v = qkv_BS3HC[:, :, 0], qkv_BS3HC[:, :, 1], qkv_BS3HC[:, :, 2]
        scores_BHST = jnp.einsum("bshc,bthc->bhst", q, k) * (q.shape[-1] ** -0.5)
        o_BSHC = jnp.einsum("bhst,bthc->bshc", jax.nn.softmax(scores_BHST, axis=-1), v)
        x_BSZ = x_BSZ + jnp.einsum("bshc,hcz->bsz", o_BSHC, self.attn_out[...])
        m_BSZ = rms_norm(x_BSZ, self.mlp_norm[...], eps)
        return x_BSZ + jnp.einsum("bsf,fz->bsz", jax.nn.silu(m_BSZ @ self.mlp_in[...]), self.mlp_out[...])


class Head(nnx.Module):
    def __init__(self, D: int, G: int, out: int, bias_init: float, *, rngs: nnx.Rngs):
        self.norm = nnx.Param(jnp.ones((D,), F32))
        self.w1 = _normal(rngs, (D, G))
        self.b1 = _zeros((G,))
        self.w2 = _normal(rngs, (G, out))
        self.b2 = nnx.Param(jnp.full((out,), bias_init, F32))

    def __call__(self, x_BD, eps: float):
        x_BD = rms_norm(x_BD.astype(F32), self.norm[...], eps)
        return jax.nn.silu(x_BD @ self.w1[...] + self.b1[...]) @ self.w2[...] + self.b2[...]


class Sidecar(nnx.Module):
    def __init__(self, cfg: KimiLinearConfig, rcfg: RecursiveConfig, *, rngs: nnx.Rngs):
        D, Z, W = cfg.hidden_size, rcfg.d_state, rcfg.chunk_width
        if W % cfg.kda_chunk_size:
            raise ValueError(f"recursive config: chunk_width {W} is not a multiple of the model's KDA chunk size "
                             f"{cfg.kda_chunk_size} (window snapshots are the chunked scan's boundary states)")
        self.eps = cfg.rms_norm_eps
        self.chunk_width = W
        self.num_slots = W + 1 if rcfg.use_latent_token else W
        self.cells = RefineCells(D, Z, rcfg.refine_rank, rcfg.refined_layers(cfg.num_hidden_layers),
                                 rcfg.refine_gate_init, rngs=rngs)
        self.in_h = _normal(rngs, (D, Z))
        self.in_tok = _normal(rngs, (D, Z))
        self.in_conf = _normal(rngs, (3, Z))
        self.in_step = _normal(rngs, (STEP_FEATURES, Z))
        self.mixer = nnx.List([MixerBlock(Z, rcfg.mixer_heads, rngs=rngs) for _ in range(rcfg.mixer_layers)])
        self.mixer_norm = nnx.Param(jnp.ones((Z,), F32))
        self.mixer_out = _normal(rngs, (Z, Z))
        self.z0 = _normal(rngs, (self.num_slots, Z)) if rcfg.z_init == "learned" else None
        if rcfg.use_latent_token:
            self.z_embed = _normal(rngs, (D,))
            self.z_to_embed = _normal(rngs, (Z, D))
        self.mask_embed = _normal(rngs, (D,)) if rcfg.seed == "mask" else None
        self.lora = (LoRA(cfg, rcfg.lora_layer_indices(cfg.num_hidden_layers), rcfg.lora_rank, rngs=rngs)
                     if rcfg.uses_lora else None)
        self.halt_head = Head(D, rcfg.gate_hidden, 1, rcfg.halt_bias_init, rngs=rngs)
        self.length_head = Head(D, rcfg.gate_hidden, W + 1, 0.0, rngs=rngs) if rcfg.enable_length_head else None

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

    # ------------------------------------------------------------------ refine cells inside the base
    def segment_edits(self, cfg: KimiLinearConfig):
        """Cells and LoRA laid out like the base's scanned segments: per segment, per cycle position, {"cell",
        "lora"} stacked over the repeats (None where no repeat has one). Repeats without one get a zero gate
        (alpha = 0, LoRA b = 0), so their edit is exactly 0."""
        cells = {k: getattr(self.cells, k)[...] for k in ("norm", "a_h", "a_z", "b", "alpha")}
        stacks = [(self.cells.layers, cells, ("alpha",))]
        lora_stacks = {}
        if self.lora is not None:
            for kind, layers, params in ((KDA, self.lora.kda_layers, self.lora.kda),
                                         (MLA, self.lora.mla_layers, self.lora.mla)):
                if layers:
                    lora_stacks[kind] = (layers, {k: v[...] for k, v in params.items()})

        def gather(layers_of_stack, params, gated, layers):
            index = {layer: i for i, layer in enumerate(layers_of_stack)}
            if not any(layer in index for layer in layers):
                return None
            rows = jnp.asarray([index.get(layer, 0) for layer in layers], jnp.int32)
            on = jnp.asarray([layer in index for layer in layers], F32)
            out = {k: v[rows] for k, v in params.items()}
            for k in gated:
                out[k] = out[k] * on.reshape((-1,) + (1,) * (out[k].ndim - 1))
            return out

        out = []
        for seg in plan_segments(cfg.layer_kinds):
            per_position = []
            for position in range(seg.period):
                layers = [seg.layer(position, r) for r in range(seg.repeats)]
                cell = gather(*stacks[0][:2], stacks[0][2], layers)
                kind = cfg.mixer_types[layers[0]]
                lora = None
                if kind in lora_stacks:
                    layers_of_stack, params = lora_stacks[kind]
                    lora = gather(layers_of_stack, params, tuple(k for k in params if k.endswith("_b")), layers)
                per_position.append(None if cell is None and lora is None else {"cell": cell, "lora": lora})
            out.append(per_position)
        return out

    # ------------------------------------------------------------------ latent z
    def initial_z(self, batch: int, draft_embeds_BWD=None):
        Z = self.mixer_out.shape[0]
        if self.z0 is not None:
            return jnp.broadcast_to(self.z0[...], (batch, self.num_slots, Z))
        z_BSZ = jnp.zeros((batch, self.num_slots, Z), F32)
        if draft_embeds_BWD is not None:  # z_init == "draft": one mixer pass over the draft tokens alone
            z_BSZ = self.mix(z_BSZ, None, draft_embeds_BWD, None, jnp.int32(0))
        return z_BSZ

    def mix(self, z_BSZ, h_top_BSD, token_embeds_BWD, conf_BW3, step):
        """z <- z + Mixer(Proj(h_top) + Proj(E[y]) + z + e_step + Proj(confidence)); missing inputs count as 0."""
        B, S, Z = z_BSZ.shape
        W = self.chunk_width
        pad = lambda a_BW: jnp.pad(a_BW, [(0, 0), (0, S - W), (0, 0)])  # the [Z] slot has no token/confidence
        x_BSZ = z_BSZ + (step_features(step) @ self.in_step[...])[None, None, :]
        if h_top_BSD is not None:
            x_BSZ = x_BSZ + jnp.einsum("bsd,dz->bsz", h_top_BSD.astype(F32), self.in_h[...])
        if token_embeds_BWD is not None:
            x_BSZ = x_BSZ + pad(jnp.einsum("bwd,dz->bwz", jax.lax.stop_gradient(token_embeds_BWD).astype(F32),
                                           self.in_tok[...]))
        if conf_BW3 is not None:
            x_BSZ = x_BSZ + pad(conf_BW3 @ self.in_conf[...])
        for block in self.mixer:
            x_BSZ = block(x_BSZ, self.eps)
        return z_BSZ + rms_norm(x_BSZ, self.mixer_norm[...], self.eps) @ self.mixer_out[...]

    def latent_token_embed(self, z_BSZ):
        return self.z_embed[...] + jnp.mean(z_BSZ, axis=1) @ self.z_to_embed[...]

    # ------------------------------------------------------------------ heads
    def heads(self, h_top_BSD):
        """(halt logit [B], length logits [B, W + 1] or None) from the [Z] readout (or the window mean)."""
        readout_BD = h_top_BSD[:, -1] if self.num_slots > self.chunk_width else jnp.mean(h_top_BSD, axis=1)
        halt_B = self.halt_head(readout_BD, self.eps)[:, 0]
        length_BL = None if self.length_head is None else self.length_head(readout_BD, self.eps)
        return halt_B, length_BL


def build_sidecar(cfg: KimiLinearConfig, rcfg: RecursiveConfig, seed: int | None = None) -> Sidecar:
    """A fresh sidecar (b = 0: the surgery that leaves the base unchanged), seeded from `rcfg.rng_seed`."""
    return Sidecar(cfg, rcfg, rngs=nnx.Rngs(rcfg.rng_seed if seed is None else seed))


def confidence_features(logits_BWV):
    """[max prob, top1 - top2 prob margin, entropy] per position, float32 (the mixer's confidence inputs)."""
    logp = jax.nn.log_softmax(logits_BWV.astype(F32), axis=-1)
    top2 = jax.lax.top_k(logp, 2)[0]
    p1, p2 = jnp.exp(top2[..., 0]), jnp.exp(top2[..., 1])
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jax.lax.stop_gradient(jnp.stack([p1, p1 - p2, entropy], axis=-1))
