"""HQClipLoss against open_clip's ClipLoss and against explicit-loop references of our equations."""

from __future__ import annotations

import math
import socket
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cycle.clip.loss import HQClipLoss, reduce_for_logging
from cycle.config import LossConfig

N, D, K = 6, 8, 5


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _batch(seed=0, with_grad=False):
    img, txt, neg = _unit(N, D, seed=seed), _unit(N, D, seed=seed + 1), _unit(N, D, seed=seed + 2)
    if with_grad:
        img, txt, neg = (t.clone().requires_grad_(True) for t in (img, txt, neg))
    scale = torch.tensor([math.log(1 / 0.07)]).exp()
    neg_valid = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    text_keys = torch.arange(N, dtype=torch.long) * 10
    neg_keys = torch.arange(N, dtype=torch.long) * 10 + 1
    neg_keys[3] = text_keys[2]  # sample 3's negative reads exactly like sample 2's positive
    g = torch.Generator().manual_seed(seed + 3)
    tag_logits = torch.randn(N, K, generator=g)
    tag_targets = (torch.rand(N, K, generator=g) < 0.4).float()
    tag_targets[4] = 0  # a sample without vocabulary tags
    return dict(
        image_features=img,
        text_features=txt,
        neg_text_features=neg,
        logit_scale=scale,
        neg_valid=neg_valid,
        text_keys=text_keys,
        neg_keys=neg_keys,
        tag_logits=tag_logits,
        tag_targets=tag_targets,
    )


def _cfg(**kw):
    return replace(LossConfig(), **kw)


def test_clip_term_equals_open_clip_clip_loss():
    from open_clip.loss import ClipLoss

    b = _batch()
    ours = HQClipLoss(_cfg(hni_weight=0.0, stc_weight=0.0))(**b)
    assert set(ours) == {"clip_loss"}  # zero weight: term neither computed nor returned
    ref = ClipLoss()(b["image_features"], b["text_features"], b["logit_scale"])
    assert torch.allclose(ours["clip_loss"], ref, atol=1e-6, rtol=0)


def _ce(logits: list[float], label: int) -> float:
    m = max(logits)
    return -(logits[label] - m - math.log(sum(math.exp(v - m) for v in logits)))


@pytest.mark.parametrize("norm", ["negatives", "batch"])
def test_batch_hni_equals_explicit_loops(norm):
    b = _batch(seed=1)
    out = HQClipLoss(_cfg(hni_weight=0.7, stc_weight=0.0, hni_mode="batch", hni_norm=norm))(**b)
    x, y, yn, s = b["image_features"], b["text_features"], b["neg_text_features"], float(b["logit_scale"])
    valid, tk, nk = b["neg_valid"].tolist(), b["text_keys"].tolist(), b["neg_keys"].tolist()
    total, count = 0.0, 0
    for i in range(N):
        if not valid[i]:
            continue
        row = [s * float(x[i] @ y[j]) for j in range(N)]
        row += [s * float(x[i] @ yn[k]) for k in range(N) if valid[k] and nk[k] != tk[i]]
        total += _ce(row, i)
        count += 1
    assert count == 4
    divisor = count if norm == "negatives" else N  # loss.hni_norm: rows with a negative, or the batch
    assert out["hni_loss"].item() == pytest.approx(0.7 * total / divisor, abs=1e-5)


@pytest.mark.parametrize("norm", ["negatives", "batch"])
def test_pair_hni_equals_explicit_loops(norm):
    b = _batch(seed=2)
    out = HQClipLoss(_cfg(hni_weight=1.0, stc_weight=0.0, hni_mode="pair", hni_norm=norm))(**b)
    x, y, yn, s = b["image_features"], b["text_features"], b["neg_text_features"], float(b["logit_scale"])
    terms = [_ce([s * float(x[i] @ y[i]), s * float(x[i] @ yn[i])], 0) for i in range(N) if b["neg_valid"][i]]
    divisor = len(terms) if norm == "negatives" else N
    assert out["hni_loss"].item() == pytest.approx(sum(terms) / divisor, abs=1e-5)


