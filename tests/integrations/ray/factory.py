"""What every replica of the Ray tests builds: the serving tests' tiny model (the same
weights in every process, from a fixed seed) and its word-level tokenizer."""

from loratree.models.tiny import tiny_tokenizer
from tests.serve.common import VOCAB, tiny_model

FACTORY = "tests.integrations.ray.factory:tiny"


def tiny():
    return tiny_model(), tiny_tokenizer(VOCAB)
