"""Tree packing: layout, mask, exactness against flat rows (log-probs and PPO gradients), bad input."""

from __future__ import annotations

import logging

import pytest
import torch

import tiny
from treepo.config import EngineConfig, SamplerConfig
from treepo.engines.transformers_engine import TransformersEngine
from treepo.errors import InputError
from treepo.gpu_check.correctness import flat_and_packed, random_samples
from treepo.errors import ConfigError
from treepo.train import tree_attention as ta
from treepo.train.packing import (DENSE_UP_TO, PackingError, choose_attention, pack_samples, pack_sequences,
                                  packed_logprobs, sliding_window, tree_attention)
from treepo.train.update import build_samples
from treepo.train.logprobs import Sample, collate, response_logprobs
from treepo.rollout.sampler import TreeSampler
from treepo.tree import Node, PromptTree, check_tree


def test_layout_by_hand():
    row = pack_sequences([[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3]])
    assert row.tokens == [1, 2, 3, 4, 5]
    assert row.depth == [0, 1, 2, 2, 1]
    assert row.size == [5, 3, 1, 1, 1]
    assert row.paths == [[0, 1, 2], [0, 1, 3], [0, 4], [0, 1, 2]]  # a repeated sequence shares every token
    allowed = tree_attention([row], 6)[0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],  # token 4 sees 1, 2 and itself, not its sibling 3
        [1, 0, 0, 0, 1, 0],  # token 5 sees only the root 1
        [0, 0, 0, 0, 0, 1],  # padding sees itself
    ]


def _node(node_id, tokens, start, **kw):
    return Node(id=node_id, token_ids=tokens, logprobs=[-1.0] * len(tokens), entropies=[0.0] * len(tokens),
                start=start, **kw)


def hand_tree(index=0, prompt=(5, 6, 7, 8)) -> PromptTree:
    """Variable-length segments, a leaf stopped early at depth 1, a fallback branch, sibling
    segments that start with the same token (the trie shares it)."""
    t = PromptTree(prompt_index=index, prompt_ids=list(prompt))
    for n in [
        _node((0,), [10, 11, 12], 0),
        _node((0, 0), [20, 21], 3),
        _node((0, 0, 0), [30], 5, finish_reason="eos", hit_eos=True),
        _node((0, 0, 1), [31, 32, 33, 34], 5, finish_reason="max_tokens"),
        _node((0, 1), [20, 22, 23], 3, finish_reason="answer"),  # shares token 20 with (0, 0)
        _node((1,), [40], 0, finish_reason="eos", hit_eos=True),  # early stop at depth 1
        _node((0, 3), [50, 51], 3, fallback=True),  # fallback branch: child index 3, no 2
        _node((0, 3, 0), [52, 53, 54], 5, finish_reason="max_tokens"),
    ]:
        t.nodes[n.id] = n
    t.leaves = [(0, 0, 0), (0, 0, 1), (0, 1), (1,), (0, 3, 0)]
    return t


def pack_trees(trees):
    """One row for the trees' trajectories (prompt + response per leaf, in leaf order, tree by tree)."""
    return pack_sequences([list(t.prompt_ids) + t.response_ids(leaf) for t in trees for leaf in t.leaves])


def test_pack_trees_counts_each_segment_once():
    tree = hand_tree()
    row = pack_trees([tree])
    nodes = sum(len(n) for n in tree.nodes.values())
    assert len(row) == 4 + nodes - 1  # prompt once, each segment once, token 20 shared by two siblings
    for path, leaf in zip(row.paths, tree.leaves):
        assert [row.tokens[i] for i in path] == tree.prompt_ids + tree.response_ids(leaf)
        assert [row.depth[i] for i in path] == list(range(len(path)))
    # two trees whose prompts share a system-prompt prefix share it in one row
    other = hand_tree(1, prompt=(5, 6, 9))
    row2 = pack_trees([tree, other])
    assert len(row2) == len(row) + len(pack_trees([other])) - 2


