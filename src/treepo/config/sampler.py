"""SamplerConfig: the TreePO tree (shape, budget, branching, stopping, fallback) and the jobs' variants."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Optional

from ..errors import ConfigError
from .base import _help, _require


AUTO_FANOUT_MAX = -1  # init_divergence_max: up to 8 root children, at most width
DivergencePolicy = Literal["fixed_avg", "low_prob", "high_prob", "entropy"]
# Advantage estimators (train/advantages.py implements each one of these names).
Estimator = Literal["average", "size_weighted", "segment", "grpo", "unbiased"]
# Estimators built on subtrees: with independent samples they have no tree to read.
TREE_ESTIMATORS = ("average", "size_weighted", "segment")
# How the step's advantages are normalised (train/advantages.py).
Whitening = Literal["token", "scale", "group", "none"]


@dataclass
class SamplerConfig:
    """The TreePO tree: its shape, how it branches, when paths stop, how it backtracks."""

    mode: Literal["tree", "independent"] = field(
        default="tree",
        metadata=_help("'tree' = TreePO segment tree; 'independent' = width independent samples (the baseline)."),
    )
    width: int = field(default=8, metadata=_help("Trajectories per prompt, the group size w [paper: 16]."))
    depth: int = field(default=4, metadata=_help("Most model segments on one path (env turns do not count; turn mode: most turns), d [paper: 14]."))
    segment_len: int = field(default=64, metadata=_help("New tokens per segment [paper: 512]."))
    branching: int = field(default=2, metadata=_help("Children a node gets when it forks, b [paper: 2]."))
    init_divergence: int = field(
        default=0,
        metadata=_help("Root fan-out; 0 = branching (at most width). With init_divergence_max: the low end."),
    )
    init_divergence_max: int = field(
        default=0,
        metadata=_help(
            "If > 0, each prompt's root fan-out is drawn uniformly from [init_divergence, "
            "init_divergence_max] (the paper's 'more init divergence' is 2..8)."
        ),
    )
    divergence_policy: DivergencePolicy = field(
        default="fixed_avg",
        metadata=_help(
            "How a step's children are split over active paths: 'fixed_avg' (even), 'low_prob' / "
            "'high_prob' (softmax of -/+ segment log-prob), 'entropy' (softmax of segment entropy)."
        ),
    )
    divergence_score: Literal["last_mean", "path_mean", "path_sum"] = field(
        default="last_mean",
        metadata=_help("Log-prob score for the probability policies: last segment mean, whole path mean or sum."),
    )
    divergence_temperature: float = field(
        default=1.0, metadata=_help("Softmax temperature of the probability / entropy policies.")
    )
    divergence_temperature_end: Optional[float] = field(
        default=None,
        metadata=_help("If set, the temperature follows a cosine from divergence_temperature to this over training."),
    )
    budget: Literal["particles", "transfer", "branch"] = field(
        default="particles",
        metadata=_help(
            "How a prompt's width is spent: 'particles' (each prompt holds width particles; a fork splits a path's "
            "particles among its children and a path that ends keeps them as its leaf's multiplicity, so the "
            "weighted leaves are exact draws from the policy and the tree never decodes more than width "
            "independent samples; see rollout/particles.py), 'transfer' (the paper's rule: a finished path's "
            "forks go to the survivors, so leaves run longer than the policy's answers) or 'branch' (new "
            "branches cut from the finished paths at random earlier segment boundaries)."
        ),
    )
    shape: Literal["adaptive", "fixed"] = field(
        default="fixed",
        metadata=_help(
            "'adaptive': before each rollout, segment length, root fan-out and fork depth are chosen from the "
            "running answer-length distribution (depth x segment_len, or max_response_tokens, stays the "
            "response budget) so that forks land where prefixes are long, and the sampler falls back to "
            "independent sampling when answers fit in about one segment; the first rollout, with no lengths "
            "seen yet, samples independently. 'fixed': the shape as given. Needs budget 'particles'; fixed "
            "segments, no env (elsewhere the given shape is kept)."
        ),
    )
    fork_depth: int = field(
        default=0,
        metadata=_help(
            "Budget 'particles': paths fork (into branching children, while they hold more than one particle) "
            "at every segment boundary from this depth on (1 = after the first segment); 0 = 1, or chosen by "
            "the adaptive shape. Must be below depth."
        ),
    )
    min_distinct: float = field(
        default=0.75,
        metadata=_help(
            "Adaptive shape: the least expected share of distinct leaves per group (distinct trajectories / "
            "width); a shape that saves more tokens with more duplicated leaves is not chosen."
        ),
    )
    min_segment_len: int = field(
        default=32,
        metadata=_help("Adaptive shape: the shortest segment it may choose. Every segment boundary is an engine "
                       "round, and each round regathers the batch's KV cache, so shorter segments save tokens at a "
                       "cost in time."),
    )
    fallback_policy: Literal["finished", "any", "root"] = field(
        default="finished",
        metadata=_help(
            "Which finished paths are reopened when a prompt has no active path and fewer than width "
            "trajectories: 'finished' (ended with an answer or EOS, else restart from the prompt), "
            "'any' (any finished path), 'root' (always restart from the prompt)."
        ),
    )
    fallback_max_backtrack: int = field(
        default=0,
        metadata=_help("Most fork points a fallback cut goes back (segments; turns in turn mode); 0 = any (up to the prompt)."),
    )
    answer_policy: Literal["boxed_and_eos", "boxed_as_eos", "none"] = field(
        default="boxed_and_eos",
        metadata=_help(
            "When a path counts as answered: 'boxed_and_eos' (a complete \\boxed{} and EOS), "
            "'boxed_as_eos' (the box alone ends the path), 'none' (never)."
        ),
    )
    answer_predicate: Optional[str] = field(
        default=None,
        metadata=_help("'module:function' taking the response text and returning True when it holds an answer."),
    )
    max_response_tokens: int = field(
        default=0,
        metadata=_help("Response token cap, env turns included; 0 = depth * segment_len (turn mode: * max_turn_tokens). "
                       "Longer paths finish (truncated). With an env, raise it to leave room for the env's turns."),
    )
    rep_window: int = field(default=32, metadata=_help("Repetition detector: window length in characters."))
    rep_count: int = field(
        default=8, metadata=_help("Repetition detector: a window seen this often in a segment ends the path; 0 = off.")
    )
    rep_priority: Literal["first", "last"] = field(
        default="last", metadata=_help("Check repetition before ('first') or after ('last') the other stop rules.")
    )
    seed: int = field(default=0, metadata=_help("Seed for every random choice (tree decisions and token sampling)."))
    segment_mode: Literal["fixed", "turn"] = field(
        default="fixed",
        metadata=_help(
            "'fixed' = segments of segment_len tokens; 'turn' = a segment is one assistant turn (it ends at the "
            "end-of-turn token or a stop string, at most max_turn_tokens), so trees branch and backtrack at turn "
            "boundaries and depth counts turns."
        ),
    )
    max_turn_tokens: int = field(
        default=0, metadata=_help("Turn mode: most new tokens in one assistant turn; 0 = segment_len.")
    )
    stop_strings: list[str] = field(
        default_factory=list,
        metadata=_help("Strings that end an assistant turn where they appear (e.g. '</calc>'), besides the EOS token."),
    )
    env: Optional[str] = field(
        default=None,
        metadata=_help(
            "Environment that answers between assistant turns: 'calculator' (a safe arithmetic tool), 'recheck' "
            "(asks the model to re-check until it gives a boxed answer), or 'module:Class' (see treepo.envs)."
        ),
    )
    env_args: Optional[str] = field(
        default=None, metadata=_help('JSON object of keyword arguments for the environment class, e.g. \'{"max_calls": 4}\'.')
    )
    max_turns: int = field(
        default=0,
        metadata=_help("With an env: most assistant turns on one path (reason 'max_turns'); 0 = depth."),
    )

    def __post_init__(self) -> None:
        for name in ("width", "depth", "segment_len", "branching"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 1, f"{name}={value!r}: must be an integer >= 1 (e.g. --{name} 2)."
            )
        lo, hi = self.init_divergence, self.init_divergence_max
        _require(lo >= 0, f"init_divergence={lo}: must be >= 0 (0 = use branching).")
        _require(hi >= 0 or hi == AUTO_FANOUT_MAX,
                 f"init_divergence_max={hi}: must be >= 0 (0 = fixed fan-out; -1 = up to 8, at most width).")
        _require(
            self.root_fanout_range[0] <= self.width,
            f"init_divergence={self.root_fanout_range[0]} exceeds width={self.width}: a prompt cannot start more "
            f"paths than it may finish; lower init_divergence or raise width.",
        )
        if hi > 0:
            _require(lo >= 1, "init_divergence_max is set: give the low end too, e.g. --init_divergence 2.")
            _require(
                hi >= lo,
                f"init_divergence range [{lo}, {hi}] is reversed: put the smaller value in init_divergence.",
            )
            _require(hi <= self.width, f"init_divergence_max={hi} exceeds width={self.width}: lower it to <= width.")
        _require(
            self.divergence_temperature > 0,
            f"divergence_temperature={self.divergence_temperature}: must be > 0.",
        )
        _require(
            self.divergence_temperature_end is None or self.divergence_temperature_end > 0,
            f"divergence_temperature_end={self.divergence_temperature_end}: must be > 0 or unset.",
        )
        _require(
            self.fallback_max_backtrack >= 0,
            f"fallback_max_backtrack={self.fallback_max_backtrack}: must be >= 0 (0 = no limit).",
        )
        _require(self.max_response_tokens >= 0, f"max_response_tokens={self.max_response_tokens}: must be >= 0.")
        _require(self.rep_window >= 1, f"rep_window={self.rep_window}: must be >= 1 character.")
        _require(self.rep_count >= 0 and self.rep_count != 1, f"rep_count={self.rep_count}: use 0 (off) or >= 2.")
        _require(
            self.answer_predicate is None or ":" in self.answer_predicate,
            f"answer_predicate={self.answer_predicate!r}: write it as 'module:function'.",
        )
        _require(
            not (self.answer_predicate and self.answer_policy == "none"),
            "answer_predicate is set but answer_policy='none' never asks it: drop one of the two.",
        )
        _require(self.max_turn_tokens >= 0, f"max_turn_tokens={self.max_turn_tokens}: must be >= 0 (0 = segment_len).")
        _require(
            not (self.max_turn_tokens and self.segment_mode == "fixed"),
            f"max_turn_tokens={self.max_turn_tokens} only applies to turn segments: add --segment_mode turn, "
            "or set the segment size with --segment_len.",
        )
        _require(
            isinstance(self.stop_strings, list) and all(isinstance(x, str) and x for x in self.stop_strings),
            f"stop_strings={self.stop_strings!r}: give a list of non-empty strings, e.g. --stop_strings '</calc>'.",
        )
        _require(
            self.env is None or ":" in self.env or self.env.isidentifier(),
            f"env={self.env!r}: use a built-in environment name (calculator, recheck) or 'module:Class'.",
        )
        if self.env_args is not None:
            try:
                args = json.loads(self.env_args)
            except json.JSONDecodeError as e:
                raise ConfigError(f"env_args={self.env_args!r}: not valid JSON ({e.msg}); write a JSON object, "
                                  'e.g. \'{"max_calls": 4}\'.') from e
            _require(isinstance(args, dict), f"env_args={self.env_args!r}: expected a JSON object, e.g. '{{\"max_calls\": 4}}'.")
            _require(self.env is not None, "env_args is set but no env: add --env NAME or drop env_args.")
        _require(self.max_turns >= 0, f"max_turns={self.max_turns}: must be >= 0 (0 = depth).")
        _require(
            self.max_turns <= self.depth,
            f"max_turns={self.max_turns} exceeds depth={self.depth}: every assistant turn takes at least one "
            "segment, so depth ends the path first; raise depth or lower max_turns.",
        )

        _require(self.fork_depth >= 0, f"fork_depth={self.fork_depth}: must be >= 0 (0 = 1, or chosen by --shape adaptive).")
        _require(
            self.fork_depth < self.depth,
            f"fork_depth={self.fork_depth} is past the last fork point (paths have at most depth={self.depth} "
            f"segments, so the last boundary is {self.depth - 1}): lower --fork_depth below --depth or raise --depth.",
        )
        _require(not (self.fork_depth and self.budget != "particles"),
                 f"fork_depth={self.fork_depth} only applies to --budget particles (now {self.budget!r}): drop --fork_depth "
                 "or add --budget particles.")
        _require(
            not (self.mode == "tree" and self.budget == "particles" and self.branching == 1
                 and self.shape == "fixed" and self.root_fanout_range[0] < self.width),
            f"branching=1 with budget 'particles': paths never fork, so a group would have only "
            f"{self.root_fanout_range[0]} distinct leaves of width={self.width}; raise --branching (e.g. 2) or "
            f"set --init_divergence {self.width} (independent sampling).",
        )
        if self.mode == "tree" and self.budget == "particles":  # knobs of the transfer / branch rules only
            defaults = {"divergence_policy": "fixed_avg", "divergence_score": "last_mean", "divergence_temperature": 1.0,
                        "divergence_temperature_end": None, "fallback_policy": "finished", "fallback_max_backtrack": 0}
            for name, default in defaults.items():
                value = getattr(self, name)
                _require(value == default,
                         f"{name}={value!r} does nothing with budget 'particles' (it splits a path's particles evenly "
                         f"and never backtracks): drop --{name}, or add --budget transfer (or branch) to use it.")
        _require(0 < self.min_distinct <= 1,
                 f"min_distinct={self.min_distinct}: must be in (0, 1] (a share of width, e.g. 0.75).")
        _require(isinstance(self.min_segment_len, int) and self.min_segment_len >= 1,
                 f"min_segment_len={self.min_segment_len!r}: must be an integer >= 1 (e.g. 16).")
        if self.shape == "adaptive" and self.mode == "tree":
            _require(self.budget == "particles",
                     f"--shape adaptive chooses where particle paths fork, but budget={self.budget!r}: add "
                     "--budget particles, or --shape fixed to keep the fixed shape with this budget.")
            for name in ("init_divergence", "init_divergence_max", "fork_depth"):
                value = getattr(self, name)
                _require(not value, f"{name}={value} contradicts --shape adaptive, which chooses the root fan-out and "
                                    f"fork depth: drop --{name} or add --shape fixed.")

    @property
    def root_fanout_range(self) -> tuple[int, int]:
        """(low, high) root fan-out; equal ends mean a fixed fan-out. Independent mode forks width at once."""
        if self.mode == "independent":
            return self.width, self.width
        lo = self.init_divergence or min(self.branching, self.width)
        hi = self.init_divergence_max
        if hi == AUTO_FANOUT_MAX:  # up to 8, at most width, when a low end is given; else a fixed fan-out
            hi = max(lo, min(8, self.width)) if self.init_divergence else lo
        return lo, (hi or lo)

    @property
    def segment_cap(self) -> int:
        """Most new tokens in one segment: segment_len, or in turn mode max_turn_tokens (0 = segment_len)."""
        return (self.max_turn_tokens or self.segment_len) if self.segment_mode == "turn" else self.segment_len

    @property
    def turn_limit(self) -> int:
        """Most assistant turns on one path: max_turns, or depth when it is 0."""
        return self.max_turns or self.depth

    @property
    def response_budget(self) -> int:
        """Most response tokens a path may have (environment turns' tokens count too: they fill the context).

        max_response_tokens when set, else depth x the segment size; with an environment, set it above
        that to leave room for the environment's turns.
        """
        return self.max_response_tokens or self.depth * self.segment_cap


@dataclass
class JobSamplerConfig(SamplerConfig):
    """The sampler of `treepo rollout`, `eval` and `train`: SamplerConfig with the adaptive shape by default.

    The Python API's SamplerConfig keeps the shape it is given (`shape='fixed'`), so a TreeSampler built by
    hand grows exactly the tree it is asked for.
    """

    shape: Literal["adaptive", "fixed"] = field(
        default="adaptive",
        metadata=SamplerConfig.__dataclass_fields__["shape"].metadata,
    )


@dataclass
class TrainSamplerConfig(JobSamplerConfig):
    """The sampler of `treepo train` (the same defaults as rollout's and eval's: particles, adaptive shape)."""
