"""Each layer's attention kind from the config, and kinds loratree cannot run refused."""

import pytest
from transformers import Qwen2Config, Qwen2ForCausalLM

from loratree.errors import UnsupportedModelError
from loratree.models.attention import check_attention, layer_windows, sliding_window
from loratree.models.families import FAMILIES, SLIDING, WINDOW, tiny_family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_windows_follow_the_config(family):
    model = tiny_family(family)
    windows = layer_windows(model)
    assert len(windows) == model.config.get_text_config().num_hidden_layers
    assert sliding_window(model) == (WINDOW if family in SLIDING else None)
    check_attention(model)


def test_hybrid_models_say_which_layers_slide():
    assert layer_windows(tiny_family("gemma3")) == (WINDOW, WINDOW, None)
    assert layer_windows(tiny_family("gemma2")) == (WINDOW, None)
    assert layer_windows(tiny_family("mistral")) == (WINDOW, WINDOW)


def test_a_window_the_family_turns_off_is_no_window():
    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         sliding_window=4, use_sliding_window=False)
    assert sliding_window(Qwen2ForCausalLM(config)) is None


def test_an_attention_kind_loratree_does_not_run_is_refused_by_name():
    model = tiny_family("qwen2")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match=r"qwen2.*linear_attention"):
        check_attention(model)
    model.config.layer_types = ["full_attention", "full_attention"]
    model.config.attention_chunk_size = 8
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        check_attention(model)
