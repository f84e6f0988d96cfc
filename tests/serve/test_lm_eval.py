"""lm-eval (EleutherAI's harness) through ``loratree serve`` equals lm-eval's own ``hf``
backend with ``peft=`` the same adapter, item by item.

Two small tasks the test writes (nothing is downloaded): a multiple-choice task scored by
loglikelihood (``local-completions``: token-id prompts in batches, ``echo`` with prompt
logprobs) and a ``generate_until`` task (``local-completions`` with text prompts, and
``local-chat-completions`` with the chat template applied). Each runs for the base model
and for an adapter. The same commands, from a shell, are in docs/serving.md.
"""

import json
import random

import pytest

from loratree.models.chat import DEFAULT_CHAT_TEMPLATE
from loratree.models.tiny import tiny_tokenizer
from tests.serve.common import VOCAB, tiny_model
from tests.serve.conftest import lora_adapter, make_engine

lm_eval = pytest.importorskip("lm_eval")  # a test dependency: present under `make test`

from lm_eval.tasks import TaskManager  # noqa: E402

ADAPTER = "evals/a"
BASE_NAME = "tiny"
MC, GEN = "loratree_mc", "loratree_gen"


def _words(r: random.Random, n: int) -> str:
    return " ".join(f"w{r.randrange(3, VOCAB - 4)}" for _ in range(n))


def _write_tasks(root):
    """Two tasks over local JSON lines: 8 multiple-choice items, 6 generation items."""
    r = random.Random(0)
    mc = [{"q": _words(r, r.randrange(3, 8)),
           "choices": [_words(r, r.randrange(1, 4)) for _ in range(3)],
           "label": r.randrange(3)} for _ in range(8)]
    gen = [{"q": _words(r, r.randrange(3, 8)), "answer": _words(r, 2)} for _ in range(6)]
    common = "test_split: test\ndataset_path: json\n"
    for name, rows, body in (
        (MC, mc, 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\n'
                 'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
                 "metric_list:\n  - metric: acc\n"),
        (GEN, gen, 'output_type: generate_until\ndoc_to_text: "{{q}}"\n'
                   'doc_to_target: "{{answer}}"\n'
                   'generation_kwargs:\n  until: ["w7"]\n  max_gen_toks: 6\n'
                   "  do_sample: false\n"
                   "metric_list:\n  - metric: exact_match\n    higher_is_better: true\n"),
    ):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (root / f"{name}.yaml").write_text(
            f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n    test: {data}\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, many):
    """(base model directory, task directory); the served store is ``many`` plus ADAPTER."""
    root = tmp_path_factory.mktemp("lm-eval")
    base = root / "base"
    tiny_model().save_pretrained(base)
    tokenizer = tiny_tokenizer(VOCAB)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # what the server renders without one
    tokenizer.save_pretrained(base)
    if ADAPTER not in many:
        many.save(ADAPTER, lora_adapter(31), 0)
    tasks = root / "tasks"
    tasks.mkdir()
    _write_tasks(tasks)
    return base, tasks


def _evaluate(model: str, model_args: dict, tasks, names, *, chat: bool = False) -> dict:
    out = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(names),
        task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        apply_chat_template=chat, batch_size=model_args.pop("batch_size", 4))
    return {task: sorted(samples, key=lambda s: s["doc_id"])
            for task, samples in out["samples"].items()}


def _reference(base, tasks, adapter: str | None, store, names, chat=False) -> dict:
    args = {"pretrained": str(base), "dtype": "float32", "device": "cpu"}
    if adapter is not None:
        args["peft"] = str(store.path_of(adapter))
    return _evaluate("hf", args, tasks, names, chat=chat)


def _same_loglikelihoods(ours: list, ref: list) -> None:
    assert len(ours) == len(ref) == 8
    for a, b in zip(ours, ref, strict=True):
        assert a["doc_id"] == b["doc_id"]
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip(
                a["filtered_resps"], b["filtered_resps"], strict=True):
            assert lp_a == pytest.approx(lp_b, abs=1e-4), a["doc_id"]
            assert greedy_a == greedy_b, a["doc_id"]
        assert a["acc"] == b["acc"]


def _same_generations(ours: list, ref: list) -> None:
    assert len(ours) == len(ref) == 6
    assert [s["filtered_resps"] for s in ours] == [s["filtered_resps"] for s in ref]
    assert any(s["filtered_resps"][0] for s in ours)  # not all empty


@pytest.mark.parametrize("adapter", [None, ADAPTER], ids=["base", "adapter"])
def test_local_completions_equal_hf_peft(setup, many, adapter):
    from tests.serve.conftest import live

    base, tasks = setup
    reference = _reference(base, tasks, adapter, many, (MC, GEN))
    with live(many, make_engine(many)) as (url, _):
        ours = _evaluate("local-completions", {
            "base_url": f"{url}/v1/completions", "model": adapter or BASE_NAME,
            "tokenizer": str(base), "tokenizer_backend": "huggingface",
            "tokenized_requests": True, "max_retries": 1, "batch_size": 4,
        }, tasks, (MC, GEN))
    _same_loglikelihoods(ours[MC], reference[MC])
    _same_generations(ours[GEN], reference[GEN])


@pytest.mark.parametrize("adapter", [None, ADAPTER], ids=["base", "adapter"])
def test_local_chat_completions_equal_hf_peft(setup, many, adapter):
    from tests.serve.conftest import live

    base, tasks = setup
    reference = _reference(base, tasks, adapter, many, (GEN,), chat=True)
    with live(many, make_engine(many)) as (url, _):
        ours = _evaluate("local-chat-completions", {
            "base_url": f"{url}/v1/chat/completions", "model": adapter or BASE_NAME,
            "tokenizer_backend": "none", "tokenized_requests": False, "max_retries": 1,
            "batch_size": 1,
        }, tasks, (GEN,), chat=True)
    _same_generations(ours[GEN], reference[GEN])
