"""The CLIP model: the factory, and the module the trainer optimises.

One entry point, `create_clip(name)`: any open_clip architecture by name, or one of our small configs in
`model_configs/` (registered with open_clip, so open_clip itself can build them too). Model configs are
data; nothing here knows their sizes.

A saved CLIP (the checkpoint directory) is `saved.py`.

`ClipWithTagHead` is the module the trainer optimises: the CLIP plus, when STC is on, the tag head.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from pathlib import Path
from typing import Optional

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import parse_model_name
from torch import Tensor, nn

from ..errors import HQClipError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# The two files of a saved CLIP (saved.py writes and reads them; a pretrained directory has them too).
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"

_registered = False


# Outputs of `ClipWithTagHead` that are per-sample features (cached and concatenated across micro-batches);
# the rest (logit_scale) is recomputed with gradient every time.
FEATURE_KEYS = ("image_features", "text_features", "neg_text_features", "tag_logits")
# The linear tag head's initial weights: small, so every tag logit starts at the prior log-odds (its bias).
TAG_HEAD_INIT_STD = 0.01
# The cosine head's initial logit scale: cosines in [-1, 1] times 10 let a tag's logit move ~+-10 around
# its prior, the range BCE needs (a linear head on the unit-norm embedding at std 0.01 moves ~+-0.1).
STC_SCALE_INIT = 10.0
# The prior positive rate is clamped into [floor, 0.5]: a finite bias, and never a prior that favours "on".
TAG_PRIOR_MIN, TAG_PRIOR_MAX = 1e-6, 0.5
# Below this many texts the two-bucket split of `encode_text` saves nothing worth its extra call.
MIN_TEXTS_TO_BUCKET = 4


class CheckpointError(HQClipError, ValueError):
    """A CLIP checkpoint directory that is missing, incomplete or unreadable; the message says which file."""


class UnknownArchitectureError(HQClipError, ValueError):
    """`clip.name` names no open_clip architecture and none of `model_configs/`."""


def register_model_configs() -> None:
    """Make our small architectures (hqclip-tiny, hqclip-micro, ...) known to open_clip by name. Idempotent."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def list_architectures() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


@contextmanager
def _quiet_random_init():
    """open_clip warns "initialized randomly" whenever it loads no weights itself: expected here."""

    def drop(record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


QUICKGELU_SUFFIX = "-quickgelu"


def check_quickgelu(name: str, pretrained: Optional[str]) -> None:
    """Refuse QuickGELU weights (OpenAI's, DFN's, MetaCLIP's) for a GELU architecture: open_clip only warns,
    and the model then computes something else with every weight loaded. Offline: open_clip's tables."""
    if not pretrained or Path(pretrained).exists() or ":" in name.split("/")[0]:
        return  # a file or directory carries its own architecture; hf-hub:/local-dir: names their config
    register_model_configs()
    arch = name.replace("/", "-")
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    model_cfg = open_clip.get_model_config(arch) or {}
    if tag_cfg and tag_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
        fixed = arch + QUICKGELU_SUFFIX
        hint = (
            f"use clip.name={fixed}"
            if open_clip.get_model_config(fixed) is not None
            else "use an architecture with quick_gelu: true"
        )
        raise UnknownArchitectureError(
            f"config key 'clip.pretrained': '{pretrained}' weights of {arch} were trained with QuickGELU but "
            f"'{name}' uses GELU (open_clip would load them and silently compute something else): {hint}"
        )


def _resolve_pretrained(pretrained: Optional[str]) -> Optional[str]:
    """A checkpoint directory of ours becomes its weights file; tags and file paths go to open_clip as given."""
    if pretrained and Path(pretrained).is_dir():
        weights = Path(pretrained) / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"pretrained directory '{pretrained}' has no {WEIGHTS_FILE}")
        return str(weights)
    return pretrained


