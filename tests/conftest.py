"""Tiny random-init models and synthetic multi-task data for fast tests."""

import copy
import os

import pytest
import torch

from bora.data.documents import TokenizedSplit

VOCAB = 48

# Tiny models gain nothing from intra-op threads, and oversubscribed OpenMP threads make a
# shared 2-core machine many times slower: keep the tests single-threaded.
torch.set_num_threads(1)

# precision='auto' runs bf16 on CPUs with AMX; pin the tests' arithmetic to fp32 whatever CPU runs them, in
# this process and in the ones it starts (tests of bf16 itself ask for precision='bf16')
os.environ["BORA_CPU_BF16"] = "0"


def tiny_llama(layers: int = 3, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def adapted_tiny_llama(num_tasks: int, layers: int = 3):
    """``(lm, adapters, params)``: a tiny Llama with rank-2 adapters on every projection and random task adapters
    ``key -> (A [T, r, in], B [T, out, r])`` (sd 0.3, seed 0), for likelihood tests against plain transformers."""
    from bora.core.config import AdapterConfig
    from bora.lora.inject import inject_adapters_

    lm = tiny_llama(layers=layers)
    adapters = inject_adapters_(lm, AdapterConfig(rank=2, layers=None))
    g = torch.Generator().manual_seed(0)
    params = {k: (0.3 * torch.randn(num_tasks, *a, generator=g), 0.3 * torch.randn(num_tasks, *b, generator=g))
              for k, (a, b) in adapters.shapes().items()}
    return lm, adapters, params


def tiny_gpt2(layers: int = 3, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_opt(layers: int = 3, seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0)
    return OPTForCausalLM(cfg).eval()


class TinyTokenizer:
    pad_token_id = 0


def task_data(n_per_task=(24, 12, 6), seed: int = 0, tasks=None) -> TokenizedSplit:
    """Documents whose even positions carry a task-specific token: adapters can learn it."""
    g = torch.Generator().manual_seed(seed)
    ids, tids = [], []
    for t, n in enumerate(n_per_task):
        for _ in range(n):
            L = int(torch.randint(6, 14, (1,), generator=g))
            x = torch.randint(5, VOCAB, (L,), generator=g)
            x[::2] = 1 + t
            ids.append(x)
            tids.append(t)
    names = tuple(tasks or [f"task{t}" for t in range(len(n_per_task))])
    return TokenizedSplit(ids, torch.tensor(tids), names)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def fresh():
    """Deep copies, so tests can inject adapters into independent models."""
    return copy.deepcopy


# A chat template for the word-level tokenizer: a role word (user w1, assistant w2, system w3), the content and an
# end-of-turn word w4; the generation prompt is the assistant's role word.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ {'user': 'w1', 'assistant': 'w2', 'system': 'w3'}[m['role']] }} "
                      "{{ m['content'] }} w4 {% endfor %}{% if add_generation_prompt %}w2 {% endif %}")


def tiny_tokenizer(chat_template=None):
    """A fast word-level tokenizer of ``<pad> <unk> w0 ... w45`` (ids 0..47), optionally with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tiny_model_dir(path, layers: int = 3, seed: int = 0, chat_template=None):
    """Save a tiny Llama and a word-level tokenizer as a from_pretrained folder (offline)."""
    tok = tiny_tokenizer(chat_template)
    tiny_llama(layers, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path, sizes=(20, 10, 6), seed=0):
    """A JSONL file with 'text' and 'speaker' columns; each speaker favours its own words."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for t, n in enumerate(sizes):
            for _ in range(n):
                words = [f"w{t}" if i % 2 == 0 else f"w{rng.randrange(5, VOCAB - 2)}"
                         for i in range(rng.randrange(5, 12))]
                f.write(json.dumps({"text": " ".join(words), "speaker": f"spk{t}"}) + "\n")
    return path