def test_stc_equals_reference_bce():
    b = _batch(seed=3)
    out = HQClipLoss(_cfg(hni_weight=0.0, stc_weight=0.5))(**b)
    z, t = b["tag_logits"].tolist(), b["tag_targets"].tolist()
    rows = []
    for i in range(N):
        if sum(t[i]) == 0:
            continue
        sig = [1 / (1 + math.exp(-v)) for v in z[i]]
        rows.append(-sum(tt * math.log(p) + (1 - tt) * math.log(1 - p) for p, tt in zip(sig, t[i])) / K)
    assert out["stc_loss"].item() == pytest.approx(0.5 * sum(rows) / len(rows), abs=1e-6)


def test_batch_without_any_usable_negative_gives_zero_hni_with_gradient_graph():
    b = _batch(seed=4, with_grad=True)
    b["neg_valid"] = torch.zeros(N, dtype=torch.bool)
    out = HQClipLoss(_cfg(hni_weight=1.0, stc_weight=0.0))(**b)
    assert out["hni_loss"].item() == 0.0
    out["hni_loss"].backward()  # stays differentiable (DeepSpeed needs a graph on every rank)


@pytest.mark.parametrize("missing,message", [("neg_text_features", "negative texts"), ("tag_targets", "tag logits")])
def test_missing_inputs_for_an_enabled_term_are_a_clear_error(missing, message):
    b = _batch()
    b.pop(missing)
    with pytest.raises(ValueError, match=message):
        HQClipLoss(_cfg(hni_weight=1.0, stc_weight=1.0))(**b)


def test_bad_hni_mode_is_refused_by_config_validation():
    from cycle.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loss.hni_mode"):
        load_config(None, ["name=x", "loss.hni_mode=triplet"])


# --------------------------------------------------------------------------------- gradients on a model
@pytest.fixture(scope="module")
def micro_clip():
    from cycle.clip.model import create_clip

    torch.manual_seed(0)
    model, _, _, tokenizer = create_clip("hqclip-micro")
    return model, tokenizer


def _model_batch(tokenizer, n=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = tokenizer([f"a red apple number {i}" for i in range(n)])
    neg_texts = tokenizer([f"a green pear number {i}" for i in range(n)])
    neg_valid = torch.tensor([True, False, True, True][:n])
    tag_targets = torch.zeros(n, 3)
    tag_targets[0, 1] = tag_targets[2, 0] = 1
    return dict(images=images, texts=texts, neg_texts=neg_texts, neg_valid=neg_valid, tag_targets=tag_targets)


def _grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad for name, p in module.named_parameters()}


def test_gradients_reach_exactly_the_parameters_each_term_should(micro_clip):
    from cycle.clip.model import ClipWithTagHead

    clip, tokenizer = micro_clip
    module = ClipWithTagHead(clip, num_tags=3)
    batch = _model_batch(tokenizer)
    out = module(**batch)

    def nonzero(grads, prefix):
        return all(
            g is not None and g.abs().sum() > 0
            for n, g in grads.items()
            if n.startswith(prefix) and "token_embedding" not in n
        )

    def untouched(grads, prefix):
        return all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith(prefix))

    # STC: the image tower and the head, never the text tower.
    stc = HQClipLoss(_cfg(hni_weight=0.0, stc_weight=1.0))(**out, **batch)["stc_loss"]
    g = _grads(module, stc)
    assert nonzero(g, "clip.visual") and nonzero(g, "stc_head")
    assert untouched(g, "clip.transformer") and untouched(g, "clip.logit_scale")

    # HNI with the positives' text features cut off: the text tower still learns, through the negatives.
    out = module(**batch)
    cut = dict(out, text_features=out["text_features"].detach())
    hni = HQClipLoss(_cfg(hni_weight=1.0, stc_weight=0.0, hni_mode="pair"))(**cut, **batch)["hni_loss"]
    g = _grads(module, hni)
    assert nonzero(g, "clip.transformer") and nonzero(g, "clip.visual") and nonzero(g, "clip.logit_scale")
    assert untouched(g, "stc_head")

    # The full loss with STC off: the head gets nothing.
    out = module(**batch)
    full = HQClipLoss(_cfg(hni_weight=1.0, stc_weight=0.0))(**out, **batch)
    g = _grads(module, sum(full.values()))
    assert nonzero(g, "clip.") and untouched(g, "stc_head")


