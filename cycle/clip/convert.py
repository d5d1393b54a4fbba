"""open_clip towers -> transformers CLIP modules, weight for weight.

The vision tower becomes a `CLIPVisionModel` (the LVLM's vision tower) and, with the text tower and the
projections, a whole `CLIPModel` (the HF export). Only plain towers convert exactly: learned (or fixed)
position embedding, CLS pooling with `ln_post` over all tokens, the default residual block, no layer
scale, no attentional pooler, square images. Anything else raises `ConversionError` naming the reason,
rather than converting into a model that silently computes something else.

Exactness notes:
- open_clip's `nn.GELU` is the erf GELU: HF must say `hidden_act="gelu"` (HF's default `quick_gelu`
  changes every output); open_clip's `QuickGELU` maps to `quick_gelu`.
- Text pooling: open_clip's `argmax` takes the position of the highest token id (the EOT token of the
  bundled BPE tokenizer). HF's CLIP text model pools by argmax of the ids exactly when
  `eos_token_id == 2` (the convention of OpenAI's own HF configs), so that is what we write; open_clip's
  `eos` pooling maps to HF's first-occurrence-of-`eos_token_id` rule.
- Both text towers use the causal mask and no padding mask, so the padding after EOT never reaches it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel

from ..errors import HQClipError

HF_ARGMAX_EOS_ID = 2  # HF CLIPTextModel pools by argmax(input_ids) when eos_token_id == 2


# ValueError stays a base: `cycle export` (cycle/cli.py) catches ValueError around `export_generation`.
class ConversionError(HQClipError, ValueError):
    """The open_clip tower has a feature HF's CLIP cannot reproduce exactly."""


