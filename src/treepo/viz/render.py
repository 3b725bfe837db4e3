"""Pictures of rollout trees for a person: one self-contained HTML page and a PNG overview.

Both use the same layout (`layout`): x is the depth, y the leaf order (depth-first, so edges never
cross), and an internal node sits at the mean y of its children. Leaves are coloured by finish
reason and labelled with their reward; nodes made by backtracking (fallback) get a dashed border;
environment turns (tool results, follow-ups: context the model did not write) are teal boxes
tagged "env" (squares in the PNG). `terminal_tree` draws one tree for the terminal, env turns
tagged the same way.

    trees = load_trees(Path("runs/demo"))
    html_path, png_path = write_pictures(trees, Path("runs/demo"), summary=summary)

The HTML has no external references: inline CSS, inline SVG and a small script that shows a
clicked node's full segment text (and, for a leaf, its whole path text) in a panel.
"""

from __future__ import annotations

import itertools
import json
from html import escape
from pathlib import Path
from typing import Any, Optional

from .. import io
from ..errors import InputError
from ..tree import FINISH_REASONS, ROOT, NodeId, PromptTree

# One colour per finish reason, in the order of tree.FINISH_REASONS (a new reason needs a colour here).
_PALETTE = ("#4c78a8", "#54a24b", "#f58518", "#b279a2", "#9d755d", "#72b7b2", "#e45756", "#eeca3b", "#d62728")
assert len(_PALETTE) >= len(FINISH_REASONS), "give every finish reason in tree.FINISH_REASONS a colour"
REASON_COLOURS = dict(zip(FINISH_REASONS, _PALETTE))
INTERNAL_COLOUR = "#9e9e9e"
ENV_COLOUR = "#17becf"  # environment turns
GOOD, BAD = "#1a7f37", "#cf222e"  # reward > 0, reward <= 0
SNIPPET = 30  # characters of segment text shown in a box
BOX_W, BOX_H, COL, ROW, ROOT_W, PAD, LABEL_W = 212, 26, 252, 36, 64, 12, 150


# -- data ----------------------------------------------------------------------------------------


def load_trees(run_dir: Path) -> list[PromptTree]:
    """The trees of a run folder (`run_dir/trees.jsonl`, one `PromptTree.to_dict()` per line)."""
    run_dir = Path(run_dir)
    path = run_dir / "trees.jsonl"
    if not run_dir.is_dir():
        raise InputError(f"run folder {run_dir} does not exist; pass a folder written by `treepo rollout --out`")
    if not path.is_file():
        raise InputError(f"{run_dir} has no trees.jsonl; pass a folder written by `treepo rollout --out`")
    # Line by line, so that an error can name the line.
    trees = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                trees.append(_parse_tree_line(line, path, lineno))
    return trees


def _parse_tree_line(line: str, path: Path, lineno: int) -> PromptTree:
    try:
        return PromptTree.from_dict(json.loads(line))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"{path} line {lineno} is not a tree ({type(e).__name__}: {e}); "
            "rewrite the file with `treepo rollout --out` or remove that line"
        ) from None


def layout(tree: PromptTree) -> dict[NodeId, tuple[int, float]]:
    """(depth, y) per node: childless nodes take the next leaf slot, parents the mean of their children."""
    kids: dict[NodeId, list[NodeId]] = {}
    for node_id in sorted(tree.nodes):
        kids.setdefault(node_id[:-1], []).append(node_id)
    pos: dict[NodeId, tuple[int, float]] = {}
    slots = itertools.count()

    def place(node_id: NodeId) -> float:
        children = kids.get(node_id, [])
        y = sum(map(place, children)) / len(children) if children else float(next(slots))
        pos[node_id] = (len(node_id), y)
        return y

    place(ROOT)
    return pos


def path_text(tree: PromptTree, node_id: NodeId) -> str:
    return "".join(n.text for n in tree.path(node_id))


