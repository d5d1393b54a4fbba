"""Every check of a merged config, in one place: `validate(cfg)` raises `ConfigError` naming the key.

Checks here depend on config values only (and, for names another library resolves, on that library's
tables, offline); the stages and backends trust what passed them.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import HQClipError
from .schema import AltNoiseConfig, ConfigError, sft_adapter_only, to_dict

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


def validate(cfg: DictConfig) -> None:
    """Every check of the merged (not yet typed) config, in the order a user would fix them."""
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


def launcher_world_size() -> Optional[int]:
    """WORLD_SIZE when a launcher (torchrun, `deepspeed`, Ray Train, srun with several tasks) started this
    process, else None. Our own ranks (`cycle.clip.dist`) never load a config."""
    from ..clip.dist import LauncherError, world_info_from_env

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
OWN_CLIP_CONFIGS = Path(__file__).resolve().parents[1] / "clip" / "model_configs"
CLOSE_MATCHES = 3  # suggestions named in the error


def known_clip_names() -> list[str]:
    """open_clip's architectures with ours registered (imports torch: only when a name is not ours)."""
    from ..clip.model import list_architectures  # registers our configs with open_clip's `add_model_config`

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
        from ..clip.model import check_quickgelu  # an open_clip tag: offline, from open_clip's own tables

        try:
            check_quickgelu(cfg.clip.name, pretrained)
        except HQClipError as err:
            raise ConfigError(str(err)) from None


# --- end names