_samples = random_samples  # one home: treepo.gpu_check.correctness


def _rollout_trees(model, n=3):
    tok = tiny.tokenizer()
    engine = TransformersEngine(model, tok, EngineConfig(temperature=1.0, threads=1), seed=1)
    cfg = SamplerConfig(width=6, depth=4, segment_len=5, seed=2)
    return TreeSampler(cfg, engine).rollout(tiny.prompts()[:n]).trees


def assert_same_pass(a, b, mask, tol: float = 1e-4):
    """Two (log-probs, entropies, PPO loss, gradients) passes of the same samples agree: log-probs and
    entropies within `tol`, the loss within 1e-5 relative, each gradient within 1e-4 of its largest entry."""
    (lp_a, ent_a, loss_a, g_a), (lp_b, ent_b, loss_b, g_b) = a, b
    assert (lp_a - lp_b).abs()[mask].max() < tol
    assert (ent_a - ent_b).abs()[mask].max() < tol
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    assert g_a.keys() == g_b.keys() and g_a
    for k in g_a:
        assert ((g_a[k] - g_b[k]).abs().max() / g_a[k].abs().max().clamp_min(1e-8)) < 1e-4, k


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_equals_flat_logprobs_and_gradients(kind, attn):
    model = tiny.model(kind, attn_implementation=attn)
    trees = _rollout_trees(model) + [hand_tree(7)]
    assert any(len(leaf) < 4 for t in trees for leaf in t.leaves)  # paths of different depths
    # several packed rows (max_tokens=150), one or more groups each
    flat, packed, flat_pass, packed_pass = flat_and_packed(model, _samples(trees))
    assert packed.input_ids.shape[0] > 1
    assert packed.packed_tokens < packed.flat_tokens
    assert_same_pass(flat_pass, packed_pass, flat.response_mask)


def test_packed_logprobs_match_the_engine():
    """The sampler's own log-probs (what old_logprobs='engine' uses) equal the packed pass's."""
    model = tiny.model("llama")
    trees = _rollout_trees(model, n=2)
    samples = [Sample(t.prompt_ids, t.response_ids(leaf), [0.0] * len(t.response_ids(leaf)),
                      t.trajectory(leaf).logprobs, group=k) for k, t in enumerate(trees) for leaf in t.leaves]
    packed = pack_samples(samples, 0)
    with torch.no_grad():
        logp, _ = packed_logprobs(model, packed)
    assert (logp - packed.flat.old_logprobs).abs()[packed.flat.response_mask].max() < 1e-4


def test_damaged_trees_are_named():
    tree = hand_tree(3)
    del tree.nodes[(0, 0)]
    with pytest.raises(InputError, match=r"prompt 3, node \[0, 0, 0\]: its parent \[0, 0\] is missing"):
        check_tree(tree)
    tree = hand_tree(3)
    tree.nodes[(0, 1)].start = 2
    with pytest.raises(InputError, match=r"prompt 3, node \[0, 1\]: starts at response offset 2 .* disagree"):
        check_tree(tree)
    tree = hand_tree(3)
    tree.nodes[(1,)].logprobs = []
    tree.rewards = {leaf: 1.0 for leaf in tree.leaves}
    with pytest.raises(InputError, match="1 tokens but 0 log-probs"):
        build_samples([tree], "average", True)  # the trainer checks every tree before it trains on it


def test_a_tree_beyond_the_row_limit_names_the_prompt_and_the_fix():
    samples = _samples([hand_tree(0), hand_tree(9, prompt=(1, 2, 3, 4, 5, 6, 7))])
    with pytest.raises(PackingError, match=r"prompt 9: its 5 trajectories pack to 25 unique tokens, beyond .* "
                                           r"limit of 24 .*shorter trees.*--no_packing"):
        pack_samples(samples, 0, max_tokens=24)


