"""The HTML and PNG pictures of rollout trees, and reading a run folder's trees.jsonl."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fakes import FakeEngine
from treepo import io
from treepo.config import SamplerConfig
from treepo.errors import InputError
from treepo.viz.render import layout, load_trees, render_html, write_pictures
from treepo.rollout.sampler import TreeSampler
from treepo.tree import PromptTree

PROMPT = [ord(c) for c in "what is 2+2?"]


def mixed_tree() -> PromptTree:
    """Answers, EOS and depth leaves; one segment's text is hostile HTML."""

    def script(r):
        if len(r.node_id) == 2 and r.node_id[-1] % 2 == 0:
            return {"text": "so \\boxed{4}", "eos": True}
        if len(r.node_id) == 3 and r.node_id[-1] % 2 == 1:
            return {"text": "four", "eos": True}
        return None

    cfg = SamplerConfig(width=8, depth=4, segment_len=16)
    tree = TreeSampler(cfg, FakeEngine(script=script)).rollout([PROMPT]).trees[0]
    tree.prompt_text = "what is 2+2? <b>bold</b> & 'quotes'"
    tree.answer = "4"
    tree.nodes[(0,)].text = '<script>alert("x")</script>\n  indented & more'
    tree.rewards = {leaf: 1.0 if tree.nodes[leaf].finish_reason == "answer" else 0.0 for leaf in tree.leaves}
    return tree


def fallback_tree() -> PromptTree:
    cfg = SamplerConfig(width=6, depth=4, segment_len=3, branching=2, fallback_policy="finished", budget="transfer")
    engine = FakeEngine(script=lambda r: {"text": "ab", "eos": True} if len(r.node_id) == 2 else None)
    tree = TreeSampler(cfg, engine).rollout([PROMPT]).trees[0]
    tree.prompt_text = "backtracking prompt"
    return tree


@pytest.fixture(scope="module")
def trees() -> list[PromptTree]:
    return [mixed_tree(), fallback_tree()]


@pytest.fixture(scope="module")
def page(trees) -> str:
    summary = {"prompts": 2, "saving_vs_own_leaves": 0.4321, "finish_reasons": {"answer": 3, "eos": 5},
               "config": {"sampler": {"width": 8}}}
    return render_html(trees, "demo <title>", summary)


def test_one_svg_per_tree_and_one_element_per_node(trees, page):
    assert page.count("<svg") == len(trees) == page.count("</svg>")
    for i, tree in enumerate(trees):
        section = page.split(f'id="prompt-{i}"')[1].split("</section>")[0]
        assert section.count('<g class="node') == len(tree.nodes)
        assert len(re.findall(r'<g class="node leaf', section)) == len(tree.leaves)
        for node_id in tree.nodes:
            assert f'data-id="{".".join(map(str, node_id))}"' in section


def test_legend_summary_and_counts(trees, page):
    assert "Legend:" in page
    for reason in ("answer", "eos", "max_tokens", "depth", "repetition", "fallback"):
        assert reason in page.split("Legend:")[1].split("</div>")[0]
    assert "saving_vs_own_leaves" in page and "0.4321" in page and "answer: 3" in page
    tree = trees[0]
    assert f"decoded tokens: {tree.decoded_tokens}" in page and f"leaf tokens: {tree.leaf_tokens}" in page
    assert "reference answer" in page


def test_text_is_escaped(page):
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "demo &lt;title&gt;" in page
    assert page.count("<script>") == 1  # only our own small script
    # whitespace of the full segment text survives in the data attribute (newline as a reference)
    assert "&lt;/script&gt;&#10;  indented &amp; more" in page


def test_reward_labels_only_when_rewarded(trees, page):
    first, second = (page.split(f'id="prompt-{i}"')[1].split("</section>")[0] for i in range(2))
    tree = trees[0]
    n_good = sum(r > 0 for r in tree.rewards.values())
    assert n_good and n_good < len(tree.leaves)
    assert first.count("r=1</text>") == n_good
    assert first.count("r=0</text>") == len(tree.leaves) - n_good
    assert 'class="label"' in second and not re.search(r" r=[-\d.e]+</text>", second)


def test_fallback_nodes_are_dashed(trees, page):
    section = page.split('id="prompt-1"')[1].split("</section>")[0]
    n_fallback = sum(n.fallback for n in trees[1].nodes.values())
    assert n_fallback > 0
    dashed = re.findall(r'<g class="node[^"]*fallback[^"]*".*?</g>', section, flags=re.S)
    assert len(dashed) == n_fallback and all("stroke-dasharray" in g for g in dashed)
    assert section.count("stroke-dasharray") == n_fallback


