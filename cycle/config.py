"""Structured configuration for a run: one dataclass per part, YAML files, `key=value` overrides.

`load_config(path, overrides)` is the one entry point. Anything wrong (unknown key, wrong type, missing
required value, a bad choice) raises `ConfigError` with one line naming the key and what was expected.
`fingerprint(section)` is the stable hash the controller records for each stage's inputs.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import HQClipError
from .files import write_text_atomic


class ConfigError(HQClipError, ValueError):
    """A configuration problem, explained in one line that names the key (a ValueError for older callers)."""


# ----------------------------------------------------------------------------------------------- data
@dataclass
class AltNoiseConfig:
    """Rates of the seeded corruptions that turn a clean scene description into web-like alt-text.

    Each scene draws exactly one kind (or none, with the remaining probability); see
    `cycle.data.emoji.altnoise` for what each kind does.
    """

    one_object: float = 0.25  # only one of the scene's objects is named
    wrong_count: float = 0.10  # a count is changed
    wrong_position: float = 0.10  # a position word is changed
    sibling_name: float = 0.15  # an object is named as a sibling of its subgroup
    generic: float = 0.10  # "image", "photo of stuff", ...
    filename: float = 0.10  # "IMG_2041.png", "emoji-sticker-12.jpg"
    shop_spam: float = 0.10  # "Buy cheap ... free shipping"


@dataclass
class EmojiScenesConfig:
    """The built-in dataset: Noto Color Emoji glyphs composed into scenes (see DESIGN.md)."""

    font: str = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
    image_size: int = 64
    vocab_size: int = 200  # concrete objects drawn from the allowed groups
    max_objects: int = 3  # objects per scene: 1..max_objects
    max_count: int = 3  # copies of one object in a scene: 1..max_count
    n_train: int = 3000
    n_val: int = 300  # validation split: tune here, never on held-out sets
    n_test_retrieval: int = 300
    n_test_negatives: int = 300
    n_test_compositional: int = 200
    n_test_zeroshot_per_object: int = 2  # single-object renderings per vocabulary object (zero-shot test)
    single_object_share: float = 0.3  # share of scenes that are the plain emoji
    heldout_pair_share: float = 0.1  # object pairs kept out of training for the compositional test
    seed_share: float = 0.1  # share of training scenes with a teacher annotation (paper: 10k of 150M)
    alt_noise: AltNoiseConfig = field(default_factory=AltNoiseConfig)
    seed: int = 0


@dataclass
class DataConfig:
    source: str = "emoji-scenes"  # "emoji-scenes" or "store" (samples already ingested into the run)
    emoji: EmojiScenesConfig = field(default_factory=EmojiScenesConfig)
    max_pixels: int = 50_000_000  # decompression-bomb cap on ingested images
    min_side: int = 8  # smaller images are rejected
    num_workers: int = 0  # DataLoader workers (spawn context: Lance is not fork-safe)


@dataclass
class StoreConfig:
    uri: str = ""  # empty: <run_dir>/lance; a path, or an object store: s3://bucket/path, gs://..., az://...
    write_batch: int = 1024  # rows per commit: few large commits keep the table lean
    # Object stores: Lance storage options that are not secret (aws_endpoint, aws_region, allow_http, ...).
    # config.yaml is saved in the run folder, so secrets are refused here (see `_validate_store`).
    storage_options: dict[str, Any] = field(default_factory=dict)
    # option -> name of the environment variable its value is read from when the store is opened
    # (credentials: aws_secret_access_key: AWS_SECRET_ACCESS_KEY); only the name is saved
    storage_options_env: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- CLIP
@dataclass
class ClipModelConfig:
    name: str = "hqclip-tiny"  # any open_clip architecture, or one of cycle/clip/model_configs/*.json
    pretrained: Optional[str] = None  # open_clip pretrained tag (needs a hub) or a checkpoint path
    init: str = "scratch"  # gen >= 1: "scratch" or "previous" (start from CLIP_{g-1})


@dataclass
class LossConfig:
    # Positive text of an annotated sample: long description, short tag text, else the raw alt-text
    # (long_text_prob + short_text_prob <= 1). Short tag texts keep zero-shot prompts ("a photo of X")
    # in the training distribution as descriptions replace alt-text.
    long_text_prob: float = 0.5  # P(positive text = long description)
    # P(positive text = one tag or "a, b and c" from the tags). 0 until measured better: at 0.2, val R@1 fell
    # 0.164 -> 0.134 on 2 seeds of a shortened demo and val zero-shot stayed at chance (tune_loss_val.md).
    short_text_prob: float = 0.0
    short_text_max_tags: int = 3  # a short text names 1 to this many of the sample's tags
    hni_weight: float = 1.0
    hni_mode: str = "batch"  # "batch" (negatives as extra columns, NegCLIP style) or "pair"
    # what L_hni's sum over rows with a negative is divided by: "batch" (N: a row weighs as in L_clip) or
    # "negatives" (their count |V|: each such row weighs N/|V| times an L_clip row, 9x when 11% of rows have
    # one; at the demo's size that took generation 1 below generation 0: benchmarks/results/variant_hninorm.md)
    hni_norm: str = "batch"
    # "paired": a row's negative is the aligned edit of ITS positive (neg_desc for a description, neg_tags
    # for a tag text, none for alt-text), as the paper means HNI; "independent": the old draw (the negative
    # source drawn by neg_tags_prob whatever the positive), kept for comparison; "mined": a description's
    # negative sentences are other training images' sentences one word away from its own (clip/text.py), texts
    # the CLIP also sees as positives
    hni_negatives: str = "paired"
    neg_tags_prob: float = 0.5  # "independent" only: P(negative text = negative tags) vs long negative description
    # A negative part (sentence or tag) further than this many words (word-level edit distance) from its
    # positive part is not a minimal edit, so it may well be true: it is not used. 0: no bound. The emoji
    # teacher's exact minimal edits are 1-3 words (benchmarks/results/neg_edit_distances.md); 8 leaves room
    # for longer names in user data.
    neg_max_edit_words: int = 8
    # "swap": a description whose negative has no usable edit (identical, too far, missing) is given a rule
    # edit instead, one count/spatial/colour word swapped (clip/negatives.swap_edit); "tags": one object edit
    # made from the annotator's own tag negatives, a tag the description names replaced by its aligned negative
    # tag (clip/negatives.tag_edit); "none": it has no negative
    neg_repair: str = "none"
    # Which texts an image with a teacher annotation (the seed set the annotator is fine-tuned on) trains CLIP_g
    # on: "annotator" (its own annotation, like every other image) or "teacher" (the teacher's: correct facts
    # and exact minimal-edit negatives, where the annotator's negatives mostly repeat its description)
    seed_texts: str = "annotator"
    stc_weight: float = 1.0
    # "cosine": z_k = s * cos(x, w_k) + b_k, s learnable (init 10), b_k at the tag's prior log-odds: its logits
    # reach useful magnitudes. "linear": z = W x + b on the unit-norm embedding, W at std 0.01 (measured in
    # 2026-11: the term fell 2% in training; the logits cannot move). Default: the one that learns (val, 2 seeds
    # of a shortened demo: STC term 0.080 -> 0.069, falls 17% in training instead of 0%; R@1 unchanged).
    # "text": z_k = s * cos(x, T(tag_k)) + b_k, the rows are the CLIP's text embeddings of the tag texts, so STC
    # also trains the text tower on class-like texts (what zero-shot reads)
    stc_head: str = "cosine"
    stc_vocab_size: int = 1000  # top-K normalised tags of the generation's annotations
    stc_min_count: int = 2
    max_sentences: int = 0  # 0: as many sentences as fit the text context
    text_fit: str = "sample"  # "sample" sentences to fit the context, or "truncate"


@dataclass
class TrainConfig:
    epochs: int = 10
    # epochs of generation g's training: the g-th entry, the last one for later generations; empty: `epochs`
    # everywhere. E.g. [20, 10]: generation 0 trains 20 epochs, each later one 10 (it starts from the previous
    # CLIP with `clip.init: previous`), or [20, 40] for an epoch-matched control of two generations.
    epochs_per_generation: list = field(default_factory=list)
    batch_size: int = 128  # global batch (contrastive negatives span all of it)
    micro_batch_size: int = 0  # 0: = batch_size / world size; smaller: feature-cache accumulation
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_clip: float = 1.0
    zero_stage: int = 1
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16"
    checkpoint_every: int = 100  # steps
    log_every: int = 10
    seed: int = 0
    world_size: int = 1  # >1 starts that many processes on this machine; under a launcher, its WORLD_SIZE


@dataclass
class EvalConfig:
    batch_size: int = 256
    templates: list[str] = field(default_factory=lambda: ["a photo of {}.", "an emoji of {}.", "{}"])
    splits: list[str] = field(
        default_factory=lambda: ["test_zeroshot", "test_retrieval", "test_negatives", "test_compositional"]
    )
    select_split: str = "val"  # the split that early stopping and tuning look at


# ----------------------------------------------------------------------------------------------- LVLM
@dataclass
class LMConfig:
    name: str = "tiny"  # "tiny": a Llama-style LM built and pretrained here; else an HF name or path
    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 4
    vocab_size: int = 4096  # BPE trained on the run's text
    max_length: int = 192  # text tokens per training sequence; the image's tokens come on top
    pretrain_epochs: int = 3
    pretrain_lr: float = 1e-3
    # emoji-scenes: each seed sequence is also pretrained on with this many fresh noisy alt-texts, so the
    # tiny LM learns to read, copy and repair the reference (measured on the demo data: fact-F1 of the
    # annotator on val 0.08-0.14 without, 0.25 with 4)
    pretrain_seed_variants: int = 4
    batch_size: int = 32


@dataclass
class StageConfig:
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 16
    warmup_steps: int = 10


@dataclass
class LoraConfig:
    enabled: bool = True  # False: full fine-tuning of the LM (better for tiny LMs, see ENV-FACTS)
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class CarryConfig:
    """Generation >= 2 starts from the previous generation's annotator (its LM, tokenizer and projector,
    under the new tower) instead of the pretrained LM: SFT continues rather than restarts, so it needs fewer
    epochs, and what annotator g-1 learned is kept (merged SFT outputs only: full tuning or
    `lvlm.sft_save: merged`)."""

    enabled: bool = False
    align_epochs: Optional[int] = None  # alignment epochs when carried (None: lvlm.align.epochs)
    sft_epochs: Optional[int] = None  # SFT epochs when carried (None: lvlm.sft.epochs)


@dataclass
class LVLMConfig:
    # an existing LLaVA-family checkpoint (llava-hf layout: a hub name or a directory that
    # `LlavaForConditionalGeneration` loads): its LM, tokenizer and chat template are reused, and its
    # projector too when the tower's width matches the projector's input; "" builds on `lm.name`
    base: str = ""
    lm: LMConfig = field(default_factory=LMConfig)
    vision_feature_layer: int = -2
    keep_cls_token: bool = True  # "full" feature select: keep the CLS image token
    align: StageConfig = field(default_factory=lambda: StageConfig(epochs=2, lr=1e-3))
    # share of the non-seed training samples also used for alignment, captioned by their raw alt-text
    # (LLaVA's stage 1 aligns on web captions): more images to learn image -> words from than the seeds
    align_alt_text_share: float = 0.0
    # gen >= 2: share of the previous generation's annotations added to alignment, those that the CLIP trained on
    # them fits best (mean cos(image, desc sentence); seed images excluded)
    align_add_best: float = 0.0
    sft: StageConfig = field(default_factory=lambda: StageConfig(epochs=20, lr=5e-4))
    lora: LoraConfig = field(default_factory=LoraConfig)
    sft_add_best: float = 0.0  # gen >= 2: the same for SFT (the four formulas as targets)
    carry: CarryConfig = field(default_factory=CarryConfig)
    # emoji-scenes seeds: fresh alt-text noise every SFT epoch (from the scene graph), so the annotator
    # learns to read the image rather than memorise one alt-text per seed (measured to help, ENV-FACTS)
    sft_fresh_alt_text: bool = True
    sft_gradient_checkpointing: bool = False  # recompute LM activations in SFT: far less memory, ~30% slower
    # the same for alignment: its loss backpropagates through the whole (frozen) LM to the projector
    align_gradient_checkpointing: bool = False
    # what SFT keeps: "merged" (a whole LLaVA with the adapter merged in), "adapter" (LoRA only: the
    # adapter + the projector beside the aligned LLaVA, no full copy; the annotator merges in memory or
    # vLLM serves the adapter), "auto" (adapter for a real LM with LoRA, merged otherwise)
    sft_save: str = "auto"
    dtype: str = "auto"  # LLaVA weights: "auto" (bf16 on GPU, fp32 on CPU), "fp32", "bf16"


@dataclass
class OpenAIBackendConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    requests_per_minute: int = 600
    timeout_s: float = 60.0
    max_retries: int = 5


@dataclass
class VLLMBackendConfig:
    python: str = ""  # python of a separate vLLM environment; empty: import vllm here
    mode: str = "offline"  # "offline" (vllm.LLM) or "server" (OpenAI-compatible server)
    gpu_memory_utilization: float = 0.85
    cpu_memory_utilization: float = 0.2  # vLLM on a CPU: share of RAM it reserves (its gpu_memory_utilization there)
    max_num_seqs: int = 256
    tensor_parallel_size: int = (
        1  # GPUs one vLLM engine spans (offline mode); with Ray: cluster.annotate.gpus_per_actor
    )


@dataclass
class AnnotateConfig:
    backend: str = "transformers"  # "transformers", "vllm" or "openai"
    batch_size: int = 64
    max_new_tokens: int = 96
    temperature: float = 0.0
    retries: int = 2  # extra attempts with another seed before a row is kept as failed
    retry_temperature: float = 0.7  # retries sample (a greedy retry would repeat the same output)
    write_batch: int = 512
    # transformers backend: "dynamic" grows the KV cache by concatenation every step; "static"
    # preallocates it (no per-step copy of the whole cache: see README, annotation throughput)
    kv_cache: str = "dynamic"
    openai: OpenAIBackendConfig = field(default_factory=OpenAIBackendConfig)
    vllm: VLLMBackendConfig = field(default_factory=VLLMBackendConfig)


# ----------------------------------------------------------------------------------------------- cluster
@dataclass
class ClusterAnnotateConfig:
    """The annotation pass on Ray Data: one actor per model copy, each holding one backend."""

    actors: int = 2  # model copies working at once (one per GPU, or per tensor-parallel group)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # vLLM with tensor_parallel_size=k: k
    # rows of the pinned samples table per shard: the unit of work, of resume and of loss on a failure
    # (shard ids depend on it, so a pass resumes with the size it began with)
    rows_per_shard: int = 1024
    # finished shards are committed to staging together at most this often: one Lance version per interval,
    # not per shard (a killed controller redoes at most one interval's shards); 0: each shard on its own, at once
    commit_every_s: float = 30.0


@dataclass
class ClusterLvlmConfig:
    """Alignment and SFT under Ray Train: data-parallel workers, each holding the whole LLaVA."""

    workers: int = 1  # each takes its share of every batch; gradients are averaged over all target tokens
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 0: CPU workers; on a GPU cluster 1 (one LLaVA per GPU)


@dataclass
class ClusterConfig:
    """Where the stages run: `local` (this process; imports no Ray) or `ray` (a Ray cluster)."""

    executor: str = "local"
    address: Optional[str] = None  # a Ray cluster ("ray://host:10001", "host:6379", "auto"); null: a local Ray
    runtime_env: dict[str, Any] = field(default_factory=dict)  # Ray's runtime_env for the run's job
    annotate: ClusterAnnotateConfig = field(default_factory=ClusterAnnotateConfig)
    lvlm: ClusterLvlmConfig = field(default_factory=ClusterLvlmConfig)


# ----------------------------------------------------------------------------------------------- run
@dataclass
class CycleConfig:
    generations: int = 2  # generations after gen 0
    early_stop_patience: int = 0  # 0: never stop early
    early_stop_metric: str = "val/retrieval_mean_r1"


@dataclass
class RunConfig:
    name: str = MISSING
    root: str = "generations"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    cpu_threads: int = 0  # torch intra-op threads on the CPU; 0: torch's default. 1 is steadier on shared cores
    gpu_memory_gb: float = 0.0  # memory of one GPU the run is planned for (`hqclip run --dry-run`); 0: no check
    data: DataConfig = field(default_factory=DataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    clip: ClipModelConfig = field(default_factory=ClipModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lvlm: LVLMConfig = field(default_factory=LVLMConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    cycle: CycleConfig = field(default_factory=CycleConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name


# Values that must be one of a few words; checked after merging so the message names the key.
CHOICES: dict[str, tuple[str, ...]] = {
    "data.source": ("emoji-scenes", "store"),
    "clip.init": ("scratch", "previous"),
    "loss.hni_mode": ("batch", "pair"),
    "loss.hni_norm": ("negatives", "batch"),
    "loss.hni_negatives": ("paired", "mined", "independent"),
    "loss.neg_repair": ("none", "swap", "tags"),
    "loss.seed_texts": ("annotator", "teacher"),
    "loss.stc_head": ("cosine", "linear", "text"),
    "loss.text_fit": ("sample", "truncate"),
    "train.precision": ("auto", "fp32", "bf16"),
    "annotate.backend": ("transformers", "vllm", "openai"),
    "annotate.vllm.mode": ("offline", "server"),
    "annotate.kv_cache": ("dynamic", "static"),
    "lvlm.sft_save": ("auto", "merged", "adapter"),
    "lvlm.dtype": ("auto", "fp32", "bf16"),
    "device": ("auto", "cpu", "cuda"),
    "cluster.executor": ("local", "ray"),
}
PROBABILITIES = (
    "loss.long_text_prob",
    "loss.short_text_prob",
    "loss.neg_tags_prob",
    "data.emoji.seed_share",
    "data.emoji.single_object_share",
    "data.emoji.heldout_pair_share",
    "lvlm.sft_add_best",
    "lvlm.align_alt_text_share",
    "lvlm.align_add_best",
)


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).split("\n")[0]
    return f"config key '{key}': {msg}" if key else f"config: {msg}"


MIN_EMOJI_IMAGE_SIZE = 16  # below this the glyphs of a scene no longer fit their layout cells
ALT_NOISE_KINDS = tuple(f.name for f in fields(AltNoiseConfig))


def check_emoji(emoji: Any) -> None:
    """The built-in dataset's settings (a DictConfig or an `EmojiScenesConfig`: the builder checks the
    one it is given too). Limits that need the vocabulary or the layout are checked where those live."""
    if emoji.image_size < MIN_EMOJI_IMAGE_SIZE:
        raise ConfigError(
            f"config key 'data.emoji.image_size': got {emoji.image_size}, expected >= {MIN_EMOJI_IMAGE_SIZE}"
        )
    for key in (
        "n_train",
        "n_val",
        "n_test_retrieval",
        "n_test_negatives",
        "n_test_compositional",
        "n_test_zeroshot_per_object",
    ):
        if getattr(emoji, key) < 0:
            raise ConfigError(f"config key 'data.emoji.{key}': got {getattr(emoji, key)}, expected >= 0")
    for key in (
        "single_object_share",
        "heldout_pair_share",
        "seed_share",
        *(f"alt_noise.{k}" for k in ALT_NOISE_KINDS),
    ):
        value = getattr(emoji.alt_noise, key.split(".")[1]) if "." in key else getattr(emoji, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key 'data.emoji.{key}': got {value!r}, expected a probability in [0, 1]")
    total = sum(getattr(emoji.alt_noise, k) for k in ALT_NOISE_KINDS)
    if total > 1.0 + 1e-9:
        raise ConfigError(f"config key 'data.emoji.alt_noise': rates sum to {total:.3f}, expected <= 1")
    if emoji.n_test_compositional > 0 and (emoji.max_objects < 2 or emoji.heldout_pair_share <= 0):
        raise ConfigError(
            "config key 'data.emoji.n_test_compositional': the compositional test needs "
            "max_objects >= 2 and heldout_pair_share > 0 (or set n_test_compositional=0)"
        )


def _at_least(cfg: DictConfig, low: int, *keys: str) -> None:
    """Refuse any of `keys` (dotted, from the root) below `low`, naming the key."""
    for key in keys:
        if OmegaConf.select(cfg, key) < low:
            raise ConfigError(f"config key '{key}': got {OmegaConf.select(cfg, key)!r}, expected >= {low}")


def _validate_data_store_eval(cfg: DictConfig) -> None:
    check_emoji(cfg.data.emoji)
    _at_least(cfg, 1, "store.write_batch", "eval.batch_size", "data.min_side", "data.max_pixels")
    _at_least(cfg, 0, "data.num_workers")
    if not cfg.eval.templates:
        raise ConfigError("config key 'eval.templates': empty, expected at least one (zero-shot needs a prompt)")


def _validate(cfg: DictConfig) -> None:
    _validate_data_store_eval(cfg)
    _validate_store(cfg)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}': got {value!r}, expected one of {', '.join(allowed)}")
    for key in PROBABILITIES:
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key '{key}': got {value!r}, expected a probability in [0, 1]")
    _at_least(
        cfg,
        1,
        "train.epochs",
        "train.batch_size",
        "data.emoji.image_size",
        "data.emoji.vocab_size",
        "data.emoji.max_objects",
        "annotate.batch_size",
    )
    _validate_clip_train(cfg)
    _validate_lvlm_annotate(cfg)
    _validate_cluster(cfg)
    _validate_names(cfg)


# --- store: where the run's LanceDB lives, and how it is reached (object stores)
# Option names that hold a secret (credentials, tokens, keys): only ever through store.storage_options_env.
SECRET_OPTION = re.compile(r"secret|token|password|sas|account_key|service_account_key", re.IGNORECASE)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# schemes whose URI names a bucket or container right after "://"
BUCKET_SCHEMES = ("s3", "s3+ddb", "gs", "az", "abfs", "abfss")


def _validate_store(cfg: DictConfig) -> None:
    uri = cfg.store.uri
    scheme, sep, rest = uri.partition("://")
    if sep and scheme.lower() in BUCKET_SCHEMES and not rest.split("/")[0]:
        raise ConfigError(f"config key 'store.uri': got {uri!r}, expected {scheme}://BUCKET/PATH")
    options, env = cfg.store.storage_options, cfg.store.storage_options_env
    for key in options:
        where = f"config key 'store.storage_options.{key}'"
        # an interpolation such as ${oc.env:...} is resolved into config.yaml, which is saved in the run folder
        if OmegaConf.is_interpolation(options, key):
            raise ConfigError(
                f"{where}: an interpolation is resolved into the run folder's config.yaml; name the "
                f"environment variable in store.storage_options_env.{key} instead"
            )
        if SECRET_OPTION.search(str(key)):
            raise ConfigError(
                f"{where}: a secret in config (config.yaml is saved in the run folder); name the environment "
                f"variable that holds it in store.storage_options_env.{key} instead"
            )
        value = options[key]
        if value is None or isinstance(value, (DictConfig, ListConfig)):
            raise ConfigError(f"{where}: got {value!r}, expected a string, number or boolean")
    for key in env:
        if OmegaConf.is_interpolation(env, key):
            raise ConfigError(
                f"config key 'store.storage_options_env.{key}': expected the name of an environment variable, "
                f"not an interpolation (its value would be saved in the run folder's config.yaml)"
            )
        if key in options:
            raise ConfigError(
                f"config key 'store.storage_options_env.{key}': also set in store.storage_options; keep one"
            )
        if not ENV_NAME.fullmatch(str(env[key])):
            raise ConfigError(
                f"config key 'store.storage_options_env.{key}': got {env[key]!r}, expected the name of an "
                f"environment variable (e.g. AWS_SECRET_ACCESS_KEY)"
            )


# --- end store


# --- cluster: the executor and the annotation actors
def _validate_cluster(cfg: DictConfig) -> None:
    c = cfg.cluster
    _at_least(
        cfg,
        1,
        "cluster.annotate.actors",
        "cluster.annotate.rows_per_shard",
        "annotate.vllm.tensor_parallel_size",
        "cluster.lvlm.workers",
    )
    _at_least(
        cfg,
        0,
        "cluster.annotate.cpus_per_actor",
        "cluster.annotate.gpus_per_actor",
        "cluster.annotate.commit_every_s",
        "cluster.lvlm.cpus_per_worker",
        "cluster.lvlm.gpus_per_worker",
    )
    if c.executor != "ray" and c.lvlm.workers > 1:
        raise ConfigError(
            f"config key 'cluster.lvlm.workers': {c.lvlm.workers} data-parallel workers run on Ray only: "
            "set cluster.executor=ray, or cluster.lvlm.workers=1"
        )
    tp = cfg.annotate.vllm.tensor_parallel_size
    if c.executor == "ray" and cfg.annotate.backend == "vllm" and tp > 1 and c.annotate.gpus_per_actor < tp:
        raise ConfigError(
            f"config key 'cluster.annotate.gpus_per_actor': {c.annotate.gpus_per_actor}, but one vLLM engine "
            f"spans annotate.vllm.tensor_parallel_size={tp} GPUs: expected >= {tp}"
        )
    if c.address is not None and not str(c.address).strip():
        raise ConfigError("config key 'cluster.address': empty, expected a Ray address or null (a local Ray)")
    # runtime_env.env_vars travel in config.yaml, which is saved in the run folder: no secrets there
    env_vars = c.runtime_env.get("env_vars")
    if env_vars is None:
        return
    if not isinstance(env_vars, DictConfig):
        raise ConfigError(f"config key 'cluster.runtime_env.env_vars': got {env_vars!r}, expected a mapping")
    for key in env_vars:
        if SECRET_OPTION.search(str(key)):
            raise ConfigError(
                f"config key 'cluster.runtime_env.env_vars.{key}': a secret in config (config.yaml is saved in "
                "the run folder); set it in the environment of the Ray workers instead"
            )


# --- end cluster


# --- lvlm / annotate: checks that depend on config values only (the stages and backends trust them)
def _validate_lvlm_annotate(cfg: DictConfig) -> None:
    _at_least(cfg, 1, "lvlm.lm.num_heads", "annotate.write_batch")
    _at_least(cfg, 0, "annotate.retries")
    lm = cfg.lvlm.lm
    if lm.name == "tiny" and lm.hidden_size % lm.num_heads:
        raise ConfigError(
            f"config key 'lvlm.lm.hidden_size': {lm.hidden_size} is not a multiple of lvlm.lm.num_heads={lm.num_heads}"
        )
    if cfg.lvlm.lora.enabled and not cfg.lvlm.lora.target_modules:
        raise ConfigError("config key 'lvlm.lora.target_modules': empty, expected LM projection names")
    if cfg.lvlm.base.strip() and lm.name != "tiny":
        raise ConfigError(
            f"config key 'lvlm.base': '{cfg.lvlm.base}' brings its own LM, but lvlm.lm.name is '{lm.name}' too: "
            "set one of them (lvlm.lm.name=tiny with a base)"
        )
    if cfg.lvlm.sft_save == "adapter" and not cfg.lvlm.lora.enabled:
        raise ConfigError("config key 'lvlm.sft_save': 'adapter' needs lvlm.lora.enabled=true (full tuning has none)")
    carry = cfg.lvlm.carry
    for key in ("align_epochs", "sft_epochs"):
        if carry[key] is not None and carry[key] < 1:
            raise ConfigError(f"config key 'lvlm.carry.{key}': got {carry[key]!r}, expected >= 1 or null")
    if carry.enabled and sft_adapter_only(cfg.lvlm):
        raise ConfigError(
            "config key 'lvlm.carry.enabled': carrying the annotator needs merged SFT outputs "
            "(set lvlm.sft_save=merged, or lvlm.carry.enabled=false)"
        )
    if cfg.gpu_memory_gb < 0:
        raise ConfigError(f"config key 'gpu_memory_gb': got {cfg.gpu_memory_gb!r}, expected >= 0 (0: no check)")


def sft_adapter_only(lv: LVLMConfig) -> bool:
    """Whether SFT keeps the LoRA adapter (+ projector) alone, no merged copy (`lvlm.sft_save`)."""
    if not lv.lora.enabled or lv.sft_save == "merged":
        return False
    return lv.sft_save == "adapter" or bool(lv.base.strip()) or lv.lm.name != "tiny"


def epochs_of(train: "TrainConfig", gen: int) -> int:
    """The epochs generation `gen`'s CLIP trains (`train.epochs_per_generation`, else `train.epochs`)."""
    per_gen = list(train.epochs_per_generation or [])
    return int(per_gen[min(gen, len(per_gen) - 1)]) if per_gen else int(train.epochs)