def snippet(text: str, n: int = SNIPPET) -> str:
    flat = text.replace("\n", "⏎").replace("\t", " ")
    if not flat:
        return "∅ (no text)"
    return flat if len(flat) <= n else flat[: n - 1] + "…"


def tree_counts(tree: PromptTree) -> dict[str, Any]:
    leaf = tree.leaf_tokens
    return {
        "nodes": len(tree.nodes),
        "leaves": len(tree.leaves),
        "decoded tokens": tree.decoded_tokens,
        "leaf tokens": leaf,
        "saving": f"{1 - tree.decoded_tokens / leaf:.1%}" if leaf else "n/a",
        "fallbacks": tree.fallbacks,
        "fallback nodes": sum(n.fallback for n in tree.nodes.values()),
        "env turns": sum(n.env for n in tree.nodes.values()),
    }


def _style(tree: PromptTree, node_id: NodeId) -> tuple[bool, str]:
    """(is a leaf, colour): leaves by finish reason, env turns teal, other internal nodes grey."""
    if tree.nodes[node_id].env:
        return False, ENV_COLOUR
    if node_id not in tree.leaves:
        return False, INTERNAL_COLOUR
    return True, REASON_COLOURS.get(tree.nodes[node_id].finish_reason or "", "#333")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _attr(text: str) -> str:
    """Escape for an attribute value, keeping newlines and tabs as character references."""
    return escape(text, quote=True).replace("\n", "&#10;").replace("\t", "&#9;").replace("\r", "&#13;")


