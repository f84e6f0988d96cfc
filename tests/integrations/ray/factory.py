"""What every replica of the Ray tests builds: the serving tests' tiny model (the same
weights in every process, from a fixed seed) and its word-level tokenizer."""

from loratree.models.tiny import tiny_tokenizer
from tests.serve.common import VOCAB, tiny_model

FACTORY = "tests.integrations.ray.factory:tiny"
CONTEXT = 1024
"""The replicas' context: room for a stream long enough to be killed under (the default
rotary embedding has no length of its own, so the first 128 positions compute as in
``tiny_model``)."""


def tiny():
    model = tiny_model()
    model.config.max_position_embeddings = CONTEXT
    return model, tiny_tokenizer(VOCAB)