def trained_generation(cfg: RunConfig, gen: int) -> RunConfig:
    """`cfg` with train.epochs resolved for generation `gen` (and the per-generation list, now applied, emptied)."""
    if not cfg.train.epochs_per_generation:
        return cfg
    return replace(cfg, train=replace(cfg.train, epochs=epochs_of(cfg.train, gen), epochs_per_generation=[]))


def carried_stage(cfg: RunConfig, stage: str) -> RunConfig:
    """`cfg` with lvlm.<stage>.epochs replaced by lvlm.carry.<stage>_epochs (for a carried annotator)."""
    epochs = getattr(cfg.lvlm.carry, f"{stage}_epochs")
    if epochs is None:
        return cfg
    lvlm = replace(cfg.lvlm, **{stage: replace(getattr(cfg.lvlm, stage), epochs=epochs)})
    return replace(cfg, lvlm=lvlm)


# --- end lvlm / annotate


def launcher_world_size() -> Optional[int]:
    """WORLD_SIZE when a launcher (torchrun, `deepspeed`, Ray Train, srun with several tasks) started this
    process, else None. Our own ranks (`cycle.clip.dist`) never load a config."""
    from .clip.dist import LauncherError, world_info_from_env

    try:
        info = world_info_from_env()
    except LauncherError as err:
        raise ConfigError(str(err)) from None
    return info.world_size if info.launched else None


