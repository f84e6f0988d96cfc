"""What the serving tests share: a tiny model whose output depends visibly on the adapter,
and the solo reference a served answer must equal."""

import torch

from loratree import surgery
from loratree.adapters import load_adapter, save_adapter
from loratree.adapters.node_files import write_record
from loratree.models.tiny import tiny_llama
from loratree.serve import Request
from loratree.serve.slot_table import BASE
from loratree.tree import nodes
from tests.conftest import randomize_slot

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


def adapter_dir(tmp, name, config, seed, store=None, metrics=None):
    """A PEFT directory ``tmp/src-<name>-<seed>`` of a random LoRA adapter on
    ``tiny_model``; when ``name`` is a tree path, with the node record of its parent in
    ``store`` (and ``metrics``)."""
    model = tiny_model()
    surgery.inject(model, config)
    randomize_slot(model, 0, std=0.3, seed=seed)
    d = save_adapter(model, tmp / f"src-{name.replace('/', '_')}-{seed}")
    if "/" in name:
        write_record(d, nodes.record_for(store, name.rsplit("/", 1)[0], metrics=metrics))
    return d


def solo_reference(store, name, prompt, n):
    """Greedy decoding without any cache: the full sequence through a fresh model with only
    this adapter loaded. Returns (new tokens, each step's logits)."""
    return dir_reference(None if name == BASE else store.path_of(name), prompt, n)


def dir_reference(path, prompt, n):
    """``solo_reference`` for the adapter directory ``path`` (None: the base model)."""
    model = tiny_model()
    if path is not None:
        load_adapter(model, path)
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


def peft_references(paths, prompt, n):
    """Greedy tokens of PEFT itself for each adapter directory of ``paths`` on the tiny
    model (one PEFT model holding them all, switched with ``set_adapter``)."""
    import peft

    model, out = None, []
    for i, path in enumerate(paths):
        if model is None:
            model = peft.PeftModel.from_pretrained(tiny_model(), path, adapter_name="0")
        else:
            model.load_adapter(path, adapter_name=str(i))
        model.set_adapter(str(i))
        model.eval()
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        out.append(ids[len(prompt):])
    return out
