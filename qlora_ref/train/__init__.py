"""QLoRA fine-tuning (paper, section 4's recipe), shared by both backends: ``TrainConfig`` (the
paper's recipe), the loop (``loop.train``), checkpoints with exact resume (``checkpoint``), the progress bar,
and the reference backend (``reference.RefTrainer``). ``qlora_ref.train.api.finetune`` runs it all from paths.

Submodules are imported on use (``from qlora_ref.train.loop import train``) so that ``qlora_ref.adapters`` and
the checkpoint module can import each other's pieces without a cycle.
"""
