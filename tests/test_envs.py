"""The environment protocol, loading, chat rendering of env turns, the two built-ins, and the safe evaluator."""

from __future__ import annotations

import builtins
import time

import pytest

import tiny
from fakes import FakeEngine, encode
from treepo.config import SamplerConfig
from treepo.envs import CalculatorEnv, EnvTurn, RecheckEnv, load_env, system_prompt_with
from treepo.envs.base import EnvError, chat_suffix, path_view, render_messages, turn_token_ids
from treepo.envs.calculator import last_call
from treepo.envs.recheck import LAST_TURN, RECHECK
from treepo.envs.safe_eval import Refused, evaluate
from treepo.errors import ConfigError
from treepo.rollout.sampler import TreeSampler

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STRICT = ("{% for message in messages %}{% if message['role'] not in ['user', 'assistant'] %}"
          "{{ raise_exception('Conversation roles must be user/assistant') }}{% endif %}"
          "{{ '[' + message['role'] + '] ' + message['content'] + '</s>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")


# -- loading -------------------------------------------------------------------------------------


def test_builtins_load_by_name_with_args():
    assert isinstance(load_env("calculator"), CalculatorEnv)
    env = load_env("recheck", '{"max_turns": 2}')
    assert isinstance(env, RecheckEnv) and env.max_turns == 2
    assert load_env(None) is None
    assert type(load_env("toy_envs:Always")).__name__ == "Always"


@pytest.mark.parametrize("spec, args, message", [
    ("calculater", None, "not a built-in environment (did you mean calculator?)"),
    ("no_such_module:Env", None, "cannot import module 'no_such_module'"),
    ("toy_envs:Missing", None, "module 'toy_envs' has no class 'Missing'"),
    ("toy_envs:not_a_class", None, "'not_a_class' is a int, not a class"),
    ("toy_envs:NoNextTurn", None, "class NoNextTurn lacks the hook next_turn(self, path) -> Optional[EnvTurn]"),
    ("toy_envs:OnlyCheck", None, "class OnlyCheck lacks the hook next_turn"),
    ("toy_envs:NeedsArg", None, "NeedsArg(**{}) failed (TypeError"),
    ("recheck", '{"max_turns": 0}', "RecheckEnv(**{'max_turns': 0}) failed (ValueError: max_turns=0"),
    ("calculator", '{"colour": 1}', "CalculatorEnv(**{'colour': 1}) failed"),
])
def test_bad_environments_are_one_clear_error_naming_class_and_hook(spec, args, message):
    with pytest.raises(ConfigError) as e:
        load_env(spec, args)
    assert message in str(e.value) and spec in str(e.value)


def test_sampler_refuses_an_env_instance_without_hooks():
    from toy_envs import NoNextTurn

    with pytest.raises(ConfigError, match="NoNextTurn lacks the hook next_turn"):
        TreeSampler(SamplerConfig(), FakeEngine(), env=NoNextTurn())


def test_env_stop_strings_and_instructions_are_used():
    sampler = TreeSampler(SamplerConfig(stop_strings=["END"], env="calculator"), FakeEngine())
    assert sampler.stops == ("END", "</calc>")
    assert system_prompt_with("Be brief.", load_env("calculator")).startswith("Be brief.\n\nYou have a calculator.")
    assert system_prompt_with("Be brief.", load_env("recheck")) == "Be brief."


# -- the path the hooks see ------------------------------------------------------------------------


def test_path_view_merges_segments_into_turns():
    cfg = SamplerConfig(width=1, depth=5, segment_len=5, branching=1, stop_strings=["</c>"])

    class Spy(RecheckEnv):
        seen = []

        def check_finished(self, path):
            self.seen.append(path)
            return "answer" if path.assistant_turns == 2 and path.turn_ended else None

        def next_turn(self, path):
            return EnvTurn(token_ids=encode("[r]"))

    texts = {1: "ab c", 2: "d</c>", 3: "xyz!"}
    engine = FakeEngine(script=lambda r: {"text": texts.get(len(r.node_id) - (len(r.node_id) > 2), "zz"),
                                          "eos": len(r.node_id) == 4})
    TreeSampler(cfg, engine, env=Spy()).rollout([encode("q")])
    last = Spy.seen[-1]
    assert [(t.role, t.text) for t in last.turns] == [("assistant", "ab cd</c>"), ("env", "[r]"), ("assistant", "xyz!")]
    assert last.assistant_turns == 2 and last.env_turns == 1 and last.turn_ended and last.hit_eos
    assert last.max_turns == 5 and last.text == "xyz!" and last.prompt_ids == tuple(encode("q"))
    mid = Spy.seen[0]
    assert not mid.turn_ended and mid.text == "ab c"