def test_models_that_cannot_be_packed_say_why():
    assert choose_attention(tiny.model("llama"))[0] == "blocks"
    model = tiny.model("llama")
    model.config._attn_implementation = "flash_attention_2"  # the dense form needs eager or sdpa
    form, refused = choose_attention(model, "dense")
    assert form is None and "flash_attention_2" in refused[0]

    class IgnoresMask(torch.nn.Module):  # a model that drops the tree mask (4D tensor or BlockMask): causal only
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, attention_mask=None, **kw):
            if attention_mask is not None and len(attention_mask.shape) == 4:
                self.config._attn_implementation = "sdpa"  # and its attention is plain causal sdpa
                attention_mask = None
            return self.inner(attention_mask=attention_mask, **kw)

    form, refused = choose_attention(IgnoresMask(tiny.model("llama")))
    assert form is None and [r.split(":")[0] for r in refused] == ["blocks", "dense"]
    assert all("differ from flat" in r for r in refused)


def test_a_model_with_activation_checkpointing_packs_with_the_dense_mask():
    model = tiny.model("llama")
    model.activation_checkpointing_enable()
    form, refused = choose_attention(model)
    assert form == "dense" and "activation checkpointing" in refused[0]


def test_a_reference_model_that_ignores_the_block_mask_is_caught():
    class NoBlockMask(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def parameters(self, recurse=True):
            return self.inner.parameters(recurse)

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, attention_mask=None, **kw):
            if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
                raise TypeError("this model takes tensor masks only")
            return self.inner(attention_mask=attention_mask, **kw)

    form, refused = choose_attention(tiny.model("llama"), reference=NoBlockMask(tiny.model("llama")))
    assert form == "dense" and refused[0].startswith("blocks: the reference model: a packed pass failed")


def test_sliding_window_models_pack_only_within_the_window():
    model = tiny.model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1,
                       attn_implementation="eager")
    assert sliding_window(model) == 16 and sliding_window(tiny.model("llama")) is None
    short = [Sample([5, 6], [7, 8, 9], [1.0] * 3, [0.0] * 3), Sample([5, 6], [7, 10], [1.0] * 2, [0.0] * 2)]
    packed = pack_samples(short, 0, window=16)
    with torch.no_grad():
        flat_lp, _ = response_logprobs(model, collate(short, 0))
        packed_lp, _ = packed_logprobs(model, packed)
    assert (flat_lp - packed_lp).abs()[packed.flat.response_mask].max() < 1e-4
    long = [Sample([5, 6], list(range(20, 40)), [1.0] * 20, [0.0] * 20, meta={"prompt": 4})]
    with pytest.raises(PackingError, match="prompt 4: a sequence of 22 tokens passes the model's sliding attention "
                                           "window of 16"):
        pack_samples(long, 0, window=16)


def test_trainer_falls_back_to_flat_with_a_logged_reason(caplog, tmp_path):
    from treepo.config import TrainConfig
    from accelerate import Accelerator
    from treepo.train.update import PolicyUpdate

    model = tiny.model("llama")
    model.config._attn_implementation = "flash_attention_2"
    opt = torch.optim.AdamW(model.parameters())
    with caplog.at_level(logging.WARNING):
        upd = PolicyUpdate(TrainConfig(out=str(tmp_path), num_prompts=4), accelerator=Accelerator(cpu=True),
                           model=model, optimizer=opt, scheduler=None)
    assert not upd.packed
    assert "packing is off for this run: blocks: " in caplog.text
    assert "dense: attention implementation 'flash_attention_2' cannot take a dense tree mask" in caplog.text


