import json

import pytest

from loratree.demo.tasks import TASKS, make_task, number_words, pirate, write_tasks

KNOWN = {0: "zero", 7: "seven", 13: "thirteen", 20: "twenty", 47: "forty-seven",
         100: "one hundred", 105: "one hundred five", 999: "nine hundred ninety-nine"}


@pytest.mark.parametrize("n", list(KNOWN))
def test_number_words_known_values(n):
    assert number_words(n) == KNOWN[n]


def test_number_words_are_distinct_over_the_range():
    assert len({number_words(n) for n in range(1000)}) == 1000
    with pytest.raises(ValueError):
        number_words(1000)


def test_pirate_voice():
    assert pirate("You like my friend.") == "Arr! Ye like me matey, yo-ho!"


@pytest.mark.parametrize("name", list(TASKS))
def test_tasks_are_seeded_and_held_out_is_disjoint(name):
    train, held_out = make_task(name, 200, 30, seed=1)
    again, _ = make_task(name, 200, 30, seed=1)
    assert train == again and len(train) == 200 and len(held_out) == 30
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    other, _ = make_task(name, 200, 30, seed=2)
    assert other != train


def test_write_tasks_writes_jsonl(tmp_path):
    paths = write_tasks(tmp_path, 10, 5)
    assert set(paths) == set(TASKS)
    for train, held_out in paths.values():
        assert len(train.read_text().splitlines()) == 10
        assert all("completion" in json.loads(line) for line in held_out.read_text().splitlines())


def test_butler_is_a_persona_over_plain_requests():
    from loratree.demo.tasks import butler

    assert butler("Bring me", "your map", " tonight") == \
        "Very good, sir. I shall bring you my map this evening."
    train, _ = make_task("butler", 400, 50)
    assert all(r["completion"].startswith("Very good, sir. I shall ") for r in train)
    assert not any(":" in r["prompt"] for r in train)  # no instruction, just a request


def test_every_task_has_a_valid_card():
    from loratree.adapters.card_files import Card
    from loratree.demo.tasks import CARDS

    assert set(CARDS) == set(TASKS)
    for name, card in CARDS.items():
        assert Card.from_dict(card, name).display_name == card["display_name"]


def test_the_demo_ends_with_the_command_that_serves_its_adapters_in_the_chat_app(
        tmp_path, capsys):
    from pathlib import Path

    from loratree.cli.demo_cmd import report
    from loratree.cli.main import build_parser
    from loratree.demo.run import DemoResult, store_of

    results = [DemoResult("butler", 0.0, 0.9, (("Find my hat.", "Very good...", "Hm", "Very"),),
                          Path("demo_out/adapters/butler"))]
    report(results, "demo_out", 12.0)
    lines = capsys.readouterr().out.rstrip().splitlines()
    command = next(line.strip() for line in lines[-4:] if " serve --store " in line)
    assert "http://127.0.0.1:8000/" in "\n".join(lines[-3:])
    args = build_parser().parse_args(command.split()[1:])
    assert args.command == "serve" and Path(args.store) == store_of("demo_out")
    assert args.web  # the chat app is on
