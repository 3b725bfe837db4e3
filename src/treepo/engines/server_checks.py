"""The server engine's start-up checks, before any rollout: what each server is and whether it fits.

`survey` asks every server `GET /v1/models` (an OpenAI-compatible server that serves the model
asked for; its kind from `owned_by`; the context it allows from `max_model_len` or llama-server's
`meta.n_ctx`), then tokenises a probe on the server (`/extras/tokenize` for llama-cpp-python,
whose prompts are text; `/tokenize` for vLLM, SGLang and llama-server, which take ids) and
compares it with the local tokenizer, naming the first token that differs. Every failure is a
one-line InputError naming the URL and the fix. (The engine then sends each server one greedy
completion: `ServerEngine._check_servers`.)
"""

from __future__ import annotations

import logging
from typing import Optional

from ..errors import InputError, ServerError
from .server_pool import HTTPRefused, ServerPool, Unusable, Usage

log = logging.getLogger(__name__)

PROBE_TEXT = "Tokenizer check: 12 + 7 = 19, naïve café ☃ \\boxed{x}\n  indented\tline"
# GET /v1/models `owned_by` -> the server's kind (the engine's route and the weight sync's back-end)
KINDS = {"llamacpp": "llama.cpp", "vllm": "vllm", "sglang": "sglang", "me": "llama-cpp-python"}


def survey(pool: ServerPool, tokenizer, cfg) -> tuple[str, str, str, Optional[int]]:
    """(model name, dialect 'text' | 'token_ids', kind, context the servers allow or None) of all servers."""
    names, dialects, contexts, kinds = set(), set(), [], set()
    for server in pool.servers:
        try:
            listing = pool.get(server, "/v1/models")
            served = [m["id"] for m in listing["data"]]
        except (HTTPRefused, KeyError, TypeError, Unusable) as e:
            raise InputError(f"server_url={server.url!r} is not an OpenAI-compatible server: GET /v1/models "
                             f"gave {e}. Pass the server's base URL, e.g. http://127.0.0.1:8000.") from None
        name = choose_model(server.url, served, cfg.server_model)
        mine = [m for m in listing["data"] if m["id"] == name]
        contexts += [m["max_model_len"] for m in mine if m.get("max_model_len")]
        contexts += [m["meta"]["n_ctx"] for m in mine if isinstance(m.get("meta"), dict) and m["meta"].get("n_ctx")]
        kinds.add(next((KINDS.get(str(m.get("owned_by")), "unknown") for m in mine), "unknown"))
        names.add(name)
        dialect, server_ids = tokenize_probe(pool, server, tokenizer, name)
        check_tokenizer(server.url, name, server_ids, tokenizer, cfg.model)
        dialects.add(dialect)
    if len(names) > 1 or len(dialects) > 1:
        raise InputError(f"the servers differ (models {sorted(names)}, kinds {sorted(dialects)}): "
                         "give servers that run the same model.")
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return names.pop(), dialects.pop(), kind, min(contexts) if contexts else None


def choose_model(url: str, served: list[str], wanted: str) -> str:
    if wanted:
        if wanted not in served:
            raise InputError(f"server {url} does not serve server_model={wanted!r}; it serves {served}: "
                             f"pass one of those to --server-model.")
        return wanted
    if len(served) != 1:
        raise InputError(f"server {url} serves {len(served)} models {served}: choose one with --server-model.")
    return served[0]


def probe_text(tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):  # special tokens too, as real prompts have them
        return tokenizer.apply_chat_template([{"role": "user", "content": PROBE_TEXT}], tokenize=False,
                                             add_generation_prompt=True)
    return PROBE_TEXT


def probe_ids(tokenizer) -> list[int]:
    return tokenizer(probe_text(tokenizer), add_special_tokens=False)["input_ids"]


def tokenize_probe(pool: ServerPool, server, tokenizer, name: str) -> tuple[str, Optional[list[int]]]:
    """('text' | 'token_ids', the server's ids for the probe or None when it has no tokenize endpoint)."""
    text = probe_text(tokenizer)
    for path, body, dialect in (("/extras/tokenize", {"input": text}, "text"),  # llama-cpp-python
                                ("/tokenize", {"model": name, "prompt": text, "add_special_tokens": False},
                                 "token_ids"),  # vLLM, SGLang
                                ("/tokenize", {"content": text, "add_special": False, "parse_special": True},
                                 "token_ids")):  # llama-server
        try:
            ids = pool.post(path, body, token_list, server=server)
        except (HTTPRefused, ServerError):
            continue
        if ids:  # llama-server answers another dialect's body with no tokens: try the next
            return dialect, ids
    log.warning("server %s has no tokenize endpoint: its tokenizer cannot be compared with the local one", server.url)
    return "token_ids", None


def check_tokenizer(url: str, name: str, server_ids: Optional[list[int]], tokenizer, model: str) -> None:
    if server_ids is None:
        return
    local = probe_ids(tokenizer)
    bos = tokenizer.bos_token_id
    if server_ids[:1] == [bos] and local[:1] != [bos]:
        server_ids = server_ids[1:]  # a server that adds BOS when tokenising
    if server_ids != local:
        at = next((i for i, (a, b) in enumerate(zip(server_ids, local)) if a != b), min(len(server_ids), len(local)))
        raise InputError(
            f"server {url} ({name}) tokenises differently from the local tokenizer of model={model!r} (first "
            f"difference at token {at}: server {server_ids[at:at + 3]}, local {local[at:at + 3]}): pass --model "
            "the model (or tokenizer folder) that the server runs."
        )


def string_table(tokenizer, vocab_size: int) -> dict[str, int]:
    """Text dialect: each token's string -> its id (-1 where several tokens share a string)."""
    strings = tokenizer.batch_decode([[i] for i in range(vocab_size)], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    table: dict[str, int] = {}
    for i, s in enumerate(strings):
        if s and "\ufffd" not in s:
            table[s] = -1 if s in table else i
    return table


def token_list(answer: dict) -> tuple[list[int], Usage]:
    """A tokenize endpoint's answer: {"tokens": [ids]}."""
    tokens = answer.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise Unusable("no 'tokens' list of ids")
    return tokens, Usage(0, 0)
