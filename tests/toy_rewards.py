"""Reward functions with TRL's signature, for the trainer tests (they vary within a group on random text)."""


def letter_share(prompts, completions, **columns):
    """+1 when the completion has more letters 'a'-'m' than 'n'-'z', else -1: varies on random text."""
    out = []
    for c in completions:
        low = sum("a" <= ch <= "m" for ch in c.lower())
        high = sum("n" <= ch <= "z" for ch in c.lower())
        out.append(1.0 if low > high else -1.0)
    return out


def constant(prompts, completions, **columns):
    return [0.5] * len(completions)


def raises(prompts, completions, **columns):
    raise RuntimeError("the grader is down")
