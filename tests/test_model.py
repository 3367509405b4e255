"""Model and loader against Hugging Face transformers: logits, config layouts, checkpoint errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcpd.attention import create_unified_wrapper
from dcpd.batch import BatchRequest, DCPPlanConfig
from dcpd.model.config import ModelConfig, ModelLoadError
from dcpd.model.default import build_default_model
from dcpd.model.loader import load_model_dir
from dcpd.model.tokenizer import ByteTokenizer, load_tokenizer
from tests.hf_models import make_checkpoint


def dcpd_logits(loaded, prompt: list[int]) -> torch.Tensor:
    """All-position logits of one prompt through the paged attention path."""
    cfg = loaded.config
    wrapper = create_unified_wrapper(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, num_layers=cfg.num_layers,
        config=DCPPlanConfig(kv_cache_bytes=8 << 20), dtype=next(loaded.model.parameters()).dtype,
    )  # fmt: skip
    blocks = wrapper.kv_cache.pool.allocate(-(-len(prompt) // 16))
    plan = wrapper.plan([BatchRequest("p", prompt, len(prompt), block_ids=blocks)])
    with torch.inference_mode():
        return loaded.model(torch.tensor(prompt), plan.positions, wrapper, plan)


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {}),
        ("llama", {"tie": True, "kv_heads": 1}),
        ("llama", {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("qwen2", {}),
    ],
)  # fmt: skip
def test_prefill_logits_match_transformers(tmp_path: Path, arch: str, options: dict) -> None:
    hf = make_checkpoint(tmp_path, arch, **options)
    loaded = load_model_dir(tmp_path)
    prompt = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = dcpd_logits(loaded, prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_old_config_layout_gives_the_same_model(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 128}  # fmt: skip
    make_checkpoint(tmp_path, "llama", rope_theta=300000.0, rope_scaling=dict(scaling))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in cfg  # transformers 5 layout
    new = ModelConfig.from_hf_dict(cfg)
    old_cfg = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    old_cfg["rope_theta"] = 300000.0
    old_cfg["rope_scaling"] = {"type": "llama3", **{k: v for k, v in scaling.items() if k != "rope_type"}}
    old = ModelConfig.from_hf_dict(old_cfg)
    assert old.rope_theta == new.rope_theta == 300000.0
    assert old.rope_scaling == new.rope_scaling
    torch.testing.assert_close(old.rope_inv_freq(), new.rope_inv_freq())


def test_sharded_checkpoint_and_dtypes(tmp_path: Path) -> None:
    hf = make_checkpoint(tmp_path, "llama", max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    prompt = list(range(3, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(dcpd_logits(load_model_dir(tmp_path), prompt), ref, atol=1e-4, rtol=1e-4)
    for dtype, tol in (("bfloat16", 0.1), ("float16", 0.02)):
        loaded = load_model_dir(tmp_path, dtype=dtype)
        assert next(loaded.model.parameters()).dtype == getattr(torch, dtype)
        assert loaded.model.inv_freq.dtype == torch.float32
        torch.testing.assert_close(dcpd_logits(loaded, prompt), ref, atol=tol, rtol=tol)


def _rewrite(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*layers.1.mlp.up_proj"),
        (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}), "unexpected tensor.*extra"),
        (lambda t: t.update({"model.norm.weight": torch.zeros(63)}), r"model.norm.weight has shape \(63,\)"),
    ],
)
def test_bad_checkpoints_name_the_tensor(tmp_path: Path, mutate, message: str) -> None:
    make_checkpoint(tmp_path, "llama")
    _rewrite(tmp_path, mutate)
    with pytest.raises(ModelLoadError, match=message):
        load_model_dir(tmp_path)


def test_bad_configs_name_the_field(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, message in (
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope type 'yarn' is not supported"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
        ({"hidden_size": None}, "hidden_size"),
    ):
        bad = {k: v for k, v in {**cfg, **change}.items() if v is not None}
        with pytest.raises(ModelLoadError, match=message):
            ModelConfig.from_hf_dict(bad)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_model_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="dtype 'int8'"):
        load_model_dir(tmp_path, dtype="int8")


def test_tokenizers(tmp_path: Path) -> None:
    byte = ByteTokenizer()
    text = "héllo, wörld ✓"
    assert byte.decode(byte.encode(text)) == text and max(byte.encode(text)) < 256
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": {"content": "<s>"}}))
    hf_tok = load_tokenizer(tmp_path)
    assert hf_tok.encode("hello world") == [3, 4]
    assert hf_tok.eos_token_ids == (2,) and hf_tok.bos_token_id == 1
    assert hf_tok.decode([1, 3, 4, 2]) == "hello world"  # special tokens are skipped
    # a post-processor that adds BOS (as Llama's tokenizer.json has) is applied, like transformers does
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("hello world") == [1, 3, 4]


def test_default_model_is_deterministic() -> None:
    a, b = build_default_model(), build_default_model()
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.config.vocab_size == ByteTokenizer.vocab_size and a.source == "embedded-default"
