"""The PyTorch reference (transformers' KimiLinearForCausalLM) for parity checks. Needs the `test` extra (torch).

`build_reference(cfg, seed)` makes a random HF model of the same architecture, with non-default A_log, dt_bias and
router correction bias (the defaults would hide bugs in those paths), and `save_reference(model, folder, layout)`
writes it as a checkpoint folder in the hub or transformers-native naming, optionally sharded.
"""

from __future__ import annotations

import json
import os

import numpy as np

from kimi_jax.config import KimiLinearConfig

LAYOUTS = ("hub", "native")


def hf_config(cfg: KimiLinearConfig):
    from transformers import KimiLinearConfig as HFConfig

    d = cfg.to_hf_dict()
    d.pop("architectures")
    d.pop("model_type")
    return HFConfig(**d)


def build_reference(cfg: KimiLinearConfig, seed: int = 0, bias_std: float = 0.5):
    import torch
    from transformers import KimiLinearForCausalLM

    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(hf_config(cfg)).eval().float()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(bias_std * torch.randn(module.e_score_correction_bias.shape,
                                                                            generator=gen))
    return model


def save_reference(model, folder: str, layout: str = "hub", num_shards: int = 1) -> str:
    """Write config.json and safetensors in the given naming; shards get a model.safetensors.index.json."""
    from safetensors.numpy import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    os.makedirs(folder, exist_ok=True)
    if layout == "hub":
        # transformers reverses its conversion mapping on save: the files carry the hub's original names.
        model.save_pretrained(folder, safe_serialization=True)
        tensors = _read_folder(folder)
        for f in os.listdir(folder):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.remove(os.path.join(folder, f))
    else:
        model.config.save_pretrained(folder)
        tensors = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    names = sorted(tensors)
    if num_shards <= 1:
        save_file({k: np.ascontiguousarray(tensors[k]) for k in names}, os.path.join(folder, "model.safetensors"))
        return folder
    weight_map = {}
    for s, part in enumerate(np.array_split(np.arange(len(names)), num_shards)):
        shard = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({names[i]: np.ascontiguousarray(tensors[names[i]]) for i in part}, os.path.join(folder, shard))
        weight_map.update({names[i]: shard for i in part})
    total = int(sum(t.nbytes for t in tensors.values()))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder


def _read_folder(folder: str) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def reference_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.as_tensor(attention_mask)}
        return model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long), **kwargs).logits.float().numpy()