def test_unusable_negatives_are_not_encoded(micro_clip):
    from cycle.clip.model import ClipWithTagHead

    clip, tokenizer = micro_clip
    batch = _model_batch(tokenizer)
    out = ClipWithTagHead(clip)(**batch)
    assert torch.all(out["neg_text_features"][1] == 0)
    assert torch.allclose(out["neg_text_features"][0].norm(), torch.tensor(1.0))


# --------------------------------------------------------------------------------- two ranks (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, cfgs, batch, queue):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        n = N // 2
        for cfg in cfgs:
            local = {
                k: (v[rank * n : (rank + 1) * n].clone() if k != "logit_scale" else v.clone()) for k, v in batch.items()
            }
            for k in FEATURES:
                local[k].requires_grad_(True)
            losses = HQClipLoss(cfg, rank=rank, world_size=2)(**local)
            sum(losses.values()).backward()
            # DeepSpeed averages gradients over ranks: each rank's feature gradients are half its share.
            grads = {k: (local[k].grad / 2).tolist() for k in FEATURES}  # plain lists: the worker exits first
            queue.put((cfg.hni_mode, rank, reduce_for_logging(losses, 2), grads))
    finally:
        dist.destroy_process_group()


FEATURES = ("image_features", "text_features", "neg_text_features")


def test_two_ranks_give_the_loss_and_gradients_of_one_rank():
    import torch.multiprocessing as mp

    cfgs = [_cfg(hni_weight=0.5, stc_weight=0.3, hni_mode=mode) for mode in ("batch", "pair")]
    batch = _batch(seed=5)
    batch["neg_valid"] = torch.tensor([1, 0, 0, 0, 1, 1], dtype=torch.bool)  # uneven counts per rank
    batch["tag_targets"][0:3] = 0
    batch["tag_targets"][0, 0] = 1

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, cfgs, batch, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2 * len(cfgs)):
        mode, rank, losses, grads = queue.get(timeout=90)
        results[mode, rank] = (losses, grads)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for cfg in cfgs:
        one = {k: (v.clone().requires_grad_(True) if k in FEATURES else v) for k, v in batch.items()}
        ref = HQClipLoss(cfg)(**one)
        sum(ref.values()).backward()
        for name, value in ref.items():
            assert results[cfg.hni_mode, 0][0][name] == pytest.approx(value.item(), abs=1e-6)
            assert results[cfg.hni_mode, 1][0][name] == pytest.approx(value.item(), abs=1e-6)
        for k in FEATURES:
            both = torch.tensor(results[cfg.hni_mode, 0][1][k] + results[cfg.hni_mode, 1][1][k])
            assert torch.allclose(both, one[k].grad, atol=1e-6), (cfg.hni_mode, k)


def test_text_tower_cut_to_length_buckets_gives_the_full_context_features(micro_clip):
    from cycle.clip.model import encode_text

    clip, tokenizer = micro_clip
    texts = ["a cat", "two red apples on a table", " ".join(["word"] * 90), "", "a b c d e f g h", "dog!"]
    tokens = tokenizer(texts)
    ours, full = encode_text(clip, tokens), clip.encode_text(tokens, normalize=True)
    assert torch.allclose(ours, full, atol=1e-6)


# --------------------------------------------------------------------------------- the STC head (issue 10)
def test_cosine_head_equals_explicit_loops_and_starts_at_the_tag_prior():
    from cycle.clip.model import STC_SCALE_INIT, CosineTagHead

    torch.manual_seed(0)
    head = CosineTagHead(D, K)
    with torch.no_grad():
        head.bias.copy_(torch.randn(K))
    x = torch.randn(N, D)  # not unit-norm: the head normalises itself
    z = head(x)
    s = float(head.logit_scale.detach().exp())
    assert s == pytest.approx(STC_SCALE_INIT)
    for i in range(N):
        xi = x[i].tolist()
        for k in range(K):
            w = head.weight[k].tolist()
            dot = sum(a * b for a, b in zip(xi, w))
            cos = dot / math.sqrt(sum(a * a for a in xi)) / math.sqrt(sum(b * b for b in w))
            assert z[i, k].item() == pytest.approx(s * cos + head.bias[k].item(), abs=1e-5)