# --- clip / train / loss: how the batch splits over ranks and micro-batches (the trainer relies on it)
def _validate_clip_train(cfg: DictConfig) -> None:
    t = cfg.train
    _at_least(cfg, 1, "train.world_size", "train.log_every", "train.checkpoint_every", "loss.stc_vocab_size")
    per_gen = t.epochs_per_generation
    if not OmegaConf.is_list(per_gen) or not all(
        isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in per_gen
    ):
        raise ConfigError(
            f"config key 'train.epochs_per_generation': got {to_dict(per_gen)!r}, expected a list of epochs >= 1 "
            "(entry g for generation g, the last for later ones)"
        )
    if cfg.loss.neg_max_edit_words < 0:
        raise ConfigError(
            f"config key 'loss.neg_max_edit_words': got {cfg.loss.neg_max_edit_words!r}, expected >= 0 (0: no bound)"
        )
    if cfg.loss.short_text_max_tags < 1:
        raise ConfigError(f"config key 'loss.short_text_max_tags': got {cfg.loss.short_text_max_tags!r}, expected >= 1")
    positive_draw = cfg.loss.long_text_prob + cfg.loss.short_text_prob
    if positive_draw > 1.0 + 1e-9:
        raise ConfigError(
            f"config key 'loss.short_text_prob': loss.long_text_prob + loss.short_text_prob = {positive_draw:.3f}, "
            "expected <= 1 (the rest is the alt-text's share)"
        )
    if t.batch_size % t.world_size:
        raise ConfigError(
            f"config key 'train.batch_size': {t.batch_size} does not divide by train.world_size={t.world_size}"
        )
    if t.zero_stage not in (1, 2):
        raise ConfigError(f"config key 'train.zero_stage': got {t.zero_stage}, expected 1 or 2")
    launched = launcher_world_size()
    if launched is not None and launched != t.world_size:
        raise ConfigError(
            f"config key 'train.world_size': {t.world_size}, but the launcher started {launched} processes "
            f"(WORLD_SIZE={launched}): set train.world_size={launched}"
        )
    local = t.batch_size // t.world_size
    if t.micro_batch_size < 0 or (t.micro_batch_size and local % t.micro_batch_size):
        raise ConfigError(
            f"config key 'train.micro_batch_size': {t.micro_batch_size} does not divide the per-rank "
            f"batch {local} (train.batch_size / train.world_size; 0: the whole per-rank batch)"
        )


