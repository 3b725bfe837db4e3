"""`treepo train --engine server --launch_server`: training that pushes its weights to a real llama-server.

treepo writes the policy as a float32 GGUF (llama.cpp's own converter), starts llama.cpp's C++
`llama-server` on loopback, and after every update writes the new weights and restarts the server
on them. The model is a tiny random Llama with SmolLM2's tokenizer (llama.cpp's converter must
recognise the tokenizer); the GGUF is f32, so the server's log-probs equal the policy's to about
1e-4 nats, while one update at this learning rate moves them by far more.

Skipped when llama-server is not built, unless TREEPO_REQUIRE_SERVER=1 (CI and the README's test
command, after `scripts/setup.sh --server` built it): then a missing server fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from treepo.config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig, WeightSyncConfig
from treepo.engines.loading import load_tokenizer
from treepo.engines.local_server import llama_server_binary
from treepo.engines.weight_sync.base import WeightSyncError
from treepo.engines.weight_sync.llama_cpp import LlamaCppRestartSync
from treepo.errors import ServerError
from treepo.train.trainer import run_train

from real_servers import leak_guards, require

import tiny

require(llama_server_binary() is not None, "llama-server is not built", "bash scripts/build_llama_server.sh")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer (49,152 tokens), saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _ = load_tokenizer(EngineConfig())
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, vocab_size=len(tokenizer),
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-smollm-vocab")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


no_server_outlives_the_module, no_server_outlives_its_test = leak_guards("llama-server", set())


def cfgs(model_dir: Path, prompts: Path, out: Path, **train):
    args = dict(prompts=str(prompts), num_prompts=8, steps=2, prompts_per_step=2, micro_batch_size=8,
                learning_rate=1e-2, out=str(out), checkpoint_every=1, tensorboard=False, eval_prompts=0)
    args.update(train)
    return (EngineConfig(model=str(model_dir), engine="server", launch_server=True, server_parallel=2,
                         server_threads=1, server_concurrency=4, server_retries=1, server_timeout=30),
            SamplerConfig(width=4, depth=2, segment_len=8, seed=3),
            RewardConfig(reward="toy_rewards:letter_share"), TrainConfig(**args))


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward_mean"' in line]


@pytest.fixture
def prompts(tmp_path) -> Path:
    return tiny.write_prompts(tmp_path / "prompts.jsonl", 8)


def test_two_steps_push_each_update_to_llama_server(model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    run_train(*cfgs(model_dir, prompts, out), sync_cfg=WeightSyncConfig())
    steps = rows(out)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        print(f"step {r['step']}: server vs updated policy {r['sync_gap']:.2e} nats, vs the weights before the "
              f"update {r['sync_gap_old']:.3f}; update moved the probe {r['sync_policy_moved']:.3f}; "
              f"rollout log-probs |server - policy| mean {r['engine_logprob_gap']:.2e}, max "
              f"{r['engine_logprob_gap_max']:.2e}; sync {r['sync_seconds']:.1f} s")
        # After each sync the server scores the fixed probe as the updated policy does, not as the old weights did.
        assert r["sync_gap"] < 2e-3
        assert r["sync_policy_moved"] > 0.02 and r["sync_gap_old"] > 10 * r["sync_gap"]
        # The rollout came from the weights the policy had before this update (pushed by the previous sync).
        assert r["engine_logprob_gap"] < 2e-3 and r["engine_logprob_gap_max"] < 2e-2
    synced = sorted(p.name for p in (out / "weight_sync").glob("*.gguf"))
    assert synced == ["step-000002.gguf"]  # only the newest weights are kept


def test_a_server_serving_other_weights_stops_training_and_resume_continues(model_dir, prompts, tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "run"
    send = LlamaCppRestartSync.send

    def stale(self, model, step):  # the server comes back on the previous file: the old weights
        if step == 2:
            self.server.restart(self.server.gguf)
            return 0
        return send(self, model, step)

    monkeypatch.setattr(LlamaCppRestartSync, "send", stale)
    with pytest.raises(WeightSyncError) as failure:
        run_train(*cfgs(model_dir, prompts, out, steps=3), sync_cfg=WeightSyncConfig())
    message = str(failure.value)
    assert "\n" not in message and "127.0.0.1" in message and "other weights" in message and "step 2" in message
    assert (out / "checkpoints" / "step-000001").is_dir() and not (out / "checkpoints" / "step-000002").exists()
    monkeypatch.setattr(LlamaCppRestartSync, "send", send)
    run_train(*cfgs(model_dir, prompts, out, steps=3, resume="auto"), sync_cfg=WeightSyncConfig())
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert all(r["sync_gap"] < 2e-3 for r in rows(out))


def test_a_server_that_dies_mid_step_is_an_error_and_resume_continues(model_dir, prompts, tmp_path, monkeypatch):
    from treepo.engines.server import ServerEngine

    out = tmp_path / "run"
    generate, send = ServerEngine.generate, LlamaCppRestartSync.send
    synced = []

    def counting(self, model, step):
        synced.append(step)
        return send(self, model, step)

    def dying(self, requests):
        if synced:  # in step 2's rollout: the server has taken step 1's weights
            for server in self.owned:
                server.kill()
        return generate(self, requests)

    monkeypatch.setattr(LlamaCppRestartSync, "send", counting)
    monkeypatch.setattr(ServerEngine, "generate", dying)
    with pytest.raises(ServerError) as failure:
        run_train(*cfgs(model_dir, prompts, out, steps=3), sync_cfg=WeightSyncConfig())
    assert "\n" not in str(failure.value) and "127.0.0.1" in str(failure.value)
    assert (out / "checkpoints" / "step-000001").is_dir()
    monkeypatch.setattr(ServerEngine, "generate", generate)
    run_train(*cfgs(model_dir, prompts, out, steps=3, resume="auto"), sync_cfg=WeightSyncConfig())
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
