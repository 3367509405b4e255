"""Load a local Hugging Face model directory (no network): config, safetensors weights, generation config."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from dcpd.model.config import ModelConfig, ModelLoadError
from dcpd.model.llama import LlamaForCausalLM
from dcpd.model.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
# Tensors some checkpoints carry that the model recomputes.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    stop_token_ids: tuple[int, ...]  # from generation_config.json, config.json and the tokenizer
    source: str  # the model directory, or "embedded-default"


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not supported (choose one of {sorted(DTYPES)})")
    return DTYPES[name]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: invalid JSON ({exc})") from None


def _expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape for this config."""
    h, d = config.hidden_size, config.head_dim
    q, kv, inter = config.num_heads * d, config.num_kv_heads * d, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if config.qkv_bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if config.mlp_bias:
            shapes |= {
                p + "mlp.gate_proj.bias": (inter,),
                p + "mlp.up_proj.bias": (inter,),
                p + "mlp.down_proj.bias": (h,),
            }
    return shapes


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: missing 'weight_map'")
        files = sorted({model_dir / name for name in weight_map.values()})
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{index}: shard {f.name} not found")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def load_weights(model: LlamaForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
    """Validate Hugging Face tensors against the config and copy them into the fused model."""
    config = model.config
    expected = _expected_tensors(config)
    if config.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}  # tied: may be stored anyway
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint is missing tensor(s) {missing[:5]}{more}")
    extra = sorted(k for k in set(tensors) - set(expected) if not IGNORED.fullmatch(k))
    if extra:
        raise ModelLoadError(f"checkpoint has unexpected tensor(s) {extra[:5]} for {config.architecture}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(tensors[name].shape)}, config implies {shape}")

    def put(param: torch.Tensor, *names: str) -> None:
        with torch.no_grad():
            param.copy_(torch.cat([tensors[n] for n in names]) if len(names) > 1 else tensors[names[0]])

    put(model.embed_tokens.weight, "model.embed_tokens.weight")
    put(model.norm.weight, "model.norm.weight")
    if not config.tie_word_embeddings:
        put(model.lm_head.weight, "lm_head.weight")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        put(layer.input_layernorm.weight, p + "input_layernorm.weight")
        put(layer.post_attention_layernorm.weight, p + "post_attention_layernorm.weight")
        put(attn.qkv_proj.weight, *(p + f"self_attn.{x}_proj.weight" for x in "qkv"))
        put(attn.o_proj.weight, p + "self_attn.o_proj.weight")
        put(mlp.gate_up_proj.weight, p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        put(mlp.down_proj.weight, p + "mlp.down_proj.weight")
        if config.qkv_bias:
            put(attn.qkv_proj.bias, *(p + f"self_attn.{x}_proj.bias" for x in "qkv"))
        if config.o_bias:
            put(attn.o_proj.bias, p + "self_attn.o_proj.bias")
        if config.mlp_bias:
            put(mlp.gate_up_proj.bias, p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias")
            put(mlp.down_proj.bias, p + "mlp.down_proj.bias")


def load_model_dir(
    model_dir: str | Path, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> LoadedModel:
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    config = ModelConfig.from_hf_dict(_read_json(path / "config.json"))
    torch_dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device)
    model.inv_freq = config.rope_inv_freq().to(device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, read_checkpoint(path))
    model = model.to(torch_dtype).eval()
    model.inv_freq = config.rope_inv_freq().to(device)  # stays float32
    tokenizer = load_tokenizer(path)
    stop = set(config.eos_token_ids) | set(tokenizer.eos_token_ids)
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        eos = _read_json(gen_path).get("eos_token_id")
        stop |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return LoadedModel(model, config, tokenizer, tuple(sorted(stop)), str(path))


@dataclass(frozen=True)
class ModelSpec:
    """A model without its weights: what a router needs to tokenize and check requests."""

    config: ModelConfig
    tokenizer: Tokenizer
    source: str


def load_model_spec(model_dir: str | Path | None) -> ModelSpec:
    if model_dir is None:
        from dcpd.model.default import default_config
        from dcpd.model.tokenizer import ByteTokenizer

        return ModelSpec(default_config(), ByteTokenizer(), "embedded-default")
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist")
    return ModelSpec(ModelConfig.from_hf_dict(_read_json(path / "config.json")), load_tokenizer(path), str(path))
