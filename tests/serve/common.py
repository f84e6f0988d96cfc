"""What the serving tests share: a tiny model whose output depends visibly on the adapter,
and the solo reference a served answer must equal."""

import torch

from loratree.adapters import load_adapter
from loratree.models.tiny import tiny_llama
from loratree.serve import Request
from loratree.serve.slot_table import BASE

VOCAB = 64


def tiny_model():
    """A tiny Llama whose greedy output depends visibly on the adapter (weights x5)."""
    model = tiny_llama(vocab=VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.generation_config.eos_token_id = None
    return model


def solo_reference(store, name, prompt, n):
    """Greedy decoding without any cache: the full sequence through a fresh model with only
    this adapter loaded. Returns (new tokens, each step's logits)."""
    model = tiny_model()
    if name != BASE:
        load_adapter(model, store.path_of(name))
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out = model(input_ids=torch.tensor([ids])).logits[0, -1]
            logits.append(out)
            ids.append(int(out.argmax()))
    return ids[len(prompt):], logits


def run_plan(engine, plan):
    """Submit ``plan`` (adapter, prompt, new tokens, step to submit at) and run it out."""
    handles, step = {}, 0
    while len(handles) < len(plan) or engine.busy():
        for i, (a, p, n, at) in enumerate(plan):
            if at == step:
                handles[i] = engine.submit(Request(p, adapter=a, max_new_tokens=n,
                                                   ignore_eos=True))
        engine.step()
        step += 1
    return [handles[i] for i in range(len(plan))]
