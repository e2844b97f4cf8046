"""HPS data: generate many responses per prompt, score them with a reward model, make pairs.

    prefsel generate  --prompts P --model POLICY --num-samples K --output runs/gen [--backend vllm|hf]
    prefsel annotate  --data runs/gen --reward-model RM --output runs/multi
    prefsel to-pairs  --data runs/multi --output runs/pairs [--strategy hps|best-worst]

Pure pieces (prompt parsing, seeds, vLLM request/row shaping, reward pooling, pair choice) do not
import Ray; the jobs (generate_job, annotate_job) wrap them in Ray Data pipelines.
"""