def create_clip(
    name: str, pretrained: Optional[str] = None, device: str | torch.device = "cpu", image_size: Optional[int] = None
):
    """Build a CLIP by architecture name. Returns (model, preprocess_train, preprocess_val, tokenizer).

    `pretrained` is an open_clip tag (downloads: needs a hub), a weights file, or a checkpoint directory
    written by `save_clip`. `image_size` overrides the config's (ViT position embeddings are resized
    when pretrained weights are loaded). The logit scale is always a 1-element tensor: DeepSpeed
    cannot shard 0-dim parameters.
    """
    register_model_configs()
    schema, _ = parse_model_name(name)
    if schema is None and open_clip.get_model_config(name.replace("/", "-")) is None:
        known = ", ".join(open_clip.list_models())
        raise UnknownArchitectureError(f"unknown CLIP architecture '{name}'; known: {known}")
    check_quickgelu(name, pretrained)
    with _quiet_random_init() if pretrained is None else nullcontext():
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name,
            pretrained=_resolve_pretrained(pretrained),
            device=device,
            force_image_size=image_size,
            nonscalar_logit_scale=True,
        )
    tokenizer = open_clip.get_tokenizer(name)
    _remember(model, _plain_name(name), open_clip.get_model_config(name if schema else name.replace("/", "-")))
    return model, preprocess_train, preprocess_val, tokenizer


def _remember(model: torch.nn.Module, name: str, cfg: Optional[dict]) -> None:
    """What `save_clip` records when not told: the architecture name and the exact config it was built from."""
    model.hqclip_model_name = name
    model.hqclip_model_cfg = deepcopy(cfg)


def model_config_of(model: torch.nn.Module, model_name: Optional[str] = None) -> dict:
    """The open_clip model config that rebuilds `model`: the config it was built from (else the named
    one), with the image size and context length the model actually has."""
    register_model_configs()
    cfg = getattr(model, "hqclip_model_cfg", None)
    if cfg is None and model_name:
        cfg = open_clip.get_model_config(model_name.replace("/", "-") if ":" not in model_name else model_name)
    if cfg is None:
        raise ValueError(f"unknown CLIP architecture '{model_name}'")
    cfg = deepcopy(cfg)
    visual = getattr(model, "visual", None)
    size = getattr(visual, "image_size", None)
    if size is not None and "timm_model_name" not in cfg["vision_cfg"]:
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        cfg["vision_cfg"]["image_size"] = size[0] if size[0] == size[1] else list(size)
    if getattr(model, "context_length", None):
        cfg["text_cfg"]["context_length"] = int(model.context_length)
    return cfg


def read_checkpoint_config(path: str | Path) -> dict:
    """The parsed `open_clip_config.json` of a checkpoint directory, with clear errors."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"CLIP checkpoint directory '{path}' does not exist")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"CLIP checkpoint '{path}' has no {CONFIG_FILE}")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"CLIP checkpoint '{path}': {CONFIG_FILE} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise CheckpointError(f"CLIP checkpoint '{path}': {CONFIG_FILE} has no 'model_cfg' object")
    return config


def _plain_name(model_name: str) -> str:
    schema, ident = parse_model_name(model_name)
    if schema == "local-dir":
        try:
            return read_checkpoint_config(ident).get("model_name") or model_name
        except CheckpointError:
            return model_name
    return model_name


class CosineTagHead(nn.Module):
    """z_k = s * cos(x, w_k) + b_k: a cosine classifier with a learnable scale s = exp(logit_scale).

    Why: the image embedding is unit-norm, so a linear head's logits are bounded by |w_k|, which starts at
    ~0.01 * sqrt(D) and grows slowly under weight decay; normalising w_k and learning s gives the logits
    their range from the first step (the scale is not decayed: `optim.no_weight_decay` matches its name).
    The rows start small (std 0.01) all the same: AdamW moves every coordinate by ~lr a step whatever its
    size, so learned directions replace the random ones within tens of steps instead of hundreds
    (tests/test_loss.py: BCE 0.95 -> 0.22 in 100 steps, against 0.95 -> 0.76 with unit-norm rows).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * TAG_HEAD_INIT_STD)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(STC_SCALE_INIT)))

    def forward(self, x: Tensor) -> Tensor:
        return self.logit_scale.exp() * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T + self.bias


