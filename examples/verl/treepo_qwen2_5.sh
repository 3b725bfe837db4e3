#!/usr/bin/env bash
# TreePO on Qwen2.5 with verl 0.9.x on a GPU node: the GRPO command with treepo's config lines.
#
#   bash examples/verl/treepo_qwen2_5.sh vllm      # or: sglang
#
# Needs, on the cluster: pip install 'verl[vllm]>=0.9.1,<0.10' (or verl[sglang]), then pip install --no-deps treepo
# (treepo's own transformers pin is above verl's; docs/verl.md, "Install"),
# and GSM8K as verl's parquet files (python -m verl's examples/data_preprocess/gsm8k.py --local_save_dir ~/data/gsm8k).
# TREEPO_CHECK_ONLY=1 composes verl's config with these lines and runs verl's and treepo's start-up checks instead of
# training (no GPU needed; tests/verl_plugin/test_verl_recipe.py runs it in CI). Not run on a GPU by treepo's authors:
# see docs/verl.md, "What has and has not run".
set -euo pipefail
BACKEND=${1:-vllm}
MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct}
DATA=${DATA:-$HOME/data/gsm8k}
GPUS=${GPUS:-8}
PYTHON=${PYTHON:-python3}

OVERRIDES=(
    # --- the TreePO lines: everything else is an ordinary verl GRPO run ---
    trainer.use_v1=True
    trainer.v1.trainer_mode=treepo                          # verl's sync trainer + the tree advantage step
    actor_rollout_ref.rollout.agent.default_agent_loop=treepo_tree
    algorithm.adv_estimator=treepo                          # or treepo_paper (the paper's Eq. 5)
    actor_rollout_ref.rollout.n=16                          # the tree width w (the paper's 16)
    +treepo.segment_len=512                                 # the paper's tree: 14 segments of 512 tokens
    +treepo.depth=14
    +treepo.branching=2
    # --- the usual GRPO settings ---
    actor_rollout_ref.rollout.name="$BACKEND"
    actor_rollout_ref.model.path="$MODEL"
    data.train_files="$DATA/train.parquet"
    data.val_files="$DATA/test.parquet"
    data.train_batch_size=64
    data.max_prompt_length=1024
    data.max_response_length=7168                           # depth x segment_len
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.ppo_mini_batch_size=32
    actor_rollout_ref.actor.use_dynamic_bsz=True               # micro-batches by tokens (trees' rows vary in length)
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.rollout.tensor_model_parallel_size=2
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6
    actor_rollout_ref.rollout.calculate_log_probs=True
    trainer.n_gpus_per_node="$GPUS"
    trainer.nnodes=1
    trainer.total_epochs=1
    trainer.project_name=treepo
    trainer.experiment_name="qwen2_5_${BACKEND}_treepo"
    trainer.logger='["console"]'
)

if [ "${TREEPO_CHECK_ONLY:-0}" = 1 ]; then
    exec "$PYTHON" -m treepo.integrations.verl "${OVERRIDES[@]}"
fi
exec "$PYTHON" -m verl.trainer.main_ppo "${OVERRIDES[@]}" "${@:2}"
