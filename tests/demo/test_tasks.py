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
