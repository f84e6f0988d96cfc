"""card.json: typed and checked when it goes into the store (a bad card is refused, naming
the field), kept by add and replace, defaults for adapters without one, and written by
`store add --card` and the trainer's --display-name / --description."""

import json
import logging

import pytest

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.card_files import (
    CARD_NAME,
    PALETTE,
    Card,
    CardError,
    card_or_default,
    default_card,
    read_card,
    write_card,
)
from loratree.cli.main import main
from loratree.config import LoraConfig
from loratree.models.tiny import tiny_llama
from loratree.train import TrainConfig

GOOD = {"display_name": "Jeeves", "description": "A formal butler.", "color": "#34495e",
        "avatar": "J"}


@pytest.fixture
def lora_dir(tmp_path):
    model = tiny_llama()
    surgery.inject(model, LoraConfig(rank=2, targets=("q_proj",)))
    return save_adapter(model, tmp_path / "src")


def test_defaults_come_from_the_name():
    card = default_card("support/fr-formal_v2")
    assert card.display_name == "Fr Formal V2"
    assert card.description == "" and card.avatar == ""
    assert card.color in PALETTE and card.color == default_card("support/fr-formal_v2").color


@pytest.mark.parametrize(("change", "field"), [
    ({"display_name": ""}, "display_name"),
    ({"display_name": "x" * 61}, "display_name"),
    ({"display_name": "two\nlines"}, "display_name"),
    ({"description": "y" * 201}, "description"),
    ({"color": "red"}, "color"),
    ({"color": 3}, "color"),
    ({"avatar": "ABCDE"}, "avatar"),
    ({"mood": "grumpy"}, "mood"),
])
def test_a_bad_card_is_refused_at_add_naming_the_field(lora_dir, tmp_path, change, field):
    (lora_dir / CARD_NAME).write_text(json.dumps({**GOOD, **change}))
    store = AdapterStore(tmp_path / "store")
    with pytest.raises(CardError, match=field):
        store.add("jeeves", lora_dir)
    assert "jeeves" not in store


@pytest.mark.parametrize("text", ["not json", "[1, 2]", "\xff"])
def test_a_card_that_is_not_a_json_object_is_refused(lora_dir, tmp_path, text):
    (lora_dir / CARD_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(CardError, match="card"):
        AdapterStore(tmp_path / "store").add("x", lora_dir)


def test_add_keeps_the_card_and_a_damaged_card_at_serve_time_gives_defaults(
        lora_dir, tmp_path, caplog):
    write_card(lora_dir, GOOD)
    store = AdapterStore(tmp_path / "store")
    store.add("butler", lora_dir)
    version = store.path_of("butler")
    assert read_card(version, "butler") == Card(**GOOD)
    (version / CARD_NAME).chmod(0o644)
    (version / CARD_NAME).write_text("{broken")  # damage at rest, after the add
    with caplog.at_level(logging.WARNING):
        assert card_or_default(version, "butler") == default_card("butler")
    assert "butler" in caplog.text and CARD_NAME in caplog.text


def test_store_add_with_card_flag(lora_dir, tmp_path, capsys):
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"display_name": "Captain Flint"}))
    store = tmp_path / "store"
    assert main(["store", "--store", str(store), "add", "pirate", str(lora_dir),
                 "--card", str(card)]) == 0
    got = read_card(AdapterStore(store).path_of("pirate"), "pirate")
    assert got.display_name == "Captain Flint" and got.color == default_card("pirate").color
    assert not (lora_dir / CARD_NAME).exists()  # the source is left as it was
    card.write_text(json.dumps({"display_name": "x", "colour": "#ffffff"}))
    assert main(["store", "--store", str(store), "add", "bad", str(lora_dir),
                 "--card", str(card)]) == 2
    assert "colour" in capsys.readouterr().err
    assert "bad" not in AdapterStore(store)
    assert not [p for p in (store / ".objects").iterdir() if p.name.startswith(".card-")]


def test_trainer_card_fields_are_checked():
    assert TrainConfig(data="x.jsonl", display_name="Jeeves").display_name == "Jeeves"
    with pytest.raises(ValueError, match="display_name"):
        TrainConfig(data="x.jsonl", display_name="a\nb")
    with pytest.raises(ValueError, match="description"):
        TrainConfig(data="x.jsonl", description="d" * 300)


def test_the_trainer_writes_the_card_and_the_store_keeps_it(tmp_path):
    from loratree.models.tiny import tiny_tokenizer
    from loratree.train import train

    records = [{"prompt": "w5 w6", "completion": "w6 w5"}]
    out = tmp_path / "butler"
    train(TrainConfig(out=str(out), max_steps=1, batch_size=1, rank=2,
                      display_name="Jeeves", description="A formal butler."),
          model=tiny_llama(vocab=64), tokenizer=tiny_tokenizer(64), rows=records,
          progress=False)
    assert json.loads((out / CARD_NAME).read_text()) == {"display_name": "Jeeves",
                                                         "description": "A formal butler."}
    store = AdapterStore(tmp_path / "store")
    store.add("butler", out)
    card = read_card(store.path_of("butler"), "butler")
    assert (card.display_name, card.description) == ("Jeeves", "A formal butler.")