def test_tag_prior_initialises_each_tags_bias():
    from cycle.clip.model import TAG_PRIOR_MAX, ClipWithTagHead

    for kind in ("cosine", "linear"):
        module = ClipWithTagHead(torch.nn.Module(), num_tags=3, embed_dim=D, head=kind)
        module.init_tag_prior([0.1, 0.9, 0.0])  # clamped into [floor, 0.5]
        p = torch.tensor([0.1, TAG_PRIOR_MAX, 1e-6])
        assert torch.allclose(module.stc_head.bias, torch.log(p / (1 - p)), atol=1e-5)
        module.init_tag_prior(0.2)  # one rate for every tag
        assert torch.allclose(module.stc_head.bias, torch.full((3,), math.log(0.2 / 0.8)), atol=1e-6)


def _fit_head(kind: str, steps: int) -> tuple[float, float]:
    """BCE of a head trained alone on fixed unit-norm features with learnable tags (AdamW as the trainer's)."""
    from cycle.clip.model import ClipWithTagHead
    from cycle.clip.optim import param_groups

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(128, 32, generator=g), dim=-1)
    targets = (x @ torch.randn(32, 40, generator=g) > 0.6).float()  # ~15% positives per tag
    torch.manual_seed(0)
    module = ClipWithTagHead(torch.nn.Module(), num_tags=40, embed_dim=32, head=kind)
    module.init_tag_prior(targets.mean(0).tolist())
    opt = torch.optim.AdamW(param_groups(module, 0.2), lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = HQClipLoss(_cfg(hni_weight=0.0, stc_weight=1.0))
    first = None
    for _ in range(steps):
        loss = loss_fn(x, x, torch.ones(1), tag_logits=module.stc_head(x), tag_targets=targets)["stc_loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss.item()


def test_cosine_head_learns_where_the_linear_head_cannot():
    # 100 steps at the trainer's lr: the linear head's term falls ~3%, the cosine head's ~76% (it starts
    # higher: random directions times s = 10 put each logit ~s / sqrt(D) off its prior) and ends far lower.
    lin_first, lin_last = _fit_head("linear", steps=100)
    cos_first, cos_last = _fit_head("cosine", steps=100)
    assert (lin_first - lin_last) / lin_first < 0.1
    assert (cos_first - cos_last) / cos_first > 0.5 and cos_last < 0.6 * lin_last


def test_head_rows_of_shared_tags_carry_over():
    from cycle.clip.model import ClipWithTagHead

    torch.manual_seed(0)
    old = ClipWithTagHead(torch.nn.Module(), num_tags=3, embed_dim=D, head="cosine")
    with torch.no_grad():
        old.stc_head.logit_scale.fill_(2.5)
    old_vocab, new_vocab = ["cat", "dog", "sun"], ["moon", "sun", "cat", "tree"]
    new = ClipWithTagHead(torch.nn.Module(), num_tags=4, embed_dim=D, head="cosine")
    before = {k: v.detach().clone() for k, v in new.stc_head.state_dict().items()}
    state = old.stc_head.state_dict()
    assert new.carry_over_head(state, old_vocab, new_vocab) == 2
    for k, tag in enumerate(new_vocab):  # row by row: a shared tag's row is the old one, the others untouched
        src = old_vocab.index(tag) if tag in old_vocab else None
        for name in ("weight", "bias"):
            want = state[name][src] if src is not None else before[name][k]
            assert torch.equal(new.stc_head.state_dict()[name][k], want), (tag, name)
    assert float(new.stc_head.logit_scale.detach()) == 2.5
    linear = ClipWithTagHead(torch.nn.Module(), num_tags=4, embed_dim=D, head="linear")
    assert linear.carry_over_head(state, old_vocab, new_vocab) == 0  # another kind: nothing copied
    wider = ClipWithTagHead(torch.nn.Module(), num_tags=4, embed_dim=D + 1, head="cosine")
    assert wider.carry_over_head(state, old_vocab, new_vocab) == 0  # another embedding width


TAGS = ["red apple", "dog", "two cat"]


def test_text_head_rows_are_the_clips_text_embeddings_of_the_tags(micro_clip):
    from cycle.clip.model import ClipWithTagHead

    clip, tokenizer = micro_clip
    module = ClipWithTagHead(clip, num_tags=3, head="text", tag_tokens=tokenizer(TAGS))
    with torch.no_grad():
        module.stc_head.bias.copy_(torch.tensor([0.3, -1.0, 2.0]))
    batch = _model_batch(tokenizer)
    out = module(**batch)
    s = float(module.stc_head.logit_scale.detach().exp())
    with torch.no_grad():
        images = clip.encode_image(batch["images"], normalize=True)
        for k, tag in enumerate(TAGS):  # one tag at a time, through open_clip's own encode_text
            t = clip.encode_text(tokenizer([tag]), normalize=True)[0]
            for i in range(images.shape[0]):
                want = s * float(images[i] @ t) + float(module.stc_head.bias[k])
                assert float(out["tag_logits"][i, k]) == pytest.approx(want, abs=1e-5)

    # STC through a text head trains the text tower too (the point of it), and the head's bias and scale
    stc = HQClipLoss(_cfg(hni_weight=0.0, stc_weight=1.0))(**out, **batch)["stc_loss"]
    g = _grads(module, stc)
    text_tower = [v for n, v in g.items() if n.startswith("clip.transformer")]
    assert text_tower and all(v is not None and v.abs().sum() > 0 for v in text_tower)
    assert g["stc_head.bias"].abs().sum() > 0 and g["stc_head.logit_scale"].abs().sum() > 0
    assert set(module.stc_head.state_dict()) == {"bias", "logit_scale"}  # tokens are rebuilt, never saved


def test_text_head_carries_biases_and_scale_and_needs_its_tokens(micro_clip):
    from cycle.clip.model import ClipWithTagHead, make_tag_head, tag_head_kind

    clip, tokenizer = micro_clip
    old = {"weight": torch.randn(3, D), "bias": torch.tensor([1.0, 2.0, 3.0]), "logit_scale": torch.tensor([2.5])}
    new = ClipWithTagHead(clip, num_tags=2, head="text", tag_tokens=tokenizer(["sun", "dog"]))
    assert new.carry_over_head(old, ["cat", "dog", "moon"], ["sun", "dog"]) == 1
    assert new.stc_head.bias.tolist()[1] == 2.0 and new.stc_head.bias.tolist()[0] == 0.0
    assert float(new.stc_head.logit_scale.detach()) == 2.5
    assert tag_head_kind(dict(new.stc_head.named_parameters())) == "text" and tag_head_kind(old) == "cosine"
    with pytest.raises(ValueError, match="tokenized tag texts"):
        make_tag_head("text", D, 3)


def test_tag_metrics_equal_explicit_loops():
    from cycle.evaluate.metrics import average_precision, tag_metrics

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(N, K, generator=g)
    targets = (torch.rand(N, K, generator=g) < 0.4).float()
    targets[:, 0] = 0  # a tag no image has: left out of the mean
    targets[0, 0] = 0

    def ap(scores, pos):
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        hits, total = 0, 0.0
        for rank, i in enumerate(order, 1):
            if pos[i]:
                hits += 1
                total += hits / rank
        return total / hits

    present = [k for k in range(K) if targets[:, k].sum() > 0]
    want = sum(ap(logits[:, k].tolist(), targets[:, k].tolist()) for k in present) / len(present)
    got = tag_metrics(logits, targets)
    assert got["tag_map"] == pytest.approx(want, abs=1e-6) and got["tag_map_tags"] == len(present)
    assert average_precision(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0, 1, 1])) == pytest.approx(
        (1 / 2 + 2 / 3) / 2
    )
