"""The TreePO trainer: tree rollouts on the live policy -> rewards -> advantages -> PPO update.

    treepo train                                  # the embedded default: SmolLM2-135M, letter_counting (1-3 words), CPU
    treepo train --config run.yaml --steps 50     # a YAML file plus command-line overrides

One step:
1. roll out `prompts_per_step` prompt groups with the embedded engine, which runs the policy's
   own weights (re-read after every update);
2. score every trajectory; with dynamic sampling, drop groups whose rewards are all equal and
   roll out more prompts (at most `max_resample_rounds` extra rounds);
3. per-token advantages from the tree (`advantages.py`), whitened over the batch's tokens;
4. `mini_batches` x `ppo_epochs` PPO updates (`update.py`, `loss.py`), each accumulating
   gradients over micro-batches of `micro_batch_size` trajectories (tree-packed by default:
   `packing.py`), normalised to the token-mean of the update; AdamW with warm-up and gradient
   clipping, through accelerate (so `accelerate launch` works).

Every step appends a row to `metrics.jsonl` (and TensorBoard under `tb/`); checkpoints go to
`checkpoints/` atomically and `--resume` continues from the newest; at the end the run folder
gets `model/` (the trained weights), `summary.json`, `reward.png` and `savings.png`.
The row's keys and `summary.json` are built in `step_metrics.py`; whether `--out` starts or resumes a
run, and the random streams a checkpoint keeps, in `resume.py`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from rich.console import Console

from .. import io
from ..config import EngineConfig, RewardConfig, SamplerConfig, TrainConfig, WeightSyncConfig
from ..engines.memory import format_bytes
from ..envs import load_env, system_prompt_with
from ..errors import ConfigError, RewardError
from ..eval.evaluate import evaluate
from ..progress import progress_bar
from ..prompts import render
from ..rewards.scorers import FAILURE_KINDS, FailureTally, build_reward
from ..rewards.scoring import overlong_penalty, score_trees
from ..rollout.sampler import RolloutResult, TreeSampler
from ..rollout.stopping import answer_predicate
from ..tree import leaf_weights
from . import checkpoint
from .metrics_log import MetricsLog
from .resume import check_run_folder, rng_state, set_rng_state
from .setup import PromptStream, check_configs, check_sharding, load_training_prompts, start_serving
from .step_metrics import brief, run_summary, step_row
from .update import PolicyUpdate

log = logging.getLogger(__name__)

EVAL_SEED = 12345  # held-out evaluation samples with this seed every time, so runs compare


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Owns the model, optimizer, engine and run folder of one training run."""

    def __init__(
        self,
        engine_cfg: EngineConfig,
        sampler_cfg: SamplerConfig,
        reward_cfg: RewardConfig,
        train_cfg: TrainConfig,
        *,
        sync_cfg: Optional[WeightSyncConfig] = None,
        model=None,
        tokenizer=None,
        console: Optional[Console] = None,
    ):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        from ..engines.transformers_engine import TransformersEngine, context_length

        self.engine_cfg, self.sampler_cfg, self.reward_cfg, self.cfg = engine_cfg, sampler_cfg, reward_cfg, train_cfg
        self.sync_cfg = sync_cfg or WeightSyncConfig()
        self.console = console or Console(stderr=True)
        check_configs(engine_cfg, sampler_cfg, reward_cfg, train_cfg)
        self.out = io.check_output_dir(train_cfg.out)
        self.resume_from = check_run_folder(self.out, train_cfg.resume, self._configs(), self.console)
        # Everything that can fail on bad input fails here, before the model loads.
        self.predicate = answer_predicate(sampler_cfg)
        self.env = load_env(sampler_cfg.env, sampler_cfg.env_args)
        self.reward_fn = build_reward(reward_cfg.reward, task=None if train_cfg.prompts else train_cfg.task,
                                      timeout=reward_cfg.reward_timeout, failure_reward=reward_cfg.failure_reward)
        pool, self.heldout = load_training_prompts(train_cfg, reward_cfg, sampler_cfg.seed)
        self.stream = PromptStream(pool, sampler_cfg.seed)

        if model is None:
            from ..engines.loading import load_model

            with self.console.status(f"loading model {engine_cfg.model} ..."):
                # The policy trains locally whichever engine samples (a server gets its weights pushed).
                model, tokenizer = load_model(replace(engine_cfg, engine="transformers", server_url=[],
                                                      launch_server=False))
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        torch.manual_seed(sampler_cfg.seed)
        # Buffers (e.g. rotary tables) are never trained: no broadcast per forward, whose count may
        # differ between ranks (they hold different numbers of micro-batches).
        self.accelerator = Accelerator(cpu=model.device.type == "cpu",
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        check_sharding(self.accelerator)
        if not self.accelerator.is_main_process:
            self.console = Console(stderr=True, quiet=True)  # one progress bar and one log, from rank 0
        self.reference = None
        if train_cfg.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False).to(self.accelerator.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.learning_rate,
                                      weight_decay=train_cfg.weight_decay)
        warm = train_cfg.warmup_steps  # update k (0-based) runs at lr * min(1, (k + 1) / (warm + 1)): never 0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / (warm + 1)))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler  # stepped once per update (accelerate's wrapper steps it once per process)
        self.policy = self.accelerator.unwrap_model(self.model)
        self.update = PolicyUpdate(train_cfg, accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                                   scheduler=self.scheduler, reference=self.reference, pad_id=self.pad_id,
                                   temperature=engine_cfg.temperature)
        # Each rank samples its own share of prompts with its own random stream.
        rank_cfg = replace(sampler_cfg, seed=self.rank_seed(0))
        system_prompt = system_prompt_with(train_cfg.system_prompt, self.env)
        self.pool_ids = [render(p, tokenizer, system_prompt) for p in pool]
        self.weight_sync = None
        if engine_cfg.engine == "server":
            if self.world > 1:
                raise ConfigError("--engine server trains in one process (every rank would push weights to the same "
                                  "servers): launch without accelerate's multi-process, or use the embedded engine.")
            # A launched server's slots hold the longest prompt (training or held-out) plus a full response.
            longest = max(len(ids) for ids in self.pool_ids + [render(p, tokenizer, system_prompt)
                                                              for p in self.heldout])
            self.engine, self.weight_sync = start_serving(
                engine_cfg, self.sync_cfg, self.policy, tokenizer, self.out, seed=rank_cfg.seed,
                context=context_length(self.policy.config), need=longest + self.sampler_cfg.response_budget + 16,
                resuming=self.resume_from is not None)
        else:
            self.engine = TransformersEngine(self.policy, tokenizer, engine_cfg, seed=rank_cfg.seed)
        try:
            self.sampler = TreeSampler(rank_cfg, self.engine, predicate=self.predicate, env=self.env)
            for i, ids in enumerate(self.pool_ids):  # a prompt too long for the context fails now, not at step N
                self.sampler.check_fits(ids, i)
            # A step rolls out its prompts (this rank's share) together: a KV cache that cannot fit fails now.
            per_rank = -(-train_cfg.prompts_per_step // self.world)
            self.plan = self.sampler.plan([len(ids) for ids in self.pool_ids], per_rank,
                                          batch_flag="--prompts_per_step")
        except BaseException:
            self.close()
            raise
        self.step = 0
        self.rows: list[dict] = []
        self.evals: list[dict] = []
        self.log: Optional[MetricsLog] = None

    def rank_seed(self, step: int) -> int:
        """The sampling seed of this rank (at a resumed step, for more than one process)."""
        return self.sampler_cfg.seed + 1_000_003 * self.rank + 7_919 * step * (self.world > 1)

    def _all_gather_ints(self, value: int) -> list[int]:
        """`value` from every rank, in rank order."""
        if self.world == 1:
            return [value]
        return [int(x) for x in self.accelerator.gather(torch.tensor([value], device=self.accelerator.device)).tolist()]

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        try:
            result = self._train()
        except BaseException:
            try:
                self.close()
            except Exception as e:  # noqa: BLE001 - the training error is the one to report
                log.warning("stopping the servers after the error failed too: %s", e)
            raise
        self.close()
        return result

    def close(self) -> None:
        """Stop what the run started (a launched llama-server); the embedded engine holds nothing to stop."""
        if self.weight_sync is not None:
            try:
                self.weight_sync.close()
            finally:
                self.engine.close()

    def _train(self) -> dict:
        if self.accelerator.is_main_process and (stale := checkpoint.remove_stale(self.out)):
            self.console.print(f"removed {len(stale)} unfinished checkpoint folder(s) left by an interrupted save: "
                               + ", ".join(p.name for p in stale))
        if self.resume_from is not None:
            self._restore(self.resume_from)
            self.console.print(f"resumed from {self.resume_from} (step {self.step})")
        self._open_logs()
        p = self.plan
        self.console.print(f"train plan: {self.cfg.steps - self.step} steps x {p.batch} prompts x width {p.width} x "
                           f"budget {p.budget} tokens per step"
                           + (f"; KV cache up to {format_bytes(p.kv_bytes)}" if p.kv_bytes is not None else "")
                           + (f" of {format_bytes(p.available)} available" if p.available is not None else ""),
                           highlight=False)
        try:
            if self.heldout and self.step == 0:
                self._evaluate_heldout()
            with progress_bar(self.console, unit="steps") as progress:
                task = progress.add_task("train", total=self.cfg.steps, completed=self.step, info="first step")
                self.engine.on_progress = lambda text: progress.update(task, info=f"step {self.step + 1}: {text}")
                while self.step < self.cfg.steps:
                    row = self.train_step()
                    if self.heldout and self.cfg.eval_every and self.step % self.cfg.eval_every == 0 \
                            and self.step < self.cfg.steps:
                        row.update(self._evaluate_heldout(log_row=False))
                    self._log(row)
                    progress.update(task, completed=self.step, info=brief(row))
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 \
                            and self.step < self.cfg.steps:
                        self.save_checkpoint()
            if self.heldout and not any(e["eval_step"] == self.step for e in self.evals):
                self._evaluate_heldout()
            self.save_checkpoint()
        except BaseException:
            self.log.close()  # the rows written so far stay; no model/ and no checkpoint past the last good one
            raise
        finally:
            self.engine.on_progress = None
        return self._finish()

    def train_step(self) -> dict:
        """Roll out, score, build advantages and update once; return the step's metric row."""
        t0 = time.perf_counter()
        cfg = self.cfg
        progress = self.step / max(cfg.steps, 1)
        kept, results, failures, dropped, rounds, rewards_all, correct_all = [], [], Counter(), 0, 0, [], []
        weighted = []  # per tree: (leaf-weighted reward, leaf-weighted accuracy), unbiased for the policy's
        need = cfg.prompts_per_step
        tally = FailureTally()  # the step's reward failures (all its resample rounds)
        while True:
            if self.weight_sync is not None:  # a server draws from (seed, group, node): a seed per step and round
                self.engine.reseed((self.rank_seed(0) * 1_000_003 + self.step) * 1_009 + rounds)
            # Every rank draws the same prompts from the stream and rolls out its share of them.
            indices = self.stream.take(need)[self.rank :: self.world]
            ids = [self.pool_ids[i] for i in indices]
            # Each tree's prompt_index is its problem's place in the pool, so messages name a real prompt.
            result = self.sampler.rollout(ids, indices=indices, progress=progress) if ids else RolloutResult([])
            results.append(result)
            scored, fails = score_trees(result.trees, self.stream.prompts, self.reward_fn, self.engine, tally)
            failures.update(fails)
            for j, tree in enumerate(result.trees):
                if cfg.overlong_buffer:
                    budget = self.sampler_cfg.response_budget
                    for leaf in tree.leaves:
                        tree.rewards[leaf] += overlong_penalty(len(tree.response_ids(leaf)), budget,
                                                               cfg.overlong_buffer, cfg.overlong_factor)
                rewards = [tree.rewards[leaf] for leaf in tree.leaves]
                rewards_all += rewards
                correct_all += scored[j]["correct"]
                w = leaf_weights(tree.leaves, tree.multiplicity())
                weighted.append((float(np.dot(w, rewards)), float(np.dot(w, scored[j]["correct"]))))
                if cfg.dynamic_sampling and max(rewards) - min(rewards) < 1e-9:
                    dropped += 1
                else:
                    kept.append(tree)
            counts = self._all_gather_ints(len(kept))  # kept groups per rank: all ranks decide alike
            if not cfg.dynamic_sampling or sum(counts) >= cfg.prompts_per_step or rounds >= cfg.max_resample_rounds:
                break
            rounds += 1
            need = cfg.prompts_per_step - sum(counts)
        self._stop_if_reward_failed_everywhere(tally)
        # At most prompts_per_step groups in all, taken rank by rank.
        quota = max(0, min(len(kept), cfg.prompts_per_step - sum(counts[: self.rank])))
        kept = kept[:quota]
        trained = min(sum(counts), cfg.prompts_per_step)
        rollout_seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's updates use
        if trained and self.weight_sync is not None:
            self.weight_sync.remember(self.policy)  # the probe's scores before the update (sync_gap_old)
        update = self.update(kept, self.step) if trained else {}  # a rank with no group still joins the update
        self.step += 1
        if self.weight_sync is not None and self.engine_cfg.temperature != 1.0:
            # a server reports log-probs before temperature, the policy's here are after: the gap would measure that
            update.update(engine_logprob_gap=None, engine_logprob_gap_max=None)
        if trained:
            update.update(self._sync_weights())
        if self.world > 1:  # the step's rollouts and counts from every rank, for the metrics row
            from accelerate.utils import gather_object

            parts = gather_object([(results, rewards_all, correct_all, failures, dropped, weighted)])
            results = [r for part in parts for r in part[0]]
            rewards_all = [x for part in parts for x in part[1]]
            correct_all = [x for part in parts for x in part[2]]
            failures = sum((part[3] for part in parts), Counter())
            dropped = sum(part[4] for part in parts)
            weighted = [x for part in parts for x in part[5]]
        row = step_row(self.step, results, self.sampler_cfg, rewards_all=rewards_all, correct_all=correct_all,
                       weighted=weighted, update=update, lr=lr, trained=trained, dropped=dropped, rounds=rounds,
                       failures=failures, rollout_seconds=rollout_seconds, train_seconds=time.perf_counter() - t1,
                       step_seconds=time.perf_counter() - t0)
        if not trained:
            log.warning("step %d: every group had equal rewards after %d resample rounds; no update this step",
                        self.step, rounds)
        return row

    def _stop_if_reward_failed_everywhere(self, tally: FailureTally) -> None:
        """Raise RewardError, before any update, when the reward failed on every sample of the step (all ranks)."""
        if self.world > 1:  # every rank takes the same decision, from the counts of all of them (one gather)
            local = torch.tensor([[tally.samples, *(tally.counts.get(k, 0) for k in FAILURE_KINDS)]],
                                 device=self.accelerator.device)
            samples, *kinds = self.accelerator.gather(local).sum(0).tolist()
            tally = FailureTally(samples=int(samples), first=tally.first,
                                 counts=Counter({k: int(n) for k, n in zip(FAILURE_KINDS, kinds) if n}))
        if not tally.samples or tally.failed < tally.samples:
            return
        latest = checkpoint.latest_checkpoint(self.out)
        kept = (f"the last checkpoint ({latest.relative_to(self.out)}) is kept: continue with --resume once it is "
                "fixed" if latest is not None else "no checkpoint had been written yet")
        raise RewardError(f"{tally.error_text(self.reward_fn.name, f'of step {self.step + 1}')}. The run stopped "
                          f"before updating the model; {kept}.")

    # -- evaluation ---------------------------------------------------------------------------
    def _evaluate_heldout(self, log_row: bool = True) -> dict:
        if not self.accelerator.is_main_process:  # rank 0 evaluates; the others wait at the next step
            return {}
        state = self.engine.rng_state()  # evaluation must not shift training's random stream
        # Independent sampling by default, so the curve means the same thing whatever the training sampler.
        eval_cfg = replace(self.sampler_cfg, seed=EVAL_SEED, mode=self.cfg.eval_mode,
                           width=self.cfg.eval_samples or self.sampler_cfg.width)
        summary, _ = evaluate(self.engine, eval_cfg, self.heldout, self.reward_fn,
                              system_prompt=self.cfg.system_prompt, batch_size=self.cfg.prompt_batch_size, strict=False)
        self.engine.set_rng_state(state)
        k = summary["k"]
        row = {"eval_step": self.step, "eval_accuracy": summary[f"mean@{k}"]["value"],
               "eval_pass": summary[f"pass@{k}"]["value"], "eval_maj": summary[f"maj@{k}"]["value"]}
        self.console.print(f"held-out ({len(self.heldout)} problems, step {self.step}): mean@{k} "
                           f"{row['eval_accuracy']:.1%}, pass@{k} {row['eval_pass']:.1%}, maj@{k} {row['eval_maj']:.1%}")
        self.evals.append(row)
        if log_row:
            self._log({"step": self.step, **row})
        return row

    # -- logs, checkpoints, the end -----------------------------------------------------------
    def _open_logs(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # Keep only the rows the checkpoint covers: steps after it will be redone.
        self.log = MetricsLog(self.out, main=self.accelerator.is_main_process, tensorboard=self.cfg.tensorboard)
        self.rows = self.log.open(self.step if self.resume_from else None)
        self.evals = [{k: v for k, v in r.items() if k != "step" and k.startswith("eval")} for r in self.rows
                      if "eval_step" in r]

    def _log(self, row: dict) -> None:
        self.rows.append(row)
        self.log.write(row)

    def save_checkpoint(self) -> Optional[Path]:
        if not self.accelerator.is_main_process:
            return None
        if checkpoint.latest_checkpoint(self.out) == checkpoint.step_dir(self.out, self.step):
            return None
        rng = rng_state(self.sampler, self.engine)
        state = {"step": self.step, "data_position": self.stream.position, "rows": len(self.rows),
                 "config": self._configs()}
        return checkpoint.save(
            self.out, self.step, model=self.policy, tokenizer=self.tokenizer,
            optimizer_state={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            rng_state=rng, trainer_state=state, keep=self.cfg.keep_checkpoints,
        )

    def _restore(self, folder: Path) -> None:
        ck = checkpoint.load(folder)
        checkpoint.load_weights(self.policy, ck["model_dir"])
        self.optimizer.load_state_dict(ck["optimizer"]["optimizer"])
        self.scheduler.load_state_dict(ck["optimizer"]["scheduler"])
        set_rng_state(ck["rng"], self.sampler, self.engine)
        if self.world > 1:  # the checkpoint holds rank 0's streams: every rank starts fresh ones
            self.sampler.rng.seed(self.rank_seed(ck["trainer"]["step"]))
            self.engine.reseed(self.rank_seed(ck["trainer"]["step"]))
        self.step = ck["trainer"]["step"]
        self._sync_weights()
        self.stream.position = ck["trainer"]["data_position"]

    def _sync_weights(self) -> dict:
        """The policy's weights changed: the embedded engine re-reads them; servers get them pushed (metrics)."""
        self.engine.sync_weights()
        if self.weight_sync is None:
            return {}
        return self.weight_sync.push(self.policy, self.step).metrics()

    def _configs(self) -> dict:
        return {"engine": asdict(self.engine_cfg), "sampler": asdict(self.sampler_cfg), "sync": asdict(self.sync_cfg),
                "reward": asdict(self.reward_cfg), "train": asdict(self.cfg)}

    def _finish(self) -> dict:
        from ..viz.plots import plot_training

        self.log.close()
        summary = run_summary(self.step, self.rows, self.evals, self._configs())
        if self.accelerator.is_main_process:
            checkpoint.save_model_dir(self.out / "model", self.policy, self.tokenizer)
            io.write_json(self.out / "summary.json", summary)
            pictures = plot_training(self.rows, self.out)
            if summary["reward_failures"]:
                samples = sum(r["prompts_rolled"] * r["trajectories_per_prompt"] for r in self.rows if "reward_mean" in r)
                kinds = ", ".join(f"{k} {n}" for k, n in summary["reward_failures"].items())
                self.console.print(f"[yellow]reward failures[/yellow]: reward {self.reward_fn.name!r} failed on "
                                   f"{sum(summary['reward_failures'].values())} of {samples:.0f} samples ({kinds}); "
                                   f"they scored failure_reward {self.reward_cfg.failure_reward:g}")
            self.console.print(f"wrote {self.out}/model, metrics.jsonl, summary.json"
                               + "".join(f", {p.name}" for p in pictures))
        return summary


def run_train(engine_cfg: EngineConfig, sampler_cfg: SamplerConfig, reward_cfg: RewardConfig, train_cfg: TrainConfig,
              *, sync_cfg: Optional[WeightSyncConfig] = None, model=None, tokenizer=None,
              console: Optional[Console] = None) -> dict:
    """The `treepo train` job; returns the run summary."""
    trainer = Trainer(engine_cfg, sampler_cfg, reward_cfg, train_cfg, sync_cfg=sync_cfg, model=model,
                      tokenizer=tokenizer, console=console)
    summary = trainer.train()
    if trainer.accelerator.num_processes > 1:  # close the process group: a gloo rank can abort at exit otherwise
        trainer.accelerator.end_training()
    return summary