# --- end clip / train / loss


# --- names: architectures and other names that another library resolves, checked here so a typo fails
# before the first stage runs rather than after the data stage
# The project's own CLIP configs (cycle/clip/model_configs/*.json), known without importing open_clip.
OWN_CLIP_CONFIGS = Path(__file__).resolve().parent / "clip" / "model_configs"
CLOSE_MATCHES = 3  # suggestions named in the error


def known_clip_names() -> list[str]:
    """open_clip's architectures with ours registered (imports torch: only when a name is not ours)."""
    from .clip.model import list_architectures  # registers our configs with open_clip's `add_model_config`

    return list_architectures()


def check_clip_name(name: str) -> None:
    """`clip.name` must be an architecture open_clip knows (ours included), or a schema name open_clip
    resolves itself ("hf-hub:org/repo", "local-dir:PATH")."""
    if not name or not name.strip():
        raise ConfigError("config key 'clip.name': empty, expected a CLIP architecture name")
    if (OWN_CLIP_CONFIGS / f"{name}.json").is_file() and "/" not in name:
        return
    if ":" in name.split("/")[0]:  # "hf-hub:...", "local-dir:...": open_clip resolves (and checks) these
        return
    known = known_clip_names()
    if name.replace("/", "-") in known:  # open_clip's own spelling rule for names such as ViT-B/32
        return
    import difflib

    close = difflib.get_close_matches(name, known, n=CLOSE_MATCHES, cutoff=0.5)
    ours = sorted(p.stem for p in OWN_CLIP_CONFIGS.glob("*.json"))
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else f"known: {', '.join(ours)} and {len(known) - len(ours)} more (open_clip.list_models())"
    )
    raise ConfigError(f"config key 'clip.name': unknown CLIP architecture '{name}'; {hint}")