# ----------------------------------------------------------------------------------------------- blocks
def _hidden_act(block: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    act = block.mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    raise ConversionError(f"activation {type(act).__name__} has no HF CLIP equivalent")


def _check_blocks(transformer: nn.Module, what: str) -> nn.Module:
    from open_clip.transformer import ResidualAttentionBlock

    blocks = list(transformer.resblocks)
    if not blocks:
        raise ConversionError(f"{what} tower has no transformer blocks")
    for block in blocks:
        if type(block) is not ResidualAttentionBlock:
            raise ConversionError(f"{what} tower uses {type(block).__name__} (custom block): not convertible")
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(block.ls_2, nn.Identity):
            raise ConversionError(f"{what} tower uses layer scale (ls_init_value): HF CLIP has none")
        if hasattr(block, "ln_1_kv"):
            raise ConversionError(f"{what} tower uses cross-attention blocks: not convertible")
    return blocks[0]


def _block_state(block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """One open_clip residual block -> HF CLIPEncoderLayer weights (fused in_proj split into q/k/v)."""
    attn = block.attn
    q_w, k_w, v_w = attn.in_proj_weight.detach().chunk(3, dim=0)
    q_b, k_b, v_b = attn.in_proj_bias.detach().chunk(3, dim=0)
    out = {
        "self_attn.q_proj.weight": q_w,
        "self_attn.q_proj.bias": q_b,
        "self_attn.k_proj.weight": k_w,
        "self_attn.k_proj.bias": k_b,
        "self_attn.v_proj.weight": v_w,
        "self_attn.v_proj.bias": v_b,
        "self_attn.out_proj.weight": attn.out_proj.weight.detach(),
        "self_attn.out_proj.bias": attn.out_proj.bias.detach(),
        "layer_norm1.weight": block.ln_1.weight.detach(),
        "layer_norm1.bias": block.ln_1.bias.detach(),
        "layer_norm2.weight": block.ln_2.weight.detach(),
        "layer_norm2.bias": block.ln_2.bias.detach(),
        "mlp.fc1.weight": block.mlp.c_fc.weight.detach(),
        "mlp.fc1.bias": block.mlp.c_fc.bias.detach(),
        "mlp.fc2.weight": block.mlp.c_proj.weight.detach(),
        "mlp.fc2.bias": block.mlp.c_proj.bias.detach(),
    }
    return {f"{prefix}{k}": v.clone() for k, v in out.items()}


def _ln_eps(ln: nn.Module) -> float:
    return float(getattr(ln, "eps", 1e-5))


# ----------------------------------------------------------------------------------------------- vision
def _check_plain_vit(visual: nn.Module) -> None:
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ConversionError(f"vision tower is {type(visual).__name__}, not an open_clip VisionTransformer")
    if visual.attn_pool is not None:
        raise ConversionError("vision tower uses an attentional pooler: HF CLIP pools the CLS token")
    if visual.pool_type != "tok":
        raise ConversionError(f"vision tower pools '{visual.pool_type}': HF CLIP pools the CLS token ('tok')")
    if visual.final_ln_after_pool:
        raise ConversionError("vision tower sets final_ln_after_pool: not convertible")
    if isinstance(visual.ln_pre, nn.Identity):
        raise ConversionError("vision tower has no ln_pre (no_ln_pre): HF CLIP always applies pre_layrnorm")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise ConversionError(f"vision tower is not square ({visual.image_size}, patch {visual.patch_size})")
    if visual.conv1.bias is not None:
        raise ConversionError("vision tower's patch embedding has a bias: HF CLIP has none")


def hf_vision_config(visual: nn.Module, projection_dim: Optional[int] = None) -> CLIPVisionConfig:
    _check_plain_vit(visual)
    block = _check_blocks(visual.transformer, "vision")
    width = visual.conv1.out_channels
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        num_channels=visual.conv1.in_channels,
        image_size=visual.image_size[0],
        patch_size=visual.patch_size[0],
        hidden_act=_hidden_act(block),
        layer_norm_eps=_ln_eps(visual.ln_pre),
        projection_dim=projection_dim or (visual.proj.shape[1] if visual.proj is not None else width),
    )


def vision_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """HF `CLIPVisionModel` weights (keys relative to it) from an open_clip ViT; the projection is not included."""
    _check_plain_vit(visual)
    state = {
        "embeddings.class_embedding": visual.class_embedding.detach().clone(),
        "embeddings.patch_embedding.weight": visual.conv1.weight.detach().clone(),
        "embeddings.position_embedding.weight": visual.positional_embedding.detach().clone(),
        "pre_layrnorm.weight": visual.ln_pre.weight.detach().clone(),
        "pre_layrnorm.bias": visual.ln_pre.bias.detach().clone(),
        "post_layernorm.weight": visual.ln_post.weight.detach().clone(),
        "post_layernorm.bias": visual.ln_post.bias.detach().clone(),
    }
    for i, block in enumerate(visual.transformer.resblocks):
        state.update(_block_state(block, f"encoder.layers.{i}."))
    return state


def openclip_vit_to_hf_vision(visual: nn.Module) -> CLIPVisionModel:
    """An open_clip ViT (`model.visual`) as a transformers `CLIPVisionModel` with the same hidden states.

    `hidden_states[0]` is the input of the first block (after `ln_pre`), `hidden_states[i]` the output of
    block i, and `pooler_output` is `ln_post` of the CLS token, as in open_clip. The projection
    (`visual.proj`) is not part of `CLIPVisionModel`; `openclip_to_hf_clip` carries it.
    """
    config = hf_vision_config(visual)
    hf = CLIPVisionModel(config)
    _load_exact(hf, vision_state_dict(visual), "CLIPVisionModel")
    return hf.to(visual.conv1.weight.dtype).eval()


# ----------------------------------------------------------------------------------------------- text
def _text_parts(model: nn.Module) -> nn.Module:
    """The module that holds the text weights: `model.text` (CustomTextCLIP) or the CLIP itself."""
    text = getattr(model, "text", None)
    if text is not None:
        if getattr(text, "cls_emb", None) is not None:
            raise ConversionError("text tower embeds a CLS token (embed_cls): not convertible")
        if not hasattr(text, "token_embedding"):
            raise ConversionError(f"text tower is {type(text).__name__} (an HF text encoder): not convertible")
        return text
    return model


def hf_text_config(model: nn.Module) -> CLIPTextConfig:
    text = _text_parts(model)
    block = _check_blocks(text.transformer, "text")
    if getattr(text, "attn_mask", None) is None:
        raise ConversionError("text tower has no causal mask (no_causal_mask): HF CLIP text is causal")
    pool = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
    eos_attr = getattr(text, "text_eos_id", None) if text is model else getattr(text, "eos_id", None)
    if pool == "argmax":
        eos_id = HF_ARGMAX_EOS_ID
    elif pool == "eos" and eos_attr not in (None, HF_ARGMAX_EOS_ID):
        eos_id = int(eos_attr)
    else:
        raise ConversionError(f"text pooling '{pool}' has no exact HF CLIP equivalent")
    proj = text.text_projection
    if isinstance(proj, nn.Linear) and proj.bias is not None:
        raise ConversionError("text projection has a bias: HF CLIP's has none")
    if proj is None:
        raise ConversionError("text tower has no projection: not convertible to CLIPModel")
    width = text.token_embedding.embedding_dim
    return CLIPTextConfig(
        vocab_size=text.token_embedding.num_embeddings,
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(text.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        max_position_embeddings=text.positional_embedding.shape[0],
        hidden_act=_hidden_act(block),
        layer_norm_eps=_ln_eps(text.ln_final),
        projection_dim=_proj_weight(proj).shape[0],
        pad_token_id=0,
        bos_token_id=49406,
        eos_token_id=eos_id,
    )


def _proj_weight(proj) -> torch.Tensor:
    """open_clip stores projections as (in, out) parameters or Linear; HF wants Linear weights (out, in)."""
    return proj.weight.detach() if isinstance(proj, nn.Linear) else proj.detach().t()


def text_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    text = _text_parts(model)
    state = {
        "embeddings.token_embedding.weight": text.token_embedding.weight.detach().clone(),
        "embeddings.position_embedding.weight": text.positional_embedding.detach().clone(),
        "final_layer_norm.weight": text.ln_final.weight.detach().clone(),
        "final_layer_norm.bias": text.ln_final.bias.detach().clone(),
    }
    for i, block in enumerate(text.transformer.resblocks):
        state.update(_block_state(block, f"encoder.layers.{i}."))
    return state


# ----------------------------------------------------------------------------------------------- whole
def openclip_to_hf_clip(model: nn.Module) -> CLIPModel:
    """A whole open_clip CLIP as a transformers `CLIPModel` (towers, projections, logit scale)."""
    visual = model.visual
    text_cfg = hf_text_config(model)
    vision_cfg = hf_vision_config(visual)
    if visual.proj is None:
        raise ConversionError("vision tower has no projection: not convertible to CLIPModel")
    logit_scale = float(model.logit_scale.detach().reshape(-1)[0])
    if getattr(model, "logit_bias", None) is not None:
        raise ConversionError("model has a logit bias (SigLIP-style): HF CLIPModel has none")
    config = CLIPConfig(
        text_config=text_cfg.to_dict(),
        vision_config=vision_cfg.to_dict(),
        projection_dim=vision_cfg.projection_dim,
        logit_scale_init_value=logit_scale,
    )
    if text_cfg.projection_dim != vision_cfg.projection_dim:
        raise ConversionError(
            f"text and image embeddings differ in size ({text_cfg.projection_dim} vs {vision_cfg.projection_dim})"
        )
    hf = CLIPModel(config)
    state = {f"vision_model.{k}": v for k, v in vision_state_dict(visual).items()}
    state.update({f"text_model.{k}": v for k, v in text_state_dict(model).items()})
    state["visual_projection.weight"] = _proj_weight(visual.proj).clone()
    state["text_projection.weight"] = _proj_weight(_text_parts(model).text_projection).clone()
    state["logit_scale"] = model.logit_scale.detach().reshape(()).clone()
    _load_exact(hf, state, "CLIPModel")
    return hf.to(visual.conv1.weight.dtype).eval()


def _load_exact(hf: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load every weight of the HF module; any key missing or left over is a mapping bug, never ignored."""
    expected = set(hf.state_dict().keys())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ConversionError(
            f"{what} weight mapping incomplete: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    hf.load_state_dict(state, strict=True)
