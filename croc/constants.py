"""The one home of croc's enums and defaults; every other module imports them from here.

Dependency-free, so that any layer (ops, pool, data, model, train) can import it.
"""

__all__ = [
    "ASSIGNMENTS",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "MASK_KINDS",
    "POOL_INITS",
    "STAGES",
]

STAGES = ("projector", "croc", "finetune")  # the training stages, in recipe order
MASK_KINDS = ("image", "prefix", "causal")  # what the Croc stage's mixed mask makes bidirectional
ASSIGNMENTS = ("hungarian", "nearest")  # how replaced visual tokens pick their pool tokens
POOL_INITS = ("normal", "normalized")  # how the prompt token pool is initialised
IMAGE_TOKEN = "<image>"  # the image placeholder of LLaVA records and the tokenizer's image token
IGNORE_INDEX = -100  # label of a position that is not predicted
