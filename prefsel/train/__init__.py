"""Training on Ray Train (+ DeepSpeed): DPO, HPS and Bradley-Terry reward models.

Layers (pure torch code does not import Ray; the Ray layer wraps it; see ARCHITECTURE.md):

    config.py      TrainConfig: every option, defaults from the papers, validated once
    data.py        rows -> tokenized training rows (core formats/tokenizer), epoch/batch plan,
                   reference log-prob precompute (Ray Data actor pool)
    objectives.py  collation + the DPO / HPS / Bradley-Terry objectives (calls prefsel.losses)
    strategy.py    the ONE DeepSpeed config builder, DeepSpeed and DDP engines
    loop.py        the Ray Train worker loop (checkpoints, resume, metrics, final save)
    job.py         builds the TorchTrainer and runs it
    cli.py         `prefsel train rm|dpo|hps`
"""

from prefsel.train.config import TrainConfig

__all__ = ["TrainConfig"]
