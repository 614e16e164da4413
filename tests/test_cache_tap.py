"""CacheTap observes exactly the keys/values transformers attention modules write to their cache.

Tiny random-weight Llama, Qwen2, Qwen3 (q/k norm), Mistral and Gemma models (2 layers, GQA)
are built once per module from local configs; nothing is downloaded.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from models import K_PROJ, tiny_decoder
from torch import Tensor, nn

from kvcal.calibration.cache_tap import CacheSlot, CacheTap, cache_slots, has_cache_tap
from kvcal.errors import ConfigError

transformers = pytest.importorskip("transformers")

from hf_models import ARCHS, BATCH, HEAD_DIM, KV_HEADS, KV_NAMES, SEQ, VOCAB, build  # noqa: E402


@pytest.fixture(scope="module", params=list(ARCHS))
def hf_model(request: pytest.FixtureRequest) -> nn.Module:
    return build(request.param)


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return build("llama")


@pytest.fixture(scope="module")
def inputs() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding in the second row
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def run_tapped(
    model: nn.Module, names: list[str], kwargs: dict[str, object], callback: Callable[[str, Tensor], None] | None = None
) -> tuple[dict[str, list[Tensor]], object]:
    """One forward under a CacheTap; returns what the callback saw per layer and the model output."""
    seen: dict[str, list[Tensor]] = {}
    tap = CacheTap(model, cache_slots(model, names), callback or (lambda n, t: seen.setdefault(n, []).append(t)))
    with torch.no_grad(), tap:
        output = model(**tap.call_kwargs(kwargs))
    return seen, output


def as_channels(states: Tensor) -> Tensor:
    """Cache layout [batch, kv_heads, seq, head_dim] -> [batch, seq, kv_heads*head_dim]."""
    batch, _, seq, _ = states.shape
    return states.transpose(1, 2).reshape(batch, seq, -1)


def assert_no_hooks(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_observed_tensors_equal_the_cache(hf_model: nn.Module, inputs: dict[str, Tensor]) -> None:
    seen, output = run_tapped(hf_model, KV_NAMES, inputs)
    assert sorted(seen) == sorted(KV_NAMES)
    for i, layer in enumerate(output.cache.layers):
        keys = seen[f"model.layers.{i}.self_attn.k_proj"]
        values = seen[f"model.layers.{i}.self_attn.v_proj"]
        assert len(keys) == len(values) == 1
        assert keys[0].shape == (BATCH, SEQ, KV_HEADS * HEAD_DIM)
        assert torch.equal(keys[0], as_channels(layer.keys))
        assert torch.equal(values[0], as_channels(layer.values))
    assert_no_hooks(hf_model)


def test_logits_unchanged_by_the_tap(hf_model: nn.Module, inputs: dict[str, Tensor]) -> None:
    with torch.no_grad():
        plain = hf_model(**inputs, use_cache=True).logits
    _, output = run_tapped(hf_model, KV_NAMES, inputs)
    assert torch.equal(output.logits, plain)


def test_everything_removed_when_the_callback_raises(llama: nn.Module, inputs: dict[str, Tensor]) -> None:
    def fail(name: str, tensor: Tensor) -> None:
        raise RuntimeError(f"observer failed on {name}")

    with torch.no_grad():
        before = llama(**inputs, use_cache=True).logits
    cache = transformers.DynamicCache(config=llama.config)
    with pytest.raises(RuntimeError, match="observer failed on model.layers.0.self_attn.k_proj"):
        run_tapped(llama, KV_NAMES, {**inputs, "cache": cache}, callback=fail)
    assert_no_hooks(llama)
    assert "update" not in vars(cache)
    with torch.no_grad():
        after = llama(**inputs, use_cache=True).logits
    assert torch.equal(after, before)


def test_qwen3_keys_are_normed_and_rotated_not_the_k_proj_output(inputs: dict[str, Tensor]) -> None:
    model = build("qwen3")
    projected: dict[str, Tensor] = {}
    attention = model.model.layers[0].self_attn
    handles = [
        getattr(attention, p).register_forward_hook(lambda m, a, out, p=p: projected.__setitem__(p, out))
        for p in ("k_proj", "v_proj")
    ]
    try:
        seen, _ = run_tapped(model, KV_NAMES[:2], inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert seen["model.layers.0.self_attn.k_proj"][0].shape == projected["k_proj"].shape
    assert not torch.allclose(seen["model.layers.0.self_attn.k_proj"][0], projected["k_proj"])
    # Values get neither norm nor RoPE: the cache holds the v_proj output itself.
    assert torch.equal(seen["model.layers.0.self_attn.v_proj"][0], projected["v_proj"])


def test_only_the_configured_slot_is_reported(llama: nn.Module, inputs: dict[str, Tensor]) -> None:
    seen, output = run_tapped(llama, ["model.layers.1.self_attn.v_proj"], inputs)
    assert list(seen) == ["model.layers.1.self_attn.v_proj"]
    assert torch.equal(seen["model.layers.1.self_attn.v_proj"][0], as_channels(output.cache.layers[1].values))


def test_each_forward_reports_only_the_new_tokens(llama: nn.Module, inputs: dict[str, Tensor]) -> None:
    seen: dict[str, list[Tensor]] = {}
    tap = CacheTap(llama, cache_slots(llama, KV_NAMES), lambda n, t: seen.setdefault(n, []).append(t))
    step = torch.tensor([[5], [6]])
    with torch.no_grad(), tap:
        first = llama(**tap.call_kwargs(inputs))
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
        llama(**tap.call_kwargs({"input_ids": step, "attention_mask": mask, "cache": first.cache}))
    keys = seen["model.layers.1.self_attn.k_proj"]
    assert [k.shape[1] for k in keys] == [SEQ, 1]
    assert torch.equal(torch.cat(keys, dim=1), as_channels(first.cache.layers[1].keys))


def test_sliding_window_cache_keeps_the_tail_of_what_was_written(inputs: dict[str, Tensor]) -> None:
    model = build("mistral", sliding_window=4)
    seen, output = run_tapped(model, KV_NAMES, inputs)
    stored = as_channels(output.cache.layers[0].keys)
    assert stored.shape[1] == 3  # DynamicSlidingWindowLayer keeps the last sliding_window - 1 tokens
    observed = seen["model.layers.0.self_attn.k_proj"][0]
    assert observed.shape[1] == SEQ and torch.equal(observed[:, -3:], stored)


def test_encoder_decoder_sub_caches_are_tapped() -> None:
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config).eval()
    names = ["model.decoder.layers.0.self_attn.k_proj", "model.decoder.layers.0.encoder_attn.v_proj"]
    ids = torch.randint(3, VOCAB, (2, 8))
    seen, output = run_tapped(model, names, {"input_ids": ids, "decoder_input_ids": ids[:, :5]})
    assert torch.equal(seen[names[0]][0], as_channels(output.cache.self_attention_cache.layers[0].keys))
    assert torch.equal(seen[names[1]][0], as_channels(output.cache.cross_attention_cache.layers[0].values))
    assert not has_cache_tap(model)  # `--tap auto` keeps encoder-decoder models on the projection tap


def test_call_kwargs_forces_use_cache_without_mutating(llama: nn.Module) -> None:
    tap = CacheTap(llama, cache_slots(llama, KV_NAMES), lambda n, t: None)
    given = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "use_cache": False}
    assert tap.call_kwargs(given) == {**given, "use_cache": True}
    assert given["use_cache"] is False


def test_cache_slots_map_layers_to_their_attention(llama: nn.Module) -> None:
    slots = cache_slots(llama, ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"])
    assert slots == {
        "model.layers.1.self_attn.k_proj": CacheSlot("model.layers.1.self_attn", 1, "key"),
        "model.layers.1.self_attn.v_proj": CacheSlot("model.layers.1.self_attn", 1, "value"),
    }


@pytest.mark.parametrize(
    "name", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj"]
)
def test_cache_slots_reject_layers_that_are_not_k_or_v(llama: nn.Module, name: str) -> None:
    with pytest.raises(ConfigError) as info:
        cache_slots(llama, [name])
    assert name in str(info.value) and "--tap proj" in str(info.value)


def test_cache_slots_reject_a_parent_without_layer_idx() -> None:
    with pytest.raises(ConfigError) as info:
        cache_slots(tiny_decoder(), [K_PROJ])
    message = str(info.value)
    assert K_PROJ in message and "layer_idx" in message and "--tap proj" in message


def test_cache_slots_reject_an_unknown_layer(llama: nn.Module) -> None:
    with pytest.raises(ConfigError, match="model.layers.9.self_attn.k_proj"):
        cache_slots(llama, ["model.layers.9.self_attn.k_proj"])


def test_has_cache_tap(hf_model: nn.Module) -> None:
    assert has_cache_tap(hf_model)
    assert not has_cache_tap(tiny_decoder())


def test_has_cache_tap_does_not_import_transformers() -> None:
    code = (
        "import sys; from models import tiny_decoder; from kvcal.calibration.cache_tap import has_cache_tap; "
        "assert not has_cache_tap(tiny_decoder()); assert 'transformers' not in sys.modules"
    )
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
