"""The environment protocol: what answers between the model's turns, and when a path ends.

Subclass `Environment` and write its two hooks; the sampler calls them, never the reverse:

    class Echo(Environment):
        instructions = "Say DONE when you are finished."

        def check_finished(self, path: PathView) -> Optional[str]:
            # after every model segment: a finish reason, or None to go on
            return "done" if "DONE" in path.text else None

        def next_turn(self, path: PathView) -> Optional[EnvTurn]:
            # after a model turn that did not finish: the environment's reply, or None = episode over
            return EnvTurn(messages=[{"role": "user", "content": f"You said {len(path.text)} characters."}])

Both hooks must be functions of the path they are given: one instance serves every path of every
prompt, in any order, and branches of one path ask again (state that must survive a turn belongs
in the conversation). A hook that raises, or returns anything else than the types above, ends that
path with the finish reason `env_error` (counted, and logged); `load_env` refuses a class that
cannot be imported or lacks a hook before any model work.

Environment tokens are context, never trained on and never counted as decoded (see `treepo.tree`).
`EnvTurn.messages` are rendered with the tokenizer's chat template (`render_messages`);
`EnvTurn.token_ids` are appended as given.
"""

from __future__ import annotations

import difflib
import inspect
import json
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

from ..errors import ConfigError
from ..plugins import load_callable
from ..tree import NodeId, PromptTree

HOOKS = {
    "check_finished": "check_finished(self, path) -> Optional[str]",
    "next_turn": "next_turn(self, path) -> Optional[EnvTurn]",
}


class EnvError(Exception):
    """An environment broke its contract during a run: the path finishes with reason `env_error`."""


@dataclass(frozen=True)
class Turn:
    """One turn of a path: an assistant turn (model segments between env turns, merged) or an env turn."""

    role: Literal["assistant", "env"]
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class PathView:
    """What the hooks see: one path of one prompt's tree, ending at the newest model segment."""

    prompt_index: int
    prompt_ids: tuple[int, ...]
    node_id: NodeId  # the newest model segment
    turns: tuple[Turn, ...]  # in order; the last one is the assistant turn that segment belongs to
    turn_ended: bool  # that segment closed its assistant turn (EOS / end-of-turn token or a stop string)
    hit_eos: bool
    hit_stop: bool
    max_turns: int  # the run's turn limit (max_turns, or depth when unset)

    @property
    def text(self) -> str:
        """Text of the current (newest) assistant turn."""
        return self.turns[-1].text

    @property
    def assistant_turns(self) -> int:
        """Assistant turns on the path, the current one included (computed from the path, so right after rollback)."""
        return sum(t.role == "assistant" for t in self.turns)

    @property
    def env_turns(self) -> int:
        return sum(t.role == "env" for t in self.turns)


@dataclass
class EnvTurn:
    """The environment's reply: chat messages to render, or token ids to append (exactly one of the two).

    messages: e.g. [{"role": "tool", "content": "42"}] (role and content strings).
    """

    messages: Optional[list[dict]] = None
    token_ids: Optional[list[int]] = None


class Environment:
    """Base class of environments. Override both hooks; the class attributes are optional."""

    instructions: str = ""  # appended to the system prompt, e.g. how to call a tool
    stop_strings: tuple[str, ...] = ()  # extra strings that end an assistant turn (e.g. a tool call's closing tag)

    def check_finished(self, path: PathView) -> Optional[str]:
        """After every model segment, once the built-in rules let the path go on: a finish reason, or None."""
        raise NotImplementedError

    def next_turn(self, path: PathView) -> Optional[EnvTurn]:
        """After a model turn ends (and the path is not finished): the reply to append, or None to end the episode."""
        raise NotImplementedError


def path_view(tree: PromptTree, node_id: NodeId, max_turns: int, decode: Callable[[Sequence[int]], str]) -> PathView:
    """The hooks' view of the path ending at model segment `node_id`."""
    turns: list[Turn] = []
    current: list[int] = []
    for n in tree.path(node_id):
        if n.env:
            turns.append(Turn("assistant", decode(current), tuple(current)))
            turns.append(Turn("env", n.text, tuple(n.token_ids)))
            current = []
        else:
            current.extend(n.token_ids)
    turns.append(Turn("assistant", decode(current), tuple(current)))
    node = tree.nodes[node_id]
    return PathView(
        prompt_index=tree.prompt_index,
        prompt_ids=tuple(tree.prompt_ids),
        node_id=node_id,
        turns=tuple(turns),
        turn_ended=node.ends_turn,
        hit_eos=node.hit_eos,
        hit_stop=node.hit_stop,
        max_turns=max_turns,
    )


# -- rendering an env turn into token ids ---------------------------------------------------------

_PLACEHOLDER = "TREEPOASSISTANTTURN"