# -- rendering env turns -----------------------------------------------------------------------------


def _tok(template=None):
    """The tiny test tokenizer with a chat template (a new wrapper: the cached one keeps none)."""
    t = tiny.tokenizer()
    copy = t.__class__(tokenizer_object=t.backend_tokenizer, eos_token="<eos>", pad_token="<pad>")
    copy.chat_template = template
    return copy


def test_chat_template_renders_the_suffix_after_the_assistant_turn():
    tok = _tok(CHATML)
    msgs = [{"role": "tool", "content": "12*7 = 84"}]
    # the model ended its turn with a stop string: the template's end-of-turn text comes first
    assert chat_suffix(tok, msgs, None) == "<|im_end|>\n<|im_start|>tool\n12*7 = 84<|im_end|>\n<|im_start|>assistant\n"
    ids = render_messages(tok, msgs, None)
    assert tok.decode(ids) == chat_suffix(tok, msgs, None)


def test_an_end_of_turn_token_the_model_produced_is_not_repeated():
    class Tok:  # a tokenizer whose EOS text is the template's end-of-turn marker
        chat_template = CHATML

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            from jinja2 import Template

            return Template(CHATML).render(messages=messages, add_generation_prompt=add_generation_prompt)

        def decode(self, ids, skip_special_tokens=False):
            return "<|im_end|>" if ids == [2] else "?"

    assert chat_suffix(Tok(), [{"role": "user", "content": "again"}], eos_id=2) == \
        "\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_without_a_tool_role_gets_a_user_message():
    tok = _tok(STRICT)
    suffix = chat_suffix(tok, [{"role": "tool", "content": "84"}], None)
    assert suffix == "</s>[user] tool: 84</s>[assistant] "


def test_without_a_chat_template_env_messages_use_the_plain_layout():
    tok = _tok(None)
    ids = render_messages(tok, [{"role": "tool", "content": "84"}], None)
    assert tok.decode(ids) == "\n\nTool: 84\n\nAnswer:"


def test_malformed_turns_say_what_is_wrong():
    tok = _tok(None)
    cases = [
        ("hello", "returned str, not EnvTurn"),
        (EnvTurn(), "exactly one of"),
        (EnvTurn(messages=[{"role": "tool", "content": 3}]), "non-empty list"),
        (EnvTurn(messages=[]), "non-empty list"),
        (EnvTurn(token_ids=[1, "2"]), "list of ints"),
        (EnvTurn(token_ids=[len(tok) + 5]), "outside the vocabulary"),
        (EnvTurn(token_ids=[]), "renders to no tokens"),
    ]
    for turn, message in cases:
        with pytest.raises(EnvError, match=message):
            turn_token_ids(turn, tok, None, len(tok))
    with pytest.raises(EnvError, match="no tokenizer"):
        turn_token_ids(EnvTurn(messages=[{"role": "tool", "content": "x"}]), None, None, None)
    assert turn_token_ids(EnvTurn(token_ids=[5, 6]), tok, None, len(tok)) == [5, 6]


# -- the calculator ------------------------------------------------------------------------------


def _view(text: str, eos: bool = False, stop: bool = False, turns: int = 1, max_turns: int = 4):
    from treepo.tree import Node, PromptTree

    tree = PromptTree(prompt_index=0, prompt_ids=[1])
    node_id: tuple = ()
    for k in range(turns):
        node_id += (0,)
        last = k == turns - 1
        tree.nodes[node_id] = Node(node_id, encode(text), [0.0] * len(text), [0.0] * len(text), text=text,
                                   hit_eos=eos if last else True, hit_stop=stop if last else False)
        if not last:
            node_id += (0,)
            tree.nodes[node_id] = Node(node_id, [65], [0.0], [0.0], text="A", env=True)
    return path_view(tree, node_id, max_turns, FakeEngine().decode)