def test_self_contained(page):
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "src=" not in page


def test_layout_parents_sit_at_the_mean_of_their_children(trees):
    for tree in trees:
        pos = layout(tree)
        leaf_ys = sorted(pos[leaf][1] for leaf in tree.leaves)
        assert leaf_ys == list(range(len(tree.leaves)))
        for node_id in tree.nodes:
            kids = tree.children(node_id)
            assert pos[node_id][0] == len(node_id)
            if kids:
                assert pos[node_id][1] == pytest.approx(sum(pos[k][1] for k in kids) / len(kids))


def test_big_tree_renders_at_a_readable_size():
    cfg = SamplerConfig(width=64, depth=14, segment_len=4)
    tree = TreeSampler(cfg, FakeEngine()).rollout([PROMPT]).trees[0]
    page = render_html([tree], "big")
    w, h = map(float, re.search(r'<svg width="(\d+)" height="(\d+)"', page).groups())
    assert 14 * 200 < w < 14 * 400 and 64 * 25 < h < 64 * 60


def test_write_pictures_writes_html_and_png(tmp_path, trees):
    html_path, png_path = write_pictures(trees * 3, tmp_path / "out", summary={"prompts": 6}, max_png_trees=4)
    assert html_path == tmp_path / "out" / "trees.html" and html_path.read_text().count("<svg") == 6
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 400 < width < 5000 and 300 < height < 5000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["trees.html", "trees.png"]  # no temp files


def test_write_pictures_with_no_trees(tmp_path):
    html_path, png_path = write_pictures([], tmp_path)
    assert "No trees" in html_path.read_text() and png_path.read_bytes()[:4] == b"\x89PNG"


def test_load_trees_round_trips(tmp_path, trees):
    io.write_jsonl(tmp_path / "trees.jsonl", [t.to_dict() for t in trees])
    assert load_trees(tmp_path) == trees


def test_load_trees_missing_folder_or_file(tmp_path):
    with pytest.raises(InputError, match=r"nope.*does not exist.*treepo rollout --out"):
        load_trees(tmp_path / "nope")
    with pytest.raises(InputError, match=r"no trees\.jsonl"):
        load_trees(tmp_path)


@pytest.mark.parametrize("bad", ["{not json", json.dumps({"prompt_index": 0}), "[1, 2]"])
def test_load_trees_names_the_malformed_line(tmp_path, trees, bad):
    good = json.dumps(trees[0].to_dict())
    Path(tmp_path / "trees.jsonl").write_text(f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(InputError, match=r"trees\.jsonl line 3 "):
        load_trees(tmp_path)


def env_tree() -> PromptTree:
    from toy_envs import Always

    cfg = SamplerConfig(width=4, depth=3, segment_len=8, segment_mode="turn")
    tree = TreeSampler(cfg, FakeEngine(script=lambda r: {"text": "hi", "eos": True}), env=Always()).rollout([PROMPT]).trees[0]
    tree.prompt_text = "multi-turn"
    return tree


def test_env_turns_are_marked_in_html_png_and_terminal(tmp_path):
    from rich.console import Console

    from treepo.viz.render import ENV_COLOUR
    from treepo.viz.terminal import terminal_tree

    tree = env_tree()
    n_env = sum(n.env for n in tree.nodes.values())
    assert n_env
    page = render_html([tree])
    env_groups = re.findall(r'<g class="node env".*?</g>', page, flags=re.S)
    assert len(env_groups) == n_env and all(f'stroke="{ENV_COLOUR}"' in g and ">env: " in g for g in env_groups)
    assert page.count(f'stroke="{ENV_COLOUR}"') == n_env  # model segments keep their own colours
    assert "environment turn (context: not decoded, not trained)" in page
    assert "env: environment turn" in page.split("Legend:")[1].split("</div>")[0]
    assert f"env turns: {n_env}" in page
    _, png = write_pictures([tree], tmp_path)
    assert png.read_bytes()[:4] == b"\x89PNG"
    console = Console(record=True, width=120, color_system=None)
    console.print(terminal_tree(tree))
    text = console.export_text()
    assert text.count("env [ok") == n_env and text.count("not trained") == n_env
    assert text.count(" depth") == len(tree.leaves)  # leaves carry their finish reason