def _chat(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def chat_suffix(tokenizer, messages: list[dict], eos_id: Optional[int]) -> str:
    """The text the chat template puts after an assistant turn's content: its end-of-turn marker (unless the
    model already produced it as `eos_id`), the messages, and the next assistant turn's header.

    It is the difference between the template's rendering of [user, assistant] and of
    [user, assistant, *messages] with the generation prompt. A template that rejects a role (many have
    no 'tool' role) gets the message as a user message whose content starts with "<role>: ".
    """
    base = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PLACEHOLDER}]
    try:
        before = _chat(tokenizer, base, False)
    except Exception as e:  # noqa: BLE001 - any template failure is reported as the env's
        raise EnvError(f"the chat template cannot render a user/assistant exchange ({e})") from e
    try:
        after = _chat(tokenizer, base + messages, True)
    except Exception:  # noqa: BLE001 - e.g. jinja's raise_exception for an unknown role
        as_user = [m if m["role"] in ("user", "assistant", "system") else
                   {"role": "user", "content": f"{m['role']}: {m['content']}"} for m in messages]
        try:
            after = _chat(tokenizer, base + as_user, True)
        except Exception as e:  # noqa: BLE001
            raise EnvError(f"the chat template cannot render the environment's messages ({e})") from e
    cut = before.find(_PLACEHOLDER)
    if cut < 0:
        raise EnvError("the chat template drops the assistant's content; return token_ids instead of messages")
    cut += len(_PLACEHOLDER)
    if after[:cut] != before[:cut]:
        raise EnvError("the chat template renders earlier turns differently once more messages follow; "
                       "return token_ids instead of messages")
    suffix = after[cut:]
    if eos_id is not None:
        eos_text = tokenizer.decode([eos_id], skip_special_tokens=False)
        if eos_text and suffix.startswith(eos_text):
            suffix = suffix[len(eos_text):]
    return suffix


def render_messages(tokenizer, messages: list[dict], eos_id: Optional[int]) -> list[int]:
    """Token ids that follow an assistant turn for these env messages.

    With a chat template: `chat_suffix`. Without one (a plain tokenizer, as for prompts rendered by
    `treepo.prompts.render`): "\\n\\nRole: content" per message, then "\\n\\nAnswer:".
    `eos_id` is the end-of-turn token the model produced, if it did (it is not repeated).
    """
    if tokenizer is None:
        raise EnvError("the engine has no tokenizer to render messages with; return token_ids")
    if getattr(tokenizer, "chat_template", None):
        text = chat_suffix(tokenizer, messages, eos_id)
    else:
        text = "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAnswer:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def turn_token_ids(turn: object, tokenizer, eos_id: Optional[int], vocab_size: Optional[int]) -> list[int]:
    """Check an env turn and give its token ids; EnvError says what is malformed."""
    if not isinstance(turn, EnvTurn):
        raise EnvError(f"next_turn returned {type(turn).__name__}, not EnvTurn or None")
    if (turn.messages is None) == (turn.token_ids is None):
        raise EnvError("an EnvTurn needs exactly one of messages or token_ids")
    if turn.messages is not None:
        if not isinstance(turn.messages, list) or not turn.messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and m["role"] and isinstance(m.get("content"), str)
            for m in turn.messages
        ):
            raise EnvError('messages must be a non-empty list of {"role": str, "content": str}')
        ids = render_messages(tokenizer, turn.messages, eos_id)
    else:
        ids = turn.token_ids
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise EnvError("token_ids must be a list of ints")
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise EnvError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size})")
        ids = list(ids)
    if not ids:
        raise EnvError("the env turn renders to no tokens; return None to end the episode instead")
    return ids


# -- loading -------------------------------------------------------------------------------------


def builtin_envs() -> dict[str, type]:
    from .calculator import CalculatorEnv
    from .recheck import RecheckEnv

    return {"calculator": CalculatorEnv, "recheck": RecheckEnv}


def check_env(env: object, name: str) -> None:
    """ConfigError unless `env` (a class or an instance) defines both hooks and sane optional attributes."""
    cls = env if inspect.isclass(env) else type(env)
    for hook, signature in HOOKS.items():
        fn = getattr(cls, hook, None)
        if not callable(fn) or fn is getattr(Environment, hook):
            raise ConfigError(f"env={name!r}: class {cls.__name__} lacks the hook {signature}; define it "
                              "(see treepo.envs.Environment).")
    stops = getattr(env, "stop_strings", ())
    if not isinstance(stops, (tuple, list)) or not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"env={name!r}: {cls.__name__}.stop_strings must be a tuple of non-empty strings.")
    if not isinstance(getattr(env, "instructions", ""), str):
        raise ConfigError(f"env={name!r}: {cls.__name__}.instructions must be a string.")


def load_env(spec: Optional[str], args_json: Optional[str] = None) -> Optional[Environment]:
    """The environment named by `--env` (a built-in name or 'module:Class'), built with `--env_args`."""
    if spec is None:
        return None
    if ":" not in spec:
        builtins = builtin_envs()
        if spec not in builtins:
            close = difflib.get_close_matches(spec, list(builtins), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"env={spec!r} is not a built-in environment{hint}: use one of "
                              f"{', '.join(builtins)}, or 'module:Class' for your own.")
        cls = builtins[spec]
    else:
        cls = load_callable(spec, "env", want_class=True)
    check_env(cls, spec)
    args = json.loads(args_json) if args_json else {}
    try:
        env = cls(**args)
    except Exception as e:  # noqa: BLE001 - a wrong argument, or the constructor refusing a value
        raise ConfigError(f"env={spec!r}: {cls.__name__}(**{args}) failed ({type(e).__name__}: {e}); "
                          "fix env_args.") from e
    check_env(env, spec)
    return env


def system_prompt_with(system_prompt: str, env: Optional[Environment]) -> str:
    """The system prompt plus the environment's instructions (how to call its tool), if it has any."""
    extra = getattr(env, "instructions", "") if env is not None else ""
    if not extra:
        return system_prompt
    return f"{system_prompt}\n\n{extra}" if system_prompt else extra