def test_a_micro_batch_beyond_the_row_limit_runs_flat_and_is_counted(tmp_path):
    from accelerate import Accelerator
    from treepo.config import TrainConfig
    from treepo.train.update import PolicyUpdate

    model = tiny.model("llama")
    upd = PolicyUpdate(TrainConfig(out=str(tmp_path), num_prompts=4), accelerator=Accelerator(cpu=True),
                       model=model, optimizer=torch.optim.AdamW(model.parameters()), scheduler=None)
    assert upd.packed
    samples = _samples([hand_tree(0)])
    packed, flat, counts = upd._prepare(samples)
    assert packed is not None and counts["packing_fallbacks"] == 0 and counts["forward_tokens"] == 22
    upd.pack_limit = 10  # the tree packs to 22 tokens
    packed, flat, counts = upd._prepare(samples)
    assert packed is None and counts["packing_fallbacks"] == 1 and counts["forward_tokens"] == counts["flat_tokens"]
    assert flat.response_ids.shape[0] == len(samples)


# -- the block-mask forms (memory that grows with the tokens) ----------------------------------

def _random_row(kind: str, seed: int):
    """A packed row of a random tree: 'deep' (one long chain with short side branches), 'narrow' (two
    long paths), 'wide' (many short leaves off one prompt)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda n: torch.randint(2, 300, (n,), generator=g).tolist()  # noqa: E731
    if kind == "deep":
        spine = draw(150)
        seqs = [spine] + [spine[: int(c)] + draw(3) for c in torch.randint(1, 150, (6,), generator=g)]
    elif kind == "narrow":
        prompt = draw(20)
        seqs = [prompt + draw(90), prompt + draw(70)]
    else:
        prompt = draw(10)
        seqs = [prompt + draw(int(n)) for n in torch.randint(1, 8, (40,), generator=g)]
    return pack_sequences(seqs)


@pytest.mark.parametrize("kind", ["deep", "narrow", "wide"])
@pytest.mark.parametrize("block", [4, 16])
def test_block_mask_keeps_every_allowed_pair_and_only_fills_full_blocks(kind, block):
    row = _random_row(kind, 0)
    n = len(row) + 3  # padding columns too
    ends = ta.tree_ends([row.size], n)
    allowed = tree_attention([row], n)[0]  # [N, N]
    bm = ta.tree_block_mask(ends, block)
    nb = -(-n // block)
    partial, full = torch.zeros(nb, nb, dtype=torch.bool), torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        partial[i, bm.kv_indices[0, 0, i, : bm.kv_num_blocks[0, 0, i]].long()] = True
        full[i, bm.full_kv_indices[0, 0, i, : bm.full_kv_num_blocks[0, 0, i]].long()] = True
    assert not (partial & full).any()
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(bm.mask_mod(torch.tensor(0), None, q, k), allowed)  # the rule itself, pair by pair
    pad = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    pad[:n, :n] = allowed
    tiles = pad.view(nb, block, nb, block).permute(0, 2, 1, 3)  # [nb(q), nb(kv), block, block]
    assert torch.equal(partial | full, tiles.any(-1).any(-1))  # exactly the blocks some pair needs
    inside = torch.zeros(nb * block, dtype=torch.bool)
    inside[:n] = True
    whole = (tiles | ~inside.view(nb, block)[:, None, :, None] | ~inside.view(nb, block)[None, :, None, :])
    assert torch.equal(full, whole.all(-1).all(-1) & (torch.arange(nb)[:, None] > torch.arange(nb)[None, :]))
    assert partial.sum() + full.sum() < nb * (nb + 1) // 2 or kind == "narrow"  # blocks are skipped


@pytest.mark.parametrize("kind", ["deep", "narrow", "wide"])
def test_block_sparse_kernel_equals_dense_attention_forward_and_backward(kind, monkeypatch):
    monkeypatch.setattr(ta, "Q_TILE", 2)  # several query tiles even on a small tree
    row = _random_row(kind, 1)
    n = len(row)
    bm = ta.tree_block_mask(ta.tree_ends([row.size], n), 8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ta.BlockSparseAttention.apply(q, k, v, bm, 8 ** -0.5)  # [1, 3, N, 8]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tree_attention([row], n)[:, None])
    assert (out - ref).abs().max() < 1e-5
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    mine, theirs = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(mine, theirs):
        assert (a - b).abs().max() < 1e-4 * b.abs().max()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_block_mask_packing_equals_flat_logprobs_and_gradients(kind, monkeypatch):
    monkeypatch.setattr(ta, "BLOCK", 16)  # rows of ~100 tokens: several blocks, some skipped
    monkeypatch.setattr(ta, "Q_TILE", 2)
    model = tiny.model(kind)
    trees = _rollout_trees(model) + [hand_tree(7)]
    flat, packed, flat_pass, packed_pass = flat_and_packed(model, _samples(trees), attention="blocks")
    assert packed.input_ids.shape[0] > 1 and packed.attention == "blocks"
    assert model.config._attn_implementation == "sdpa"  # switched for the packed pass only
    assert_same_pass(flat_pass, packed_pass, flat.response_mask)


def test_the_run_picks_the_block_mask_on_cpu_and_says_why_not_flex():
    model = tiny.model("llama")
    form, refused = choose_attention(model)
    assert form == "blocks" and refused == []  # 'flex' is tried on CUDA only
    form, refused = choose_attention(model, "flex")
    assert form is None and "no backward pass off CUDA" in refused[0]
    assert choose_attention(model, "dense") == ("dense", [])
    # transformers' GPT-2 reads `attention_mask.ndim`, which a BlockMask lacks: the probe refuses it, dense serves
    form, refused = choose_attention(tiny.model("gpt2"))
    assert form == "dense" and len(refused) == 1 and refused[0].startswith("blocks: a packed pass failed")


def test_trainer_logs_and_records_the_mask_form(caplog, tmp_path):
    from accelerate import Accelerator

    from treepo.config import TrainConfig
    from treepo.train.update import PolicyUpdate

    model = tiny.model("llama")
    opt = torch.optim.AdamW(model.parameters())
    with caplog.at_level(logging.INFO):
        upd = PolicyUpdate(TrainConfig(out=str(tmp_path), num_prompts=4), accelerator=Accelerator(cpu=True),
                           model=model, optimizer=opt, scheduler=None)
    assert upd.packed and upd.attention == "blocks" and upd.dense_up_to == DENSE_UP_TO
    assert f"packed training: tree mask as blocks (rows of up to {DENSE_UP_TO} tokens: dense" in caplog.text
    samples = _samples(_rollout_trees(model, n=1))
    _, _, counts = upd._prepare(samples)  # a small row: the dense mask
    assert counts["block_mask_batches"] == 0
    upd.dense_up_to = 0
    packed, _, counts = upd._prepare(samples)
    assert counts["block_mask_batches"] == 1 and packed.attention == "blocks"
    named = PolicyUpdate(TrainConfig(out=str(tmp_path), num_prompts=4, packed_attention="blocks"),
                         accelerator=Accelerator(cpu=True), model=model, optimizer=opt, scheduler=None)
    assert named.attention == "blocks" and named.dense_up_to == 0  # a named form is used at every size
    with pytest.raises(ConfigError, match="packed_attention='sparse'.*--packed_attention auto"):
        TrainConfig(out=str(tmp_path), num_prompts=4, packed_attention="sparse")


def _two_rows_gqa(dtype=torch.float32):
    """Two packed rows of different trees (the shorter padded), q with 4 heads, k and v with 2 (GQA)."""
    rows = [_random_row("deep", 2), _random_row("wide", 3)]
    n = max(len(r) for r in rows)
    bm = ta.tree_block_mask(ta.tree_ends([r.size for r in rows], n), 8)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, n, 8, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, n, 8, generator=g).to(dtype).requires_grad_() for _ in range(2))
    return rows, n, bm, q, k, v


def _dense_reference(rows, n, q, k, v):
    k2, v2 = (t.float().repeat_interleave(2, dim=1) for t in (k, v))  # transformers' repeat_kv layout
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k2, v2,
                                                            attn_mask=tree_attention(rows, n)[:, None])


def test_block_sparse_kernel_with_grouped_heads_padding_and_two_rows(monkeypatch):
    monkeypatch.setattr(ta, "Q_TILE", 3)
    rows, n, bm, q, k, v = _two_rows_gqa()
    out = ta.BlockSparseAttention.apply(q, k, v, bm, 8 ** -0.5)
    ref = _dense_reference(rows, n, q, k, v)
    assert (out - ref).abs().max() < 1e-5
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert (a - b).abs().max() < 1e-4 * b.abs().max()


def test_block_sparse_kernel_under_autocast_keeps_float32_softmax():
    """accelerate's bf16 mixed precision runs the forward in autocast and the backward outside it: the kernel
    must recompute the same probabilities in the backward (it turns autocast off inside)."""
    rows, n, bm, q, k, v = _two_rows_gqa(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ta.BlockSparseAttention.apply(q, k, v, bm, 8 ** -0.5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    ref = _dense_reference(rows, n, q, k, v)  # float32 from the same bf16 inputs
    theirs = torch.autograd.grad(ref, (q, k, v), grad.float())
    assert (out.float() - ref).abs().max() < 2e-2
    for a, b in zip(mine, theirs):
        assert (a.float() - b).abs().max() < 2e-2 * b.abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a backward inside autocast runs too
        ta.BlockSparseAttention.apply(q, k, v, bm, 8 ** -0.5).float().sum().backward()


def test_moving_a_packed_batch_rebuilds_its_mask():
    model = tiny.model("llama")
    samples = _samples(_rollout_trees(model, n=1))
    batch = pack_samples(samples, 0, attention="blocks")
    first = batch.mask()
    assert batch.mask() is first  # kept for the reference pass
    moved = batch.to("cpu")
    assert moved.mask() is not first and torch.equal(moved.mask().kv_indices, first.kv_indices)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_output_layer_in_chunks_gives_the_same_logprobs_entropies_and_gradients(kind, monkeypatch):
    """Past BIG_LOGITS the head runs in chunks (log-sum-exp per chunk, recomputed in the backward pass;
    target logit = hidden . output row): flat and packed passes equal the whole-logits ones."""
    from treepo.train import logprobs

    model = tiny.model(kind)
    assert logprobs.chunkable_head(model) is model.get_output_embeddings()
    samples = _samples(_rollout_trees(model, n=2))
    whole = flat_and_packed(model, samples)
    monkeypatch.setattr(logprobs, "BIG_LOGITS", 0)
    monkeypatch.setattr(logprobs, "HEAD_CHUNK", 7)  # several chunks, the last one partial
    chunked = flat_and_packed(model, samples)
    m = whole[0].response_mask
    for a, b in zip(whole[2:], chunked[2:]):  # the flat pass, then the packed one
        assert_same_pass(a, b, m, tol=1e-5)
    with torch.no_grad():  # the sampling temperature divides the logits on both routes
        lp_t, _ = response_logprobs(model, whole[0], temperature=0.7)
        monkeypatch.setattr(logprobs, "BIG_LOGITS", 2**40)
        lp_w, _ = response_logprobs(model, whole[0], temperature=0.7)
    assert (lp_t - lp_w).abs()[m].max() < 1e-5


def test_logits_scaled_after_the_head_are_never_chunked():
    model = tiny.model("llama")
    model.config.final_logit_softcapping = 30.0
    from treepo.train.logprobs import chunkable_head
    assert chunkable_head(model) is None
    class Wrapped(torch.nn.Module):  # as DistributedDataParallel holds the model: its own forward must run
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    assert chunkable_head(Wrapped(tiny.model("llama"))) is None