class TextTagHead(nn.Module):
    """z_k = s * cos(x, t_k) + b_k where t_k is the CLIP's own text embedding of tag k's text.

    Why: zero-shot classifies an image by its cosine with the text embedding of a class name; a head with
    free rows (CosineTagHead) shapes only the image side, so it can leave zero-shot where it was. Here the
    class rows ARE the text tower's embeddings of the tag texts, so STC's gradient also reaches the text
    tower and trains short class-like texts against every image, present tag or absent. The tag texts are
    the vocabulary's normalised tags; their tokens are a buffer rebuilt from the vocabulary (not saved).
    Saved as a cosine head whose rows are the text embeddings at save time (`Trainer.save_model`), so
    evaluation and the next generation read one head format.
    """

    def __init__(self, tag_tokens: Tensor):
        super().__init__()
        self.register_buffer("tokens", tag_tokens, persistent=False)
        self.bias = nn.Parameter(torch.zeros(tag_tokens.shape[0]))
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(STC_SCALE_INIT)))

    def forward(self, x: Tensor, tag_features: Tensor) -> Tensor:
        return self.logit_scale.exp() * F.normalize(x, dim=-1) @ F.normalize(tag_features, dim=-1).T + self.bias


def make_tag_head(kind: str, in_features: int, num_tags: int, tag_tokens: Optional[Tensor] = None) -> nn.Module:
    """`loss.stc_head`: "cosine" (CosineTagHead), "linear" (nn.Linear) or "text" (TextTagHead, needs the
    tokenized tag texts)."""
    if kind == "cosine":
        return CosineTagHead(in_features, num_tags)
    if kind == "linear":
        return nn.Linear(in_features, num_tags)
    if kind == "text":
        if tag_tokens is None or tag_tokens.shape[0] != num_tags:
            raise ValueError(f"a text STC head needs the {num_tags} tokenized tag texts")
        return TextTagHead(tag_tokens)
    raise ValueError(f"unknown STC head '{kind}', expected cosine, linear or text")


def tag_head_kind(state: dict) -> str:
    """The kind of a head, from its tensors: a cosine head has rows and a logit scale, a text head only a
    logit scale (its rows are text embeddings), a linear head no scale."""
    if "logit_scale" not in state:
        return "linear"
    return "cosine" if "weight" in state else "text"


class ClipWithTagHead(nn.Module):
    """The CLIP plus, when STC is on, the tag head; one `forward` gives everything `HQClipLoss` needs.

    So a DeepSpeed engine wraps a single module and the feature cache stores one dict per micro-batch.
    Positive and negative texts go through the text tower in one call; only usable negatives are encoded
    (the others stay zero rows, masked by the loss). `head` is `loss.stc_head` ("cosine" or "linear").
    """

    def __init__(
        self,
        clip: nn.Module,
        num_tags: int = 0,
        embed_dim: Optional[int] = None,
        cut_text_padding: bool = True,
        head: str = "cosine",
        tag_tokens: Optional[Tensor] = None,
    ):
        super().__init__()
        self.clip = clip
        self.cut_text_padding = cut_text_padding
        if num_tags > 0:
            embed_dim = embed_dim or _embed_dim(clip)
            # The head reads the unit-norm image embedding: STC shapes the same space that zero-shot uses.
            self.stc_head: Optional[nn.Module] = make_tag_head(head, embed_dim, num_tags, tag_tokens)
        else:
            self.stc_head = None

    def init_tag_prior(self, positive_rate) -> None:
        """Start every tag logit at its prior log-odds, so early steps don't just push all tags down.

        `positive_rate`: one rate for every tag, or one per tag (the tag's share of annotated samples).
        """
        if self.stc_head is None:
            return
        rates = torch.as_tensor(positive_rate, dtype=torch.float32).expand(self.stc_head.bias.shape)
        p = rates.clamp(TAG_PRIOR_MIN, TAG_PRIOR_MAX)
        with torch.no_grad():
            if isinstance(self.stc_head, nn.Linear):
                nn.init.normal_(self.stc_head.weight, std=TAG_HEAD_INIT_STD)
            self.stc_head.bias.copy_(torch.log(p / (1 - p)))

    def carry_over_head(self, state: dict, old_vocab: list, new_vocab: list) -> int:
        """Copy the rows (weight, bias) of tags in both vocabularies from a previous head's `state`, and a
        cosine head's scale; a text head takes the biases and scale only (its rows are its CLIP's text
        embeddings). Returns the number of rows copied; 0 when the head's kind or width differs."""
        head = self.stc_head
        if head is None:
            return 0
        text = isinstance(head, TextTagHead)  # its rows are the text tower's: only biases and scale carry
        if not text and tag_head_kind(state) != tag_head_kind(dict(head.named_parameters())):
            return 0
        if text and "logit_scale" not in state:
            return 0
        if len(old_vocab) != len(state["bias"]) or (
            not text and tuple(state["weight"].shape[1:]) != tuple(head.weight.shape[1:])
        ):
            return 0
        old_index = {t: i for i, t in enumerate(old_vocab)}
        pairs = [(k, old_index[t]) for k, t in enumerate(new_vocab) if t in old_index]
        if not pairs:
            return 0
        new_rows, old_rows = (torch.tensor(x) for x in zip(*pairs))
        with torch.no_grad():
            if not text:
                head.weight[new_rows] = state["weight"][old_rows].to(head.weight)
            head.bias[new_rows] = state["bias"][old_rows].to(head.bias)
            if "logit_scale" in state:
                head.logit_scale.copy_(state["logit_scale"].reshape(head.logit_scale.shape))
        return len(pairs)

    def _encode_text(self, tokens: Tensor) -> Tensor:
        if self.cut_text_padding:
            return encode_text(self.clip, tokens)
        return self.clip.encode_text(tokens, normalize=True)

    def forward(
        self,
        images: Tensor,
        texts: Tensor,
        neg_texts: Optional[Tensor] = None,
        neg_valid: Optional[Tensor] = None,
        **_unused,
    ) -> dict[str, Tensor]:
        image_features = self.clip.encode_image(images, normalize=True)
        n = texts.shape[0]
        out = {"image_features": image_features}
        if neg_texts is not None:
            idx = torch.nonzero(neg_valid, as_tuple=True)[0]
            feats = self._encode_text(torch.cat([texts, neg_texts[idx]]))
            out["text_features"] = feats[:n]
            neg = feats.new_zeros((n, feats.shape[1]))
            out["neg_text_features"] = neg.index_copy(0, idx, feats[n:])
        else:
            out["text_features"] = self._encode_text(texts)
        if isinstance(self.stc_head, TextTagHead):
            out["tag_logits"] = self.stc_head(image_features, self._encode_text(self.stc_head.tokens))
        elif self.stc_head is not None:
            out["tag_logits"] = self.stc_head(image_features)
        out["logit_scale"] = self.clip.logit_scale.exp()
        return out


