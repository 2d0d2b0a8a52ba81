"""One rank in process: the latent cache is sized once the weights are loaded (on a GPU the budget comes
from the free device memory, which must not count the memory the weights are about to take)."""

from __future__ import annotations

from moeserve.coordinator.config import EngineConfig
from moeserve.coordinator.engine import Engine
from moeserve.coordinator.engine_setup import replica_layout
from moeserve.coordinator.inproc_executor import InProcessExecutor, cache_bytes_per_token
from moeserve.model.config import ModelConfig


def test_the_cache_is_sized_after_the_weights_load(ckpt_factory) -> None:
    path = ckpt_factory("v3_noaux_norm")
    config = EngineConfig(model=str(path), device="cpu", max_num_seqs=4, max_num_batched_tokens=64)
    asked: list[tuple[int, bool]] = []

    def size_cache(per_token: int) -> int:
        import gc

        from moeserve.model.deepseek import DeepseekModel
        loaded = any(isinstance(o, DeepseekModel) for o in gc.get_objects())
        asked.append((per_token, loaded))
        return 7

    engine = Engine(config, launcher=InProcessExecutor.launcher(size_cache=size_cache))
    try:
        model = engine.executor.runner.model
        assert asked == [(cache_bytes_per_token(model), True)]  # once, with the model already built
        assert engine.executor.num_blocks == 7 == engine.kv.num_blocks
        _, layout = replica_layout(config, ModelConfig.from_hf(path))
        assert layout.num_blocks != 7  # the layout's own estimate was not used
    finally:
        engine.close()
