"""The configuration's schema: one dataclass per part of a run, with its defaults and what each key means.

Values are checked in `checks` and loaded by `load_config` (the package's entry point); the helpers at the
end derive what a stage runs with from a config (epochs of one generation, a carried annotator's epochs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from ..errors import HQClipError


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