# -- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin:0 0 6px}
table.summary{border-collapse:collapse;font-size:13px}
.summary td{border:1px solid #ddd;padding:2px 8px;vertical-align:top}
.legend{font-size:12px;margin:8px 0;display:flex;gap:14px;flex-wrap:wrap;align-items:center}
.sw{display:inline-block;width:14px;height:10px;border:2px solid;margin-right:4px;vertical-align:middle}
section.tree{border-top:2px solid #ccc;margin-top:18px;padding-top:8px}
.counts{font-size:13px;color:#444} pre{white-space:pre-wrap;margin:4px 0;font-size:12px}
.scroll{overflow:auto;max-height:80vh;border:1px solid #eee}
pre.panel{background:#f6f8fa;border:1px solid #ddd;padding:6px;max-height:30vh;overflow:auto}
g.node{cursor:pointer} g.node text{font:11px monospace} g.node.sel rect{stroke-width:3.5;stroke:#000}
g.node.env text{font-style:italic}
"""

SCRIPT = """
document.addEventListener('click', function (e) {
  var g = e.target.closest && e.target.closest('g.node'); if (!g) return;
  var svg = g.ownerSVGElement, panel = document.getElementById(svg.dataset.panel);
  var out = g.dataset.info + '\\n\\nsegment text:\\n' + g.dataset.text;
  if (g.classList.contains('leaf')) {
    var parts = g.dataset.id.split('.'), whole = '';
    for (var k = 1; k <= parts.length; k++) {
      whole += svg.querySelector('g.node[data-id="' + parts.slice(0, k).join('.') + '"]').dataset.text;
    }
    out += '\\n\\nwhole path text:\\n' + whole;
  }
  panel.textContent = out;
  svg.querySelectorAll('g.node.sel').forEach(function (n) { n.classList.remove('sel'); });
  g.classList.add('sel');
});
"""


def render_html(trees: list[PromptTree], title: str = "treepo rollout", summary: Optional[dict] = None) -> str:
    """The whole page as a string (pure)."""
    body = [f"<h1>{escape(title)}</h1>", _summary_html(summary), _legend_html()]
    body += [_tree_html(i, t) for i, t in enumerate(trees)] or ["<p>No trees.</p>"]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
    )


def _summary_html(summary: Optional[dict]) -> str:
    if not summary:
        return ""
    rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{_value_html(v)}</td></tr>" for k, v in summary.items())
    return f'<table class="summary">{rows}</table>'


def _value_html(v: Any) -> str:
    if isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values()):
        return "<br>".join(f"{escape(str(k))}: {escape(_fmt(x))}" for k, x in v.items())
    if isinstance(v, (dict, list)):
        return f"<details><summary>show</summary><pre>{escape(json.dumps(v, indent=2, default=str))}</pre></details>"
    return escape(_fmt(v))


def _legend_html() -> str:
    items = [f'<span><span class="sw" style="background:{c}33;border-color:{c}"></span>{r}</span>'
             for r, c in REASON_COLOURS.items()]
    items += [
        f'<span><span class="sw" style="background:#fff;border-color:{INTERNAL_COLOUR}"></span>internal segment</span>',
        f'<span><span class="sw" style="background:{ENV_COLOUR}33;border-color:{ENV_COLOUR}"></span>'
        "env: environment turn (context, not trained)</span>",
        '<span><span class="sw" style="background:#fff;border-color:#555;border-style:dashed"></span>'
        "fallback (backtracking) node</span>",
        f'<span style="color:{GOOD}">r=… reward &gt; 0</span>',
        f'<span style="color:{BAD}">r=… reward ≤ 0</span>',
        "<span>click a node for its full text</span>",
    ]
    return '<div class="legend"><b>Legend:</b> ' + " ".join(items) + "</div>"


def _tree_html(i: int, tree: PromptTree) -> str:
    counts = " · ".join(f"{k}: {escape(str(v))}" for k, v in tree_counts(tree).items())
    prompt = escape(tree.prompt_text or "(no prompt text)")
    if len(tree.prompt_text) > 300 or tree.prompt_text.count("\n") > 6:
        prompt_html = f"<details><summary>prompt ({len(tree.prompt_text)} chars)</summary><pre>{prompt}</pre></details>"
    else:
        prompt_html = f"<pre>{prompt}</pre>"
    answer = f"<div>reference answer: <code>{escape(tree.answer)}</code></div>" if tree.answer is not None else ""
    return (
        f'<section class="tree" id="prompt-{i}"><h2>Prompt {tree.prompt_index}</h2>'
        f'<div class="counts">{counts}</div>{prompt_html}{answer}'
        f'<pre class="panel" id="panel-{i}">Click a node to see its text here.</pre>'
        f'<div class="scroll">{_tree_svg(tree, f"panel-{i}")}</div></section>'
    )


def _slots(pos: dict[NodeId, tuple[int, float]]) -> int:
    return int(max(y for _, y in pos.values())) + 1


def _xy(depth: int, y: float) -> tuple[float, float]:
    x = PAD if depth == 0 else PAD + ROOT_W + (depth - 1) * COL
    return x, PAD + y * ROW


def _tree_svg(tree: PromptTree, panel_id: str) -> str:
    pos = layout(tree)
    width = _xy(max(d for d, _ in pos.values()), 0)[0] + BOX_W + LABEL_W + PAD
    height = 2 * PAD + (_slots(pos) - 1) * ROW + BOX_H
    parts = [f'<svg width="{width:.0f}" height="{height:.0f}" data-panel="{panel_id}">']
    parts += [_edge_svg(pos[n[:-1]], pos[n]) for n in sorted(tree.nodes)]
    rx, ry = _xy(*pos[ROOT])
    parts.append(f'<g class="root"><circle cx="{rx + 8}" cy="{ry + BOX_H / 2}" r="7" fill="#333"/>'
                 f'<text x="{rx}" y="{ry + BOX_H / 2 - 10}" font-size="10">prompt</text></g>')
    parts += [_node_svg(tree, n, pos[n]) for n in sorted(tree.nodes)]
    return "".join(parts) + "</svg>"


def _edge_svg(parent: tuple[int, float], child: tuple[int, float]) -> str:
    px, py = _xy(*parent)
    cx, cy = _xy(*child)
    x0, y0 = (px + 16 if parent[0] == 0 else px + BOX_W), py + BOX_H / 2
    x1, y1, mid = cx, cy + BOX_H / 2, (x0 + cx) / 2
    curve = f"M{x0:.1f},{y0:.1f} C{mid:.1f},{y0:.1f} {mid:.1f},{y1:.1f} {x1:.1f},{y1:.1f}"
    return f'<path d="{curve}" fill="none" stroke="#aaa"/>'


def _node_svg(tree: PromptTree, node_id: NodeId, p: tuple[int, float]) -> str:
    node = tree.nodes[node_id]
    x, y = _xy(*p)
    is_leaf, colour = _style(tree, node_id)
    fill = f"{colour}33" if is_leaf or node.env else "#fff"
    dash = ' stroke-dasharray="5 3"' if node.fallback else ""
    classes = "node" + (" leaf" if is_leaf else "") + (" fallback" if node.fallback else "") + (" env" if node.env else "")
    info, reward = _node_info(tree, node_id), tree.rewards.get(node_id)
    tooltip = info + "\n" + (path_text(tree, node_id) if is_leaf else node.text)
    label = ("env: " + snippet(node.text, SNIPPET - 5)) if node.env else snippet(node.text)
    out = (f'<g class="{classes}" data-id="{".".join(map(str, node_id))}" data-info="{_attr(info)}" '
           f'data-text="{_attr(node.text)}"><title>{escape(tooltip)}</title>'
           f'<rect x="{x:.1f}" y="{y:.1f}" width="{BOX_W}" height="{BOX_H}" rx="4" fill="{fill}" '
           f'stroke="{colour}" stroke-width="{2 if is_leaf else 1.2}"{dash}/>'
           f'<text x="{x + 5:.1f}" y="{y + BOX_H / 2 + 4:.1f}">{escape(label)}</text>')
    if is_leaf:
        out += _leaf_label(node.finish_reason or "?", reward, x + BOX_W + 6, y + BOX_H / 2 + 4)
    return out + "</g>"


def _node_info(tree: PromptTree, node_id: NodeId) -> str:
    node, reward = tree.nodes[node_id], tree.rewards.get(node_id)
    info = f"node {'.'.join(map(str, node_id))} · depth {len(node_id)} · {len(node)} tokens"
    info += " · environment turn (context: not decoded, not trained)" if node.env else ""
    info += f" · finish: {node.finish_reason}" if node.finish_reason else ""
    info += " · fallback (backtracking)" if node.fallback else ""
    return info + (f" · reward {reward:.4g}" if reward is not None else "")


def _leaf_label(reason: str, reward: Optional[float], x: float, y: float) -> str:
    colour = "#555" if reward is None else (GOOD if reward > 0 else BAD)
    text = escape(reason) + ("" if reward is None else f" r={reward:.3g}")
    return f'<text class="label" x="{x:.1f}" y="{y:.1f}" fill="{colour}" font-weight="bold">{text}</text>'


# -- PNG -----------------------------------------------------------------------------------------


def render_png(trees: list[PromptTree], path: Path, max_trees: int = 4) -> Path:
    """The first `max_trees` trees as matplotlib subplots, written atomically to `path`.

    Uses a bare `Figure` (drawn by Agg when saved as PNG), not pyplot: no global backend switch.
    """
    from matplotlib.figure import Figure

    shown = trees[:max_trees]
    ncols = min(2, max(1, len(shown)))
    nrows = max(1, -(-len(shown) // ncols))
    rows_per_tree = max([_slots(layout(t)) for t in shown] or [1])
    legend_in = 0.7  # inches kept free below the plots for the legend
    height = nrows * min(12, 1.6 + 0.28 * rows_per_tree) + legend_in
    fig = Figure(figsize=(7.5 * ncols, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tree in zip(axes.flat, shown):
        _draw_tree(ax, tree)
    if not shown:
        axes[0, 0].text(0.5, 0.5, "no trees", ha="center", va="center")
    fig.legend(handles=_legend_handles(), loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    with io.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return Path(path)


def _legend_handles() -> list:
    from matplotlib.lines import Line2D

    def marker(colour: str, label: str, edge: str = "none", **kw) -> Line2D:
        return Line2D([], [], ls="none", marker="o", ms=8, mfc=colour, mec=edge, label=label, **kw)

    handles = [marker(c, r) for r, c in REASON_COLOURS.items()]
    handles.append(marker(INTERNAL_COLOUR, "internal segment"))
    handles.append(Line2D([], [], ls="none", marker="s", ms=8, mfc=ENV_COLOUR, mec="none", label="env turn"))
    handles.append(Line2D([], [], ls="--", color="#999", marker="o", ms=8, mfc="none", mec="#000", mew=1.5,
                          label="fallback node"))
    handles.append(Line2D([], [], ls="none", marker="$r$", color=GOOD, label="reward > 0"))
    handles.append(Line2D([], [], ls="none", marker="$r$", color=BAD, label="reward ≤ 0"))
    return handles


def _draw_tree(ax, tree: PromptTree) -> None:
    from matplotlib.collections import LineCollection

    pos = layout(tree)
    ids = sorted(tree.nodes)
    fb = [tree.nodes[n].fallback for n in ids]
    segments = [[pos[n[:-1]], pos[n]] for n in ids]
    ax.add_collection(LineCollection(segments, colors=["#888" if f else "#bbb" for f in fb], linewidths=0.8,
                                     linestyles=["--" if f else "-" for f in fb]))
    styles = [_style(tree, n) for n in ids]
    model = [k for k, n in enumerate(ids) if not tree.nodes[n].env]
    ax.scatter([0, *(pos[ids[k]][0] for k in model)], [pos[ROOT][1], *(pos[ids[k]][1] for k in model)], zorder=3,
               s=[40] + [45 if styles[k][0] else 22 for k in model], c=["#333"] + [styles[k][1] for k in model],
               edgecolors=["none"] + ["#000" if fb[k] else "none" for k in model], linewidths=1.5)
    env = [n for n in ids if tree.nodes[n].env]
    if env:
        ax.scatter([pos[n][0] for n in env], [pos[n][1] for n in env], zorder=3, s=30, marker="s", c=ENV_COLOUR)
    for leaf, reward in tree.rewards.items():
        ax.annotate(f"{reward:.2g}", pos[leaf], xytext=(5, -3), textcoords="offset points", fontsize=7,
                    color=GOOD if reward > 0 else BAD)
    max_depth = max(d for d, _ in pos.values())
    ax.set(xlim=(-0.3, max_depth + 0.8), ylim=(_slots(pos) - 0.5, -0.5), yticks=[], xticks=range(max_depth + 1))
    ax.axis("on")
    ax.set_xlabel("depth (segments and env turns)", fontsize=8)
    ax.spines[["top", "right", "left"]].set_visible(False)
    prompt = snippet(tree.prompt_text, 45) if tree.prompt_text else ""
    ax.set_title(f"prompt {tree.prompt_index}: {prompt}\n{len(tree.nodes)} nodes, {len(tree.leaves)} leaves, "
                 f"{tree.fallbacks} fallback rounds", fontsize=9)


# -- files ---------------------------------------------------------------------------------------


def write_pictures(trees: list[PromptTree], out_dir: Path, *, title: str = "treepo rollout",
                   summary: Optional[dict] = None, max_png_trees: int = 4) -> tuple[Path, Path]:
    """Write `out_dir/trees.html` (every tree) and `out_dir/trees.png` (the first `max_png_trees`)."""
    out_dir = Path(out_dir)
    html_path, png_path = out_dir / "trees.html", out_dir / "trees.png"
    io.write_text(html_path, render_html(trees, title, summary))
    render_png(trees, png_path, max_png_trees)
    return html_path, png_path