def _validate_names(cfg: DictConfig) -> None:
    check_clip_name(cfg.clip.name)
    pretrained = cfg.clip.pretrained
    if pretrained and ":" not in cfg.clip.name.split("/")[0] and not Path(pretrained).exists():
        from .clip.model import check_quickgelu  # an open_clip tag: offline, from open_clip's own tables

        try:
            check_quickgelu(cfg.clip.name, pretrained)
        except HQClipError as err:
            raise ConfigError(str(err)) from None


# --- end names


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Schema <- YAML file <- `key=value` overrides, validated. Returns a typed `RunConfig`."""
    try:
        cfg = OmegaConf.structured(RunConfig)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as err:  # a syntax error: say where, in one line
                mark = getattr(err, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
            cfg = OmegaConf.merge(cfg, loaded)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}': expected key=value")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(
                f"config key '{missing[0]}': a value is required (set it in the file or as {missing[0]}=...)"
            )
        _validate(cfg)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None


def to_dict(section: Any) -> Any:
    """Plain JSON-able form of a config section (a dataclass, a DictConfig, or already plain)."""
    if is_dataclass(section):
        return {f.name: to_dict(getattr(section, f.name)) for f in fields(section)}
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)
    if isinstance(section, (list, tuple)):
        return [to_dict(v) for v in section]
    if isinstance(section, dict):
        return {k: to_dict(v) for k, v in section.items()}
    return section


def fingerprint(*parts: Any) -> str:
    """Stable short hash of config sections and other JSON-able inputs (paths, versions, hashes)."""
    blob = json.dumps([to_dict(p) for p in parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, run_dir: str | Path) -> str:
    """Write the resolved config with its fingerprint into the run directory; returns the fingerprint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(cfg)
    text = f"# fingerprint: {fp}\n" + to_yaml(cfg)
    write_text_atomic(run_dir / "config.yaml", text)
    return fp