def encode_text(clip: nn.Module, tokens: Tensor) -> Tensor:
    """Unit-norm text features; equal to `clip.encode_text(tokens, normalize=True)` up to float rounding.

    Texts are mostly shorter than the context (alt-text, tags): the text tower runs on two length
    buckets, each cut after its longest text's last token. With a causal text tower pooled at the
    end-of-text token this changes nothing (no position attends to a later one) but skips the padding.
    """
    n = tokens.shape[0]
    if n < MIN_TEXTS_TO_BUCKET or not _trimmable(clip):
        return clip.encode_text(tokens, normalize=True)
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    lengths = ((tokens != 0) * positions).amax(dim=1)  # one past the last non-pad token (end-of-text included)
    order = torch.argsort(lengths)
    ordered = lengths[order].tolist()
    # the split into (short, long) that runs the fewest token positions
    k = min(range(1, n), key=lambda i: i * ordered[i - 1] + (n - i) * ordered[-1])
    parts = [order[:k], order[k:]]
    feats = torch.cat([_encode_cut(clip, tokens[idx, : int(max(lengths[idx].max(), 1))]) for idx in parts])
    return feats[torch.argsort(torch.cat(parts))]


def _trimmable(clip: nn.Module) -> bool:
    """open_clip `CLIP` with a causal text tower pooled at the end-of-text token (argmax / eos)."""
    return (
        all(hasattr(clip, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final"))
        and getattr(clip, "attn_mask", None) is not None
        and getattr(clip, "text_pool_type", None) in ("argmax", "eos")
    )


def _encode_cut(clip: nn.Module, tokens: Tensor) -> Tensor:
    """The text tower on `tokens` cut to their own length (the CLIP text path, positions [0, L))."""
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    proj = clip.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1)


def _embed_dim(clip: nn.Module) -> int:
    proj = getattr(clip, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    if isinstance(proj, Tensor):
        return proj.shape[1]
    return int(clip.visual.output_dim)