def test_calculator_answers_a_call_and_ends_at_a_final_message():
    env = CalculatorEnv()
    call = _view("so <calc>12*(3+4)</calc>", stop=True)
    assert env.check_finished(call) is None
    assert env.next_turn(call).messages == [{"role": "tool", "content": "12*(3+4) = 84"}]
    assert env.check_finished(_view("it is 84", eos=True)) == "eos"
    assert env.check_finished(_view("thinking <calc>1+", eos=False)) is None  # mid-turn (fixed segments)
    assert env.next_turn(_view("no call here", eos=True)) is None
    assert last_call("<calc>1</calc> then <calc> 2*3 </calc>") == "2*3"


MALICIOUS = [
    "__import__('os').system('touch {marker}')",
    "__import__('os')",
    "().__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "(1).real",
    "open('{marker}', 'w')",
    "9**9**9",
    "10**100000",
    "2**10**8",
    "'a' * 10**9",
    "[0] * 10**9",
    "(lambda f: f(f))(lambda f: f(f))",
    "[x for x in iter(int, 1)]",
    "sum(1 for _ in iter(int, 1))",
    "factorial(10**6)",
    "exp(10**6)",
    "eval('1+1')",
    "globals()",
    "x",
]


@pytest.mark.parametrize("expression", MALICIOUS)
def test_malicious_expressions_are_refused_with_a_message_never_run(expression, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    expression = expression.format(marker=marker)

    def forbidden(*a, **k):
        raise AssertionError("eval/exec must never run")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    started = time.perf_counter()
    with pytest.raises(Refused):
        evaluate(expression)
    message = CalculatorEnv().answer(expression)
    assert time.perf_counter() - started < 1.0
    assert message.startswith("error: ") and "does not run code" in message
    assert not marker.exists()


@pytest.mark.parametrize("expression, value", [
    ("2**10 + sqrt(16)", 1028.0), ("7 // 2", 3), ("-3 % 5", 2), ("round(2.567, 2)", 2.57), ("max(1, 9, 4)", 9),
    ("factorial(20)", 2432902008176640000), ("10**999 // 10**998", 10), ("2**-2", 0.25), ("pi", 3.141592653589793),
    ("log(e)", 1.0), ("abs(-3)", 3),
])
def test_arithmetic_still_works(expression, value, monkeypatch):
    monkeypatch.setattr(builtins, "eval", lambda *a, **k: pytest.fail("eval used"))
    assert evaluate(expression) == pytest.approx(value)


@pytest.mark.parametrize("expression, reason", [
    ("1/0", "division by zero"), ("(-8)**0.5", "not a real number"), ("sqrt(-1)", "math error"),
    ("1e308*10", "not a finite number"), ("1 +", "not an arithmetic expression"), ("1" * 400, "too long"),
    ("(" * 150 + "1" + ")" * 150, "too long"), ("f(1)", "not a calculator function"),
])
def test_errors_are_reasons_for_the_model(expression, reason):
    with pytest.raises(Refused, match=reason):
        evaluate(expression)


def test_time_limit_is_enforced():
    with pytest.raises(Refused, match="took too long"):
        evaluate("1+2+3+4+5+6+7+8+9", time_limit=1e-12)


def test_size_limit_is_configurable():
    assert evaluate("10**50", max_digits=60) == 10**50
    with pytest.raises(Refused, match="too large"):
        evaluate("10**70", max_digits=60)
    with pytest.raises(Refused, match="too large"):
        evaluate("10**40 * 10**40", max_digits=60)


# -- recheck -------------------------------------------------------------------------------------


def test_recheck_asks_again_and_says_when_it_is_the_last_turn():
    env = RecheckEnv()
    assert env.check_finished(_view("so \\boxed{4}", eos=True)) == "answer"
    assert env.check_finished(_view("not sure", eos=True)) is None
    assert env.check_finished(_view("not su", eos=False)) is None
    assert env.next_turn(_view("not sure", eos=True, turns=1, max_turns=3)).messages[0]["content"] == RECHECK
    assert env.next_turn(_view("not sure", eos=True, turns=2, max_turns=3)).messages[0]["content"] == LAST_TURN
    assert env.check_finished(_view("not sure", eos=True, turns=3, max_turns=3)) == "max_turns"
    short = RecheckEnv(max_turns=2)  # 2, not 2 | 6
    assert short.check_finished(_view("not sure", eos=True, turns=2, max_turns=6)) == "max_turns"
    assert short.next_turn(_view("not sure", eos=True, turns=1, max_turns=6)).messages[0]["content"] == LAST_TURN
