"""Training: the three Croc stages on the transformers Trainer, the demo and the evaluation.

Needs the ``train`` extra (transformers, accelerate); ``croc.train.configs`` holds the DeepSpeed
configs that ``--deepspeed zero2`` / ``zero3`` name.
"""
