"""One prompt's tree in the terminal (`treepo show` prints the first ones): a `rich` tree of segment snippets."""

from __future__ import annotations

from ..tree import ROOT, NodeId, PromptTree
from .render import ENV_COLOUR, REASON_COLOURS, snippet


def terminal_tree(tree: PromptTree, width: int = 48):
    """A `rich.tree.Tree` of one prompt's tree: segment snippets, env turns tagged, leaves with their reason."""
    from rich.markup import escape as esc
    from rich.tree import Tree

    def label(node_id: NodeId) -> str:
        node = tree.nodes[node_id]
        text = esc(snippet(node.text, width))
        if node.env:
            return f"[bold {ENV_COLOUR}]env[/] [italic {ENV_COLOUR}]{text}[/] [dim]({len(node)} tokens, not trained)[/]"
        out = f"{text} [dim]({len(node)} tokens{', fallback' if node.fallback else ''})[/]"
        if node_id in tree.leaves:
            reward = tree.rewards.get(node_id)
            colour = REASON_COLOURS.get(node.finish_reason or "", "#888888")
            out += f" [bold {colour}]{esc(node.finish_reason or '?')}[/]"
            out += "" if reward is None else f" r={reward:.3g}"
        return out

    top = Tree(f"[bold]prompt {tree.prompt_index}[/] {esc(snippet(tree.prompt_text, width))}")
    todo = [(top, ROOT)]
    while todo:
        branch, node_id = todo.pop()
        for child in tree.children(node_id):
            todo.append((branch.add(label(child)), child))
    return top
