"""DeepSpeed configs come from one pure function; the committed JSON files are its output."""

import json

import pytest

from rlhfkit.deepspeed import PRESETS, deepspeed_config
from tests.conftest import REPO


def test_zero3_gathers_16bit_weights_on_save():
    config = deepspeed_config(3)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert config["train_micro_batch_size_per_gpu"] == "auto"


def test_offload_and_validation():
    config = deepspeed_config(3, offload_optimizer=True, offload_params=True, precision="bf16")
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["bf16"]["enabled"] is True and config["fp16"]["enabled"] is False
    with pytest.raises(ValueError):
        deepspeed_config(2, offload_params=True)
    with pytest.raises(ValueError):
        deepspeed_config(4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_committed_presets_match_builder(name):
    committed = json.loads((REPO / "configs" / "deepspeed" / name).read_text())
    assert committed == json.loads(json.dumps(deepspeed_config(**PRESETS[name])))
