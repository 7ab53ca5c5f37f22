import pytest
from transformers import AutoConfig

from sparse_llava import DynamicLlavaConfig
from sparse_llava.tiny import tiny_base_config


def make(**overrides):
    return DynamicLlavaConfig.from_base_config(tiny_base_config("llava"), **overrides)


def test_defaults_are_the_papers():
    config = make()
    assert config.model_type == "dynamic_llava"
    assert config.base_model_type == "llava"
    expected = dict(
        sparse_layer=2,
        vision_keep_ratio=0.2,
        text_sparsification=True,
        predictor_hidden_size=512,
        predictor_num_heads=8,
        predictor_intermediate_size=2048,
        predictor_num_layers=2,
        output_text_keep_ratio=0.5,
        output_text_min_length=50,
        mask_loss_weight=100.0,
        gumbel_tau_start=1.0,
        gumbel_tau_end=0.1,
    )
    assert {key: getattr(config, key) for key in expected} == expected


def test_base_fields_are_carried():
    base = tiny_base_config("llava_next")
    config = DynamicLlavaConfig.from_base_config(base)
    assert config.base_model_type == "llava_next"
    assert config.image_token_id == base.image_token_id
    assert config.image_grid_pinpoints == base.image_grid_pinpoints
    assert config.text_config.to_dict() == base.text_config.to_dict()
    assert config.vision_config.hidden_size == base.vision_config.hidden_size


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_keep_ratio": 0.0}, "vision_keep_ratio must be a number in (0, 1]"),
        ({"vision_keep_ratio": 1.5}, "vision_keep_ratio must be a number in (0, 1]"),
        ({"vision_keep_ratio": "0.5"}, "vision_keep_ratio must be a number in (0, 1]"),
        ({"output_text_keep_ratio": -1}, "output_text_keep_ratio"),
        ({"sparse_layer": 4}, "sparse_layer must be below the number of decoder layers (4)"),
        ({"sparse_layer": -1}, "sparse_layer must be an integer >= 0"),
        ({"predictor_hidden_size": 30}, "divisible by 4 and by predictor_num_heads"),
        ({"text_sparsification": "yes"}, "text_sparsification must be true or false"),
        ({"base_model_type": "qwen2_vl"}, "base_model_type must be one of"),
    ],
)
def test_bad_values_name_the_problem(overrides, message):
    with pytest.raises(ValueError) as error:
        make(**overrides)
    assert message in str(error.value)


def test_rejects_a_base_that_is_not_llava():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="LLaVA-1.5 or LLaVA-NeXT"):
        DynamicLlavaConfig.from_base_config(LlamaConfig())


def test_round_trip_through_json(tmp_path):
    import sparse_llava

    sparse_llava.register_auto_classes()
    config = make(vision_keep_ratio=0.5, sparse_layer=1)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DynamicLlavaConfig)
    ignored = {"_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignored} == {
        k: v for k, v in config.to_dict().items() if k not in ignored
    }
